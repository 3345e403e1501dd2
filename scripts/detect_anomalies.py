#!/usr/bin/env python
"""Score every test image of an MVTec AD category with a trained flow and report how well the scores separate
good from defective images.

    python scripts/detect_anomalies.py --model_name_or_path runs/maf --data_dir data/mvtec_capsule

Scores (all reported; --score picks the headline one):
  nll        the seed's score: the image's negative log-likelihood, i.e. the sum of the per-pixel map;
  map-max    maximum of the per-pixel NLL map after Gaussian smoothing: small defects are diluted in a sum over
             49,152 dimensions, a local peak is not;
  map-top1   mean of the top 1% of the smoothed map (between the two).
Metrics come from the `anomaly_detection` evaluate module kept in this repository (loaded by path, works
offline): image AUROC, AUPR, F1-max and its threshold, AUROC per defect type, and pixel AUROC of the smoothed map.
Writes anomaly_report.json, roc_curve.png, nll_histogram.png and anomaly_maps.png to --output_dir.
"""

import argparse
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

import modeling_maf  # noqa: F401  (registers the maf/iaf Auto classes)
from modeling_maf.data import load_mvtec, load_split_as_tensors
from modeling_maf.metrics import ANOMALY_METRIC_PATH
from hf_dgm_training import device_description, load_model_for_inference, write_json

SCORES = ("nll", "map-max", "map-top1")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="Folder written by train_maf.py, or a Hub id.")
    parser.add_argument("--data_dir", default=None, help="Local MVTec category folder (train/, test/, ground_truth/).")
    parser.add_argument("--dataset_name", default=None, help="Hub dataset id pushed by push_mvtec_dataset.py.")
    parser.add_argument("--category", default="capsule", help="MVTec AD category (for --download).")
    parser.add_argument("--download", action="store_true", help="Fetch MVTec's archive into --data_dir if missing.")
    parser.add_argument("--output_dir", default=None, help="Where the report and figures go (default: <model>/anomaly).")
    parser.add_argument("--score", choices=SCORES, default="nll", help="Headline score of the report (all are computed).")
    parser.add_argument("--smoothing_sigma", type=float, default=None,
                        help="Gaussian sigma (pixels) applied to the per-pixel maps for map scores and pixel AUROC "
                             "(default: image_size / 32, i.e. 4 pixels at 128x128).")
    parser.add_argument("--batch_size", type=int, default=32, help="Images scored per forward pass.")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available).")
    parser.add_argument("--hub_token", default=None, help="Token for private Hub models or datasets.")
    parser.add_argument("--num_examples", type=int, default=6, help="Images shown in anomaly_maps.png.")
    args = parser.parse_args(argv)
    if args.data_dir is None and args.dataset_name is None:
        parser.error("pass --data_dir (a local MVTec category folder) or --dataset_name (a Hub dataset id).")
    return args


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, H, W) maps (edge pixels replicated)."""
    if sigma <= 0:
        return maps
    radius = max(1, int(math.ceil(3 * sigma)))
    offsets = torch.arange(-radius, radius + 1, device=maps.device, dtype=maps.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = F.pad(maps[:, None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[:, 0]


@torch.no_grad()
def score_images(model, pixel_values, batch_size, sigma, device):
    maps = torch.cat([model.anomaly_maps(chunk.to(device)).cpu() for chunk in pixel_values.split(batch_size)])
    smoothed = gaussian_smooth(maps, sigma)
    flat = smoothed.flatten(1)
    top = max(1, flat.shape[1] // 100)
    scores = {
        "nll": maps.double().sum(dim=(1, 2)),
        "map-max": flat.max(dim=1).values.double(),
        "map-top1": flat.topk(top, dim=1).values.mean(dim=1).double(),
    }
    return scores, maps, smoothed


def compute_metrics(scores, labels, defect_types, smoothed=None, masks=None):
    """Through the `evaluate` module loaded by path; on a machine without `evaluate`, the same numpy code."""
    try:
        import evaluate
    except ImportError:
        from modeling_maf.metrics import anomaly_metrics

        result = anomaly_metrics(scores, labels, defect_types, smoothed, masks)
        result["metric_backend"] = "modeling_maf.metrics (numpy; evaluate not installed)"
        return result
    extra = {"anomaly_maps": smoothed, "masks": masks} if smoothed is not None else {}
    result = evaluate.load(ANOMALY_METRIC_PATH).compute(predictions=scores.tolist(), references=labels.tolist(),
                                                        defect_types=defect_types, **extra)
    result["metric_backend"] = f"evaluate.load({os.path.relpath(ANOMALY_METRIC_PATH)})"
    return result


def roc_points(scores, labels):
    order = np.argsort(-scores, kind="mergesort")
    ranked = labels[order]
    tpr = np.concatenate([[0], np.cumsum(ranked) / max(1, ranked.sum())])
    fpr = np.concatenate([[0], np.cumsum(1 - ranked) / max(1, (1 - ranked).sum())])
    return fpr, tpr


def plot_nll_histogram(path, nll, defect_types):
    """Histogram of NLL per defect type on a log axis: defective images can score orders of magnitude above
    the good ones, which a linear axis squeezes into one bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nll = np.asarray(nll, dtype=np.float64)
    low, high = nll.min(), nll.max()
    bins = np.geomspace(low, high, 40) if low > 0 else np.linspace(low, high, 40)
    figure, axis = plt.subplots(figsize=(6, 3.6), dpi=100)
    for defect in ["good"] + sorted(set(defect_types) - {"good"}):
        selected = np.array([d == defect for d in defect_types])
        axis.hist(nll[selected], bins=bins, alpha=0.6 if defect == "good" else 0.9, label=f"{defect} ({selected.sum()})",
                  histtype="stepfilled" if defect == "good" else "step", linewidth=1.5)
    if low > 0:
        axis.set_xscale("log")
    axis.set(xlabel="NLL (nats, log scale)", ylabel="images", title="NLL of test images: good vs each defect type")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_figures(output_dir, scores, labels, defect_types, metrics, pixel_values, smoothed, masks, num_examples):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.5, 4.2), dpi=100)
    for name in SCORES:
        fpr, tpr = roc_points(scores[name], labels)
        axis.plot(fpr, tpr, label=f"{name} (AUROC {metrics[name]['auroc']:.3f})")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title="Image-level ROC")
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "roc_curve.png"))
    plt.close(figure)

    plot_nll_histogram(os.path.join(output_dir, "nll_histogram.png"), scores["nll"], defect_types)

    # Examples: the best-scoring good image and the most anomalous defective ones, with map and ground truth.
    order = np.argsort(-scores["map-max"])
    defective = [i for i in order if labels[i] == 1][: max(1, num_examples - 1)]
    good = [i for i in order[::-1] if labels[i] == 0][:1]
    chosen = good + defective
    figure, axes = plt.subplots(3, len(chosen), figsize=(1.9 * len(chosen), 5.8), dpi=90, squeeze=False)
    for column, index in enumerate(chosen):
        image = pixel_values[index].permute(1, 2, 0).numpy()
        axes[0, column].imshow(image)
        axes[0, column].set_title(f"{defect_types[index]}", fontsize=8)
        axes[1, column].imshow(image)
        axes[1, column].imshow(smoothed[index].numpy(), cmap="jet", alpha=0.5)
        axes[1, column].set_title(f"map max {scores['map-max'][index]:.1f}", fontsize=7)
        axes[2, column].imshow(masks[index].numpy(), cmap="gray", vmin=0, vmax=1)
        for row in range(3):
            axes[row, column].axis("off")
    axes[0, 0].text(-0.1, 0.5, "image", rotation=90, transform=axes[0, 0].transAxes, va="center", ha="right")
    axes[1, 0].text(-0.1, 0.5, "NLL map", rotation=90, transform=axes[1, 0].transAxes, va="center", ha="right")
    axes[2, 0].text(-0.1, 0.5, "mask", rotation=90, transform=axes[2, 0].transAxes, va="center", ha="right")
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "anomaly_maps.png"))
    plt.close(figure)


