#!/usr/bin/env python
"""One batch of temperatures against one call per temperature: `MAFModel.sample(n, temperature=[...])`, which
`sample_maf.py` uses, against `sample(n, temperature=t)` for each t, from the same seed, after 0, 1, 10, 100 and 300
refinement steps (no refinement noise: `refine_temperature=0`), then at 300 steps with the flow's CUDA graphs off.
Prints, per step count, the seconds of both, and per temperature the largest pixel difference and the mean bits/dim
of both sets of images; writes them as JSON.

The exact rows must agree to rounding. Refined rows start from them; the preconditioned ascent moves a coordinate
whose gradient is near 0 by the full step, with the sign rounding gives it, so they may drift apart; what matters is
whether both reach the same density.

    python benchmarks/compare_batched_refinement.py --model_name_or_path runs/maf --output_dir runs/compare_batch
"""

import argparse
import json
import os
import sys

import torch

from modeling_maf import MAFModel


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from sample_maf import generate  # noqa: E402  (the script's timed, seeded sampling)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="A trained MAF folder (train_maf.py's output).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_samples", type=int, default=5)
    parser.add_argument("--temperature", type=float, nargs="+", default=[1.0, 0.7])
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 1, 10, 100, 300])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def compare(model, args, steps):
    device, count = model.device, args.num_samples

    def draw(temperature):  # sample_maf.py's timed sampling, from seed 0, without refinement noise
        return generate(model, argparse.Namespace(seed=0, num_samples=count, temperature=temperature),
                        show_progress=False, refine_steps=steps, refine_temperature=0.0)

    separate, times = zip(*(draw(temperature) for temperature in args.temperature))
    separate, separate_seconds = torch.cat(separate), sum(times)
    batch, batch_seconds = draw(args.temperature)
    rows = [slice(index * count, (index + 1) * count) for index in range(len(args.temperature))]

    def mean_bits(images):  # per temperature
        with torch.no_grad():
            return [float(model(images[r].to(device)).bits_per_dim.mean()) for r in rows]

    return {"steps": steps, "separate_seconds": separate_seconds, "batch_seconds": batch_seconds,
            "max_pixel_difference": [float((separate[r] - batch[r]).abs().max()) for r in rows],
            "bits_per_dim_separate": mean_bits(separate), "bits_per_dim_batch": mean_bits(batch)}


def main(argv=None):
    args = parse_args(argv)
    model = MAFModel.from_pretrained(args.model_name_or_path).to(args.device).eval()
    results = []
    for steps in args.steps:
        results.append(compare(model, args, steps))
        print(json.dumps(results[-1]), flush=True)
    model.sampling_cuda_graphs = model.density_cuda_graphs = False
    results.append({"cuda_graphs": False, **compare(model, args, max(args.steps))})
    print(json.dumps(results[-1]), flush=True)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "compare_batched_refinement.json"), "w") as file:
        json.dump({"model": args.model_name_or_path, "temperature": args.temperature, "results": results}, file,
                  indent=1)


if __name__ == "__main__":
    main()
