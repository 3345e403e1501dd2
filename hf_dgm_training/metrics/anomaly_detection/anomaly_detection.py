"""Anomaly detection metric for `evaluate`: image AUROC, AUPR, F1-max, per-defect and pixel AUROC.

Kept in this repository and loaded by path, because the Hub's `roc_auc` module is fetched at run time and
cannot load offline:

    from hf_dgm_training.metrics import load_anomaly_metric

    metric = load_anomaly_metric()   # evaluate.load(ANOMALY_METRIC_PATH)
    metric.compute(predictions=scores, references=labels, defect_types=types, anomaly_maps=maps, masks=masks)
"""

import datasets
import evaluate

from .ranking import anomaly_metrics


_DESCRIPTION = """
Threshold-free metrics for anomaly detection, where `predictions` are anomaly scores (higher = more anomalous,
e.g. the negative log-likelihood of a flow) and `references` are 0 (normal) / 1 (anomalous):

- auroc: area under the ROC curve (probability that an anomaly outscores a normal item; ties count 1/2).
- aupr: average precision, the step-wise area under the precision-recall curve.
- f1_max and f1_threshold: the best F1 over all thresholds, predicting anomalous when score >= f1_threshold.
- auroc_per_defect (with `defect_types`): AUROC of all normal items against each defect type alone.
- pixel_auroc (with `anomaly_maps` and `masks`): AUROC over every pixel against ground-truth masks.

Accuracy is deliberately absent: classes are imbalanced and accuracy depends on a chosen threshold.
Results equal scikit-learn's roc_auc_score / average_precision_score / precision_recall_curve, ties included.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): anomaly score of each image, higher = more anomalous. Must be finite.
    references (`list` of `int`): 0 for a normal image, 1 for an anomalous one. Both classes must occur.
    defect_types (`list` of `str`, *optional*): defect type of each image (MVTec's `defect_type`, "good" for
        normal ones); adds `auroc_per_defect`.
    anomaly_maps (array-like (N, H, W), *optional*): per-pixel anomaly scores; needs `masks`; adds `pixel_auroc`.
    masks (array-like (N, H, W), *optional*): ground-truth masks, nonzero/True = defective pixel.
Returns:
    auroc (`float`), aupr (`float`), f1_max (`float`), f1_threshold (`float`), num_normal (`int`),
    num_anomalous (`int`), and when asked for: auroc_per_defect (`dict` of `str` to `float`), pixel_auroc (`float`).
Examples:
    >>> metric = evaluate.load(ANOMALY_METRIC_PATH)
    >>> metric.compute(predictions=[0.1, 0.4, 0.35, 0.8], references=[0, 0, 1, 1])["auroc"]
    0.75
"""

_CITATION = """
@inproceedings{bergmann2019mvtec,
  title={MVTec AD -- A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection},
  author={Bergmann, Paul and Fauser, Michael and Sattlegger, David and Steger, Carsten},
  booktitle={CVPR},
  year={2019}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AnomalyDetection(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # float64: NLL scores are large (~1e5 nats) and float32 would create ties that are not there.
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int64")}
            ),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.roc_auc_score.html",
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.average_precision_score.html",
            ],
        )

    def _compute(self, predictions, references, defect_types=None, anomaly_maps=None, masks=None):
        # Python lists from the cache; not format="numpy", which would round the scores to float32.
        return anomaly_metrics(predictions, references, defect_types=defect_types, anomaly_maps=anomaly_maps,
                               masks=masks)
