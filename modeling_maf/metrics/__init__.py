"""Metrics kept in this repository, so that they load offline.

`ANOMALY_METRIC_PATH` is the folder of the `anomaly_detection` evaluate module: `evaluate.load(ANOMALY_METRIC_PATH)`.
The numpy functions behind it are importable without `evaluate` (e.g. on a machine that lacks it).
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
    """`evaluate.load(ANOMALY_METRIC_PATH, **kwargs)`; evaluate is imported here only, when asked for."""
    import evaluate

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
