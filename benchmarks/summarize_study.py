"""Summarise a MAF capsule study (benchmarks/maf_capsule_study.sh): mean ± std over seeds per configuration.

    python benchmarks/summarize_study.py runs/study        # prints a Markdown table, writes study_summary.json
"""

import glob
import json
import os
import statistics
import sys
from collections import defaultdict


FIELDS = [
    ("train bits/dim", lambda t, a, s: t["final_train_bits_per_dim"]),
    ("test-good bits/dim", lambda t, a, s: a["test_good_bits_per_dim"]),
    ("AUROC (NLL)", lambda t, a, s: a["metrics_by_score"]["nll"]["auroc"]),
    ("AUROC (map-max)", lambda t, a, s: a["metrics_by_score"]["map-max"]["auroc"]),
    ("AUPR (NLL)", lambda t, a, s: a["metrics_by_score"]["nll"]["aupr"]),
    ("F1-max (NLL)", lambda t, a, s: a["metrics_by_score"]["nll"]["f1_max"]),
    ("pixel AUROC", lambda t, a, s: a["pixel_auroc"]),
    ("train s", lambda t, a, s: t["train_seconds"]),
    ("sample 5 s (T=1)", lambda t, a, s: s["runs"][0]["seconds_total"]),
]


def main(root):
    groups = defaultdict(list)
    for run in sorted(glob.glob(os.path.join(root, "*-s[0-9]*"))):
        if not os.path.isdir(run):
            continue
        try:
            train = json.load(open(os.path.join(run, "train_results.json")))
            report = json.load(open(os.path.join(run, "anomaly", "anomaly_report.json")))
            samples = json.load(open(os.path.join(run, "samples", "samples.json")))
        except FileNotFoundError as error:
            print(f"skipping {run}: {error}")
            continue
        groups[os.path.basename(run).rsplit("-s", 1)[0]].append((train, report, samples))
    summary = {}
    print("| configuration | seeds | " + " | ".join(name for name, _ in FIELDS) + " |")
    print("|---|---|" + "---|" * len(FIELDS))
    for config, runs in groups.items():
        row = {}
        for name, get in FIELDS:
            values = [get(*r) for r in runs]
            row[name] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                         "values": values}
        per_defect = defaultdict(list)
        for _, report, _ in runs:
            for defect, value in report["metrics_by_score"]["nll"]["auroc_per_defect"].items():
                per_defect[defect].append(value)
        row["auroc_per_defect (NLL)"] = {d: statistics.mean(v) for d, v in per_defect.items()}
        summary[config] = row
        cells = [f"{row[n]['mean']:.3f} ± {row[n]['std']:.3f}" for n, _ in FIELDS]
        print(f"| {config} | {len(runs)} | " + " | ".join(cells) + " |")
    json.dump(summary, open(os.path.join(root, "study_summary.json"), "w"), indent=2)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/study")
