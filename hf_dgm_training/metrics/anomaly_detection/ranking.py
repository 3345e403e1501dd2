"""Threshold-free ranking metrics for anomaly detection, in plain numpy.

Scores are "higher = more anomalous"; labels are 0 (normal) / 1 (anomalous). Ties are handled exactly as
scikit-learn does (a tie between a normal and an anomalous item counts half in AUROC; thresholds sit at distinct
score values). AUROC sorts the normal and the anomalous scores apart and counts, for every anomalous score, the normal
scores below and equal to it (two binary searches): no index sort of all scores, so the 17 million pixels of 118
maps at 384x384 take about a second. The other metrics use one sort of the scores and per-distinct-value counts. No
scikit-learn dependency: the tests compare against it instead.

This file must stay importable on its own (numpy only): the `evaluate` module next to it imports it
relatively, and scripts may import it without `evaluate` installed.
"""

from typing import NamedTuple

import numpy as np


class TieGroups(NamedTuple):
    """Distinct score values in ascending order, with how many positives/negatives share each value."""

    values: np.ndarray  # (G,) float64, ascending
    positives: np.ndarray  # (G,) int64
    negatives: np.ndarray  # (G,) int64


def _validate(scores, labels, what: str = "predictions", keep_float32: bool = False):
    """(scores as float64, or float32 ones kept as they are with ``keep_float32`` (the same order and ties, half the
    memory to sort), labels as int64), after checking both."""
    scores = np.asarray(scores)
    if not (keep_float32 and scores.dtype == np.float32):
        scores = scores.astype(np.float64, copy=False)
    scores = scores.reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(
            f"{what} has {scores.size} values but references has {labels.size}; they must match one to one."
        )
    if scores.size == 0:
        raise ValueError(f"{what} is empty: nothing to evaluate.")
    if labels.dtype == bool:
        labels = labels.astype(np.int64)
    elif not np.isin(labels, (0, 1)).all():
        bad = np.unique(labels[~np.isin(labels, (0, 1))])[:5]
        raise ValueError(f"references must be 0 (normal) or 1 (anomalous); found {bad.tolist()}.")
    finite = np.isfinite(scores)
    if not finite.all():
        raise ValueError(
            f"{what} holds {int((~finite).sum())} non-finite value(s) (NaN or inf) out of {scores.size}; "
            "anomaly scores must be finite (check the model for overflow, e.g. under bf16)."
        )
    labels = labels.astype(np.int64)
    num_positive = int(labels.sum())
    if num_positive == 0 or num_positive == labels.size:
        only = "normal (0)" if num_positive == 0 else "anomalous (1)"
        raise ValueError(
            f"references are all {only} ({labels.size} items): ranking metrics need both normal and anomalous "
            "examples. Evaluate on a split that holds both (for MVTec: the test split)."
        )
    return scores, labels


