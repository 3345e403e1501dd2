#!/usr/bin/env python
# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""Benchmark one full CycleGAN training iteration: plain eager float32 against the fast path, same maths.

A full iteration is what `scripts/train_cyclegan.py` runs every step, with its own code (`CycleGANTrainStep`,
`UnpairedSampler`): augmentation of one batch per domain on the device, the generator update (both generators,
frozen discriminators, Adam), both image pools, the discriminator update (Adam), and the losses kept on the device.

Variants (the first step of every variant starts from the same weights and the same batch, so its eight losses
are compared with the plain variant's: "loss diff"):

- plain:        eager float32, the reference's call order (6 generator calls, 4 + 2 discriminator calls), Adam
                (foreach). The paper-faithful baseline; the reference implementation itself measured 12.9 it/s
                (128^2, 6 blocks) and 10.7 it/s (256^2, 9 blocks) on one H100 (issue 7).
- bf16_eager:   bf16 autocast, channels_last, fused Adam, batched passes (3 generator calls, exact with instance
                norm), still launched op by op from Python.
- fast:         bf16_eager + the generator and discriminator updates replayed as CUDA graphs (the training
                script's default on one GPU).
- fast_compile: fast + torch.compile of the loss computations (`--torch_compile true` in the training script;
                compile time is reported as startup). Off by default in training since an H200 trained
                horse2zebra at 25.6 it/s with it against 101 it/s without; this variant is here to confirm that
                in one run and to show whether graph capture fell back to eager (the "graphs" column).

    python benchmarks/bench_cyclegan.py --output_dir outputs/bench_cyclegan          # one GPU, <= ~7.5 minutes
    python benchmarks/bench_cyclegan.py --cases 128:6:1 --compile_cases 128:6:1       # the key comparison, ~3 min
    python benchmarks/bench_cyclegan.py --smoke --output_dir /tmp/bench               # tiny, CPU, seconds

The default plan fits one 10-minute device command: runs start only while --time_budget_s (420 s) lasts, and a
fast_compile run only when --compile_estimate_s (150 s) of the budget is left; the compile runs come last. The
JSON is rewritten after every run, so a command killed by its time limit still leaves the finished runs.

Prints a Markdown table and writes bench_cyclegan.json: ms/iteration, iterations/s, images/s (images of one
domain), speed-up over plain and over the reference implementation, peak GPU memory, startup (warm-up, compile,
capture) seconds, host syncs per step seen by CUDA's sync debug mode, GPU-bound time per step (graph replays back
to back, no host work), whether CUDA graphs and torch.compile were really used (and why not), and the loss
agreement with the plain variant.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time
import warnings

import torch

from hf_dgm_training.cyclegan import ImagePool
from hf_dgm_training.cyclegan.step import (
    STEP_LOSS_NAMES,
    CycleGANTrainStep,
    FastPathOptions,
    build_optimizers,
    new_batch_buffers,
    prepare_model,
)
from hf_dgm_training.data.unpaired import UnpairedSampler, default_load_size
from modeling_cyclegan import LOSS_NAMES, CycleGANConfig, CycleGANModel


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The reference implementation (junyanz/pytorch-CycleGAN-and-pix2pix), batch 1, on an H100 as quoted in
# docs/RESULTS.md#cyclegan-speed.
REFERENCE_IT_PER_S = {(128, 6): 12.9, (256, 9): 10.7}
VARIANTS = ("plain", "bf16_eager", "fast", "fast_compile")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/bench_cyclegan", help="Where bench_cyclegan.json goes.")
    parser.add_argument("--cases", default="128:6:1,128:6:4,256:9:1,256:9:4",
                        help="Comma-separated size:residual_blocks:batch cases.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"Comma-separated subset of {VARIANTS}.")
    parser.add_argument("--compile_cases", default="128:6:1,256:9:1",
                        help="Cases that also run fast_compile (each compiles for a minute or two).")
    parser.add_argument("--steps", type=int, default=100, help="Timed iterations per case and variant.")
    parser.add_argument("--warmup", type=int, default=10, help="Untimed iterations first (includes compile/capture).")
    parser.add_argument("--filters", type=int, default=64, help="Generator and discriminator filters (paper: 64).")
    parser.add_argument("--time_budget_s", type=float, default=420.0,
                        help="Start no run once this much time has passed (the rest are listed as skipped); the "
                        "default leaves margin in a 10-minute command for start-up and the last run.")
    parser.add_argument("--compile_estimate_s", type=float, default=150.0,
                        help="Seconds a fast_compile run is expected to take (compiling ~2 minutes on an H200): one "
                        "starts only if this much of --time_budget_s is left.")
    parser.add_argument("--smoke", action="store_true",
                        help="Tiny sizes and few steps (a quick check, e.g. on a CPU).")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available).")
    args = parser.parse_args(argv)
    if args.smoke:
        args.cases, args.compile_cases, args.steps, args.warmup, args.filters = "32:1:1,32:1:2", "", 3, 2, 8
    return args


def planned_runs(args) -> list[tuple[tuple[int, int, int], str]]:
    """Everything but torch.compile first, case by case, so that a tight budget drops the slowest-to-start runs."""
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"Unknown variants {unknown}; choose from {VARIANTS}.")
    cases = parse_cases(args.cases)
    compile_cases = set(parse_cases(args.compile_cases))
    plan = [(case, v) for case in cases for v in variants if v != "fast_compile"]
    plan += [(case, "fast_compile") for case in cases if "fast_compile" in variants and case in compile_cases]
    return plan


