"""Time exact sampling of the seed-spec MAF (5 images of 128x128x3, 512-512, 7 blocks, random weights on the MADE
connections; no data needed) in one process, three ways on the same model and latents:

  previous  the sequential solver as it was before modeling_maf/sequential_solver.py (``previous_solve_sequential``
            below, per call: weights gathered into degree order, per pass: lists + cat), eager;
  eager     the current solver without a CUDA graph (``model.sampling_cuda_graphs = False``);
  graphed   the current solver with the whole sampling direction replayed as one CUDA graph (the default on CUDA):
            its first call at a shape runs eagerly, the second captures and replays; both are reported separately.

Repeats take turns between the variants, so a drift of the GPU's clocks touches all of them alike. Also reports the
largest difference between the variants' images (same latents) and the floor of one sampling pass (bytes that must
move over the measured copy bandwidth). Prints a table; writes JSON to --output_json when given.

    python benchmarks/time_maf_sampling.py --output_json runs/time_maf_sampling.json      # GPU, spec size
    python benchmarks/time_maf_sampling.py --smoke                                        # CPU, tiny: runs
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from modeling_maf import MAFConfig, MAFModel
from modeling_maf.modeling_maf import MADEBlock, MaskedLinear


def previous_solve_sequential(block, known, solve_segment, locations=None):
    """``MADEBlock.solve_sequential`` before sequential_solver.py: every call gathers the first layer's columns and the
    output rows into degree order; every pass appends its segment to lists that are concatenated at the end."""
    made = block.made
    first, *middle, last = made.layers
    degrees = block.input_degrees.to(known.device)
    by_degree = torch.argsort(degrees)
    num_features = made.num_features
    sizes = [high - low for low, high in block.segments]
    pair_sizes = [2 * size for size in sizes]
    first_rows = first.masked_weight()[:, by_degree].t().contiguous().split(sizes)
    middle_layers = [(layer.masked_weight(), layer.bias) for layer in middle]
    output_weight = last.masked_weight()
    output_rows = torch.stack([output_weight[by_degree], output_weight[num_features + by_degree]], dim=1)
    output_rows = output_rows.flatten(0, 1).split(pair_sizes)
    output_bias = torch.stack([last.bias[by_degree], last.bias[num_features + by_degree]], dim=1)
    output_bias = output_bias.flatten().split(pair_sizes)
    known_segments = known[:, by_degree].split(sizes, dim=1)
    batch_size = known.shape[0]
    pre_activation = first.bias.expand(batch_size, -1)
    offset = made.position_offset(locations, pre_activation)
    if offset is not None:
        pre_activation = pre_activation + offset
    def upcast(tensor):
        return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor
    solved, log_scales = [], []
    for rows_in, rows_out, bias_out, known_segment in zip(first_rows, output_rows, output_bias, known_segments):
        hidden = made.activation(pre_activation)
        for weight, bias in middle_layers:
            hidden = made.activation(F.linear(hidden, weight, bias))
        shift, raw_log_scale = F.linear(hidden, rows_out, bias_out).view(batch_size, -1, 2).unbind(-1)
        log_scale = made.soft_clamp(upcast(raw_log_scale))
        segment = solve_segment(known_segment, upcast(shift), log_scale)
        pre_activation = torch.addmm(pre_activation, segment.to(rows_in.dtype), rows_in)
        solved.append(segment)
        log_scales.append(log_scale)
    at_position = degrees - 1
    return torch.cat(solved, dim=1)[:, at_position], torch.cat(log_scales, dim=1)[:, at_position]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes on the CPU (checks that it runs).")
    parser.add_argument("--num_samples", type=int, default=5, help="Images per sampling call.")
    parser.add_argument("--repeats", type=int, default=10, help="Timed calls per variant (after one warm-up call).")
    parser.add_argument("--output_json", default=None, help="Write the results here.")
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.repeats < 1:
        parser.error("--num_samples and --repeats must be at least 1.")
    return args


def random_connections(model, seed=0, std=0.02):
    """Random weights on every MADE connection (absent ones stay zero), small enough that samples stay finite. Drawn
    on the CPU (the same weights on any device, and the CPU generator works under a `torch.device` context)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MaskedLinear):
                noise = torch.randn(module.weight.shape, generator=generator, device="cpu").to(module.weight.device)
                module.weight.copy_(noise * std * module.mask())
    return model


