"""scripts/detect_anomalies.py on every layout: masks for some images, no ground_truth/, one merged defect folder,
grayscale, test sets with one class only; calibration from the model, from the recorded validation files, or none."""

import json

import numpy as np
import pytest

import detect_anomalies
from hf_dgm_training import UsageError
from hf_dgm_training.data.anomaly import load_anomaly_dataset, load_split_as_tensors, split_validation
from modeling_maf import MAFModel
from modeling_maf.anomaly_scores import ANOMALY_SCORES, DEFAULT_CALIBRATED_SCORE
from synthetic_data import make_mvtec_category
from tiny_models import save_tiny_maf


FIGURES = ("roc_curve.png", "score_histogram.png", "anomaly_maps.png", "misses.png")


save_tiny_model = save_tiny_maf


def detect(*args):
    return detect_anomalies.main([str(a) for a in (*args, "--device", "cpu", "--batch_size", 4)])


def assert_figures(folder):
    for name in FIGURES:
        assert (folder / name).stat().st_size > 1000, name


def test_some_masks_calibrated_on_the_recorded_validation_files(tmp_path, capsys):
    data = make_mvtec_category(str(tmp_path / "data"), num_train=12, num_test_good=3,
                               defects=(("crack", 3), ("poke", 2)), masks={"crack"})
    model_dir = tmp_path / "model"
    save_tiny_model(model_dir)
    train = load_anomaly_dataset(data)["train"]
    validation_files = list(split_validation(train, percentage=30, seed=4)[1]["file"])
    (model_dir / "train_results.json").write_text(json.dumps({"validation_files": validation_files}))

    report = detect("--model_name_or_path", model_dir, "--data_dir", data, "--calibration_data", "validation",
                    "--target_fpr", 0.3, "--save_calibrated_model", tmp_path / "calibrated")
    output = capsys.readouterr().out
    assert "the 4 validation files recorded in train_results.json" in output
    assert report["score"] == DEFAULT_CALIBRATED_SCORE and set(report["scores"]) == set(ANOMALY_SCORES)
    assert report["calibration"]["num_images"] == 4 and report["target_fpr"] == 0.3
    assert report["decision_threshold"] == report["calibration"]["thresholds"][DEFAULT_CALIBRATED_SCORE]
    assert report["decision_threshold_fpr"] == 0.25  # floor(0.3 * 4) = 1 of the 4 calibration images
    assert report["decision_threshold_expected_fpr"] == 0.4  # (1 + 1) / (4 + 1) of new good images
    assert 0 <= report["image_auroc"] <= 1 and set(report["auroc_per_defect"]) == {"crack", "poke"}
    # Pixel metrics over the 6 images with masks (3 good + 3 crack); the 2 poke images have none.
    assert (report["pixel_metrics_images"], report["pixel_metrics_images_without_mask"]) == (6, 2)
    assert 0 <= report["pixel_auroc"] <= 1
    at = report["test_at_threshold"]
    assert at["true_positives"] + at["false_negatives"] == 5 and at["false_positives"] + at["true_negatives"] == 3
    assert at["fpr"] == at["false_positives"] / 3 and at["tpr"] == at["true_positives"] / 5
    rows = report["per_image"]
    assert sorted(r["file"] for r in rows) == sorted(
        [f"test/good/{i:03d}.png" for i in range(3)] + [f"test/crack/{i:03d}.png" for i in range(3)]
        + [f"test/poke/{i:03d}.png" for i in range(2)])
    assert all(set(ANOMALY_SCORES) <= set(r) and isinstance(r["predicted"], bool) for r in rows)
    assert sum(r["predicted"] for r in rows) == at["true_positives"] + at["false_positives"]
    # Where each crack's map peaks (the poke images have no mask, the good ones no defect).
    localised = [r for r in rows if "peak_on_defect" in r]
    assert sorted(r["file"] for r in localised) == [f"test/crack/{i:03d}.png" for i in range(3)]
    assert report["peak_on_defect"] == {"images": 3, "on_defect": sum(r["peak_on_defect"] for r in localised)}
    assert all((r["peak_distance_px"] == 0) == r["peak_on_defect"] for r in localised)
    assert "defective test images with masks" in output
    assert_figures(tmp_path / "model" / "anomaly")

    # The saved calibrated model decides the same in Python, image by image.
    calibrated = MAFModel.from_pretrained(tmp_path / "calibrated")
    test = load_split_as_tensors(load_anomaly_dataset(data)["test"], 8)
    prediction = calibrated.predict_anomalies(test.pixel_values)
    by_file = {r["file"]: r for r in rows}
    assert [by_file[f]["predicted"] for f in test.files] == prediction.is_anomalous.tolist()
    assert [by_file[f][DEFAULT_CALIBRATED_SCORE] for f in test.files] == prediction.scores.double().tolist()