def parse_cases(text: str) -> list[tuple[int, int, int]]:
    cases = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        size, blocks, batch = (int(value) for value in item.split(":"))
        cases.append((size, blocks, batch))
    return cases


def make_options(variant: str, device: torch.device) -> FastPathOptions | None:
    """The step options of a variant on this device, or None where the variant needs a GPU."""
    cuda = device.type == "cuda"
    if variant == "plain":
        return FastPathOptions(device_type=device.type)
    if not cuda and variant != "fast":
        return None
    return FastPathOptions(
        device_type=device.type,
        autocast_dtype=torch.bfloat16 if cuda else None,
        channels_last=cuda,
        fused_optimizer=cuda,
        batch_passes=True,
        cuda_graphs=cuda and variant in ("fast", "fast_compile"),
        torch_compile=variant == "fast_compile",
    )


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(size, blocks, batch, variant, options, args, device) -> dict:
    torch.manual_seed(0)
    config = CycleGANConfig(
        image_size=size, num_residual_blocks=blocks, generator_filters=args.filters, discriminator_filters=args.filters
    )
    model = prepare_model(CycleGANModel(config), device, options)
    optimizer_g, optimizer_d = build_optimizers(model, 2e-4, (0.5, 0.999), options)
    step = CycleGANTrainStep(
        model, optimizer_g, optimizer_d, ImagePool(config.pool_size), ImagePool(config.pool_size), options
    )
    step.set_learning_rate(2e-4)

    generator = torch.Generator().manual_seed(0)
    load_size = default_load_size(size)
    images = [torch.randint(0, 256, (64, 3, load_size, load_size), generator=generator, dtype=torch.uint8).to(device)
              for _ in range(2)]
    sampler = UnpairedSampler(images[0], images[1], size, batch, seed=0)
    batches = sampler.epoch_order(0)
    real_a, real_b = new_batch_buffers(batch, config, device, options)
    total = args.warmup + args.steps
    history = torch.zeros((total, len(STEP_LOSS_NAMES)), device=device)
    random.seed(0)

    def iteration(index):
        sampler.fill_batch(real_a, real_b, batches[index % len(batches)])
        history[index].copy_(step(real_a, real_b))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    started = time.perf_counter()
    for index in range(args.warmup):
        iteration(index)
    synchronize(device)
    startup_seconds = time.perf_counter() - started

    syncs = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")  # every host-device sync in the timed steps becomes a warning
        started = time.perf_counter()
        for index in range(args.warmup, total):
            iteration(index)
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        synchronize(device)
        seconds = time.perf_counter() - started
        syncs = sum("synchroniz" in str(w.message).lower() for w in caught)

    replay_ms = None
    graphs = (step.generator_step.graph, step.discriminator_step.graph)
    if None not in graphs:  # the GPU-bound time: both graphs back to back, no host work in between
        synchronize(device)
        replay_started = time.perf_counter()
        for _ in range(args.steps):
            for graph in graphs:
                graph.replay()
        synchronize(device)
        replay_ms = 1000 * (time.perf_counter() - replay_started) / args.steps

    first_losses = dict(zip(STEP_LOSS_NAMES, history[0].tolist()))
    result = {
        "size": size,
        "residual_blocks": blocks,
        "batch": batch,
        "variant": variant,
        "options": step.describe(),
        "ms_per_iteration": 1000 * seconds / args.steps,
        "iterations_per_second": args.steps / seconds,
        "images_per_second": args.steps * batch / seconds,
        "startup_seconds": startup_seconds,
        "host_syncs_per_step": syncs / args.steps,
        "graph_replay_ms_per_iteration": replay_ms,
        "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "first_step_losses": {name: first_losses[name] for name in LOSS_NAMES},
        "finite": bool(torch.isfinite(history).all()),
    }
    model = optimizer_g = optimizer_d = step = images = sampler = history = None  # free the GPU memory
    return result


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return result.stdout.strip() or None
    except OSError:
        return None


