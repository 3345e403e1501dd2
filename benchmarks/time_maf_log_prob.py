"""Time the seed-spec MAF's log_prob with dense GEMMs and with the block-sparse kernel (modeling_maf/masked_matmul.py),
side by side with nflows 0.14 at the same layer shapes, in one process: fp32 and bf16 autocast, batch 132 and 8.

    python benchmarks/time_maf_log_prob.py --output_json $OUT/log_prob.json [--sweep]
    TRITON_INTERPRET=1 python benchmarks/time_maf_log_prob.py --smoke     # CPU, tiny sizes: checks that it runs

Rows (median ms over --repeats rounds in which the variants take turns, so a drift of the clocks touches all alike):
  - log_prob of the whole spec MAF (7 blocks of 49,152 -> 512 -> 512 -> 2 x 49,152), eval mode, no grad, as users
    call it (through the density's CUDA graph, flow_graphs.py): `dense` (HF_DGM_BLOCK_SPARSE=0), `block-sparse` (the
    default: the kernel where `masked_matmul.pays`, fp32 products as tf32x3), `block-sparse every layer` (the kernel
    wherever the tiles skip enough, also for bf16 products of many rows), `block-sparse ieee` (fp32 only: plain
    float32 multiply-adds); `dense eager` and `block-sparse eager` without the graph; and nflows'
    MaskedAutoregressiveFlow when it is importable;
  - the floor: bytes a log_prob must move (the connected weights once, the pixels, each block's input read and output
    written) over the copy bandwidth measured here; and the multiply-adds of the connected weights (GFLOP);
  - every layer of one MADE alone: dense F.linear against the kernel's default tile shapes and, with --sweep, the
    fastest of a few others (what `masked_matmul.default_config` should pick); and the input gradient
    (grad_output @ weight, dense against the kernel over the transposed tiles): at batch 8 these are the training
    step's forward and input-gradient GEMMs, which say whether the kernel would pay in training too;
  - the kernel's log_prob against the dense path's (largest absolute and relative difference).
"""

import argparse
import contextlib
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from bench_maf import log_prob_floor, log_prob_fn
from modeling_maf import MAFConfig, MAFModel, masked_matmul


