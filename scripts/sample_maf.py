#!/usr/bin/env python
"""Generate images with a trained MAF or IAF (local folder or Hub id).

    python scripts/sample_maf.py --model_name_or_path runs/maf --num_samples 5 --temperature 1.0 0.7

Writes sample_t<T>_<i>.png for each image, samples_t<T>.png (a grid) and samples.json (seconds in total and per
image for each temperature, sequential MADE evaluations per block, device) in --output_dir.
"""

import argparse
import os
import time

import torch

import modeling_maf  # noqa: F401  (registers the maf/iaf Auto classes)
from hf_dgm_training import (
    add_debug_arg,
    device_description,
    load_model_for_inference,
    run_main,
    save_image_grid,
    write_json,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="Folder written by train_maf.py, or a Hub id.")
    parser.add_argument("--output_dir", default=None, help="Where images and samples.json go (default: <model>/samples).")
    parser.add_argument("--num_samples", type=int, default=5, help="Images to generate per temperature.")
    parser.add_argument("--temperature", type=float, nargs="+", default=[1.0],
                        help="Standard deviation(s) of the base noise; below 1 trades diversity for cleaner images.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the base noise.")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available).")
    parser.add_argument("--hub_token", default=None, help="Token for a private Hub model.")
    parser.add_argument("--nrow", type=int, default=None, help="Images per grid row (default: all in one row).")
    add_debug_arg(parser)
    return parser.parse_args(argv)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    args = parse_args(argv)
    device, output_dir, model = load_model_for_inference(args, "samples", model_types=("maf", "iaf"))
    report = {"model": args.model_name_or_path, "model_type": model.config.model_type,
              "device": device_description(device),
              "num_samples": args.num_samples, "sequential_passes_per_block": model.num_sequential_passes()
              if model.config.model_type == "maf" else [1] * model.config.num_blocks, "runs": []}
    for temperature in args.temperature:
        generator = torch.Generator(device=device).manual_seed(args.seed)
        synchronize(device)
        started = time.perf_counter()
        images = model.sample(args.num_samples, generator=generator, temperature=temperature, show_progress=True)
        synchronize(device)
        seconds = time.perf_counter() - started
        images = images.cpu()
        tag = f"t{temperature:g}"
        grid = os.path.join(output_dir, f"samples_{tag}.png")
        save_image_grid(images, grid, nrow=args.nrow or args.num_samples)
        for index, image in enumerate(images):
            save_image_grid(image[None], os.path.join(output_dir, f"sample_{tag}_{index}.png"), nrow=1, padding=0)
        report["runs"].append({"temperature": temperature, "seconds_total": seconds,
                               "seconds_per_image": seconds / args.num_samples, "grid": grid})
        print(f"temperature {temperature:g}: {args.num_samples} images in {seconds:.3f} s -> {grid}")
    write_json(os.path.join(output_dir, "samples.json"), report)
    return report


if __name__ == "__main__":
    run_main(main)
