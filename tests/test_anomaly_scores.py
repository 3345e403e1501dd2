"""Anomaly scores (modeling_maf/anomaly_scores.py) against hand computations, and the calibration that travels with a
MAFModel: calibrate -> save_pretrained / push_to_hub -> from_pretrained gives the same scores and decisions, bit for
bit."""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import modeling_maf.anomaly_scores as anomaly_scores
from modeling_maf import AnomalyPrediction, IAFConfig, IAFModel, MAFConfig, MAFModel
from modeling_maf.anomaly_scores import (
    ANOMALY_SCORES,
    DEFAULT_CALIBRATED_SCORE,
    PIXEL_GRID,
    LocationStatistics,
    ScoreParameters,
    calibrate_scores,
    compute_score,
    expected_fpr,
    location_statistics,
    register_score,
    threshold_at_fpr,
)
from tiny_models import randomize_flow


def tiny_model(model_class=MAFModel, config_class=MAFConfig, seed=0, image_size=6, num_channels=2):
    config = config_class(image_size=image_size, num_channels=num_channels, hidden_sizes=[16, 16], num_blocks=2)
    return randomize_flow(model_class(config), seed, std=0.1).eval()


def images(count, seed, image_size=6, num_channels=2):
    return torch.rand(count, num_channels, image_size, image_size, generator=torch.Generator().manual_seed(seed))


def with_defect(pixel_values):
    defective = pixel_values.clone()
    defective[:, :, 1:3, 1:3] = 1.0
    return defective


# ----------------------------------------------------------------------------------------------- hand computations


def hand_statistics(good):
    """numpy: per-location mean, unbiased std, floored at 1% of the mean std."""
    std = good.std(axis=0, ddof=1)
    return good.mean(axis=0), np.maximum(std, 0.01 * std.mean())


def hand_window_mean(z, window):
    """Mean over the window's pixels that lie inside the image, by loops."""
    height, width = z.shape
    half = window // 2
    out = np.zeros_like(z)
    for row in range(height):
        for column in range(width):
            patch = z[max(0, row - half): row + half + 1, max(0, column - half): column + half + 1]
            out[row, column] = patch.mean()
    return out


