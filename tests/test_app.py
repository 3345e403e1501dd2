"""app.py without a browser: how models are found and what the page says when one is missing or fails to load,
the example images, and the texts of the anomaly tab (tests/test_app_browser.py drives the page itself)."""

import os

import pytest

from synthetic_data import make_mvtec_category, make_unpaired_folder


pytest.importorskip("gradio", reason="gradio is not installed (pip install -e .[demo])")
from app import describe_maf, example_images, format_score, format_verdict, load_pipeline, looks_like_a_path  # noqa: E402


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
