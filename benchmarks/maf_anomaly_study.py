"""Every anomaly score of several trained MAF models (e.g. 3 seeds) on one test set: image AUROC, pixel AUROC and
the rates at the threshold per score, mean ± std over the models.

    python benchmarks/maf_anomaly_study.py --model_dirs runs/maf-s0 runs/maf-s1 runs/maf-s2 \
        --data_dir data/mvtec_capsule --output_dir runs/anomaly_study

Each model is calibrated here, the same way for all, on its held-out good images: the `validation_files` its
train_results.json records, else those of --validation_files (a JSON list or one file per line), else a
--validation_split_percentage split of train/good with --validation_seed (or the model's own `seed` from
train_results.json). The per-pixel NLL maps of the validation and test images come from one pass of each model;
every score of modeling_maf/anomaly_scores.py is then computed from them, for every --window_sizes entry of the
scores that average over a window (a score the window does not change is listed once). Patch models (patch_size in
their config) work alike: their per-pixel maps average each pixel over its patches, and patch-z-top3 reads the
per-patch NLL (its maps are brought to pixels for the pixel AUROC). Writes anomaly_study.json
and anomaly_study.png to --output_dir and prints a table.
"""

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch
from transformers import AutoModel

import modeling_maf  # noqa: F401  (registers the maf/iaf Auto classes)
from hf_dgm_training import device_description, resolve_device, write_json
from hf_dgm_training.data.anomaly import load_anomaly_dataset, load_split_as_tensors, split_validation
from hf_dgm_training.metrics import roc_auc, roc_auc_per_group
from hf_dgm_training.metrics.evaluation import counts_at_threshold, image_metrics_note, nll_maps_of, pixel_metrics
from modeling_maf.anomaly_scores import ANOMALY_SCORES, PATCH_GRID, ScoreParameters, calibrate_scores, compute_score


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dirs", nargs="+", required=True, help="Trained model folders (one per seed).")
    parser.add_argument("--data_dir", default=None, help="The data folder the models were trained on.")
    parser.add_argument("--dataset_name", default=None, help="Or a Hub dataset id with image + label.")
    parser.add_argument("--output_dir", required=True, help="Where anomaly_study.json and anomaly_study.png go.")
    parser.add_argument("--validation_files", default=None,
                        help="For models without validation_files in train_results.json: a JSON list (or one name "
                             "per line) of the train/good files held out from training.")
    parser.add_argument("--validation_split_percentage", type=float, default=10,
                        help="Otherwise: the percentage of train/good held out, as train_maf.py split it.")
    parser.add_argument("--validation_seed", type=int, default=None,
                        help="The seed of that split (default: the model's `seed` in train_results.json, else 0).")
    parser.add_argument("--target_fpr", type=float, default=0.05, help="False-positive rate of the thresholds.")
    parser.add_argument("--window_sizes", type=int, nargs="*", default=None,
                        help="Windows of the standardised scores to compare (odd, pixels; default: the model's "
                             "default for its image size only).")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per forward pass.")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available).")
    return parser.parse_args(argv)


def validation_files_for(args, model_dir):
    """(files or None, seed) of a model's validation split, by the precedence of the module docstring."""
    results_path = os.path.join(model_dir, "train_results.json")
    results = json.load(open(results_path)) if os.path.isfile(results_path) else {}
    if results.get("validation_files"):
        return results["validation_files"], None
    if args.validation_files:
        text = open(args.validation_files).read()
        return (json.loads(text) if text.lstrip().startswith("[") else text.split()), None
    return None, args.validation_seed if args.validation_seed is not None else results.get("seed", 0)


