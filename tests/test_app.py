"""app.py without a browser: how models are found and what the page says when one is missing or fails to load,
the example images, and the texts of the anomaly tab (tests/test_app_browser.py drives the page itself)."""

import os

import pytest

from synthetic_data import make_mvtec_category, make_unpaired_folder


pytest.importorskip("gradio", reason="gradio is not installed (pip install -e .[demo])")
from app import (  # noqa: E402
    describe_heatmap,
    describe_maf,
    example_caption,
    example_images,
    format_score,
    format_verdict,
    load_models,
    load_pipeline,
    looks_like_a_path,
    parse_args,
)


def test_a_missing_default_model_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/maf here
    detector, message = load_pipeline("anomaly-detection", None, "runs/maf", "Train one with `x`", "cpu")
    assert detector is None
    assert message == ("No model for this tab: runs/maf does not exist. Train one with `x`, or pass a folder or Hub "
                       "repo id to app.py (see `python app.py --help`).")


def test_a_missing_folder_is_not_looked_up_on_the_hub(tmp_path):
    name = str(tmp_path / "nothing")
    detector, message = load_pipeline("image-translation", name, "runs/h2z", "Train one with `y`", "cpu")
    assert detector is None
    assert message == f"No model for this tab: the folder {name} does not exist. Train one with `y`."
    assert looks_like_a_path("./runs/maf") and looks_like_a_path("a/b/c") and looks_like_a_path("~/maf")
    assert not looks_like_a_path("user/maf-capsule") and not looks_like_a_path("maf-capsule")


def test_a_folder_that_is_not_a_model_gives_the_loading_error(tmp_path):
    (tmp_path / "empty").mkdir()
    detector, message = load_pipeline("anomaly-detection", str(tmp_path / "empty"), "runs/maf", "z", "cpu")
    assert detector is None
    name = str(tmp_path / "empty")
    assert message.startswith(f"Could not load the anomaly-detection pipeline from {name!r} (folder):")


def test_example_images_of_a_dataset_folder(tmp_path):
    category = make_mvtec_category(str(tmp_path / "capsule"), defects=(("crack", 2), ("poke", 1)))
    assert example_images(category, ("test",), 8) == [
        os.path.join(category, "test", kind, "000.png") for kind in ("crack", "good", "poke")]
    assert example_images(category, ("test",), 2) == [os.path.join(category, "test", "crack", "000.png"),
                                                      os.path.join(category, "test", "good", "000.png")]
    unpaired = make_unpaired_folder(str(tmp_path / "unpaired"))
    found = example_images(unpaired, ("testA", "testB"), 4)
    assert found == [os.path.join(unpaired, "testA", "0.png"), os.path.join(unpaired, "testA", "1.png"),
                     os.path.join(unpaired, "testB", "0.png"), os.path.join(unpaired, "testB", "1.png")]
    assert example_images(None, ("test",), 8) == [] and example_images(category, ("test",), 0) == []
    with pytest.raises(SystemExit, match="does not exist"):
        example_images(str(tmp_path / "nowhere"), ("test",), 8)


def test_verdict_texts():
    assert format_score({"score": 12.345}) == "12.35"
    calibrated = {"score": 12.345, "is_anomalous": True, "threshold": 10.0, "message": None}
    assert format_verdict(calibrated) == "ANOMALOUS (score 12.35 > threshold 10.00)"
    assert format_verdict({**calibrated, "is_anomalous": False, "threshold": 20.0}) == \
        "normal (score 12.35 ≤ threshold 20.00)"
    assert format_verdict({"score": 1.0, "is_anomalous": None, "threshold": None, "message": "Calibrate."}) == \
        "no verdict: Calibrate."


def test_the_model_line_says_when_the_model_is_a_patch_flow():
    from types import SimpleNamespace

    from modeling_maf import MAFConfig, MAFModel

    tiny = dict(image_size=8, num_channels=1, hidden_sizes=[8], num_blocks=1)
    patch = describe_maf(SimpleNamespace(model=MAFModel(MAFConfig(**tiny, patch_size=4, patch_stride=2))))
    assert "a density of 4×4 patches (stride 2)" in patch and "mosaics of independent patches" in patch
    assert "patches" not in describe_maf(SimpleNamespace(model=MAFModel(MAFConfig(**tiny))))