BATCHES = (132, 8)
DTYPES = ("fp32", "bf16")
# Tile shapes (block_m, block_n, block_k, num_warps, num_stages) the sweep tries, most different ones first (each
# layer gets a slice of --sweep_budget_s; compiling a shape takes about a second).
SWEEP = [(block_m, block_n, block_k, warps, stages) for warps, stages in ((4, 3), (8, 3), (4, 4))
         for block_n, block_k in ((64, 32), (64, 64), (128, 32), (32, 64), (128, 64)) for block_m in (64, 32, 16)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_json", default=None, help="Write the results here.")
    parser.add_argument("--repeats", type=int, default=15, help="Timed rounds per measurement (median reported).")
    parser.add_argument("--calls", type=int, default=5, help="Calls per round.")
    parser.add_argument("--skip_nflows", action="store_true", help="Do not run nflows even when importable.")
    parser.add_argument("--sweep", action="store_true", help="Also time the kernel's other tile shapes per layer.")
    parser.add_argument("--sweep_budget_s", type=float, default=180.0,
                        help="Time for the whole sweep, shared equally by the layers, batches and dtypes.")
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes on whatever device is present.")
    return parser.parse_args(argv)


@contextlib.contextmanager
def environment(**values):
    """Set environment variables (None: unset) for the duration."""
    def apply(settings):
        for name, value in settings.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    saved = {name: os.environ.get(name) for name in values}
    try:
        apply(values)
        yield
    finally:
        apply(saved)


DENSE = {masked_matmul.DISABLE_ENV: "0", masked_matmul.FP32_PRECISION_ENV: None}
SPARSE = {masked_matmul.DISABLE_ENV: None, masked_matmul.FP32_PRECISION_ENV: None}
SPARSE_IEEE = {masked_matmul.DISABLE_ENV: None, masked_matmul.FP32_PRECISION_ENV: "ieee"}


def without_graphs(model, fn):
    """``fn`` with the model's density CUDA graphs off (every op launched from Python, as before flow_graphs.py)."""
    def run():
        model.density_cuda_graphs = False
        try:
            return fn()
        finally:
            model.density_cuda_graphs = True

    return run


def with_every_layer_on_the_kernel(fn):
    """``fn`` with masked_matmul.pays' rule for half precision lifted: the kernel for every layer with enough zero
    tiles whatever the batch (what the rule is measured against)."""
    def run():
        saved = masked_matmul.MAX_HALF_PRECISION_ROWS
        masked_matmul.MAX_HALF_PRECISION_ROWS = 2**31
        try:
            return fn()
        finally:
            masked_matmul.MAX_HALF_PRECISION_ROWS = saved

    return run


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_in_turns(variants: dict, repeats: int, calls: int) -> dict:
    """{name: median ms per call}; variants {name: (fn, environment)} run in turns, after one warm-up round."""
    times = {name: [] for name in variants}
    for round_index in range(repeats + 1):
        for name, (fn, env) in variants.items():
            with environment(**env):
                sync()
                started = time.perf_counter()
                for _ in range(calls):
                    fn()
                sync()
            if round_index:  # the first round compiles and warms up
                times[name].append((time.perf_counter() - started) / calls * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def copy_bandwidth_gbs(device) -> float:
    source = torch.empty((2 * 2**30 if device.type == "cuda" else 2**26) // 4, device=device)
    target = torch.empty_like(source)
    ms = time_in_turns({"copy": (lambda: target.copy_(source), {})}, repeats=10, calls=1)["copy"]
    return 2 * source.numel() * 4 / (ms / 1e3) / 1e9  # bytes read + written


def spec_model(device, config) -> MAFModel:
    torch.manual_seed(0)
    with torch.device(device):
        model = MAFModel(config).eval()
    with torch.no_grad():  # the output layers start at zero: non-zero, so that the flow does real work
        for block in model.blocks:
            last = block.made.layers[-1]
            last.weight.normal_(0, 1e-3).mul_(last.mask())
    return model


def nflows_flow(config, device):
    from nflows.flows import MaskedAutoregressiveFlow

    with torch.device(device):
        return MaskedAutoregressiveFlow(features=config.num_features, hidden_features=config.hidden_sizes[0],
                                        num_layers=config.num_blocks, num_blocks_per_layer=1,
                                        use_residual_blocks=False).eval()


def layer_rows(model, batch, dtype, repeats, calls, sweep_seconds):
    """Each layer of block 1 (reversed order) alone: dense vs the kernel's default tile shapes (vs the fastest of the
    sweep's tile shapes tried within `sweep_seconds` per layer)."""
    rows = []
    device = model.device
    generator = torch.Generator(device=device).manual_seed(batch)
    for index, layer in enumerate(model.blocks[1].made.layers):
        x = torch.randn(batch, layer.in_features, device=device, generator=generator)
        x = x.relu() if index else x
        compute = torch.bfloat16 if dtype == "bf16" else torch.float32

        def call(config=None, x=x, layer=layer):
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                if config == "dense":
                    return F.linear(x, layer.weight, layer.bias)
                return masked_matmul.block_sparse_linear(layer, x, force=True, config=config)

        # The input gradient (training's other GEMM on the weight's tiles): grad_output @ weight.
        upstream = torch.randn(batch, layer.out_features, device=device, generator=generator).to(compute)
        weight = layer.weight.detach()

        def input_grad_dense(upstream=upstream, weight=weight):
            return upstream @ weight.to(compute)

        def input_grad_kernel(upstream=upstream, weight=weight, layer=layer):
            return masked_matmul._launch(layer, upstream, weight, None, compute, transposed=True)

        variants = {"dense": (lambda: call("dense"), {}), "kernel": (call, SPARSE)}
        if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":  # else no Triton kernel runs here
            variants.update(input_grad_dense=(input_grad_dense, {}), input_grad_kernel=(input_grad_kernel, SPARSE))
        medians = time_in_turns(variants, repeats, calls)
        row = {"layer": index, "shape": list(layer.weight.shape), "batch": batch, "dtype": dtype,
               "dense_ms": medians["dense"], "kernel_ms": medians["kernel"],
               "input_grad_dense_ms": medians.get("input_grad_dense", float("nan")),
               "input_grad_kernel_ms": medians.get("input_grad_kernel", float("nan")),
               "default_config": list(masked_matmul.default_config(batch, compute)),
               "covered_fraction": masked_matmul.covered_fraction(layer)}
        best, sweep_until = None, time.perf_counter() + sweep_seconds
        for config in SWEEP:
            if time.perf_counter() > sweep_until:
                break
            if config[0] > 16 and batch <= 16:
                continue
            try:
                ms = time_in_turns({"k": (lambda config=config: call(config), SPARSE)}, max(3, repeats // 3),
                                   calls)["k"]
            except Exception as error:  # noqa: BLE001 - a tile shape the compiler refuses: recorded, sweep goes on
                row.setdefault("sweep_errors", []).append(f"{config}: {type(error).__name__}")
                continue
            if best is None or ms < best[1]:
                best = (list(config), ms)
        if best is not None:
            row["sweep_best_config"], row["sweep_best_ms"] = best
        weight_bytes = layer.weight.numel() * 4
        row["dense_GBps_weights"] = weight_bytes / (row["dense_ms"] / 1e3) / 1e9
        row["kernel_GBps_weights_read"] = weight_bytes * row["covered_fraction"] / (row["kernel_ms"] / 1e3) / 1e9
        rows.append(row)
        print(f"layer {index} {tuple(layer.weight.shape)} b{batch} {dtype}: dense {row['dense_ms']:.3f} ms, kernel "
              f"{row['kernel_ms']:.3f} ms {row['default_config']}"
              + (f", best {best[1]:.3f} ms {best[0]}" if best else "")
              + f"; input grad dense {row['input_grad_dense_ms']:.3f} ms, kernel {row['input_grad_kernel_ms']:.3f} ms",
              flush=True)
    return rows


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("time_maf_log_prob.py needs a CUDA GPU (or --smoke).")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = MAFConfig(image_size=8, hidden_sizes=[128, 96], num_blocks=3) if args.smoke else MAFConfig()
    batches = (20, 8) if args.smoke else BATCHES
    if args.smoke:
        args.repeats, args.calls, args.sweep_budget_s = 2, 1, min(args.sweep_budget_s, 20.0)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
               "triton": getattr(masked_matmul.triton, "__version__", None),
               "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
               "float32_matmul_precision": torch.get_float32_matmul_precision(),
               "copy_bandwidth_GBps": copy_bandwidth_gbs(device), "log_prob": [], "floor": [], "agreement": [],
               "layers": []}
    model = spec_model(device, config)
    flow = None
    if not args.skip_nflows:
        try:
            flow = nflows_flow(config, device)
        except ImportError as error:
            results["nflows"] = f"not run: {error}"
    for batch in batches:
        pixels = torch.rand(batch, 3, config.image_size, config.image_size, device=device,
                            generator=torch.Generator(device=device).manual_seed(batch))
        results["floor"].append(log_prob_floor(model, batch, results["copy_bandwidth_GBps"]))
        for dtype in DTYPES:
            ours = log_prob_fn(model, lambda m, p: m(p).log_prob, pixels, dtype)
            eager, every_layer = without_graphs(model, ours), with_every_layer_on_the_kernel(ours)
            variants = {"dense": (ours, DENSE), "block-sparse": (ours, SPARSE),
                        "block-sparse every layer": (every_layer, SPARSE),
                        "dense eager": (eager, DENSE), "block-sparse eager": (eager, SPARSE)}
            if dtype == "fp32":
                variants["block-sparse ieee"] = (ours, SPARSE_IEEE)
            if flow is not None:
                variants["nflows 0.14"] = (log_prob_fn(flow, lambda f, p: f.log_prob(p.flatten(1)), pixels, dtype), {})
            medians = time_in_turns(variants, args.repeats, args.calls)
            for name, ms in medians.items():
                row = {"variant": name, "batch": batch, "dtype": dtype, "ms": ms, "images_per_s": batch / ms * 1e3}
                if "nflows 0.14" in medians:
                    row["speedup_vs_nflows"] = medians["nflows 0.14"] / ms
                results["log_prob"].append(row)
                print(f"log_prob b{batch} {dtype} {name:24s} {ms:8.3f} ms"
                      + (f"  {row['speedup_vs_nflows']:.2f}x nflows" if "speedup_vs_nflows" in row else ""),
                      flush=True)
            with environment(**DENSE):
                dense = eager()  # the reference: dense GEMMs launched from Python
            for name in variants:
                if not name.startswith("nflows"):
                    fn, env = variants[name]
                    with environment(**env):
                        difference = (fn().double() - dense.double()).abs()
                    results["agreement"].append({"variant": name, "batch": batch, "dtype": dtype,
                                                 "max_abs_diff_nats": float(difference.max()),
                                                 "max_rel_diff": float((difference / dense.double().abs()).max())})
        floor = results["floor"][-1]
        print(f"floor b{batch}: {floor['ms_at_measured_bandwidth']:.3f} ms ({floor['bytes'] / 1e9:.2f} GB at "
              f"{results['copy_bandwidth_GBps']:.0f} GB/s), {floor['gflop']:.1f} GFLOP", flush=True)
    del flow
    sweep_seconds = args.sweep_budget_s / (len(batches) * len(DTYPES) * len(model.blocks[1].made.layers)) \
        if args.sweep else 0.0
    for batch in batches:
        for dtype in DTYPES:
            results["layers"] += layer_rows(model, batch, dtype, args.repeats, args.calls, sweep_seconds)
    for row in results["agreement"]:
        print("agreement", row)
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