def tie_groups(scores, labels) -> TieGroups:
    """Validate, sort once, and count positives/negatives per distinct score value."""
    scores, labels = _validate(scores, labels)
    order = np.argsort(scores)  # stability is irrelevant: only per-value counts are used
    sorted_scores = scores[order]
    starts = np.concatenate(([0], np.flatnonzero(np.diff(sorted_scores)) + 1))
    positives = np.add.reduceat(labels[order], starts)
    counts = np.diff(np.append(starts, scores.size))
    return TieGroups(sorted_scores[starts], positives.astype(np.int64), (counts - positives).astype(np.int64))


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve: P(score of an anomaly > score of a normal item), ties counting 1/2.

    Equals sklearn.metrics.roc_auc_score (the trapezoidal area under the full ROC curve) exactly.
    """
    scores, labels = _validate(scores, labels, keep_float32=True)
    anomalous = labels.astype(bool)
    normal_scores = np.sort(scores[~anomalous])
    # Sorted queries walk the normal scores in order (cache-friendly binary searches).
    anomalous_scores = np.sort(scores[anomalous])
    below = np.searchsorted(normal_scores, anomalous_scores, side="left")
    below_or_tied = np.searchsorted(normal_scores, anomalous_scores, side="right")
    # Integer arithmetic (times 2 to keep the half counts exact) avoids rounding on millions of pixels.
    twice_wins = int(below.sum(dtype=np.int64)) + int(below_or_tied.sum(dtype=np.int64))
    return float(twice_wins / (2.0 * anomalous_scores.size * normal_scores.size))


def _descending_counts(groups: TieGroups):
    """True/false positives when predicting "anomalous" for score >= each distinct value, highest value first."""
    thresholds = groups.values[::-1]
    true_positives = np.cumsum(groups.positives[::-1])
    false_positives = np.cumsum(groups.negatives[::-1])
    return thresholds, true_positives, false_positives


def average_precision(scores, labels) -> float:
    """Average precision (area under the precision-recall curve as a step sum), as sklearn computes it.

    AP = sum over distinct thresholds (descending) of (R_k - R_{k-1}) * P_k; no interpolation.
    """
    _, tp, fp = _descending_counts(tie_groups(scores, labels))
    recall_gain = np.diff(np.concatenate(([0], tp))) / tp[-1]
    precision = tp / (tp + fp)
    return float(np.sum(recall_gain * precision))


def f1_max(scores, labels) -> tuple[float, float]:
    """Best F1 over all thresholds and that threshold (predict anomalous when score >= threshold).

    The candidates are the distinct score values, as in sklearn.metrics.precision_recall_curve. When several
    thresholds reach the same F1, the highest one is returned.
    """
    thresholds, tp, fp = _descending_counts(tie_groups(scores, labels))
    f1 = 2.0 * tp / (tp + fp + tp[-1])  # 2PR/(P+R) with P = tp/(tp+fp), R = tp/num_positive
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def pixel_auroc(anomaly_maps, masks) -> float:
    """AUROC over every pixel of every image: per-pixel anomaly scores against ground-truth masks.

    anomaly_maps: (N, H, W) scores (higher = more anomalous); masks: (N, H, W), nonzero/True = defective pixel.
    Torch tensors are accepted (moved to CPU). Both must have the same shape: resize the maps or masks first.
    """
    anomaly_maps = _to_numpy(anomaly_maps)
    masks = _to_numpy(masks)
    if anomaly_maps.shape != masks.shape:
        raise ValueError(
            f"anomaly_maps has shape {tuple(anomaly_maps.shape)} but masks has {tuple(masks.shape)}; "
            "they must match pixel for pixel (resize masks with nearest-neighbour to the map size)."
        )
    if masks.dtype != bool:
        masks = masks != 0
    if not masks.any() or masks.all():
        which = "no defective pixel" if not masks.any() else "only defective pixels"
        raise ValueError(
            f"masks hold {which} ({masks.size} pixels): pixel AUROC needs both. Pass the test images that have "
            "defects together with good ones (their masks are all zero)."
        )
    return roc_auc(anomaly_maps.reshape(-1), masks.reshape(-1))


def roc_auc_per_group(scores, labels, groups) -> dict[str, float]:
    """AUROC of all normal items (label 0) against the anomalous items of each group, e.g. each defect type.

    groups: one name per item (MVTec's defect_type). The names of normal items are not used.
    """
    scores, labels = _validate(scores, labels)
    groups = np.asarray(list(groups), dtype=object)
    if groups.shape != labels.shape:
        raise ValueError(
            f"defect_types has {groups.size} names but there are {labels.size} predictions; pass one per item."
        )
    normal = labels == 0
    result = {}
    for name in sorted(set(groups[~normal].tolist())):
        chosen = normal | (groups == name)
        result[str(name)] = roc_auc(scores[chosen], labels[chosen])
    return result


def _to_numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor, without importing torch here
        array = array.detach().float().cpu().numpy() if array.dtype.is_floating_point else array.detach().cpu().numpy()
    return np.asarray(array)


def anomaly_metrics(predictions, references, defect_types=None, anomaly_maps=None, masks=None) -> dict:
    """Every metric of the `anomaly_detection` module from scores (higher = more anomalous) and 0/1 labels:
    auroc, aupr, f1_max, f1_threshold, the class counts, and auroc_per_defect / pixel_auroc when asked for."""
    predictions = np.asarray(predictions, dtype=np.float64)
    references = np.asarray(references, dtype=np.int64)
    f1, threshold = f1_max(predictions, references)
    result = {
        "auroc": roc_auc(predictions, references),
        "aupr": average_precision(predictions, references),
        "f1_max": f1,
        "f1_threshold": threshold,
        "num_normal": int((references == 0).sum()),
        "num_anomalous": int((references == 1).sum()),
    }
    if defect_types is not None:
        result["auroc_per_defect"] = roc_auc_per_group(predictions, references, defect_types)
    if (anomaly_maps is None) != (masks is None):
        raise ValueError("pixel AUROC needs both anomaly_maps and masks; pass both or neither.")
    if anomaly_maps is not None:
        result["pixel_auroc"] = pixel_auroc(anomaly_maps, masks)
    return result
