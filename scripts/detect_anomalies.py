#!/usr/bin/env python
"""Score every test image with a trained flow, decide which are anomalous, and report how well the scores separate
good from defective images.

    python scripts/detect_anomalies.py --model_name_or_path runs/maf --data_dir data/mvtec_capsule

Data: MVTec's layout (ground_truth/ masks for all, some or no defect types), the plain layout train/good,
test/good, test/<any name>, or a Hub dataset with image + label (--dataset_name); see hf_dgm_training/data/anomaly/.

Scores (modeling_maf/anomaly_scores.py; all are reported, --score picks the headline one): nll, map-max, map-topk,
and, for a calibrated model, standardized-map, standardized-topk, positive-z-sum (per-location z-scores against
held-out good images) and patch-z-top3 (per-location z-scores of each patch's NLL; for patch models, patch_size in
the config). A calibrated model (MAFModel.calibrate, done by train_maf.py on its validation split) also
carries a decision threshold per score at a target false-positive rate: an image is anomalous when its score is
above it. An uncalibrated model can be calibrated here with --calibration_data.

Image metrics (AUROC, AUPR, F1-max, AUROC per defect type) need good and defective test images; pixel AUROC is taken
over the images whose masks are known. What is undefined is said in one line and the rest is still written.
Writes anomaly_report.json, roc_curve.png, score_histogram.png, anomaly_maps.png and misses.png to --output_dir.
"""

import argparse
import math
import os

import numpy as np

from hf_dgm_training import (
    UsageError,
    add_debug_arg,
    device_description,
    load_model_for_inference,
    run_main,
    write_json,
)
from hf_dgm_training.arguments import PERCENTAGE, POSITIVE_INT, PROBABILITY, SEED
from hf_dgm_training.figures import LINE_STYLES, draw_heatmap_colorbar
from hf_dgm_training.metrics import load_anomaly_metric
from hf_dgm_training.metrics.evaluation import (
    applicable_scores,
    evaluate_scores,
    image_metrics_note,
    map_peak,
    nll_maps_of,
    peak_on_defect,
    score_all,
)


# The model package and the data loading are imported where they are used: with transformers and datasets they take
# seconds to import, which `--help` and a refused flag do not wait for.
VALIDATION = "validation"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="Folder written by train_maf.py, or a Hub id.")
    parser.add_argument("--data_dir", default=None,
                        help="Local data folder: train/good and test/<good or defect>, ground_truth/ optional.")
    parser.add_argument("--dataset_name", default=None, help="Hub dataset id with image + label (mask optional).")
    parser.add_argument("--category", default="capsule", help="MVTec AD category (for --download).")
    parser.add_argument("--download", action="store_true", help="Fetch MVTec's archive into --data_dir if missing.")
    parser.add_argument("--output_dir", default=None,
                        help="Where the report and figures go (default: <model>/anomaly).")
    parser.add_argument("--score", default=None,
                        help="Headline score of the report and of the decisions (all are computed; the names are "
                             "listed above). Default: the "
                             "model's calibrated score, or nll for a model that is not calibrated.")
    parser.add_argument("--calibration_data", default=None,
                        help="Calibrate the model here on good images (replacing a calibration it carries): a folder "
                             f"of good images, or '{VALIDATION}' for the validation split of the data's train/good "
                             "(the files train_maf.py recorded in train_results.json, else "
                             "--validation_split_percentage and --seed).")
    parser.add_argument("--validation_split_percentage", type=PERCENTAGE, default=10,
                        help=f"With --calibration_data {VALIDATION} and no recorded files: the percentage of "
                             "train/good held out (as train_maf.py does).")
    parser.add_argument("--seed", type=SEED, default=0, help="Seed of that validation split.")
    parser.add_argument("--target_fpr", type=PROBABILITY, default=0.05,
                        help="With --calibration_data: the false-positive rate the thresholds allow on those images.")
    parser.add_argument("--save_calibrated_model", default=None,
                        help="With --calibration_data: save the calibrated model (save_pretrained) to this folder.")
    parser.add_argument("--batch_size", type=POSITIVE_INT, default=32, help="Images scored per forward pass.")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available).")
    parser.add_argument("--hub_token", default=None, help="Token for private Hub models or datasets.")
    parser.add_argument("--num_examples", type=POSITIVE_INT, default=8,
                        help="Most columns of anomaly_maps.png (one per defect type, plus good images) and of "
                             "misses.png (half false negatives, half false positives).")
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    if args.data_dir is None and args.dataset_name is None:
        parser.error("pass --data_dir (a local data folder) or --dataset_name (a Hub dataset id).")
    if args.save_calibrated_model and not args.calibration_data:
        parser.error("--save_calibrated_model needs --calibration_data (the images to calibrate on).")
    if args.score is not None:
        from modeling_maf.anomaly_scores import ANOMALY_SCORES

        if args.score not in ANOMALY_SCORES:
            parser.error(f"argument --score: invalid choice: {args.score!r} (choose from {', '.join(ANOMALY_SCORES)})")
    return args


