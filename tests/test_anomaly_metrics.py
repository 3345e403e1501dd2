# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""The anomaly detection metric (numpy core and the `evaluate` module) against scikit-learn, ties included."""

import time

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from hf_dgm_training.metrics import (
    ANOMALY_METRIC_PATH,
    average_precision,
    f1_max,
    load_anomaly_metric,
    pixel_auroc,
    roc_auc,
    roc_auc_per_group,
)


def _random_case(seed: int, size: int = 200, tied: bool = True):
    rng = np.random.default_rng(seed)
    labels = (rng.random(size) < 0.3).astype(int)
    labels[:2] = [0, 1]  # both classes always present
    if tied:  # few distinct values: many ties across and within classes
        scores = rng.integers(0, 6, size).astype(float) + labels * rng.integers(0, 2, size)
    else:
        scores = rng.normal(size=size) + labels
    return scores, labels


def _sklearn_f1_max(scores, labels):
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return f1[:-1].max(), thresholds  # the last point (recall 0) has no threshold


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tied", [True, False])
def test_image_metrics_equal_sklearn(seed, tied):
    scores, labels = _random_case(seed, tied=tied)
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    best, threshold = f1_max(scores, labels)
    expected_best, sklearn_thresholds = _sklearn_f1_max(scores, labels)
    assert best == pytest.approx(expected_best, abs=1e-12)
    # The threshold is one of sklearn's candidates and really gives that F1 with "anomalous if score >= t".
    assert threshold in sklearn_thresholds
    predicted = scores >= threshold
    true_positives = np.sum(predicted & (labels == 1))
    assert 2 * true_positives / (predicted.sum() + labels.sum()) == pytest.approx(best, abs=1e-12)


def test_known_values():
    scores, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    assert roc_auc(scores, labels) == 0.75
    assert roc_auc([1, 1, 1, 1], labels) == 0.5  # all tied: chance level, as sklearn
    assert f1_max(scores, labels) == (pytest.approx(0.8), 0.35)


def test_per_defect_auroc_equals_sklearn_on_each_subset():
    scores, labels = _random_case(7, size=120)
    rng = np.random.default_rng(7)
    types = np.where(labels == 1, rng.choice(["crack", "poke", "squeeze"], size=labels.size), "good")
    per_defect = roc_auc_per_group(scores, labels, types.tolist())
    assert sorted(per_defect) == ["crack", "poke", "squeeze"]
    for name, value in per_defect.items():
        chosen = (labels == 0) | (types == name)
        assert value == pytest.approx(roc_auc_score(labels[chosen], scores[chosen]), abs=1e-12)
    with pytest.raises(ValueError, match="defect_types has 3 names"):
        roc_auc_per_group(scores, labels, ["good", "crack", "poke"])


def test_pixel_auroc_equals_sklearn_and_accepts_tensors():
    rng = np.random.default_rng(0)
    maps = rng.integers(0, 20, size=(5, 12, 12)).astype(np.float32)  # integer-valued: many ties
    masks = rng.random((5, 12, 12)) < 0.2
    maps += masks * 3
    expected = roc_auc_score(masks.reshape(-1), maps.reshape(-1))
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(torch.from_numpy(maps).to(torch.bfloat16), torch.from_numpy(masks)) == pytest.approx(
        expected, abs=1e-12
    )  # integers up to 23 are exact in bf16
    assert pixel_auroc(maps, masks.astype(np.uint8) * 255) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_is_fast_at_mvtec_size():
    rng = np.random.default_rng(0)
    maps = rng.random((132, 128, 128), dtype=np.float32)
    masks = rng.random((132, 128, 128)) < 0.02
    maps[masks] += 0.5
    start = time.perf_counter()
    value = pixel_auroc(maps, masks)
    elapsed = time.perf_counter() - start
    assert value == pytest.approx(0.875, abs=0.005)  # P(U + 0.5 > V) for U, V uniform on [0, 1]
    assert elapsed < 3.0, f"pixel AUROC over 2.2M pixels took {elapsed:.2f} s"


def test_pixel_auroc_errors():
    maps = np.zeros((2, 4, 4))
    with pytest.raises(ValueError, match=r"shape \(2, 4, 4\) but masks has \(2, 8, 8\)"):
        pixel_auroc(maps, np.zeros((2, 8, 8), dtype=bool))
    with pytest.raises(ValueError, match="no defective pixel"):
        pixel_auroc(maps, np.zeros((2, 4, 4), dtype=bool))
    with pytest.raises(ValueError, match="only defective pixels"):
        pixel_auroc(maps, np.ones((2, 4, 4), dtype=bool))