def format_table(results: list[dict]) -> str:
    """A Markdown table of the runs (aligned, so it also reads as plain text), then notes on fallbacks."""
    header = ("size", "blocks", "batch", "variant", "graphs", "compiled", "ms/it", "it/s", "img/s", "x plain", "x ref",
              "GPU ms/it", "peak MiB", "startup s", "syncs/it", "max loss diff")
    rows = [header]
    notes = []
    for r in results:
        if "error" in r or "skipped" in r:
            rows.append((str(r["size"]), str(r["residual_blocks"]), str(r["batch"]), r["variant"],
                         ("error: " + r["error"] if "error" in r else "skipped: " + r["skipped"])[:70],
                         *[""] * (len(header) - 5)))
            continue

        def number(value, digits=1):
            return "-" if value is None else f"{value:.{digits}f}"

        options = r.get("options", {})
        rows.append((
            str(r["size"]), str(r["residual_blocks"]), str(r["batch"]), r["variant"],
            "yes" if options.get("cuda_graphs") else "no", "yes" if options.get("torch_compile") else "no",
            number(r["ms_per_iteration"], 2), number(r["iterations_per_second"]), number(r["images_per_second"]),
            number(r.get("speedup_vs_plain"), 2), number(r.get("speedup_vs_reference"), 2),
            number(r["graph_replay_ms_per_iteration"], 2), number(r["peak_memory_mib"], 0),
            number(r["startup_seconds"]), number(r["host_syncs_per_step"], 2),
            number(r.get("max_loss_diff_vs_plain"), 4),
        ))
        for fallback in options.get("fallbacks", []):
            notes.append(f"- {r['size']}^2/{r['residual_blocks']} blocks/batch {r['batch']} {r['variant']}: {fallback}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    if notes:
        lines += ["", "Fallbacks (the step ran without what was asked for):", *notes]
    return "\n".join(lines)


def compile_comparison(results: list[dict]) -> list[dict]:
    """fast_compile against fast for every case that has both: the question behind the training default."""
    done = {(r["size"], r["residual_blocks"], r["batch"], r["variant"]): r for r in results
            if "error" not in r and "skipped" not in r}
    rows = []
    for (size, blocks, batch, variant), run in done.items():
        fast = done.get((size, blocks, batch, "fast"))
        if variant == "fast_compile" and fast is not None:
            rows.append({"size": size, "residual_blocks": blocks, "batch": batch,
                         "fast_it_per_s": fast["iterations_per_second"],
                         "fast_compile_it_per_s": run["iterations_per_second"],
                         "compile_over_fast": run["iterations_per_second"] / fast["iterations_per_second"],
                         "compile_startup_seconds": run["startup_seconds"],
                         "compile_used_graphs": bool(run["options"].get("cuda_graphs"))})
    return rows


def add_comparisons(results: list[dict], device, filters: int) -> None:
    plain = {(r["size"], r["residual_blocks"], r["batch"]): r for r in results
             if r["variant"] == "plain" and "error" not in r and "skipped" not in r}
    for r in results:
        if "error" in r or "skipped" in r:
            continue
        key = (r["size"], r["residual_blocks"], r["batch"])
        if key in plain:
            base = plain[key]
            r["speedup_vs_plain"] = r["iterations_per_second"] / base["iterations_per_second"]
            r["max_loss_diff_vs_plain"] = max(
                abs(r["first_step_losses"][n] - base["first_step_losses"][n]) for n in LOSS_NAMES
            )
            r["max_relative_loss_diff_vs_plain"] = max(
                abs(r["first_step_losses"][n] - base["first_step_losses"][n])
                / max(abs(base["first_step_losses"][n]), 1e-8)
                for n in LOSS_NAMES
            )
        reference = REFERENCE_IT_PER_S.get((r["size"], r["residual_blocks"]))
        if reference and r["batch"] == 1 and device.type == "cuda" and filters == 64:
            r["speedup_vs_reference"] = r["iterations_per_second"] / reference


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the training script's fast path (static shapes)
    plan = planned_runs(args)
    os.makedirs(args.output_dir, exist_ok=True)
    json_path = os.path.join(args.output_dir, "bench_cyclegan.json")

    started = time.perf_counter()
    results = []

    def report_now() -> dict:
        add_comparisons(results, device, args.filters)
        report = {
            "benchmark": "CycleGAN full training iteration",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch_version": torch.__version__,
            "commit": git_commit(),
            "command": " ".join([os.path.basename(sys.argv[0]), *(argv if argv is not None else sys.argv[1:])]),
            "steps": args.steps,
            "warmup": args.warmup,
            "time_budget_s": args.time_budget_s,
            "reference_iterations_per_second": {f"{s}x{s}, {b} blocks": v for (s, b), v in REFERENCE_IT_PER_S.items()},
            "images_per_second_counts": "images of one domain per second (each iteration also processes as many of "
                                        "the other)",
            "seconds": time.perf_counter() - started,
            "results": results,
            "compile_vs_fast": compile_comparison(results),
        }
        table = format_table(results)
        with open(json_path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(report | {"table": table}, f, indent=2)
        os.replace(json_path + ".tmp", json_path)  # a run killed mid-write keeps the previous complete file
        return report | {"table": table}

    for (size, blocks, batch), variant in plan:
        entry = {"size": size, "residual_blocks": blocks, "batch": batch, "variant": variant}
        options = make_options(variant, device)
        if options is None:
            continue
        elapsed = time.perf_counter() - started
        needed = args.compile_estimate_s if variant == "fast_compile" else 0.0
        if elapsed + needed > args.time_budget_s:
            results.append(entry | {"skipped": f"time budget: {elapsed:.0f} s used of {args.time_budget_s:.0f} s"
                                    + (f", a compile run needs ~{needed:.0f} s" if needed else "")})
            continue
        print(f"[{elapsed:5.0f} s] running {size}^2, {blocks} blocks, batch {batch}, {variant} ...", flush=True)
        try:
            results.append(run_case(size, blocks, batch, variant, options, args, device))
        except Exception as error:  # noqa: BLE001 - report the failure and go on with the other runs
            results.append(entry | {"error": f"{type(error).__name__}: {error}"[:500]})
        gc.collect()
        if variant == "fast_compile":
            torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report_now()

    report = report_now()
    print(report["table"])
    for row in report["compile_vs_fast"]:
        print(f"torch.compile at {row['size']}^2, {row['residual_blocks']} blocks, batch {row['batch']}: "
              f"{row['fast_compile_it_per_s']:.1f} it/s against {row['fast_it_per_s']:.1f} it/s without "
              f"({row['compile_over_fast']:.2f}x; CUDA graphs {'used' if row['compile_used_graphs'] else 'NOT used'}; "
              f"{row['compile_startup_seconds']:.0f} s of warm-up and compiling).")
    print(f"Wrote {json_path} ({report['seconds']:.0f} s).")
    return report


if __name__ == "__main__":
    main()