# ----------------------------------------------------------------------------------------------------- calibration


def recorded_validation_files(model_name_or_path: str, token=None):
    """The validation files train_maf.py recorded in train_results.json (local folder or Hub repo), or None."""
    import json

    from transformers.utils import cached_file

    path = cached_file(model_name_or_path, "train_results.json", token=token,
                       _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
    if path is None:
        return None
    with open(path) as f:
        return json.load(f).get("validation_files")


def calibration_pixels(args, dataset, processor):
    """(pixel_values, description) of the good images named by --calibration_data."""
    from hf_dgm_training.data.anomaly import load_good_images, load_split_as_tensors, split_validation

    if args.calibration_data != VALIDATION:
        images = load_good_images(args.calibration_data)
        return load_split_as_tensors(images, image_processor=processor).pixel_values, args.calibration_data
    files = recorded_validation_files(args.model_name_or_path, args.hub_token)
    if files:
        _, validation = split_validation(dataset["train"], validation_files=files)
        source = f"the {len(files)} validation files recorded in train_results.json"
    else:
        _, validation = split_validation(dataset["train"], args.validation_split_percentage, args.seed)
        source = (f"a {args.validation_split_percentage}% validation split of train/good (seed {args.seed}; no "
                  "validation files recorded with the model: check that it did not train on them)")
    return load_split_as_tensors(validation, image_processor=processor).pixel_values, source


def calibrate(args, model, dataset, device, processor) -> str:
    """Calibrate on --calibration_data when given; returns where the calibration comes from."""
    if args.calibration_data is None:
        return "the model" if model.is_calibrated else "none"
    pixels, source = calibration_pixels(args, dataset, processor)
    model.calibrate(pixels.to(device), target_fpr=args.target_fpr, method=args.score,
                    batch_size=args.batch_size)
    print(f"Calibrated on {len(pixels)} good images ({source}).")
    if args.save_calibrated_model:
        model.save_pretrained(args.save_calibrated_model)
        print(f"Calibrated model saved to {args.save_calibrated_model}.")
    return source


# ---------------------------------------------------------------------------------------------------------- report


def build_report(args, model, device, test, scored, metrics, method, calibration_source):
    from modeling_maf.anomaly_scores import expected_fpr

    labels = test.labels.numpy()
    headline = metrics[method]
    calibration = model.config.anomaly_calibration
    nll = scored.scores["nll"]
    # The sum of the per-pixel map over C * H * W dimensions (a patch model's map averages each pixel over its
    # patches, so this is its mean per-pixel NLL, not the flow's dimension).
    # A feature detector's NLL is of feature vectors, not pixels: no bits/dim.
    config = model.config
    pixel_model = config.model_type != "feature_maf"
    bits = nll / (config.num_channels * config.image_size**2 * math.log(2))
    predicted = scored.scores[method] > headline["threshold"] if model.is_calibrated else None
    peaks = peak_on_defect(scored.maps[method], test.masks.numpy(), test.has_masks.numpy(), labels)
    localised = [peak for peak in peaks if peak is not None]
    return {
        "model": args.model_name_or_path,
        "data": args.data_dir or args.dataset_name,
        "device": device_description(device),
        "score": method,
        "scores": list(scored.scores),
        "num_test_images": int(len(labels)),
        "num_good": int((labels == 0).sum()),
        "num_defective": int((labels == 1).sum()),
        "image_metrics_note": image_metrics_note(labels),
        "image_auroc": headline.get("auroc"),
        **{key: headline.get(key) for key in ("aupr", "f1_max", "f1_threshold", "auroc_per_defect")},
        **{key: headline[key] for key in ("pixel_auroc", "pixel_metrics_images", "pixel_metrics_images_without_mask",
                                          "pixel_metrics_note")},
        # Whether each defective image's map peaks on its marked defect (not on a blemish elsewhere), for `method`.
        "peak_on_defect": {"images": len(localised), "on_defect": sum(peak["peak_on_defect"] for peak in localised)},
        "calibration_source": calibration_source,
        "calibration": calibration,
        "decision_threshold": headline.get("threshold"),
        "decision_threshold_fpr": calibration["calibration_fpr"][method] if calibration else None,
        # (m + 1) / (N + 1): what a new good image's chance of landing above the threshold is (calibrated before this
        # field existed: computed from the fraction flagged and the number of images)
        "decision_threshold_expected_fpr": expected_fpr(calibration["calibration_fpr"][method],
                                                        calibration["num_images"]) if calibration else None,
        "target_fpr": calibration["target_fpr"] if calibration else None,
        "test_at_threshold": headline.get("at_threshold"),
        "test_good_bits_per_dim": float(bits[labels == 0].mean()) if pixel_model and (labels == 0).any() else None,
        "test_defective_bits_per_dim": float(bits[labels == 1].mean()) if pixel_model and (labels == 1).any()
        else None,
        "metrics_by_score": metrics,
        "per_image": [
            {"file": test.files[i], "defect_type": test.defect_types[i], "label": int(labels[i]),
             "has_mask": bool(test.has_masks[i]), **{name: float(values[i]) for name, values in scored.scores.items()},
             "predicted": bool(predicted[i]) if predicted is not None else None, **(peaks[i] or {})}
            for i in range(len(labels))
        ],
    }


def print_summary(report, output_dir):
    method = report["score"]
    if report["image_metrics_note"]:
        print(report["image_metrics_note"])
    else:
        print(f"image AUROC ({method}) {report['image_auroc']:.4f}, AUPR {report['aupr']:.4f}, "
              f"F1-max {report['f1_max']:.4f}; "
              + ", ".join(f"{name} {m['auroc']:.4f}" for name, m in report["metrics_by_score"].items()))
    if report["pixel_auroc"] is not None:
        print(f"pixel AUROC ({method}) {report['pixel_auroc']:.4f} over the {report['pixel_metrics_images']} test "
              f"images with masks ({report['pixel_metrics_images_without_mask']} without)")
    else:
        print(report["pixel_metrics_note"])
    peaks = report["peak_on_defect"]
    if peaks["images"]:
        off = sorted((row for row in report["per_image"] if row.get("peak_on_defect") is False),
                     key=lambda row: -row["peak_distance_px"])
        listed = ", ".join(f"{row['file']} ({row['peak_distance_px']:.0f} px)" for row in off[:5])
        print(f"map peak on the marked defect ({method}) in {peaks['on_defect']} of {peaks['images']} defective test "
              f"images with masks" + (f"; farthest off: {listed}" if off else ""))
    at = report["test_at_threshold"]
    if at is None:
        from modeling_maf.anomaly_scores import NOT_CALIBRATED

        print(NOT_CALIBRATED.replace("This model", "The model") + f" Or pass --calibration_data {VALIDATION} here.")
    else:
        rate = lambda value: "n/a" if value is None else f"{value:.3f}"  # noqa: E731
        print(f"threshold {report['decision_threshold']:.6g} ({method}, FPR {report['decision_threshold_fpr']:.3f} on "
              f"the calibration images, {report['decision_threshold_expected_fpr']:.3f} expected on new good images): "
              f"test FPR {rate(at['fpr'])}, TPR {rate(at['tpr'])} (TP {at['true_positives']}, "
              f"FP {at['false_positives']}, TN {at['true_negatives']}, FN {at['false_negatives']})")
    print(f"Report and figures in {output_dir}: anomaly_report.json, roc_curve.png, score_histogram.png, "
          "anomaly_maps.png, misses.png")


# --------------------------------------------------------------------------------------------------------- figures


def _new_figure(width, height, dpi=100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)  # no pyplot: no global backend state
    return figure


def _save(figure, path):
    figure.tight_layout()
    figure.savefig(path)


def plot_roc(path, scored, labels, metrics, names, default):
    """ROC curves of the scores `names`: the default score thick, black and below the others, which are thinner and
    each in its own line style, so that curves that coincide stay visible."""
    figure = _new_figure(4.8, 4.4)
    axis = figure.add_subplot()
    if image_metrics_note(labels) is not None:
        axis.text(0.5, 0.5, "ROC undefined:\none class only", ha="center", va="center")
    else:
        for index, name in enumerate(sorted(names, key=lambda n: n != default)):  # the default first: below
            ranked = labels[np.argsort(-scored.scores[name], kind="mergesort")]
            tpr = np.concatenate([[0], np.cumsum(ranked) / ranked.sum()])
            fpr = np.concatenate([[0], np.cumsum(1 - ranked) / (1 - ranked).sum()])
            style = dict(color="black", linewidth=3.5, alpha=0.6) if name == default else dict(
                color=f"C{index % 10}", linewidth=1.3, linestyle=LINE_STYLES[index % len(LINE_STYLES)])
            label = f"{name}{' (default)' if name == default else ''} (AUROC {metrics[name]['auroc']:.3f})"
            axis.plot(fpr, tpr, label=label, **style)
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        axis.legend(loc="lower right", fontsize=7)
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title="Image-level ROC")
    _save(figure, path)


