#!/usr/bin/env python
"""The main job in one process: train a MAF on an anomaly data folder (MVTec AD's layout), sample 5 images (exact and
refined), write its anomaly report; train the feature-space anomaly detector (a MAF over frozen pretrained CNN
features) and write its report; optionally the patch detector too. `scripts/run_maf_pipeline.sh` sets up the
environment and calls this.

    python scripts/run_maf_pipeline.py --data_dir data/mvtec_capsule                  # the default configuration (GPU)
    python scripts/run_maf_pipeline.py --data_dir data/mvtec_capsule --preset cpu     # a few minutes on 2 CPU cores

Presets: `spec` trains the default whole-image MAF (128x128x3, MADE 49152->512->512->2*49152, 7 blocks, batch 8,
100 epochs, lr 1e-4), `cpu` a 64x64 MAF (3 blocks of 256-256, 8 epochs). Both train the feature detector (384x384
images, EfficientNet-Lite0 stages 3 and 4 on a 48x48 grid, whitened per location, 4 MADE blocks of 128-128, one
image's vectors a step): `spec` for its default 3 epochs, `cpu` for one (the CPU job's time budget). Every stage runs
the script of its own (train_maf.py, sample_maf.py, detect_anomalies.py) in this process, so imports are paid once;
each stage's wall time goes to OUTPUT_DIR/pipeline_results.json with the detectors' figures.

Outputs: OUTPUT_DIR (the MAF), OUTPUT_DIR/samples, OUTPUT_DIR/anomaly, OUTPUT_DIR/detector (the feature detector) and
OUTPUT_DIR/detector/anomaly; with --patch_detector on, OUTPUT_DIR/patch_detector too. Unknown flags go to the MAF's
training (e.g. --seed 1 --mixed_precision bf16); DETECTOR_EXTRA and PATCH_EXTRA (environment) add flags to the
detectors' training, last, so they win.
"""

import argparse
import json
import os
import shlex
import time

from hf_dgm_training.arguments import SEED
from hf_dgm_training.errors import add_debug_arg