def test_standardized_scores_match_a_hand_computation():
    rng = np.random.default_rng(0)
    good = rng.gamma(2.0, 1.5, size=(7, 5, 6))
    good[:, 0, 0] = 3.0  # a flat location: its std is floored
    test = rng.gamma(2.0, 1.5, size=(3, 5, 6))
    test[:, 0, 0] = 3.0
    test[1, 2, 3] += 40.0  # a local defect
    mean, std = hand_statistics(good)
    statistics = location_statistics(torch.from_numpy(good))
    np.testing.assert_allclose(statistics.mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(statistics.std.numpy(), std, rtol=1e-12)
    assert statistics.std[0, 0] > 0

    parameters = ScoreParameters(smoothing_sigma=1.0, window_size=3, top_k_fraction=0.1)
    maps = torch.from_numpy(test)
    _, standardized = compute_score("standardized-map", maps, parameters, statistics)
    _, positive = compute_score("positive-z-sum", maps, parameters, statistics)
    _, top = compute_score("standardized-topk", maps, parameters, statistics)
    for index in range(3):
        z = (test[index] - mean) / std
        averaged = hand_window_mean(z, 3)
        assert math.isclose(float(standardized[index]), averaged.max(), rel_tol=1e-12)
        assert math.isclose(float(positive[index]), np.clip(z, 0, None).sum(), rel_tol=1e-12)
        assert math.isclose(float(top[index]), np.sort(averaged.ravel())[-3:].mean(), rel_tol=1e-12)  # 10% of 30
    assert int(standardized.argmax()) == 1 and int(positive.argmax()) == 1


def test_nll_and_smoothed_map_scores():
    maps = torch.zeros(2, 9, 9, dtype=torch.float64)
    maps[1, 4, 4] = 1.0
    parameters = ScoreParameters(smoothing_sigma=1.0, window_size=3)
    nll_maps, nll = compute_score("nll", maps, parameters)
    assert nll_maps is maps and nll.tolist() == [0.0, 1.0]
    smoothed, peak = compute_score("map-max", maps, parameters)
    kernel = np.exp(-0.5 * np.arange(-3, 4) ** 2)
    kernel /= kernel.sum()
    assert math.isclose(float(peak[1]), kernel[3] ** 2, rel_tol=1e-12)  # a point blurred by a 2-D Gaussian
    assert math.isclose(float(smoothed[1].sum()), 1.0, rel_tol=1e-12)
    _, top = compute_score("map-topk", maps, ScoreParameters(1.0, 3, top_k_fraction=1.0))
    assert math.isclose(float(top[1]), 1 / 81, rel_tol=1e-9)


@pytest.mark.parametrize("shape", [(3, 1, 1), (2, 5, 7), (2, 40, 24)])
def test_smoothing_and_box_mean_are_the_replicate_padded_convolution_and_the_inside_mean(shape):
    """The matrix-product filters equal their definitions: a Gaussian over edge-replicated pixels (conv2d on the
    replicate-padded map) and the mean over the window's pixels inside the map (avg_pool2d without the padding)."""
    import torch.nn.functional as F

    maps = torch.rand(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 50
    for sigma in (0.4, 1.5, 4.0):
        radius = max(1, math.ceil(3 * sigma))
        kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
        kernel = kernel / kernel.sum()
        padded = F.pad(maps[:, None], (radius,) * 4, mode="replicate")
        expected = F.conv2d(F.conv2d(padded, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))[:, 0]
        torch.testing.assert_close(anomaly_scores.gaussian_smooth(maps, sigma), expected, rtol=1e-12, atol=1e-12)
    for window in (3, 5, 9):
        expected = F.avg_pool2d(maps[:, None], window, stride=1, padding=window // 2, count_include_pad=False)[:, 0]
        torch.testing.assert_close(anomaly_scores.box_mean(maps, window), expected, rtol=1e-12, atol=1e-12)
        float_maps = maps.float()
        torch.testing.assert_close(anomaly_scores.box_mean(float_maps, window), expected.float())


def test_threshold_at_fpr():
    scores = torch.arange(20.0).flip(0)
    assert threshold_at_fpr(scores, 0.05) == (18.0, 0.05)  # one of 20 good images may be flagged
    assert threshold_at_fpr(scores, 0.0) == (19.0, 0.0)
    assert threshold_at_fpr(scores, 0.12) == (17.0, 0.1)
    assert threshold_at_fpr(torch.tensor([1.0, 2.0, 2.0, 2.0]), 0.3) == (2.0, 0.0)  # ties are never split
    with pytest.raises(ValueError, match="target_fpr"):
        threshold_at_fpr(scores, 1.0)


def test_expected_fpr_is_what_new_good_images_see():
    # 22 calibration images at a 5 % target: 1 flagged there, but a new good image lands above the threshold with
    # probability 2 / 23. Checked by simulation: thresholds from 22 draws, the fraction of 50 new draws above them.
    assert expected_fpr(1 / 22, 22) == 2 / 23 and expected_fpr(0.0, 19) == 1 / 20
    generator = torch.Generator().manual_seed(0)
    draws = torch.randn(4000, 72, generator=generator, dtype=torch.float64)
    above = []
    for calibration, new in zip(draws[:, :22], draws[:, 22:]):
        threshold, fpr = threshold_at_fpr(calibration, 0.05)
        assert fpr == 1 / 22
        above.append(float((new > threshold).double().mean()))
    assert abs(sum(above) / len(above) - expected_fpr(1 / 22, 22)) < 0.004  # the flagged fraction, 0.045, is not


def test_leave_one_out_thresholds_score_each_image_against_the_others():
    rng = np.random.default_rng(1)
    good = torch.from_numpy(rng.gamma(2.0, 1.0, size=(5, 4, 4)))
    parameters = ScoreParameters(smoothing_sigma=0.5, window_size=1)
    _, thresholds, fprs, _ = calibrate_scores(good, parameters, target_fpr=0.2)  # one of 5 may be flagged
    floor = 0.01 * float(good.std(dim=0).mean())
    scores = []
    for index in range(5):
        others = torch.cat([good[:index], good[index + 1:]])
        std = others.std(dim=0).clamp_min(floor)
        scores.append(float(compute_score("positive-z-sum", good[index:index + 1], parameters,
                                          LocationStatistics(others.mean(dim=0), std))[1]))
    assert math.isclose(thresholds["positive-z-sum"], sorted(scores)[-2], rel_tol=1e-9)
    assert fprs["positive-z-sum"] == 0.2
    # Per-pixel maps alone calibrate the pixel-grid scores (the patch-grid ones need NLLMaps).
    assert set(thresholds) == {name for name, score in ANOMALY_SCORES.items() if score.grid == PIXEL_GRID}
    with pytest.raises(ValueError, match="at least 3"):
        calibrate_scores(good[:2], parameters, 0.05)


def test_a_registered_score_reaches_the_model(monkeypatch):
    monkeypatch.setattr(anomaly_scores, "ANOMALY_SCORES", dict(ANOMALY_SCORES))

    @register_score("brightest-pixel")
    def brightest(nll_maps, parameters, statistics):
        """Largest per-pixel NLL, unsmoothed."""
        return nll_maps, nll_maps.flatten(1).max(dim=1).values

    model = tiny_model()
    pixels = images(3, 1)
    expected = model.anomaly_maps(pixels, method="nll").flatten(1).max(dim=1).values
    assert torch.equal(model.anomaly_scores(pixels, method="brightest-pixel"), expected)
    assert anomaly_scores.ANOMALY_SCORES["brightest-pixel"].description == "Largest per-pixel NLL, unsmoothed."
    model.calibrate(images(4, 2))
    assert "brightest-pixel" in model.config.anomaly_calibration["thresholds"]


# ------------------------------------------------------------------------------------------------ the model's API


def test_uncalibrated_model_keeps_the_nll_api_and_says_how_to_calibrate(caplog):
    model = tiny_model()
    pixels = images(3, 1)
    assert not model.is_calibrated
    torch.testing.assert_close(model.anomaly_scores(pixels), -model(pixels).log_prob)
    maps = model.anomaly_maps(pixels)
    assert maps.shape == (3, 6, 6)
    torch.testing.assert_close(maps.sum(dim=(1, 2)), model.anomaly_scores(pixels))
    smoothed = model.anomaly_maps(pixels, "map-max")
    assert torch.equal(model.anomaly_scores(pixels, method="map-max"), smoothed.amax((1, 2)))

    prediction = model.predict_anomalies(pixels)
    assert isinstance(prediction, AnomalyPrediction)
    assert prediction.is_anomalous is None and prediction.threshold is None and prediction.method == "nll"
    assert torch.equal(prediction.scores, model.anomaly_scores(pixels))
    for call in (lambda: model.anomaly_scores(pixels, method="standardized-map"), model.anomaly_threshold):
        with pytest.raises(ValueError, match=r"model\.calibrate\(good_pixel_values\)"):
            call()
    with pytest.raises(ValueError, match="Unknown anomaly score 'nope'.*positive-z-sum"):
        model.anomaly_scores(pixels, method="nope")


@pytest.mark.parametrize("model_class,config_class", [(MAFModel, MAFConfig), (IAFModel, IAFConfig)])
def test_calibrate_sets_threshold_statistics_and_decisions(model_class, config_class):
    model = tiny_model(model_class, config_class)
    good = images(20, 3)
    calibration = model.calibrate(good, target_fpr=0.1, batch_size=7)
    assert model.is_calibrated and calibration is model.config.anomaly_calibration
    assert calibration["method"] == DEFAULT_CALIBRATED_SCORE and calibration["num_images"] == 20
    assert set(calibration["thresholds"]) == set(ANOMALY_SCORES)
    nll_maps = model.anomaly_maps(good, method="nll").double()
    torch.testing.assert_close(model.anomaly_statistics.location_mean, nll_maps.mean(0).float())
    # Scores without statistics: the threshold flags exactly 2 of the 20 calibration images.
    assert calibration["calibration_fpr"]["nll"] == 0.1
    assert calibration["expected_fpr"]["nll"] == 3 / 21  # a new good image: 2 of 20 above, plus itself
    assert int((model.anomaly_scores(good, "nll") > calibration["thresholds"]["nll"]).sum()) == 2

    test = torch.cat([images(4, 4), with_defect(images(4, 5))])
    prediction = model.predict_anomalies(test)
    assert prediction.method == DEFAULT_CALIBRATED_SCORE
    assert prediction.threshold == calibration["thresholds"][DEFAULT_CALIBRATED_SCORE]
    assert torch.equal(prediction.is_anomalous, prediction.scores.double() > prediction.threshold)
    assert torch.equal(prediction.scores, model.anomaly_scores(test))
    assert prediction.maps.shape == (8, 6, 6)
    by_nll = model.predict_anomalies(test, method="nll")
    assert by_nll.threshold == calibration["thresholds"]["nll"]
    # The calibrated default also changes what anomaly_scores(x) means; "nll" stays one argument away.
    torch.testing.assert_close(model.anomaly_scores(test, method="nll"), -model(test).log_prob)

    other = model.calibrate(good, method="nll")
    assert other["method"] == "nll" and torch.equal(model.anomaly_scores(test), by_nll.scores)
    with pytest.raises(ValueError, match="at least 3 held-out good images"):
        model.calibrate(good[:2])


def assert_same_predictions(expected_model, loaded, pixels):
    assert loaded.is_calibrated and loaded.config.anomaly_calibration == expected_model.config.anomaly_calibration
    for method in ANOMALY_SCORES:
        expected, actual = expected_model.predict_anomalies(pixels, method), loaded.predict_anomalies(pixels, method)
        assert torch.equal(expected.scores, actual.scores), method
        assert torch.equal(expected.maps, actual.maps), method
        assert torch.equal(expected.is_anomalous, actual.is_anomalous), method
        assert expected.threshold == actual.threshold, method
    default_expected, default_loaded = expected_model.predict_anomalies(pixels), loaded.predict_anomalies(pixels)
    assert torch.equal(default_expected.is_anomalous, default_loaded.is_anomalous)


def test_calibration_round_trips_through_save_pretrained(tmp_path):
    model = tiny_model()
    model.calibrate(images(12, 3), target_fpr=0.1, method="standardized-map")
    model.save_pretrained(tmp_path)
    assert "anomaly_scores.py" in os.listdir(tmp_path)  # the modeling code's relative import travels with it
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["anomaly_calibration"]["method"] == "standardized-map"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as checkpoint:
        assert {"anomaly_statistics.location_mean", "anomaly_statistics.location_std"} <= set(checkpoint.keys())

    loaded = MAFModel.from_pretrained(tmp_path).eval()
    test = torch.cat([images(3, 4), with_defect(images(3, 5))])
    assert_same_predictions(model, loaded, test)
    assert torch.equal(loaded.anomaly_statistics.location_std, model.anomaly_statistics.location_std)


def test_save_pretrained_copies_every_sibling_file_the_modeling_code_imports(tmp_path):
    """trust_remote_code loads the model from the files next to the weights: every file of modeling_maf that
    modeling_maf.py imports (relatively, directly or through another such file) is copied there."""
    package = os.path.dirname(sys.modules[MAFModel.__module__].__file__)
    needed, pending = set(), ["modeling_maf.py"]
    while pending:
        with open(os.path.join(package, pending.pop())) as file:
            for line in file:
                if line.startswith("from ."):
                    name = line.split()[1][1:] + ".py"
                    if name not in needed:
                        needed.add(name)
                        pending.append(name)
    assert {"anomaly_scorer_maf.py", "patches_maf.py", "sampling_maf.py", "refinement_maf.py"} <= needed
    tiny_model().save_pretrained(tmp_path)
    assert needed <= set(os.listdir(tmp_path))


def test_checkpoint_without_statistics_loads_uncalibrated(tmp_path):
    """A model saved before calibration existed: no statistics in the checkpoint, no calibration in the config."""
    model = tiny_model()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("anomaly_statistics.")},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = MAFModel.from_pretrained(tmp_path)
    assert not loaded.is_calibrated
    assert torch.equal(loaded.anomaly_statistics.location_std, torch.ones(6, 6))
    assert not loaded.anomaly_statistics.location_mean.any()
    pixels = images(2, 1)
    assert torch.equal(loaded.anomaly_scores(pixels), model.anomaly_scores(pixels))


CHILD_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.meta_path[:] = [finder for finder in sys.meta_path
                        if "__editable__" not in getattr(finder, "__module__", "") + type(finder).__module__]
    try:
        import modeling_maf
    except ImportError:
        pass
    else:
        sys.exit("modeling_maf is importable in the child process; the test would prove nothing")
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(REPO_ID, trust_remote_code=True).eval()
    prediction = model.predict_anomalies(torch.load(INPUTS))
    torch.save({"scores": prediction.scores, "is_anomalous": prediction.is_anomalous,
                "threshold": prediction.threshold, "method": prediction.method}, OUTPUT)
    """
)


def test_calibration_round_trips_through_the_hub(hub_server, tmp_path):
    model = tiny_model(seed=1)
    model.calibrate(images(12, 3), target_fpr=0.1)
    repo_id = hub_server.repo_id("maf-calibrated")
    model.push_to_hub(repo_id)
    loaded = MAFModel.from_pretrained(repo_id, cache_dir=tmp_path / "cache").eval()
    test = torch.cat([images(3, 4), with_defect(images(3, 5))])
    assert_same_predictions(model, loaded, test)

    # A fresh interpreter without this package: the scores module comes from the repo with the modeling code.
    torch.save(test, tmp_path / "inputs.pt")
    script = f"REPO_ID, INPUTS, OUTPUT = {repo_id!r}, {str(tmp_path / 'inputs.pt')!r}, {str(tmp_path / 'out.pt')!r}\n"
    result = subprocess.run([sys.executable, "-I", "-c", script + CHILD_SCRIPT], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300,
                            env=hub_server.subprocess_env(HF_HOME=str(tmp_path / "child-home"), PYTHONPATH=None))
    assert result.returncode == 0, result.stderr[-4000:]
    remote = torch.load(tmp_path / "out.pt")
    expected = model.predict_anomalies(test)
    assert torch.equal(remote["scores"], expected.scores) and torch.equal(remote["is_anomalous"], expected.is_anomalous)
    assert (remote["threshold"], remote["method"]) == (expected.threshold, expected.method)
