"""Default-size MAF/IAF (128x128x3, MADE 49152->512->512->2*49152, 7 blocks) speed on one GPU, side by side with
nflows 0.14 in the same process.

    python benchmarks/bench_maf.py --output_dir runs/bench_maf          # GPU, default size
    python benchmarks/bench_maf.py --smoke                              # CPU, tiny sizes: checks that it runs

Measures (median over repeated runs, CUDA-event timed after warm-up):
  - train step (forward, backward, Adam) at batch 8, fp32 and bf16 autocast: ms/step, images/s, peak memory; eager
    with fused and with plain Adam, and on a GPU also replayed as one CUDA graph (train_maf.py's default there);
  - log_prob at batch 132 (the capsule test-set size) and 8, fp32 and bf16 autocast, with the MADE matmuls dense
    (HF_DGM_BLOCK_SPARSE=0) and block-sparse (modeling_maf/masked_matmul.py, the default on CUDA), and its floor: the
    bytes a log_prob must move over the measured copy bandwidth;
  - sampling 5 images: replayed as one CUDA graph (the default on a GPU; first and capture calls reported with it) and
    eager, with the sequential MADE evaluations per block;
  - IAF at the same size: sampling, density and train-step time;
  - nflows MaskedAutoregressiveFlow at the identical layer shapes (when nflows is importable): train step, log_prob,
    and sampling timed in full at 3x32x32 and 3x64x64, extrapolated to 3x128x128 (it needs D passes per layer);
  - the floor: bytes of weights (and Adam state) an fp32 step must move, over the measured copy bandwidth; the same
    for one sequential sampling pass (the weights of one segment and the middle layers).
Prints a table and writes bench_maf.json in --output_dir.
"""

import argparse
import contextlib
import gc
import json
import os
import statistics
import time

import torch

from hf_dgm_training.maf.masked_adam import MaskedAdam, connected_fraction
from modeling_maf import IAFConfig, IAFModel, MAFConfig, MAFModel
from modeling_maf.masked_matmul import DISABLE_ENV
from modeling_maf.modeling_maf import MaskedLinear
from time_maf_sampling import pass_floor_bytes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/bench_maf", help="Where bench_maf.json is written.")
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes on whatever device is present (CI check).")
    parser.add_argument("--repeats", type=int, default=20, help="Timed repetitions per measurement.")
    parser.add_argument("--skip_nflows", action="store_true", help="Do not run the nflows peer.")
    parser.add_argument("--skip_iaf_train", action="store_true", help="Skip the (slow) IAF train step.")
    return parser.parse_args(argv)


