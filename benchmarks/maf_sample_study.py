"""Exact and density-guided (refined) samples of trained MAF/IAF models, measured over a grid of refinement settings.

    python benchmarks/maf_sample_study.py --model_dirs runs/s0 runs/s1 runs/s2 --data_dir data/mvtec_capsule \\
        --output_dir runs/sample_study

For every model: the data's own measures (training and test-good images of --data_dir at the model's image size);
--num_samples exact samples at --temperature from --seed; then, from the same starting points, refined samples
(`model.sample(..., refine_steps=K, refine_step_size=eps, refine_temperature=tau)`) for every K x eps x tau of the
grid. Measures (hf_dgm_training.metrics.sample_quality, on the 8-bit images): bits/dim under the model, roughness and
diversity relative to the training images, distance to the nearest training image relative to test-good images,
and seconds (refined runs include the exact pass they start from, after a warm-up). A run passes when

    roughness <= --max_roughness x the training images'     diversity >= --min_diversity x the training images'
    no sample closer to a training image than the closest test-good image is
    mean bits/dim within [min, max] of the test-good images  seconds <= --max_seconds

Writes <output_dir>/<model>.json and <model>.png (the exact samples and every setting, labelled) per model and
study.json with every run and, per setting, how many models it passes; prints a compact table. Settings start only
while --time_budget_s lasts (skipped ones are listed), so the study ends in a known time. The default step sizes
are in a MAF's logit units; an IAF refines its latents, whose steps are larger (see MAFModel.sample).
"""

import argparse
import itertools
import os
import sys
import time

import torch
from transformers import AutoModel

from hf_dgm_training import device_description, resolve_device, save_labelled_grids, write_json
from hf_dgm_training.metrics.sample_quality import load_reference_images, reference_statistics, sample_quality
from modeling_maf import MAFImageProcessor  # also registers the maf/iaf Auto classes


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from sample_maf import generate  # noqa: E402  (the script's timed, seeded sampling)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dirs", nargs="+", required=True, help="Model folders written by train_maf.py.")
    parser.add_argument("--data_dir", default=None,
                        help="The data folder the models were trained on (train/good and test/<good or defect>).")
    parser.add_argument("--dataset_name", default=None, help="Hub dataset id instead of --data_dir.")
    parser.add_argument("--category", default="capsule", help="MVTec AD category, when --data_dir holds <category>/.")
    parser.add_argument("--output_dir", default="runs/sample_study", help="Where the JSON and PNG files go.")
    parser.add_argument("--num_samples", type=int, default=5, help="Samples per run.")
    parser.add_argument("--temperature", type=float, default=1.0, help="Latent temperature of the exact samples.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the latents and of the refinement noise.")
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 300, 1000],
                        help="refine_steps values of the grid.")
    parser.add_argument("--step_sizes", type=float, nargs="+", default=[0.005, 0.01, 0.02],
                        help="refine_step_size values of the grid (logit units for a MAF).")
    parser.add_argument("--refine_temperatures", type=float, nargs="+", default=[0.0, 1.0],
                        help="refine_temperature values of the grid (0: gradient ascent without noise).")
    parser.add_argument("--max_roughness", type=float, default=2.0, help="Criterion: roughness / training images'.")
    parser.add_argument("--min_diversity", type=float, default=0.5, help="Criterion: diversity / training images'.")
    parser.add_argument("--max_seconds", type=float, default=5.0, help="Criterion: seconds for --num_samples refined.")
    parser.add_argument("--time_budget_s", type=float, default=180.0,
                        help="No new refinement run starts after this many seconds (exact runs always run).")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available).")
    args = parser.parse_args(argv)
    if args.data_dir is None and args.dataset_name is None:
        parser.error("pass --data_dir (a local data folder) or --dataset_name (a Hub dataset id).")
    if args.num_samples < 2:
        parser.error("--num_samples must be >= 2 (diversity compares samples with each other).")
    return args


def criteria(measures, statistics, seconds, args) -> dict:
    test_good_bits = statistics["test_good_bits_per_dim"]
    closest_test_good = statistics["test_good_nearest_train_distance"]["min"]
    return {
        "roughness": measures["roughness_vs_train"] <= args.max_roughness,
        "diversity": measures["diversity_vs_train"] >= args.min_diversity,
        "not_copies": measures["nearest_train_distance"]["min"] >= closest_test_good,
        "bits_per_dim": test_good_bits["min"] <= measures["bits_per_dim"]["mean"] <= test_good_bits["max"],
        "seconds": seconds <= args.max_seconds,
    }