def pass_floor_bytes(model) -> list[int]:
    """Bytes of weights that one pass of one block must read, per pass of block 0: the segment's first-layer columns,
    every middle layer, the segment's (shift, log-scale) output rows, and their biases."""
    block = model.blocks[0]
    first, *middle, last = block.made.layers
    size = first.weight.element_size()
    hidden_first, hidden_last = first.out_features, last.in_features
    middle_bytes = sum(layer.weight.numel() + layer.bias.numel() for layer in middle) * size
    return [((high - low) * hidden_first + 2 * (high - low) * (hidden_last + 1)) * size + middle_bytes
            for low, high in block.segments]


def copy_bandwidth_gbs(device) -> float:
    if device.type != "cuda":
        return float("nan")
    source = torch.empty(2**29, device=device)  # 2 GiB
    target = torch.empty_like(source)
    times = []
    for _ in range(12):
        torch.cuda.synchronize()
        start = time.perf_counter()
        target.copy_(source)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * source.numel() * 4 / statistics.median(times[2:]) / 1e9  # bytes read + written


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        sizes = dict(image_size=8, num_channels=3, hidden_sizes=[32, 32], num_blocks=3)
        args.repeats = min(args.repeats, 2)
    else:
        sizes = dict(image_size=128, num_channels=3, hidden_sizes=[512, 512], num_blocks=7)
    with torch.device(device):
        model = random_connections(MAFModel(MAFConfig(**sizes))).eval()
    latents = torch.randn(args.num_samples, model.config.num_features, generator=torch.Generator().manual_seed(0))
    latents = latents.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def decode(variant):
        model.sampling_cuda_graphs = variant == "graphed"
        original = MADEBlock.solve_sequential
        if variant == "previous":
            MADEBlock.solve_sequential = previous_solve_sequential
        try:
            with torch.no_grad():
                images = model.decode(latents)
        finally:
            MADEBlock.solve_sequential = original
            model.sampling_cuda_graphs = True
        return images

    variants = ["previous", "eager"] + (["graphed"] if device.type == "cuda" else [])
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
               "sizes": sizes, "num_samples": args.num_samples, "passes": sum(model.num_sequential_passes())}
    def timed(variant):
        sync()
        start = time.perf_counter()
        images = decode(variant)
        sync()
        return images, time.perf_counter() - start

    images, first_call_s, capture_call_s = {}, {}, {}
    for variant in variants:  # first calls (warm-up; for "graphed" an eager run), then the capture call of "graphed"
        images[variant], first_call_s[variant] = timed(variant)
    if "graphed" in variants:
        images["graphed"], capture_call_s["graphed"] = timed("graphed")
    times = {variant: [] for variant in variants}
    for _ in range(args.repeats):
        for variant in variants:
            times[variant].append(timed(variant)[1])
    results["seconds"] = {variant: statistics.median(values) for variant, values in times.items()}
    results["first_call_seconds"] = first_call_s
    results["capture_call_seconds"] = capture_call_s
    results["max_abs_difference_to_previous"] = {
        variant: float((images[variant] - images["previous"]).abs().max()) for variant in variants[1:]}
    bandwidth = copy_bandwidth_gbs(device)
    per_pass = pass_floor_bytes(model)
    results["copy_bandwidth_GBps"] = bandwidth
    results["pass_floor"] = {"mean_bytes": statistics.mean(per_pass),
                             "mean_us_at_measured_bandwidth": statistics.mean(per_pass) / (bandwidth * 1e9) * 1e6,
                             "all_passes_ms_at_measured_bandwidth":
                                 sum(per_pass) * len(model.blocks) / (bandwidth * 1e9) * 1e3}
    results["us_per_pass"] = {variant: seconds / results["passes"] * 1e6
                              for variant, seconds in results["seconds"].items()}

    print(f"{results['device']}, torch {results['torch']}, sample {args.num_samples} at {sizes}, "
          f"{results['passes']} sequential passes")
    print(f"{'variant':10s} {'s/call':>9s} {'us/pass':>9s} {'first call s':>13s} {'capture call s':>15s} "
          f"{'max |diff| to previous':>23s}")
    for variant in variants:
        difference = results["max_abs_difference_to_previous"].get(variant, 0.0)
        print(f"{variant:10s} {results['seconds'][variant]:9.4f} {results['us_per_pass'][variant]:9.1f} "
              f"{first_call_s[variant]:13.3f} {capture_call_s.get(variant, float('nan')):15.3f} {difference:23.2e}")
    floor = results["pass_floor"]
    print(f"floor of one pass: {floor['mean_bytes'] / 1e6:.2f} MB -> {floor['mean_us_at_measured_bandwidth']:.2f} us "
          f"at {bandwidth:.0f} GB/s; all passes {floor['all_passes_ms_at_measured_bandwidth']:.2f} ms")
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as file:
            json.dump(results, file, indent=2)
    return results


if __name__ == "__main__":
    main()