def tiny_feature_detector(path, calibrate=True):
    """A feature detector with a tiny random EfficientNet-Lite (64x64 images), calibrated on random images, saved."""
    import torch

    from modeling_maf import EfficientNetLiteConfig, FeatureMAFConfig, FeatureMAFModel

    backbone = EfficientNetLiteConfig(width_coefficient=0.25, num_repeats=[1] * 7, head_channels=16, stem_channels=8)
    torch.manual_seed(0)
    model = FeatureMAFModel(FeatureMAFConfig(image_size=64, hidden_sizes=[16], num_blocks=1,
                                             backbone_config=backbone)).eval()
    if calibrate:
        model.calibrate(torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    model.save_pretrained(path)
    return path


def test_a_mistyped_folder_gets_a_suggestion(tmp_path, monkeypatch):
    from tiny_models import save_tiny_maf

    monkeypatch.chdir(tmp_path)
    save_tiny_maf(tmp_path / "runs" / "maf")
    detector, message = load_pipeline("anomaly-detection", "runs/mafx", "runs/maf", "Train one", "cpu")
    assert detector is None
    assert message == "No model for this tab: the folder runs/mafx does not exist; did you mean runs/maf? Train one."


def test_the_anomaly_tab_uses_the_feature_detector_and_the_sampling_tab_the_maf(tmp_path, monkeypatch):
    from tiny_models import save_tiny_maf

    monkeypatch.chdir(tmp_path)
    save_tiny_maf(tmp_path / "runs" / "maf")
    # Without a detector folder, the MAF serves both tabs.
    detector, _, sampler, _ = load_models(parse_args([]))
    assert detector is sampler and type(sampler.model).__name__ == "MAFModel"
    # runs/maf/detector (the main job's feature detector) is the anomaly tab's default.
    tiny_feature_detector(tmp_path / "runs" / "maf" / "detector")
    detector, message, sampler, _ = load_models(parse_args([]))
    assert message is None and type(detector.model).__name__ == "FeatureMAFModel"
    assert type(sampler.model).__name__ == "MAFModel"
    assert "FeatureMAFModel, 64×64×3, 1 blocks over the features of a frozen EfficientNet-Lite backbone" in \
        describe_maf(detector)
    assert describe_heatmap(detector).startswith("The heatmap has one colour scale for every image")
    # A feature detector given as the MAF: scored in the anomaly tab, and the sampling tab says why it cannot sample.
    detector, _, sampler, message = load_models(parse_args(["--maf_model", "runs/maf/detector",
                                                            "--detector_model", "runs/maf/detector"]))
    assert sampler is None and type(detector.model).__name__ == "FeatureMAFModel"
    assert message.startswith("The sampling tab needs a MAF or IAF; runs/maf/detector is a FeatureMAFModel")


def test_example_captions_are_the_defect_types(tmp_path):
    category = make_mvtec_category(str(tmp_path / "capsule"), defects=(("crack", 2), ("poke", 1)))
    assert [example_caption(path, category) for path in example_images(category, ("test",), 8)] == \
        ["crack", "good", "poke"]
    folder = os.path.join(category, "test", "crack")
    assert [example_caption(path, folder) for path in example_images(folder, (), 8)] == ["000.png", "001.png"]


def test_a_saved_feature_detector_loads_from_its_folder_without_this_package(tmp_path):
    """What the demo (and a Space) does: the folder's own code builds the detector, backbone included, and its
    pipeline draws the heatmap on the calibrated scale."""
    import json
    import subprocess
    import sys

    from child_process import WITHOUT_HF_DGM

    folder = tiny_feature_detector(tmp_path / "detector")
    image = tmp_path / "image.png"
    from PIL import Image

    Image.new("RGB", (40, 40), (120, 90, 60)).save(image)
    script = WITHOUT_HF_DGM + (
        "import json\nfrom transformers import pipeline\n"
        f"detector = pipeline('anomaly-detection', model={str(folder)!r}, trust_remote_code=True, device='cpu')\n"
        f"result = detector({str(image)!r})\n"
        "print(json.dumps([type(detector.model).__module__, result['heatmap_scale']['note'], "
        "result['is_anomalous'] is not None]))\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=dict(env, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    module, note, calibrated = json.loads(result.stdout.strip().splitlines()[-1])
    assert module.startswith("transformers_modules") and note is None and calibrated
