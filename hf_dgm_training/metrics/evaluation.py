"""Every anomaly score of a model on a labelled test set, and what can be measured from them: image metrics when
both classes are there, pixel AUROC over the images whose masks are known, and the decisions at the calibrated
thresholds. Shared by scripts/detect_anomalies.py and the benchmarks.

Image metrics come from the `anomaly_detection` evaluate module kept in this repository (`load_anomaly_metric`: loaded
by path, works offline), or from the same numpy code when `evaluate` is not installed (the metric is then None).
"""

import os
from typing import NamedTuple

import numpy as np
import torch

from . import ANOMALY_METRIC_PATH
from .anomaly_detection.ranking import anomaly_metrics, pixel_auroc


class ScoredImages(NamedTuple):
    """Per score name: its maps (N, H, W) float32 and its scores (N,) float64, as numpy arrays."""

    maps: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]


@torch.no_grad()
def nll_maps_of(model, pixel_values: torch.Tensor, batch_size: int, device):
    """The NLL maps at both grids (`NLLMaps`: per-pixel (N, H, W), per-patch (N, Lh, Lw)) on the CPU, from one pass
    of the flow in batches on `device`."""
    from modeling_maf.anomaly_scores import NLLMaps

    return NLLMaps.cat(model.nll_maps(chunk.to(device)).cpu() for chunk in pixel_values.split(batch_size))


def score_all(model, nll_maps) -> ScoredImages:
    """Every registered score the model can compute (the standardised ones need a calibrated model), from its
    `NLLMaps`; every map at the pixel grid."""
    maps, scores = {}, {}
    statistics_on = model.anomaly_statistics.location_mean.device
    for name in model.available_anomaly_scores:
        score_maps, values = model.score_nll_maps(nll_maps.to(statistics_on), method=name)
        maps[name] = score_maps.float().cpu().numpy()
        scores[name] = values.double().cpu().numpy()
    return ScoredImages(maps, scores)


def applicable_scores(model, names) -> list[str]:
    """The scores of `names` that tell something of their own about this model: a patch-grid score on a grid of one
    location (a whole-image flow) is a z-score of the image's NLL, ranked as "nll", so it is left out."""
    from modeling_maf.anomaly_scores import ANOMALY_SCORES, PATCH_GRID

    one_location = tuple(model.anomaly_statistics.grid_size) == (1, 1)
    return [name for name in names if not (one_location and ANOMALY_SCORES[name].grid == PATCH_GRID)]


def image_metrics_note(labels: np.ndarray) -> str | None:
    """None when both classes are present; else the one line that says why image metrics are undefined."""
    num_good, num_defective = int((labels == 0).sum()), int((labels == 1).sum())
    if num_good and num_defective:
        return None
    only = f"only good images ({num_good})" if num_good else f"only defective images ({num_defective})"
    return (f"Image-level metrics (AUROC, AUPR, F1-max) are undefined: the test set holds {only}; scores, decisions "
            "and the rates that exist are still reported.")


def image_metrics(metric, scores: np.ndarray, labels: np.ndarray, defect_types: list[str]) -> dict:
    """AUROC, AUPR, F1-max and its threshold, class counts and AUROC per defect type (both classes needed)."""
    if metric is None:
        result = anomaly_metrics(scores, labels, defect_types)
        result["metric_backend"] = "hf_dgm_training.metrics (numpy; evaluate not installed)"
        return result
    result = metric.compute(predictions=scores.tolist(), references=labels.tolist(), defect_types=defect_types)
    result["metric_backend"] = f"evaluate.load({os.path.relpath(ANOMALY_METRIC_PATH)})"
    return result


def pixel_metrics(maps: np.ndarray, masks: np.ndarray, has_masks: np.ndarray) -> dict:
    """Pixel AUROC of `maps` over the images whose masks are known; None with a note when it is undefined."""
    known = np.asarray(has_masks, dtype=bool)
    selected = masks[known]
    result = {"pixel_auroc": None, "pixel_metrics_images": int(known.sum()),
              "pixel_metrics_images_without_mask": int((~known).sum()), "pixel_metrics_note": None}
    if not selected.any() or selected.all():
        result["pixel_metrics_note"] = (
            f"Pixel AUROC is undefined: the {int(known.sum())} test image(s) with known masks hold "
            f"{'no defective pixel' if not selected.any() else 'only defective pixels'}.")
        return result
    result["pixel_auroc"] = pixel_auroc(maps[known], selected)
    return result


def map_peak(image_map: np.ndarray) -> tuple[int, int]:
    """(row, column) of a map's maximum: where a peak score (`map-max`) reads it."""
    row, column = np.unravel_index(int(np.argmax(image_map)), image_map.shape)
    return int(row), int(column)


def peak_on_defect(maps: np.ndarray, masks: np.ndarray, has_masks: np.ndarray, labels: np.ndarray) -> list:
    """Per image, where its map (N, H, W) peaks relative to its defect: for a defective image with a known, non-empty
    mask, ``{"peak_on_defect": whether the map's maximum lies on a defective pixel, "peak_distance_px": the distance
    from that maximum to the nearest defective pixel, 0 on it}``; None for the other images. A score can be high for
    a blemish that the ground truth does not mark; this says whether the map points at the defect itself."""
    peaks = []
    for image_map, mask, known, label in zip(maps, masks, has_masks, labels):
        defect = np.argwhere(mask > 0.5) if known and label == 1 else np.empty((0, 2))
        if not len(defect):
            peaks.append(None)
            continue
        peak = np.array(map_peak(image_map))
        distance = float(np.sqrt(((defect - peak) ** 2).sum(axis=1)).min())
        peaks.append({"peak_on_defect": distance == 0.0, "peak_distance_px": distance})
    return peaks


def counts_at_threshold(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """Confusion counts of "anomalous when score > threshold"; FPR (TPR) None when there is no good (defective)
    image."""
    predicted = scores > threshold
    good, defective = labels == 0, labels == 1
    counts = {
        "true_positives": int((predicted & defective).sum()),
        "false_positives": int((predicted & good).sum()),
        "true_negatives": int((~predicted & good).sum()),
        "false_negatives": int((~predicted & defective).sum()),
    }
    counts["fpr"] = counts["false_positives"] / int(good.sum()) if good.any() else None
    counts["tpr"] = counts["true_positives"] / int(defective.sum()) if defective.any() else None
    return counts


def evaluate_scores(model, scored: ScoredImages, labels: np.ndarray, defect_types: list[str], masks: np.ndarray,
                    has_masks: np.ndarray, metric=None) -> dict:
    """Per score name: image metrics (when defined), pixel metrics, and the counts at its calibrated threshold."""
    results = {}
    defined = image_metrics_note(labels) is None
    measured = []  # (maps, pixel metrics): scores whose maps are the same (e.g. map-max and map-topk) share them
    for name, scores in scored.scores.items():
        result = image_metrics(metric, scores, labels, defect_types) if defined else {}
        maps = scored.maps[name]
        pixel = next((dict(known) for seen, known in measured
                      if seen.shape == maps.shape and np.array_equal(seen, maps)), None)
        if pixel is None:
            pixel = pixel_metrics(maps, masks, has_masks)
            measured.append((maps, pixel))
        result.update(pixel)
        if model.is_calibrated:
            threshold = model.anomaly_threshold(name)
            result["threshold"] = threshold
            result["at_threshold"] = counts_at_threshold(scores, labels, threshold)
        results[name] = result
    return results
