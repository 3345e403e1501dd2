"""Metrics of the scripts, kept in this repository so that they load offline.

- `anomaly_detection/`: the `anomaly_detection` evaluate module (image AUROC, AUPR, F1-max, per-defect and pixel
  AUROC), loaded by path: `load_anomaly_metric()` (`ANOMALY_METRIC_PATH` is its folder). The numpy functions behind
  it are importable without `evaluate` (e.g. on a machine that lacks it).
- `evaluation.py`: every anomaly score of a model on a labelled test set, and the metrics of them.
- `sample_quality.py`: measures of generated images against reference images.
"""

import os

from .anomaly_detection.ranking import (
    anomaly_metrics,
    average_precision,
    f1_max,
    pixel_auroc,
    roc_auc,
    roc_auc_per_group,
)


ANOMALY_METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "anomaly_detection")


def load_anomaly_metric(**kwargs):
    """`evaluate.load(ANOMALY_METRIC_PATH, **kwargs)`, or None when `evaluate` is not installed (the numpy functions
    above give the same numbers); evaluate is imported here only, when asked for."""
    try:
        import evaluate
    except ImportError:
        return None
    return evaluate.load(ANOMALY_METRIC_PATH, **kwargs)


__all__ = [
    "ANOMALY_METRIC_PATH",
    "anomaly_metrics",
    "average_precision",
    "f1_max",
    "load_anomaly_metric",
    "pixel_auroc",
    "roc_auc",
    "roc_auc_per_group",
]
