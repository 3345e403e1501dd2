"""The transformers pipelines that travel with the models: `anomaly-detection` (MAF / IAF) and `image-translation`
(CycleGAN).

- save_pretrained writes `custom_pipelines` in config.json and the pipeline file, and
  `pipeline(task, model=<folder>, trust_remote_code=True)` builds the pipeline from the folder's copy; its outputs are
  the model's own (scores and maps of the same pixel values, `translate` of the same image).
- A fresh interpreter that cannot import this project gets the same results from a local folder and from a Hub repo
  id (loopback Hub), the pipeline code coming with the model.
"""

import json
import textwrap

import numpy as np
import pytest
from PIL import Image
from transformers import pipeline

from child_process import WITHOUT_HF_DGM, run_without_hf_dgm
from hf_dgm_training.data.anomaly import images_to_tensor
from modeling_cyclegan import ImageTranslationPipeline
from modeling_maf import AnomalyDetectionPipeline, IAFConfig, IAFModel, MAFConfig, MAFModel
from modeling_maf.anomaly_scores import NOT_CALIBRATED
from modeling_maf.heatmap_maf import NOT_CALIBRATED_NOTE, heatmap_scale
from modeling_maf.pipeline_maf import heatmap_overlay, jet_colors, with_colorbar
from test_hub_models import randomize, tiny_cyclegan


def tiny_flow(model_class=MAFModel, config_class=MAFConfig, seed=0):
    config = config_class(image_size=6, num_channels=3, hidden_sizes=[16, 16], num_blocks=2)
    return randomize(model_class(config), seed, std=0.05).eval()


def make_image(seed=0, size=(20, 14), mode="RGB"):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    return image.convert(mode)