# The whole-image MAF's flags per preset (the CPU job's times are in docs/RESULTS.md#start-up-and-end-to-end-times).
PRESETS = {
    "spec": [],
    "cpu": ["--image_size", "64", "--hidden_sizes", "256", "256", "--num_blocks", "3", "--num_train_epochs", "8"],
}
# The feature detector's flags per preset: its defaults on a GPU; on a CPU one epoch instead of three, so that the
# training loop over the 48x48 grid's vectors fits the CPU job's time budget (docs/RESULTS.md#feature-space-detector).
DETECTOR_PRESETS = {"spec": [], "cpu": ["--num_train_epochs", "1"]}
# The patch detector (docs/maf.md, 8. Patch MAF): 16x16 patches at stride 8 of 128x128 images, given their location.
PATCH_ARGS = ["--image_size", "128", "--patch_size", "16", "--patch_stride", "8", "--num_blocks", "5",
              "--hidden_sizes", "512", "512", "--learning_rate", "1e-3", "--num_train_epochs", "250",
              "--mixed_precision", "bf16"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--data_dir", help="The data folder (MVTec AD's layout: train/good, test/<good or defect>, "
                                         "optional ground_truth/<defect>/<name>_mask.png).")
    data.add_argument("--dataset_name", help="Or a Hub dataset id with image + label columns.")
    parser.add_argument("--category", default=None, help="MVTec AD category (with --download).")
    parser.add_argument("--download", action="store_true", help="Fetch MVTec's archive of --category first.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="spec",
                        help="spec: the default configuration, for a GPU; cpu: small models, a few minutes on 2 cores.")
    parser.add_argument("--output_dir", default=os.environ.get("OUTPUT_DIR", "runs/maf"),
                        help="Where everything goes (default: $OUTPUT_DIR, else runs/maf).")
    parser.add_argument("--detector", choices=("on", "off"), default="on",
                        help="Train the feature-space detector and write its report (default on).")
    parser.add_argument("--patch_detector", choices=("on", "off"), default="off",
                        help="Also train the patch MAF detector (a GPU minute; hours on a CPU).")
    parser.add_argument("--seed", type=SEED, default=None, help="Seed of every training (default: the scripts' 0).")
    add_debug_arg(parser)
    args, maf_extra = parser.parse_known_args(argv)
    args.maf_extra = maf_extra
    return args


class Stages:
    """Runs the stages one after another, timing each (wall seconds) from the process's start."""

    def __init__(self):
        self.seconds, self.last = {}, time.perf_counter()

    def run(self, name, script_main, argv):
        from accelerate.state import AcceleratorState

        print(f"\n=== {name}: {' '.join(shlex.quote(part) for part in argv)}", flush=True)
        # Each training script makes its own Accelerator (its own mixed precision): the process-wide state is reset
        # between stages as between separate processes.
        AcceleratorState._reset_state(reset_partial_state=True)
        start = time.perf_counter()
        result = script_main(argv)
        self.seconds[name] = round(time.perf_counter() - start, 2)
        return result

    def lap(self, name):
        now = time.perf_counter()
        self.seconds[name] = round(now - self.last, 2)
        self.last = now


def read_report(folder):
    path = os.path.join(folder, "anomaly", "anomaly_report.json")
    with open(path) as file:
        report = json.load(file)
    return {key: report.get(key) for key in ("score", "image_auroc", "pixel_auroc", "decision_threshold")} | {
        "report": os.path.join(folder, "anomaly")}


def main(argv=None):
    started = time.perf_counter()
    args = parse_args(argv)
    stages = Stages()
    import detect_anomalies
    import sample_maf
    import train_maf
    from hf_dgm_training import write_json

    stages.lap("imports")
    data = (["--data_dir", args.data_dir] if args.data_dir else []) + (
        ["--dataset_name", args.dataset_name] if args.dataset_name else [])
    training_data = data + (["--category", args.category] if args.category else []) + (
        ["--download"] if args.download else [])
    seed = ["--seed", str(args.seed)] if args.seed is not None else []
    maf_flags = PRESETS[args.preset]
    out = args.output_dir
    detector_dir, patch_dir = os.path.join(out, "detector"), os.path.join(out, "patch_detector")

    stages.run("train_maf", train_maf.main, training_data + ["--output_dir", out] + maf_flags + seed
               + args.maf_extra)
    stages.run("sample", sample_maf.main, ["--model_name_or_path", out, "--num_samples", "5", "--temperature", "1.0",
                                           "0.7"] + data)
    stages.run("detect_maf", detect_anomalies.main, ["--model_name_or_path", out] + data)
    reports = {"whole-image MAF": read_report(out)}
    if args.detector == "on":
        stages.run("train_detector", train_maf.main, training_data + [
            "--flow_type", "feature_maf", "--output_dir", detector_dir] + DETECTOR_PRESETS[args.preset] + seed
                   + shlex.split(os.environ.get("DETECTOR_EXTRA", "")))
        stages.run("detect_detector", detect_anomalies.main, ["--model_name_or_path", detector_dir] + data)
        reports["feature detector"] = read_report(detector_dir)
    if args.patch_detector == "on":
        stages.run("train_patch_detector", train_maf.main, training_data + ["--output_dir", patch_dir] + PATCH_ARGS
                   + seed + shlex.split(os.environ.get("PATCH_EXTRA", "")))
        stages.run("detect_patch_detector", detect_anomalies.main, ["--model_name_or_path", patch_dir] + data)
        reports["patch detector"] = read_report(patch_dir)

    best_name, best = max(reports.items(), key=lambda item: item[1]["image_auroc"] or 0.0)
    total = round(time.perf_counter() - started, 2)
    write_json(os.path.join(out, "pipeline_results.json"), {
        "preset": args.preset, "phase_seconds": stages.seconds, "pipeline_seconds": total,
        "reports": reports, "recommended_detector": best_name})
    print(f"\nDone in {total:.0f} s. Model: {out}; samples: {os.path.join(out, 'samples')}; reports: " + ", ".join(
        f"{name} {report['report']}" for name, report in reports.items()))
    for name, report in reports.items():
        pixel = f"{report['pixel_auroc']:.3f}" if report["pixel_auroc"] is not None else "n/a (no masks)"
        print(f"  {name}: image AUROC {report['image_auroc']:.3f}, pixel AUROC {pixel} ({report['score']})")
    folder = os.path.dirname(best["report"])
    print(f"Use the {best_name} for anomaly detection: {folder} (report: {best['report']}), e.g. "
          f"pipeline('anomaly-detection', model='{folder}', trust_remote_code=True).")


if __name__ == "__main__":
    from hf_dgm_training import run_main

    run_main(main)