@pytest.mark.parametrize(
    "scores, labels, message",
    [
        ([0.1, 0.2, 0.3], [0, 0, 0], "all normal"),
        ([0.1, 0.2, 0.3], [1, 1, 1], "all anomalous"),
        ([0.1, 0.2, 0.3], [0, 1, 2], "must be 0 .normal. or 1"),
        ([0.1, float("nan"), 0.3], [0, 1, 1], "non-finite"),
        ([0.1, float("inf"), 0.3], [0, 1, 1], "non-finite"),
        ([], [], "empty"),
        ([0.1, 0.2], [0, 1, 1], "2 values but references has 3"),
    ],
)
def test_bad_inputs_give_clear_errors(scores, labels, message):
    for metric in (roc_auc, average_precision, f1_max):
        with pytest.raises(ValueError, match=message):
            metric(scores, labels)


def test_evaluate_module_loads_by_path_and_matches_sklearn():
    scores, labels = _random_case(3, size=60)
    types = np.where(labels == 1, np.where(np.arange(labels.size) % 2 == 0, "crack", "poke"), "good").tolist()
    rng = np.random.default_rng(1)
    masks = rng.random((4, 8, 8)) < 0.3
    maps = rng.random((4, 8, 8)) + masks

    metric = load_anomaly_metric()
    result = metric.compute(
        predictions=scores, references=labels, defect_types=types, anomaly_maps=maps, masks=masks
    )
    assert result["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result["aupr"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert result["f1_max"] == pytest.approx(_sklearn_f1_max(scores, labels)[0], abs=1e-12)
    assert (result["num_normal"], result["num_anomalous"]) == (int((labels == 0).sum()), int(labels.sum()))
    assert set(result["auroc_per_defect"]) == {"crack", "poke"}
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.reshape(-1), maps.reshape(-1)), abs=1e-12)
    assert "pixel_auroc" not in metric.compute(predictions=scores, references=labels)

    # The .py path works too, and batches accumulate.
    import evaluate

    by_file = evaluate.load(f"{ANOMALY_METRIC_PATH}/anomaly_detection.py")
    by_file.add_batch(predictions=scores[:30], references=labels[:30])
    by_file.add_batch(predictions=scores[30:], references=labels[30:])
    assert by_file.compute()["auroc"] == pytest.approx(result["auroc"], abs=1e-12)


def test_evaluate_module_keeps_float64_scores():
    # NLL scores are ~1e5: float32 (the datasets numpy format's default) would merge these into one tie.
    scores = [100000.001, 100000.002, 100000.003, 100000.004]
    result = load_anomaly_metric().compute(predictions=scores, references=[0, 0, 1, 1])
    assert result["auroc"] == 1.0
    assert result["f1_threshold"] == 100000.003


def test_evaluate_module_errors():
    metric = load_anomaly_metric()
    with pytest.raises(ValueError, match="all normal"):
        metric.compute(predictions=[0.1, 0.2], references=[0, 0])
    with pytest.raises(ValueError, match="both anomaly_maps and masks"):
        metric.compute(predictions=[0.1, 0.2], references=[0, 1], anomaly_maps=np.zeros((1, 2, 2)))


def test_peak_on_defect_says_where_each_defective_map_peaks():
    from hf_dgm_training.metrics.evaluation import peak_on_defect

    maps = np.zeros((4, 8, 8), dtype=np.float32)
    masks = np.zeros((4, 8, 8), dtype=np.float32)
    masks[0, 2, 2:5] = masks[1, 6, 1] = masks[3, 1, 1] = 1
    maps[0, 2, 3] = 5.0  # on its defect
    maps[1, 2, 5] = 5.0  # a blemish elsewhere: 4 rows and 4 columns from the defect
    maps[2, 4, 4] = 5.0  # a good image
    maps[3, 1, 1] = 5.0  # a defect whose mask is not known
    peaks = peak_on_defect(maps, masks, np.array([True, True, True, False]), np.array([1, 1, 0, 1]))
    assert peaks[0] == {"peak_on_defect": True, "peak_distance_px": 0.0}
    assert peaks[1]["peak_on_defect"] is False and peaks[1]["peak_distance_px"] == pytest.approx(32 ** 0.5)
    assert peaks[2] is None and peaks[3] is None
