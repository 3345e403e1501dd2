"""Models saved by an earlier version of the code (tests/fixtures/legacy_models, made by
tests/fixtures/make_legacy_models.py) load with this code and score identically: same log-likelihoods, NLL maps,
scores, maps, thresholds, default score and decisions. Dropping any part of the saved calibration (the statistics
in the checkpoint, the thresholds or default score in config.json) fails here."""

import json
import os

import pytest
import torch

from modeling_maf import FeatureMAFModel, IAFModel, MAFModel


FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "legacy_models")
# feature_maf: saved by 1f83765, before the per-location whitening and the per-image channel statistics, whose
# buffers and config fields it lacks: it must load as the identity and no standardisation.
MODELS = {"maf": MAFModel, "patch_maf": MAFModel, "iaf": IAFModel, "feature_maf": FeatureMAFModel}


def close(actual, expected, what):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5, msg=what)


def assert_scores_as_saved(model, expected):
    pixels = torch.tensor(expected["test_levels"], dtype=torch.uint8).float() / 255
    assert model.is_calibrated and model.config.anomaly_calibration == expected["calibration"]
    assert list(model.available_anomaly_scores) == expected["available_scores"]
    assert model.resolve_anomaly_method(None) == expected["default_method"]
    close(model(pixels).log_prob, expected["log_prob"], "log_prob")
    nll_maps = model.nll_maps(pixels)
    close(nll_maps.pixel.sum(dim=(1, 2)), expected["nll_maps"]["pixel_sum"], "pixel NLL map sums")
    close(nll_maps.pixel.flatten(1).max(dim=1).values, expected["nll_maps"]["pixel_max"], "pixel NLL map maxima")
    close(nll_maps.patch.flatten(1), expected["nll_maps"]["patch"], "patch NLL")
    for key, saved in expected["scores"].items():
        prediction = model.predict_anomalies(pixels, None if key == "default" else key)
        maps = prediction.maps.double()
        assert prediction.method == saved["method"], key
        assert prediction.threshold == saved["threshold"], key
        assert prediction.is_anomalous.tolist() == saved["is_anomalous"], key
        close(prediction.scores, saved["scores"], f"{key}: scores")
        close(maps.sum(dim=(1, 2)), saved["map_sum"], f"{key}: map sums")
        close(maps.flatten(1).max(dim=1).values, saved["map_max"], f"{key}: map maxima")
        close(maps.flatten(1).min(dim=1).values, saved["map_min"], f"{key}: map minima")
        close(maps[:, 0, 0], saved["map_corner"], f"{key}: map corner")
        close(maps[:, 4, 3], saved["map_centre"], f"{key}: map centre")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_model_saved_by_an_earlier_version_scores_identically(name):
    folder = os.path.join(FIXTURES, name)
    with open(os.path.join(folder, "expected.json")) as file:
        expected = json.load(file)
    model = MODELS[name].from_pretrained(folder).eval()
    assert type(model) is MODELS[name]
    assert_scores_as_saved(model, expected)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_legacy_model_saved_again_by_this_code_still_scores_identically(name, tmp_path):
    folder = os.path.join(FIXTURES, name)
    with open(os.path.join(folder, "expected.json")) as file:
        expected = json.load(file)
    MODELS[name].from_pretrained(folder).save_pretrained(tmp_path)
    assert_scores_as_saved(MODELS[name].from_pretrained(tmp_path).eval(), expected)


def test_the_test_fails_when_the_calibration_is_dropped():
    """The comparison notices a model whose statistics or thresholds were lost on loading."""
    folder = os.path.join(FIXTURES, "patch_maf")
    with open(os.path.join(folder, "expected.json")) as file:
        expected = json.load(file)
    model = MAFModel.from_pretrained(folder).eval()
    statistics = {name: buffer.clone() for name, buffer in model.named_buffers() if "location" in name}
    assert statistics, "the loaded model has no per-location statistics"
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if "location" in name:
                buffer.fill_(1.0 if name.endswith("std") else 0.0)
    with pytest.raises(AssertionError):
        assert_scores_as_saved(model, expected)
    uncalibrated = MAFModel.from_pretrained(folder, anomaly_calibration=None).eval()
    with pytest.raises(AssertionError):
        assert_scores_as_saved(uncalibrated, expected)