def plot_score_histogram(path, scores, defect_types, method, threshold):
    """Histogram of the headline score per defect type, with the threshold; a log axis when the scores span
    more than a factor 10 (NLL of defects can be orders of magnitude above the good ones), labelled at 1, 2 and 5
    times powers of ten in plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    low, high = float(scores.min()), float(scores.max())
    logarithmic = low > 0 and high / low > 10
    bins = np.geomspace(low, high, 40) if logarithmic else np.linspace(low, high if high > low else low + 1, 40)
    figure = _new_figure(6, 3.6)
    axis = figure.add_subplot()
    for defect in sorted(set(defect_types), key=lambda d: (d != "good", d)):
        chosen = np.array([d == defect for d in defect_types])
        axis.hist(scores[chosen], bins=bins, alpha=0.6 if defect == "good" else 0.9, label=f"{defect} ({chosen.sum()})",
                  histtype="stepfilled" if defect == "good" else "step", linewidth=1.5)
    if threshold is not None:
        axis.axvline(threshold, color="black", linestyle="--", linewidth=1, label="threshold")
    if logarithmic:
        axis.set_xscale("log")
        decades = np.log10(high / low)
        axis.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if decades < 3 else (1.0,), numticks=8))
        axis.xaxis.set_minor_formatter(NullFormatter())
    else:
        axis.xaxis.set_major_locator(MaxNLocator(nbins=6))
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.4g}"))
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    axis.tick_params(labelsize=8)
    axis.set(xlabel=f"{method} score" + (" (log scale)" if logarithmic else ""), ylabel="images",
             title=f"{method} of the test images by defect type")
    axis.legend(fontsize=7)
    _save(figure, path)


def _as_image(pixel_values):
    """(C, H, W) in [0, 1] -> PIL image (RGB, or L for one channel)."""
    from PIL import Image

    array = (pixel_values.permute(1, 2, 0).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    return Image.fromarray(array[:, :, 0], mode="L") if array.shape[2] == 1 else Image.fromarray(array, mode="RGB")


def plot_examples(path, test, maps, scores, columns, titles, display_range, calibrated, row_label):
    """Columns of image / heatmap / mask, the heatmap drawn as the pipeline draws it (heatmap_maf: the model's
    calibrated colour scale, else each map's own) at the image's size, with the scale's colour bar beside the
    heatmap row and the map's peak (what a peak score reads) marked on the heatmap and the mask; `columns` are test
    indices (an empty list is said)."""
    from matplotlib.patheffects import withStroke

    from modeling_maf.heatmap_maf import heatmap_overlay, heatmap_scale

    if not columns:
        figure = _new_figure(3.0, 2.0, dpi=90)
        axis = figure.add_subplot()
        axis.text(0.5, 0.5, "none", ha="center", va="center")
        axis.axis("off")
        _save(figure, path)
        return
    count = len(columns)
    width = 1.9 * count + 1.9  # inches: the columns, then room for the row labels and the colour bar's labels
    figure = _new_figure(width, 6.6, dpi=90)
    grid = figure.add_gridspec(3, count + 1, width_ratios=[1.0] * count + [0.12], left=0.4 / width,
                               right=1 - 1.05 / width, top=0.86, bottom=0.02, wspace=0.08, hspace=0.28)
    scale = None
    for column, (index, title) in enumerate(zip(columns, titles)):
        image = _as_image(test.pixel_values[index])
        scale = heatmap_scale(maps[index], display_range, calibrated)
        overlay = heatmap_overlay(image, maps[index], alpha=0.5, scale=scale)
        axes = [figure.add_subplot(grid[row, column]) for row in range(3)]
        axes[0].imshow(image, cmap="gray" if image.mode == "L" else None, vmin=0, vmax=255, interpolation="nearest")
        axes[0].set_title(title, fontsize=7)
        axes[1].imshow(overlay, interpolation="nearest")
        axes[1].set_title(f"score {scores[index]:.4g}", fontsize=7)
        marked = [(axes[1], overlay.size[1], overlay.size[0])]  # the overlay is at the image's size
        if bool(test.has_masks[index]):
            mask = test.masks[index].numpy()
            axes[2].imshow(mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            marked.append((axes[2], *mask.shape))
        else:
            axes[2].text(0.5, 0.5, "no mask", ha="center", va="center", fontsize=8)
        (peak_row, peak_column), (map_height, map_width) = map_peak(maps[index]), maps[index].shape
        for axis, height, width in marked:
            axis.plot((peak_column + 0.5) * width / map_width - 0.5, (peak_row + 0.5) * height / map_height - 0.5,
                      marker="+", markeredgecolor="white", markersize=9, markeredgewidth=1.2,
                      path_effects=[withStroke(linewidth=3, foreground="black")])
        for axis in axes:
            axis.set_xticks([])
            axis.set_yticks([])
        if column:
            continue
        for axis, label in zip(axes, ("image", row_label, "mask")):
            axis.set_ylabel(label, fontsize=8)
    bar = figure.add_subplot(grid[1, count])
    draw_heatmap_colorbar(figure, bar, scale)
    if scale.note is not None:
        explained = scale.note
    else:
        explained = "one colour scale for every image, from the good validation images; black line: " + (
            "the decision threshold" if scale.threshold_label == "threshold" else
            f"{scale.threshold_label}, the level that the peaks of good images' maps exceed at the target "
            "false-positive rate (this score is a sum over the map, not a level of it)") + "; +: the map's peak"
    figure.suptitle(f"{row_label}: {explained}", fontsize=7, wrap=True)
    figure.savefig(path)


def pick_examples(scores, labels, defect_types, limit):
    """The median-scoring image of every defect type, then the median and the highest-scoring good image."""
    def median_of(indices):
        return sorted(indices, key=lambda i: scores[i])[len(indices) // 2]

    defects = sorted(set(d for d, label in zip(defect_types, labels) if label == 1))
    good = [i for i, label in enumerate(labels) if label == 0]
    good_picks = list(dict.fromkeys([median_of(good), max(good, key=lambda i: scores[i])])) if good else []
    chosen = [median_of([i for i, d in enumerate(defect_types) if d == defect and labels[i] == 1])
              for defect in defects]
    chosen = chosen[: max(1, limit - len(good_picks))] + good_picks
    return chosen[:limit]


def plot_figures(output_dir, model, test, scored, metrics, method, threshold, num_examples):
    labels = test.labels.numpy()
    scores, maps = scored.scores[method], scored.maps[method]
    plot_roc(os.path.join(output_dir, "roc_curve.png"), scored, labels, metrics,
             applicable_scores(model, scored.scores), method)
    plot_score_histogram(os.path.join(output_dir, "score_histogram.png"), scores, test.defect_types, method, threshold)
    display_range = model.anomaly_display_range(method)  # one colour scale for every map shown (None: per image)
    row_label = "NLL map" if method == "nll" else f"{method} map"
    examples = pick_examples(scores, labels, test.defect_types, num_examples)
    titles = [f"{test.defect_types[i]}\n{os.path.basename(test.files[i])}" for i in examples]
    plot_examples(os.path.join(output_dir, "anomaly_maps.png"), test, maps, scores, examples, titles, display_range,
                  model.is_calibrated, row_label)
    # The worst misses at the threshold: defective images scored lowest, good images scored highest.
    misses, titles = [], []
    if threshold is not None:
        half = max(1, num_examples // 2)
        negatives = sorted([i for i in range(len(labels)) if labels[i] == 1 and scores[i] <= threshold],
                           key=lambda i: scores[i])[:half]
        positives = sorted([i for i in range(len(labels)) if labels[i] == 0 and scores[i] > threshold],
                           key=lambda i: -scores[i])[:half]
        misses = negatives + positives
        titles = [f"missed {test.defect_types[i]}\n{os.path.basename(test.files[i])}" for i in negatives] + \
                 [f"false alarm\n{os.path.basename(test.files[i])}" for i in positives]
    plot_examples(os.path.join(output_dir, "misses.png"), test, maps, scores, misses, titles, display_range,
                  model.is_calibrated, row_label)


# ------------------------------------------------------------------------------------------------------------ main


def main(argv=None):
    args = parse_args(argv)
    device, output_dir, model = load_model_for_inference(args, "anomaly", model_types=("maf", "iaf", "feature_maf"))
    from hf_dgm_training.data.anomaly import load_anomaly_dataset, load_split_as_tensors
    from modeling_maf import MAFImageProcessor
    from modeling_maf.anomaly_scores import ANOMALY_SCORES, NOT_CALIBRATED

    dataset = load_anomaly_dataset(args.data_dir, args.dataset_name, download=args.download, category=args.category,
                                   token=args.hub_token)
    # The processor saved with the model: test and calibration images are preprocessed as the training images were.
    processor = MAFImageProcessor.from_model(args.model_name_or_path, model.config, token=args.hub_token)
    test = load_split_as_tensors(dataset["test"], image_processor=processor)
    calibration_source = calibrate(args, model, dataset, device, processor)
    method = model.resolve_anomaly_method(args.score)
    if ANOMALY_SCORES[method].needs_statistics and not model.is_calibrated:
        raise UsageError(f"--score {method} needs a calibrated model. {NOT_CALIBRATED} Or pass --calibration_data "
                         f"{VALIDATION} here.")

    scored = score_all(model, nll_maps_of(model, test.pixel_values, args.batch_size, device))
    labels = test.labels.numpy()
    metrics = evaluate_scores(model, scored, labels, test.defect_types, test.masks.numpy(), test.has_masks.numpy(),
                              metric=load_anomaly_metric() if image_metrics_note(labels) is None else None)
    report = build_report(args, model, device, test, scored, metrics, method, calibration_source)
    write_json(os.path.join(output_dir, "anomaly_report.json"), report)
    plot_figures(output_dir, model, test, scored, metrics, method, report["decision_threshold"], args.num_examples)
    print_summary(report, output_dir)
    return report


if __name__ == "__main__":
    run_main(main)