def as_array(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def maf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("maf") / "model"
    model = tiny_flow()
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def calibrated_maf_folder(tmp_path_factory):
    """A MAF calibrated on 12 'good' images (random ones: the test compares the pipeline with the model, whatever
    the verdicts), at a target false-positive rate that makes some of them anomalous."""
    folder = tmp_path_factory.mktemp("maf-calibrated") / "model"
    model = tiny_flow(seed=1)
    good = images_to_tensor([make_image(100 + index) for index in range(12)], model.config.image_size)
    model.calibrate(good, target_fpr=0.25)
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def cyclegan_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cyclegan") / "model"
    model = tiny_cyclegan()
    model.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("task, fixture, file_name, class_name", [
    ("anomaly-detection", "maf_folder", "pipeline_maf.py", "AnomalyDetectionPipeline"),
    ("image-translation", "cyclegan_folder", "pipeline_cyclegan.py", "ImageTranslationPipeline"),
])
def test_save_pretrained_names_the_pipeline_in_config_and_copies_its_file(request, task, fixture, file_name,
                                                                         class_name):
    folder, _ = request.getfixturevalue(fixture)
    config = json.loads((folder / "config.json").read_text())
    module = file_name.removesuffix(".py")
    assert config["custom_pipelines"] == {task: {"impl": f"{module}.{class_name}", "pt": ["AutoModel"],
                                                 "type": "image"}}
    assert (folder / file_name).is_file()
    built = pipeline(task, model=str(folder), trust_remote_code=True, device="cpu")
    assert type(built).__name__ == class_name
    assert type(built).__module__.startswith("transformers_modules")  # the folder's copy, not this package's


@pytest.mark.parametrize("fixture", ["maf_folder", "calibrated_maf_folder"])
def test_anomaly_detection_gives_the_models_prediction_and_a_heatmap_over_the_input(request, fixture):
    folder, model = request.getfixturevalue(fixture)
    detector = pipeline("anomaly-detection", model=str(folder), trust_remote_code=True, device="cpu")
    images = [make_image(0), make_image(1, size=(9, 9), mode="L"), make_image(2, size=(6, 6), mode="RGBA"),
              make_image(100), make_image(101)]
    results = detector(images)
    pixel_values = images_to_tensor(images, model.config.image_size)  # the training data's tensors
    expected = model.predict_anomalies(pixel_values)
    calibrated = fixture == "calibrated_maf_folder"
    assert model.is_calibrated == calibrated and len(results) == len(images)
    for index, (image, result) in enumerate(zip(images, results)):
        assert set(result) == {"score", "is_anomalous", "threshold", "heatmap", "heatmap_scale", "method", "message"}
        assert result["score"] == pytest.approx(float(expected.scores[index]), rel=1e-6)
        assert result["method"] == expected.method == (model.config.anomaly_calibration["method"] if calibrated
                                                       else "nll")
        if calibrated:
            assert result["is_anomalous"] is bool(expected.is_anomalous[index])
            assert result["threshold"] == expected.threshold and result["message"] is None
        else:
            assert result["is_anomalous"] is None and result["threshold"] is None
            assert result["message"] == NOT_CALIBRATED and "calibrate" in result["message"]
        assert result["heatmap"].size == image.size and result["heatmap"].mode == "RGB"
        # A calibrated model's colour scale is its calibrated display range; otherwise the map's own, with a note.
        scale = heatmap_scale(expected.maps[index].numpy(), expected.display_range, calibrated)
        shown = result["heatmap_scale"]
        assert (shown["threshold"], shown["note"]) == (scale.threshold, scale.note)
        assert (shown["low"], shown["high"]) == pytest.approx((scale.low, scale.high), rel=1e-5)
        if calibrated:
            display_range = model.config.anomaly_calibration["display_ranges"][expected.method]
            assert expected.display_range == display_range
            assert result["heatmap_scale"] == {"low": display_range["low"], "high": display_range["high"],
                                               "threshold": display_range["map_threshold"], "note": None,
                                               "threshold_label": display_range["label"]}
        else:
            assert expected.display_range is None and result["heatmap_scale"]["note"] == NOT_CALIBRATED_NOTE
        heatmap = heatmap_overlay(image, expected.maps[index].numpy(), scale=scale)
        assert np.array_equal(np.asarray(result["heatmap"]), np.asarray(heatmap))
    if calibrated:  # the verdicts follow the threshold
        assert [result["is_anomalous"] for result in results] == [r["score"] > r["threshold"] for r in results]
    assert type(detector.image_processor).__name__ == "MAFImageProcessor"  # the folder's, through remote code
    batched = detector(images, batch_size=2)  # the image processor makes batching possible
    for result, alone in zip(batched, results):
        assert result["score"] == pytest.approx(alone["score"], rel=1e-5)
        assert (result["is_anomalous"], result["threshold"], result["method"], result["message"]) == \
            (alone["is_anomalous"], alone["threshold"], alone["method"], alone["message"])
        assert result["heatmap"].size == alone["heatmap"].size
        if calibrated:  # one scale: an image's colours do not depend on the others in its batch
            assert result["heatmap_scale"] == alone["heatmap_scale"]
            assert np.abs(as_array(result["heatmap"]) - as_array(alone["heatmap"])).max() <= 1
    # One image in, one dict out; the heatmap opacity is a call argument (0: the image itself).
    single = detector(images[0], heatmap_alpha=0.0)
    assert single["score"] == results[0]["score"]
    assert np.array_equal(np.asarray(single["heatmap"]), np.asarray(images[0]))
    with pytest.raises(ValueError, match="heatmap_alpha"):
        detector(images[0], heatmap_alpha=2)


def test_heatmap_colours_follow_the_map():
    assert jet_colors(np.array([0.0, 0.5, 1.0])).tolist() == [[0, 0, 128], [128, 255, 128], [128, 0, 0]]
    image = Image.new("RGB", (4, 2), (0, 0, 0))
    anomaly_map = np.array([[0.0, 10.0], [0.0, 0.0]])  # the hot corner is top right
    heatmap = np.asarray(heatmap_overlay(image, anomaly_map, alpha=1.0))
    assert heatmap.shape == (2, 4, 3)
    assert heatmap[0, 3, 0] > heatmap[0, 3, 2] and heatmap[1, 0, 2] > heatmap[1, 0, 0]  # red hot, blue cold
    flat = np.asarray(heatmap_overlay(image, np.full((2, 2), 3.0), alpha=1.0))  # a constant map: all cold
    assert (flat == jet_colors(np.zeros(1))[0]).all()
    # One extreme pixel does not wash out the others: the scale runs from the 1st to the 99th percentile.
    anomaly_map = np.tile(np.linspace(0.0, 1.0, 20, dtype=np.float32), (20, 1))
    anomaly_map[0, 0] = 1e6
    colours = np.asarray(heatmap_overlay(Image.new("RGB", (20, 20)), anomaly_map, alpha=1.0)).astype(int)
    assert colours[5, 10].tolist() != colours[5, 0].tolist() != colours[5, 19].tolist()
    assert colours[5, 19, 0] > 100 and colours[5, 0, 2] > 100  # still red at the right, blue at the left


def test_anomaly_detection_with_an_iaf_and_a_model_object():
    model = tiny_flow(IAFModel, IAFConfig, seed=3)
    detector = pipeline("anomaly-detection", model=model, device="cpu")  # registered by importing modeling_maf
    assert isinstance(detector, AnomalyDetectionPipeline)
    image = make_image(4)
    expected = model.anomaly_scores(images_to_tensor([image], model.config.image_size))
    result = detector(image)
    assert result["score"] == pytest.approx(float(expected[0]), rel=1e-6) and result["message"] == NOT_CALIBRATED


def test_image_translation_gives_the_models_translation(cyclegan_folder):
    folder, model = cyclegan_folder
    translator = pipeline("image-translation", model=str(folder), trust_remote_code=True, device="cpu")
    images = [make_image(5), make_image(6, size=(16, 16), mode="L")]
    for direction in ("a_to_b", "b_to_a"):
        expected = model.translate(images, direction=direction)
        kwargs = {} if direction == "a_to_b" else {"direction": direction}  # a_to_b is the default
        outputs = translator(images, **kwargs)
        assert all(isinstance(output, Image.Image) and output.size == (16, 16) for output in outputs)
        for output, reference in zip(outputs, expected):
            assert np.array_equal(np.asarray(output), np.asarray(reference)), direction
    batched = translator(images, batch_size=2)  # the image processor makes batching possible
    assert [np.asarray(a).tolist() for a in batched] == [np.asarray(a).tolist() for a in model.translate(images)]
    resized = translator(images[0], keep_input_size=True)
    assert resized.size == images[0].size
    with pytest.raises(ValueError, match="direction must be 'a_to_b' or 'b_to_a'"):
        translator(images[0], direction="sideways")
    assert isinstance(pipeline("image-translation", model=model, device="cpu"), ImageTranslationPipeline)


# The child process: no hf-dgm importable (as in test_hub_models.py). It builds each pipeline from a folder or a Hub
# repo id and writes what the pipeline returned.
CHILD_SCRIPT = WITHOUT_HF_DGM + textwrap.dedent(
    """
    import json, sys

    import numpy as np
    from PIL import Image
    from transformers import pipeline

    results = {}
    for job in json.load(open(JOBS)):
        built = pipeline(job["task"], model=job["model"], trust_remote_code=True, device="cpu")
        assert type(built).__module__.startswith("transformers_modules"), type(built).__module__
        image = Image.open(job["image"])
        if job["task"] == "anomaly-detection":
            output = built(image)
            output["heatmap"].save(job["output"])
            built(image, colorbar=True)["heatmap"].save(job["output"] + ".colorbar.png")
            results[job["name"]] = {key: output[key] for key in
                                    ("score", "is_anomalous", "threshold", "method", "message", "heatmap_scale")}
        else:
            built(image, direction="b_to_a").save(job["output"])
            results[job["name"]] = type(built).__name__
    print(json.dumps(results))
    """
)


def test_fresh_process_without_the_package_builds_both_pipelines_from_folders_and_hub_repos(
    hub_server, calibrated_maf_folder, cyclegan_folder, tmp_path
):
    image_path = tmp_path / "input.png"
    image = make_image(7)
    image.save(image_path)
    maf_dir, maf = calibrated_maf_folder  # the calibration travels with the model
    cyclegan_dir, cyclegan = cyclegan_folder
    maf_repo, cyclegan_repo = hub_server.repo_id("maf-pipeline"), hub_server.repo_id("cyclegan-pipeline")
    maf.push_to_hub(maf_repo)
    cyclegan.push_to_hub(cyclegan_repo)

    jobs = []
    for where, maf_model, cyclegan_model in (("folder", maf_dir, cyclegan_dir), ("hub", maf_repo, cyclegan_repo)):
        jobs.append({"name": f"maf-{where}", "task": "anomaly-detection", "model": str(maf_model),
                     "image": str(image_path), "output": str(tmp_path / f"heatmap-{where}.png")})
        jobs.append({"name": f"cyclegan-{where}", "task": "image-translation", "model": str(cyclegan_model),
                     "image": str(image_path), "output": str(tmp_path / f"translation-{where}.png")})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    child_home = tmp_path / "child-hf-home"
    outputs = run_without_hf_dgm(CHILD_SCRIPT, tmp_path / "jobs.json", hub_server, child_home)
    assert (child_home / "modules" / "transformers_modules").is_dir()  # the code came with the models

    pixel_values = images_to_tensor([image], maf.config.image_size)
    expected = maf.predict_anomalies(pixel_values)
    scale = heatmap_scale(expected.maps[0].numpy(), expected.display_range, calibrated=True)
    assert scale.note is None  # the calibrated colour scale
    expected_heatmap = heatmap_overlay(image, expected.maps[0].numpy(), scale=scale)
    expected_with_colorbar = with_colorbar(expected_heatmap, scale)
    expected_translation = cyclegan.translate(image, direction="b_to_a")[0]
    for where in ("folder", "hub"):
        maf_output = outputs[f"maf-{where}"]
        assert maf_output["score"] == pytest.approx(float(expected.scores[0]), rel=1e-6), where
        assert maf_output["is_anomalous"] is bool(expected.is_anomalous[0])
        assert maf_output["threshold"] == expected.threshold and maf_output["method"] == expected.method
        assert maf_output["message"] is None and maf_output["heatmap_scale"] == scale.to_dict()
        assert np.array_equal(as_array(Image.open(tmp_path / f"heatmap-{where}.png")), as_array(expected_heatmap))
        assert np.array_equal(as_array(Image.open(tmp_path / f"heatmap-{where}.png.colorbar.png")),
                              as_array(expected_with_colorbar))
        assert outputs[f"cyclegan-{where}"] == "ImageTranslationPipeline"
        translation = Image.open(tmp_path / f"translation-{where}.png")
        assert np.array_equal(as_array(translation), as_array(expected_translation)), where


@pytest.mark.parametrize("task, fixture", [("anomaly-detection", "maf_folder"),
                                           ("image-translation", "cyclegan_folder")])
def test_bad_inputs_are_one_clear_error(request, task, fixture, tmp_path):
    """Issue 22.3: a missing file, a file that is not an image, a folder and a number each raise one error that
    names the input and says what the pipeline takes (not transformers' "Incorrect padding")."""
    folder, _ = request.getfixturevalue(fixture)
    runner = pipeline(task, model=str(folder), trust_remote_code=True)
    (tmp_path / "notes.png").write_text("not an image")
    cases = [
        (str(tmp_path / "missing.png"), ValueError, r"missing\.png does not exist: pass the path of an image file"),
        (str(tmp_path / "notes.png"), ValueError, r"notes\.png is not an image that can be read \(cannot identify"),
        (str(tmp_path), ValueError, r"is a folder; pass the path of one image file"),
        (3, TypeError, rf"The {task} pipeline takes an image: a PIL image, a file path, a URL .*; got int 3\."),
        (None, TypeError, r"got NoneType None"),
    ]
    for value, error_type, pattern in cases:
        with pytest.raises(error_type, match=pattern) as error:
            runner(value)
        assert "\n" not in str(error.value) and "Incorrect padding" not in str(error.value)
    assert runner(make_image()) is not None  # good input still works