def test_plain_grayscale_layout_with_a_merged_defect_folder_and_a_calibrated_model(tmp_path, capsys):
    data = make_mvtec_category(str(tmp_path / "data"), num_train=6, num_test_good=3, defects=(("defective", 4),),
                               masks="none", grayscale=True)
    model = save_tiny_model(tmp_path / "model", num_channels=1)
    good = load_split_as_tensors(load_anomaly_dataset(data)["train"], 8, num_channels=1).pixel_values
    model.calibrate(good, method="map-max")
    model.save_pretrained(tmp_path / "model")

    report = detect("--model_name_or_path", tmp_path / "model", "--data_dir", data, "--output_dir", tmp_path / "out")
    assert report["calibration_source"] == "the model" and report["score"] == "map-max"
    assert report["image_auroc"] is not None and report["image_metrics_note"] is None
    assert report["pixel_auroc"] is None and "no defective pixel" in report["pixel_metrics_note"]
    assert report["pixel_metrics_images_without_mask"] == 4
    assert {r["defect_type"] for r in report["per_image"]} == {"good", "defective"}
    assert "Pixel AUROC is undefined" in capsys.readouterr().out
    assert_figures(tmp_path / "out")


@pytest.mark.parametrize("num_good,defects,defined", [(4, (), "fpr"), (0, (("crack", 3),), "tpr")],
                         ids=["only-good", "only-defective"])
def test_one_class_test_sets_write_everything_computable(tmp_path, capsys, num_good, defects, defined):
    data = make_mvtec_category(str(tmp_path / "data"), num_train=6, num_test_good=num_good, defects=defects)
    model = save_tiny_model(tmp_path / "model")
    model.calibrate(load_split_as_tensors(load_anomaly_dataset(data)["train"], 8).pixel_values)
    model.save_pretrained(tmp_path / "model")

    report = detect("--model_name_or_path", tmp_path / "model", "--data_dir", data)
    assert "Image-level metrics (AUROC, AUPR, F1-max) are undefined" in report["image_metrics_note"]
    assert report["image_metrics_note"] in capsys.readouterr().out
    assert report["image_auroc"] is None and report["test_at_threshold"][defined] is not None
    other = {"fpr": "tpr", "tpr": "fpr"}[defined]
    assert report["test_at_threshold"][other] is None
    assert len(report["per_image"]) == num_good + sum(c for _, c in defects)
    assert_figures(tmp_path / "model" / "anomaly")


def test_uncalibrated_model_reports_what_it_can_and_says_how_to_calibrate(tmp_path, capsys):
    data = make_mvtec_category(str(tmp_path / "data"), num_train=4, num_test_good=2, defects=(("crack", 2),))
    save_tiny_model(tmp_path / "model")
    report = detect("--model_name_or_path", tmp_path / "model", "--data_dir", data)
    assert report["score"] == "nll" and set(report["scores"]) == {"nll", "map-max", "map-topk"}
    assert report["decision_threshold"] is None and report["test_at_threshold"] is None
    assert all(r["predicted"] is None for r in report["per_image"])
    output = capsys.readouterr().out
    assert "model.calibrate(good_pixel_values)" in output and "--calibration_data validation" in output
    # nll is the sum of the per-pixel NLL map, as the model computes it.
    nll = np.array([r["nll"] for r in report["per_image"]])
    assert np.all(np.isfinite(nll))
    with pytest.raises(UsageError, match="--score standardized-map needs a calibrated model"):
        detect("--model_name_or_path", tmp_path / "model", "--data_dir", data, "--score", "standardized-map")


def test_the_roc_lists_the_scores_that_apply_to_the_model():
    """A patch-grid score of a whole-image flow (one location) is a z-score of the image NLL: not plotted."""
    from hf_dgm_training.metrics.evaluation import applicable_scores
    from modeling_maf import MAFConfig, MAFModel
    from modeling_maf.anomaly_scores import ANOMALY_SCORES

    names = list(ANOMALY_SCORES)
    whole = MAFModel(MAFConfig(image_size=8, num_channels=1, hidden_sizes=[8], num_blocks=1))
    patches = MAFModel(MAFConfig(image_size=8, num_channels=1, hidden_sizes=[8], num_blocks=1, patch_size=4,
                                 patch_stride=2))
    assert applicable_scores(whole, names) == [name for name in names if name != "patch-z-top3"]
    assert applicable_scores(patches, names) == names