def main(argv=None):
    args = parse_args(argv)
    device, output_dir, model = load_model_for_inference(args, "anomaly")
    dataset = load_mvtec(args.data_dir, args.dataset_name, download=args.download, category=args.category,
                         token=args.hub_token)
    if "test" not in dataset:
        raise ValueError("The dataset has no test split: anomaly detection needs test images with defects.")
    test = load_split_as_tensors(dataset["test"], model.config.image_size)
    labels = test.labels.numpy()
    if args.smoothing_sigma is None:
        args.smoothing_sigma = model.config.image_size / 32
    if len(set(labels.tolist())) < 2:
        raise ValueError("The test split needs both good and defective images to compute AUROC.")

    scores, maps, smoothed = score_images(model, test.pixel_values, args.batch_size, args.smoothing_sigma, device)
    scores = {name: value.numpy() for name, value in scores.items()}
    metrics = {}
    for name in SCORES:
        with_pixels = name == args.score
        metrics[name] = compute_metrics(scores[name], labels, test.defect_types,
                                        smoothed.numpy() if with_pixels else None,
                                        test.masks.numpy() if with_pixels else None)
    headline = metrics[args.score]
    bits = scores["nll"] / (model.config.num_features * math.log(2))
    good = labels == 0
    report = {
        "model": args.model_name_or_path,
        "device": device_description(device),
        "score": args.score,
        "image_auroc": headline["auroc"],
        "aupr": headline["aupr"],
        "f1_max": headline["f1_max"],
        "f1_threshold": headline["f1_threshold"],
        "auroc_per_defect": headline["auroc_per_defect"],
        "pixel_auroc": headline.get("pixel_auroc"),
        "smoothing_sigma": args.smoothing_sigma,
        "test_good_bits_per_dim": float(bits[good].mean()),
        "test_defective_bits_per_dim": float(bits[~good].mean()),
        "num_test_images": int(len(labels)),
        "metrics_by_score": metrics,
        "per_image": [{"defect_type": d, "label": int(l), **{n: float(scores[n][i]) for n in SCORES}}
                      for i, (d, l) in enumerate(zip(test.defect_types, labels))],
    }
    write_json(os.path.join(output_dir, "anomaly_report.json"), report)
    plot_figures(output_dir, scores, labels, test.defect_types, metrics, test.pixel_values, smoothed, test.masks,
                 args.num_examples)
    print(f"image AUROC ({args.score}) {report['image_auroc']:.4f}, AUPR {report['aupr']:.4f}, F1-max "
          f"{report['f1_max']:.4f}, pixel AUROC {report['pixel_auroc']:.4f}; "
          + ", ".join(f"{n} AUROC {metrics[n]['auroc']:.4f}" for n in SCORES))
    print(f"Report and figures in {output_dir}: anomaly_report.json, roc_curve.png, nll_histogram.png, anomaly_maps.png")
    return report


if __name__ == "__main__":
    main()
