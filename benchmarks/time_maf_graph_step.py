"""Time the default-size MAF training step with MaskedAdam replayed as one CUDA graph (fp32, batch 8), in one process:
`plain` (no guard), `found_inf` (the non-finite guard train_maf.py uses: MaskedAdam's check of the gradient factors
and the kernel's skip of a flagged step) and `found_inf_clip` (that and clipping at norm 1, train_maf.py's default).
Every variant has its own model, optimizer and graph; their repeats take turns,
so a drift of the GPU's clocks touches all of them alike. Prints the median ms per step of repeats 3-N (N repeats of
50 steps) per variant, and writes them to --output_json when given.

    python benchmarks/time_maf_graph_step.py new                          # every variant
    PYTHONPATH=old_tree python benchmarks/time_maf_graph_step.py old      # the same of an older checkout

Runs from an older checkout too (it then takes CUDAGraphStep from scripts/training_utils.py, which must be on the
path), so that two trees can be compared in one device call.
"""

import argparse
import json
import statistics
import time

import torch

from hf_dgm_training.maf.masked_adam import MaskedAdam
from modeling_maf import MAFConfig, MAFModel


try:
    from hf_dgm_training import CUDAGraphStep
except ImportError:  # a checkout from before the training package
    from training_utils import CUDAGraphStep


VARIANTS = ("plain", "found_inf", "found_inf_clip")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("label", nargs="?", default="now", help="Name of the tree in the output (e.g. old, new).")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="Comma-separated, of: plain (no found_inf set), found_inf (train_maf's non-finite guard), "
                             "found_inf_clip (the guard and --max_grad_norm 1, train_maf's default step).")
    parser.add_argument("--repeats", type=int, default=8, help="Timed repeats per variant; the first two are dropped.")
    parser.add_argument("--steps", type=int, default=50, help="Steps per repeat.")
    parser.add_argument("--output_json", default=None, help="Write the results here.")
    args = parser.parse_args(argv)
    args.variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown or not args.variants:
        parser.error(f"--variants takes {', '.join(VARIANTS)}; got {args.variants}.")
    if args.repeats < 3 or args.steps < 1:
        parser.error("--repeats must be at least 3 (two are warm-up) and --steps at least 1.")
    return args


def graph_step(variant: str):
    """A default-size MAF (128x128x3, MADE 49152->512->512->2*49152, 7 blocks) with MaskedAdam (capturable, fused)
    and its training step as a CUDAGraphStep."""
    torch.manual_seed(0)
    model = MAFModel(MAFConfig()).cuda()
    max_grad_norm = 1.0 if variant == "found_inf_clip" else None
    optimizer = MaskedAdam(model, lr=1e-4, fused=True, capturable=True, max_grad_norm=max_grad_norm)
    if variant != "plain":
        optimizer.found_inf = torch.zeros((), device="cuda")

    def step(pixel_values):
        loss = model(pixel_values).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    return CUDAGraphStep(step, enabled=True, reset_fn=lambda: optimizer.zero_grad(set_to_none=True))


def main(argv=None):
    args = parse_args(argv)
    runners = {name: graph_step(name) for name in args.variants}
    batch = torch.rand(8, 3, 128, 128, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    times = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, runner in runners.items():
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(args.steps):
                runner(batch)
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - started) / args.steps * 1000)
    results = {"label": args.label, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "steps_per_repeat": args.steps,
               "variants": {name: {"median_ms": statistics.median(values[2:]), "repeats_ms": values,
                                   "cuda_graph": getattr(runners[name], "graph", None) is not None}
                            for name, values in times.items()}}
    for name, result in results["variants"].items():
        print(args.label, name, "MaskedAdam + graph fp32 step ms: median", round(result["median_ms"], 3),
              [round(t, 2) for t in result["repeats_ms"]], "graph" if result["cuda_graph"] else "EAGER")
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