def row(name, run):
    measures, passed = run["measures"], run["criteria"]
    return (f"{name:<16} {run['label']:<22} {run['seconds']:>6.2f} {measures['bits_per_dim']['mean']:>6.2f} "
            f"{measures['roughness_vs_train']:>7.2f} {measures['diversity_vs_train']:>6.2f} "
            f"{measures['min_nearest_train_distance_vs_test_good_min']:>7.2f}  "
            f"{''.join('y' if passed[key] else '.' for key in passed)}")


def study_model(model_dir, args, settings, started):
    device = resolve_device(args.device)
    model = AutoModel.from_pretrained(model_dir).to(device).eval()
    processor = MAFImageProcessor.from_model(model_dir, model.config)  # the data as the model was trained on them
    reference = load_reference_images(processor, args.data_dir, args.dataset_name, args.category)
    statistics = reference_statistics(model, reference)
    generate(model, args, show_progress=False)  # warm-up: CUDA context, kernels, masks
    generate(model, args, show_progress=False, refine_steps=2)
    exact, seconds = generate(model, args, show_progress=False)
    runs = [{"label": "exact", "refine_steps": 0, "seconds": seconds,
             "measures": sample_quality(model, exact, reference, statistics)}]
    panels = [(f"exact samples (draws from the model), T={args.temperature:g}", exact)]
    skipped = []
    for steps, step_size, temperature in settings:
        label = f"K={steps} eps={step_size:g} tau={temperature:g}"
        if time.perf_counter() - started > args.time_budget_s:
            skipped.append(label)
            continue
        images, seconds = generate(model, args, show_progress=False, refine_steps=steps, refine_step_size=step_size,
                                       refine_temperature=temperature)
        runs.append({"label": label, "refine_steps": steps, "refine_step_size": step_size,
                     "refine_temperature": temperature, "seconds": seconds,
                     "measures": sample_quality(model, images, reference, statistics)})
        panels.append((f"refined (density-guided, not draws from the model): {label}", images))
    for run in runs:
        run["criteria"] = criteria(run["measures"], statistics, run["seconds"], args)
        run["passes"] = all(run["criteria"].values())
    name = os.path.basename(os.path.normpath(model_dir))
    save_labelled_grids(panels, os.path.join(args.output_dir, f"{name}.png"), nrow=args.num_samples, panels_per_row=1)
    result = {"model": model_dir, "model_type": model.config.model_type, "device": device_description(device),
              "degree_assignment": model.config.degree_assignment, "reference": statistics, "runs": runs,
              "skipped": skipped}
    write_json(os.path.join(args.output_dir, f"{name}.json"), result)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return name, result


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    settings = list(itertools.product(args.steps, args.step_sizes, args.refine_temperatures))
    print(f"{'model':<16} {'run':<22} {'s':>6} {'bpd':>6} {'rough×':>7} {'div×':>6} {'nn/tg':>7}  "
          "pass (roughness, diversity, not copies, bpd, seconds)")
    results = {}
    for model_dir in args.model_dirs:
        name, result = study_model(model_dir, args, settings, started)
        results[name] = result
        test_good = result["reference"]["test_good_bits_per_dim"]
        print(f"{name:<16} data: test-good bits/dim {test_good['min']:.2f}..{test_good['max']:.2f}, training-image "
              f"roughness {result['reference']['train_roughness']:.2f} levels")
        for run in result["runs"]:
            print(row(name, run))
        if result["skipped"]:
            print(f"{name:<16} skipped (time budget): {', '.join(result['skipped'])}")
    summary = {}
    for result in results.values():
        for run in result["runs"]:
            entry = summary.setdefault(run["label"], {"models": 0, "models_passing": 0, "seconds": []})
            entry["models"] += 1
            entry["models_passing"] += int(run["passes"])
            entry["seconds"].append(run["seconds"])
    passing = [label for label, entry in summary.items()
               if label != "exact" and entry["models_passing"] == entry["models"] == len(results)]
    write_json(os.path.join(args.output_dir, "study.json"),
               {"args": vars(args), "models": results, "per_setting": summary, "passing_every_model": passing,
                "seconds_total": time.perf_counter() - started})
    print(f"settings passing every criterion on every model: {', '.join(passing) or 'none'}")
    print(f"study took {time.perf_counter() - started:.1f} s; results in {args.output_dir}")


if __name__ == "__main__":
    main()