class Timer:
    def __init__(self, device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def median_ms(self, fn, repeats, warmup=3):
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def peak_gib(self):
        return torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else float("nan")

    def reset_peak(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()


def copy_bandwidth_gbs(device, timer):
    if device.type != "cuda":
        return float("nan")
    source = torch.empty(2 * 2**30 // 4, device=device)
    target = torch.empty_like(source)
    ms = timer.median_ms(lambda: target.copy_(source), repeats=10)
    return 2 * source.numel() * 4 / (ms / 1e3) / 1e9  # bytes read + written


def train_step_fn(model, log_prob_of, batch, optimizer, dtype):
    def step():
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = -log_prob_of(model, batch).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_optimizer(kind, model, device, capturable=False):
    """'masked': MaskedAdam (train_maf.py's default for a MAF); 'fused': torch.optim.Adam's fused CUDA kernel;
    'plain': torch.optim.Adam with its defaults (foreach on CUDA). Release a MaskedAdam after use
    (release_optimizer)."""
    fused = device.type == "cuda" or None
    if kind == "masked":
        return MaskedAdam(model, lr=1e-4, fused=fused, capturable=capturable)
    if kind == "fused":
        return torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused, capturable=capturable)
    return torch.optim.Adam(model.parameters(), lr=1e-4)


def release_optimizer(optimizer):
    optimizer.zero_grad(set_to_none=True)
    if isinstance(optimizer, MaskedAdam):
        optimizer.release()  # the model's next optimizer gets its weight gradients from autograd again


def graphed_train_step_ms(model, batch, timer, repeats, dtype, kind):
    """The training script's default step on one GPU: the whole step replayed as one CUDA graph."""
    from hf_dgm_training import CUDAGraphStep

    optimizer = make_optimizer(kind, model, batch.device, capturable=True)

    def step(pixels):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16", cache_enabled=False):
            loss = model(pixels).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    runner = CUDAGraphStep(step, enabled=True, reset_fn=lambda: optimizer.zero_grad(set_to_none=True))
    timer.reset_peak()
    ms = timer.median_ms(lambda: runner(batch), repeats, warmup=5)
    peak = timer.peak_gib()
    described = runner.describe()
    release_optimizer(optimizer)
    runner = optimizer = None  # free the GPU memory
    gc.collect()
    torch.cuda.empty_cache()
    return ms, peak, described


def log_prob_fn(model, log_prob_of, batch, dtype):
    @torch.no_grad()
    def run():
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            return log_prob_of(model, batch)

    return run


def ours_log_prob(model, pixels):
    return model(pixels).log_prob


def nflows_log_prob(flow, pixels):
    return flow.log_prob(pixels.flatten(1))


# log_prob's MADE matmuls: (label, value of HF_DGM_BLOCK_SPARSE); nflows has one way only.
MATMULS = (("block-sparse", None), ("dense", "0"))


@contextlib.contextmanager
def block_sparse_setting(value):
    """HF_DGM_BLOCK_SPARSE set to `value` (None: unset, the default) for the duration."""
    saved = os.environ.get(DISABLE_ENV)
    try:
        if value is None:
            os.environ.pop(DISABLE_ENV, None)
        else:
            os.environ[DISABLE_ENV] = value
        yield
    finally:
        if saved is None:
            os.environ.pop(DISABLE_ENV, None)
        else:
            os.environ[DISABLE_ENV] = saved


def log_prob_floor(model, batch_size, bandwidth_gbs):
    """What a log_prob of `batch_size` images must move: the connected MADE weights (float32) once, the pixels, and
    each block's input read and output written (float32); in bytes and in ms at `bandwidth_gbs`. Also the
    multiply-adds of the connected weights, in GFLOP."""
    layers = [module for module in model.modules() if isinstance(module, MaskedLinear)]
    connected = sum(int(layer.fan_in().sum()) for layer in layers)  # counted from the degrees
    features, blocks = model.config.num_features, model.config.num_blocks
    floor_bytes = 4 * connected + 4 * batch_size * features * (1 + 2 * blocks)
    return {"batch": batch_size, "bytes": floor_bytes, "gflop": 2 * batch_size * connected / 1e9,
            "ms_at_measured_bandwidth": floor_bytes / (bandwidth_gbs * 1e9) * 1e3 if bandwidth_gbs == bandwidth_gbs
            else None}


def measure_training_and_density(name, model, log_prob_of, pixels_8, pixels_big, timer, repeats, make_optimizer,
                                 matmuls=((None, None),), log_prob=True):
    """Train-step rows at batch 8, then (with `log_prob`) log_prob rows at the big batch and at 8, each way of
    `matmuls` ((label, HF_DGM_BLOCK_SPARSE value) pairs)."""
    rows = []
    for dtype in ("fp32", "bf16"):
        optimizer = make_optimizer(model)
        timer.reset_peak()
        ms = timer.median_ms(train_step_fn(model, log_prob_of, pixels_8, optimizer, dtype), repeats)
        rows.append({"model": name, "measure": f"train step b{pixels_8.shape[0]} {dtype}", "ms": ms,
                     "images_per_s": pixels_8.shape[0] / ms * 1e3, "peak_gib": timer.peak_gib()})
        release_optimizer(optimizer)
        del optimizer
        gc.collect()
    if not log_prob:
        return rows
    model.eval()
    for pixels in (pixels_big, pixels_8):
        for dtype in ("fp32", "bf16"):
            for label, setting in matmuls:
                with block_sparse_setting(setting):
                    timer.reset_peak()
                    ms = timer.median_ms(log_prob_fn(model, log_prob_of, pixels, dtype), repeats)
                measure = f"log_prob b{pixels.shape[0]} {dtype}" + (f" {label}" if label else "")
                rows.append({"model": name, "measure": measure, "ms": ms, "images_per_s": pixels.shape[0] / ms * 1e3,
                             "peak_gib": timer.peak_gib()})
    model.train()
    return rows


def sampling_rows(model, generator, timer, repeats):
    """Exact sampling of 5 images: the default (on a GPU from the third call at a shape on: one CUDA graph of every
    block; the first call runs eagerly, the second captures) and eager (``sampling_cuda_graphs = False``)."""
    rows, passes = [], model.num_sequential_passes()[0]
    def sample():
        return model.sample(5, generator=generator)
    if timer.device.type == "cuda":
        calls = []
        for _ in range(2):  # eager first call, then the capture call
            started = time.perf_counter()
            sample()
            timer.sync()
            calls.append((time.perf_counter() - started) * 1e3)
        ms = timer.median_ms(sample, repeats=repeats, warmup=1)
        rows.append({"model": "hf-dgm MAF", "measure": "sample 5 (CUDA graph)", "ms": ms, "images_per_s": 5 / ms * 1e3,
                     "sequential_passes_per_block": passes, "first_call_ms": calls[0], "capture_call_ms": calls[1]})
    model.sampling_cuda_graphs = False
    try:
        ms = timer.median_ms(sample, repeats=max(3, repeats // 4), warmup=1)
    finally:
        model.sampling_cuda_graphs = True
    rows.append({"model": "hf-dgm MAF", "measure": "sample 5 (eager)", "ms": ms, "images_per_s": 5 / ms * 1e3,
                 "sequential_passes_per_block": passes})
    return rows


def sampling_floor(model, bandwidth):
    """Bytes of weights one sequential pass must read (mean over a block's passes; time_maf_sampling.py), and every
    pass of a sample call, over the measured copy bandwidth."""
    per_pass = pass_floor_bytes(model)
    total = sum(per_pass) * len(model.blocks)
    known = bandwidth == bandwidth
    return {"mean_bytes_per_pass": statistics.mean(per_pass), "bytes_all_passes": total,
            "us_per_pass_at_measured_bandwidth": statistics.mean(per_pass) / (bandwidth * 1e9) * 1e6 if known else None,
            "ms_all_passes_at_measured_bandwidth": total / (bandwidth * 1e9) * 1e3 if known else None}


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timer = Timer(device)
    if args.smoke:
        sizes = dict(image_size=8, num_channels=3, hidden_sizes=[32, 32], num_blocks=3)
        args.repeats = min(args.repeats, 3)
        small_sides = [4, 6]
    else:
        sizes = dict(image_size=128, num_channels=3, hidden_sizes=[512, 512], num_blocks=7)
        small_sides = [32, 64]
    hidden = sizes["hidden_sizes"][0]
    side, layers = sizes["image_size"], sizes["num_blocks"]
    generator = torch.Generator(device=device).manual_seed(0)
    pixels_8 = torch.rand(8, 3, side, side, device=device, generator=generator)
    pixels_big = torch.rand(132 if not args.smoke else 16, 3, side, side, device=device, generator=generator)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "sizes": sizes, "rows": []}
    rows = results["rows"]

    bandwidth = copy_bandwidth_gbs(device, timer)
    results["copy_bandwidth_GBps"] = bandwidth

    # ---------------------------------------------------------------- ours: MAF
    with torch.device(device):
        model = MAFModel(MAFConfig(**sizes))
    num_params = model.num_parameters()
    results["parameters"] = num_params
    rows += measure_training_and_density("hf-dgm MAF (fused Adam)", model, ours_log_prob, pixels_8, pixels_big, timer,
                                         args.repeats, lambda m: make_optimizer("fused", m, device), matmuls=MATMULS)
    rows += measure_training_and_density("hf-dgm MAF (plain Adam)", model, ours_log_prob, pixels_8, pixels_big, timer,
                                         args.repeats, lambda m: make_optimizer("plain", m, device), log_prob=False)
    rows += measure_training_and_density("hf-dgm MAF (MaskedAdam)", model, ours_log_prob, pixels_8, pixels_big, timer,
                                         args.repeats, lambda m: make_optimizer("masked", m, device), log_prob=False)
    if device.type == "cuda":
        for kind, label in (("fused", "fused Adam"), ("masked", "MaskedAdam")):
            for dtype in ("fp32", "bf16"):
                ms, peak, described = graphed_train_step_ms(model, pixels_8, timer, args.repeats, dtype, kind)
                rows.append({"model": f"hf-dgm MAF ({label} + CUDA graph)", "measure": f"train step b8 {dtype}",
                             "ms": ms, "images_per_s": 8 / ms * 1e3, "peak_gib": peak, "graph": described})
    model.eval()
    sample_generator = torch.Generator(device=device).manual_seed(0)
    rows += sampling_rows(model, sample_generator, timer, args.repeats)
    results["floor_sampling_pass"] = sampling_floor(model, bandwidth)
    # Weight traffic floor of an fp32 Adam step: forward reads W, backward reads W and writes dW, the gradient mask
    # reads and writes dW, Adam reads W, dW, m, v and writes W, m, v: 11 x 4 bytes per parameter (+ the bool mask).
    floor_bytes = num_params * (11 * 4 + 1)
    results["floor"] = {"bytes_per_fp32_step": floor_bytes,
                        "ms_at_measured_bandwidth":
                            floor_bytes / (bandwidth * 1e9) * 1e3 if bandwidth == bandwidth else None}
    # MaskedAdam: forward and backward read W; the update reads and writes W, m, v of the connected tiles only.
    fractions = connected_fraction(model)
    masked_bytes = num_params * (2 * 4 + 6 * 4 * fractions["tiles"])
    results["floor_masked_adam"] = {"bytes_per_fp32_step": masked_bytes, "fractions": fractions,
                                    "ms_at_measured_bandwidth": masked_bytes / (bandwidth * 1e9) * 1e3}
    results["floor_log_prob"] = [log_prob_floor(model, pixels.shape[0], bandwidth) for pixels in (pixels_big, pixels_8)]
    for floor in results["floor_log_prob"] if bandwidth == bandwidth else ():  # rows only with a measured bandwidth
        ms = floor["ms_at_measured_bandwidth"]
        rows.append({"model": "floor (bytes / copy bandwidth)", "measure": f"log_prob b{floor['batch']}", "ms": ms,
                     "images_per_s": floor["batch"] / ms * 1e3, "bytes": floor["bytes"], "gflop": floor["gflop"]})
    model = None  # free the GPU memory
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None

    # ---------------------------------------------------------------- ours: IAF
    with torch.device(device):
        iaf = IAFModel(IAFConfig(**sizes))
    with torch.no_grad():  # non-trivial weights so that the timing is of real work
        for block in iaf.blocks:
            last = block.made.layers[-1]
            last.weight.normal_(0, 1e-3).mul_(last.mask())
    iaf.eval()
    ms = timer.median_ms(lambda: iaf.sample(5, generator=sample_generator), repeats=args.repeats)
    rows.append({"model": "hf-dgm IAF", "measure": "sample 5", "ms": ms, "images_per_s": 5 / ms * 1e3,
                 "sequential_passes_per_block": 1})
    ms = timer.median_ms(lambda: iaf(pixels_8).log_prob, repeats=max(3, args.repeats // 4), warmup=1)
    rows.append({"model": "hf-dgm IAF", "measure": "log_prob b8 fp32", "ms": ms, "images_per_s": 8 / ms * 1e3,
                 "sequential_passes_per_block": iaf.num_sequential_passes()[0]})
    if not args.skip_iaf_train:
        iaf.train()
        optimizer = torch.optim.Adam(iaf.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
        timer.reset_peak()
        ms = timer.median_ms(train_step_fn(iaf, ours_log_prob, pixels_8, optimizer, "bf16"), repeats=3, warmup=1)
        rows.append({"model": "hf-dgm IAF", "measure": "train step b8 bf16", "ms": ms, "images_per_s": 8 / ms * 1e3,
                     "peak_gib": timer.peak_gib()})
        del optimizer
    iaf = None  # free the GPU memory
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None

    # ---------------------------------------------------------------- peer: nflows
    try:
        if args.skip_nflows:
            raise ImportError("skipped by flag")
        from nflows.flows import MaskedAutoregressiveFlow
    except ImportError as error:
        results["nflows"] = f"not run: {error}"
    else:
        def build_nflows(features):
            with torch.device(device):
                return MaskedAutoregressiveFlow(features=features, hidden_features=hidden, num_layers=layers,
                                                num_blocks_per_layer=1, use_residual_blocks=False)

        started = time.perf_counter()
        flow = build_nflows(3 * side * side)
        timer.sync()
        results["nflows_build_s"] = time.perf_counter() - started
        rows += measure_training_and_density("nflows 0.14 MAF", flow, nflows_log_prob, pixels_8, pixels_big, timer,
                                             args.repeats, lambda m: make_optimizer("plain", m, device))
        del flow
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
        per_pass = []
        for small in small_sides:
            features = 3 * small * small
            flow = build_nflows(features).eval()
            with torch.no_grad():
                ms = timer.median_ms(lambda: flow.sample(5), repeats=1, warmup=0)
            per_pass.append(ms / (features * layers))
            rows.append({"model": "nflows 0.14 MAF", "measure": f"sample 5 at 3x{small}x{small} (measured)", "ms": ms,
                         "images_per_s": 5 / ms * 1e3, "sequential_passes_per_block": features})
            del flow
        extrapolated = per_pass[-1] * 3 * side * side * layers
        rows.append({"model": "nflows 0.14 MAF", "measure": f"sample 5 at 3x{side}x{side} (extrapolated)",
                     "ms": extrapolated, "images_per_s": 5 / extrapolated * 1e3,
                     "sequential_passes_per_block": 3 * side * side,
                     "note": f"{per_pass[-1]:.3f} ms per pass at 3x{small_sides[-1]}x{small_sides[-1]} x D passes x "
                             f"{layers} layers"})

    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "bench_maf.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\n{results['device']}, torch {results['torch']}, {num_params:,} parameters, copy bandwidth "
          f"{bandwidth:.0f} GB/s, fp32-step floor "
          f"{results['floor']['ms_at_measured_bandwidth'] or float('nan'):.2f} ms "
          f"(torch Adam), {results['floor_masked_adam']['ms_at_measured_bandwidth']:.2f} ms (MaskedAdam)")
    floor = results["floor_sampling_pass"]
    print(f"sampling pass floor: {floor['mean_bytes_per_pass'] / 1e6:.2f} MB of weights, "
          f"{floor['us_per_pass_at_measured_bandwidth'] or float('nan'):.2f} us; all passes of a call "
          f"{floor['ms_all_passes_at_measured_bandwidth'] or float('nan'):.2f} ms")
    print(f"{'model':28s} {'measure':40s} {'ms':>12s} {'img/s':>10s} {'peak GiB':>9s} {'passes':>7s}")
    for row in rows:
        print(f"{row['model']:28s} {row['measure']:40s} {row['ms']:12.2f} {row['images_per_s']:10.1f} "
              f"{row.get('peak_gib', float('nan')):9.2f} {row.get('sequential_passes_per_block', ''):>7}")
    return results


if __name__ == "__main__":
    main()