def study_one_model(args, model_dir, dataset, device):
    """Per setting name and score: image AUROC, per-defect AUROC, pixel AUROC and the rates at the threshold."""
    model = AutoModel.from_pretrained(model_dir).to(device).eval()
    config = model.config
    files, seed = validation_files_for(args, model_dir)
    _, validation = (split_validation(dataset["train"], validation_files=files) if files is not None
                     else split_validation(dataset["train"], args.validation_split_percentage, seed))
    good = load_split_as_tensors(validation, config.image_size, config.num_channels).pixel_values
    test = load_split_as_tensors(dataset["test"], config.image_size, config.num_channels)
    good_maps = nll_maps_of(model, good, args.batch_size, device).to(device)
    test_maps = nll_maps_of(model, test.pixel_values, args.batch_size, device).to(device)
    labels = test.labels.numpy()
    defined = image_metrics_note(labels) is None
    default = ScoreParameters.for_image_size(config.image_size)
    windows = args.window_sizes or [default.window_size]
    entries, seen = [], {}
    for window in windows:
        parameters = ScoreParameters(default.smoothing_sigma, window, default.top_k_fraction)
        statistics, thresholds, _, _ = calibrate_scores(good_maps, parameters, args.target_fpr)
        for name in ANOMALY_SCORES:
            maps, scores = compute_score(name, test_maps, parameters, statistics)
            if ANOMALY_SCORES[name].grid == PATCH_GRID:
                maps = model.patch_maps_to_pixels(maps)
            scores = scores.double().cpu().numpy()
            if name in seen and np.array_equal(seen[name], scores):
                continue  # this score does not depend on the window
            seen[name] = scores
            entries.append((name, window, {
                "image_auroc": roc_auc(scores, labels) if defined else None,
                "auroc_per_defect": roc_auc_per_group(scores, labels, test.defect_types) if defined else None,
                **pixel_metrics(maps.float().cpu().numpy(), test.masks.numpy(), test.has_masks.numpy()),
                "at_threshold": counts_at_threshold(scores, labels, thresholds[name]),
            }))
    variants = {name: sum(1 for n, _, _ in entries if n == name) for name, _, _ in entries}
    results = {(name if variants[name] == 1 else f"{name} (window {window})"): result
               for name, window, result in entries}
    return {"model_dir": model_dir, "patch_size": config.patch_size, "patch_stride": config.patch_stride,
            "num_validation_images": len(good), "validation_seed": seed,
            "validation_files": list(validation["file"]), "scores": results}


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(per_model):
    summary = {}
    labels = list(dict.fromkeys(label for model in per_model for label in model["scores"]))
    for label in labels:
        rows = [model["scores"][label] for model in per_model if label in model["scores"]]
        summary[label] = {
            "image_auroc": mean_std([r["image_auroc"] for r in rows]),
            "pixel_auroc": mean_std([r["pixel_auroc"] for r in rows]),
            "test_fpr": mean_std([r["at_threshold"]["fpr"] for r in rows]),
            "test_tpr": mean_std([r["at_threshold"]["tpr"] for r in rows]),
        }
    return summary


def plot(path, summary):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [label for label, row in summary.items() if row["image_auroc"][0] is not None]
    figure = Figure(figsize=(max(5, 1.1 * len(labels) + 1), 4), dpi=100)
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    means = [summary[label]["image_auroc"][0] for label in labels]
    stds = [summary[label]["image_auroc"][1] for label in labels]
    axis.bar(range(len(labels)), means, yerr=stds, capsize=4, color="C0")
    axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    axis.set(ylabel="image AUROC (mean ± std over models)", ylim=(0.5, 1.0), title="Anomaly scores")
    figure.tight_layout()
    figure.savefig(path)


def format_row(label, row):
    def cell(pair):
        return "n/a" if pair[0] is None else f"{pair[0]:.3f} ± {pair[1]:.3f}"

    return (f"| {label} | {cell(row['image_auroc'])} | {cell(row['pixel_auroc'])} | {cell(row['test_fpr'])} | "
            f"{cell(row['test_tpr'])} |")


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    device = resolve_device(args.device)
    dataset = load_anomaly_dataset(args.data_dir, args.dataset_name)
    per_model = []
    for model_dir in args.model_dirs:
        per_model.append(study_one_model(args, model_dir, dataset, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next model (2 GB at the default size) starts from a clean cache
    summary = summarize(per_model)
    os.makedirs(args.output_dir, exist_ok=True)
    write_json(os.path.join(args.output_dir, "anomaly_study.json"), {
        "data": args.data_dir or args.dataset_name, "device": device_description(device),
        "target_fpr": args.target_fpr, "num_models": len(per_model), "seconds": time.perf_counter() - started,
        "summary": {label: {key: list(value) for key, value in row.items()} for label, row in summary.items()},
        "per_model": per_model})
    if any(row["image_auroc"][0] is not None for row in summary.values()):
        plot(os.path.join(args.output_dir, "anomaly_study.png"), summary)
    print(f"{len(per_model)} model(s), target FPR {args.target_fpr}, mean ± std over the models:")
    print("| score | image AUROC | pixel AUROC | test FPR at threshold | test TPR at threshold |")
    print("|---|---|---|---|---|")
    for label, row in summary.items():
        print(format_row(label, row))
    print(f"Results in {args.output_dir}: anomaly_study.json, anomaly_study.png")
    return summary


if __name__ == "__main__":
    main()
