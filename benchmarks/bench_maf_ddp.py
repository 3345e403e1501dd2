"""One default-size MAF training step under DDP, timed by phase: one process against several, MaskedAdam against
torch Adam.

    torchrun --nproc_per_node 1 benchmarks/bench_maf_ddp.py --output_dir runs/ddp     # one GPU
    torchrun --nproc_per_node 2 benchmarks/bench_maf_ddp.py --output_dir runs/ddp     # two GPUs (same call)
    torchrun --nproc_per_node 2 benchmarks/bench_maf_ddp.py --smoke                   # CPU, gloo, tiny sizes

Every process builds the default-size MAF (128x128x3, MADE 49152->512->512->2*49152, 7 blocks) at batch 8 per
process and times, after warm-up, eager steps (CUDA graphs are for one process) as train_maf.py runs them under
accelerate: bf16 autocast, DDP around the model, the optimizer built before DDP. For each optimizer it reports the
median step and its phases, each closed by a device synchronisation: forward, backward (for torch Adam this includes
DDP's gradient all-reduce of every weight), optimizer step (for MaskedAdam this includes its all-gather of the layer
factors).
Images/s counts all processes. Rank 0 writes bench_maf_ddp_<N>gpu.json.
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from hf_dgm_training.maf.masked_adam import MaskedAdam
from modeling_maf import MAFConfig, MAFModel


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/bench_maf_ddp")
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes, CPU and gloo: checks that it runs.")
    parser.add_argument("--steps", type=int, default=30, help="Timed steps per optimizer (median reported).")
    parser.add_argument("--optimizers", nargs="+", default=["masked_adam", "adam"], choices=["masked_adam", "adam"])
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    on_cuda = torch.cuda.is_available() and not args.smoke
    dist.init_process_group("nccl" if on_cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_cuda else torch.device("cpu")
    if on_cuda:
        torch.cuda.set_device(device)
    sizes = dict(image_size=8, hidden_sizes=[32, 32], num_blocks=2) if args.smoke else \
        dict(image_size=128, hidden_sizes=[512, 512], num_blocks=7)
    steps = min(args.steps, 3) if args.smoke else args.steps

    def sync():
        if on_cuda:
            torch.cuda.synchronize()

    generator = torch.Generator(device=device).manual_seed(rank)
    batch = torch.rand(8, 3, sizes["image_size"], sizes["image_size"], device=device, generator=generator)
    results = {"world_size": world_size, "device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
               "torch": torch.__version__, "sizes": sizes, "rows": []}
    for name in args.optimizers:
        torch.manual_seed(0)
        with torch.device(device):
            model = MAFModel(MAFConfig(**sizes))
        if name == "masked_adam":
            optimizer = MaskedAdam(model, lr=1e-4, fused=on_cuda or None)
        else:
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=on_cuda or None)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if on_cuda else None)
        phases = {"forward": [], "backward": [], "optimizer": [], "step": []}
        for index in range(steps + 5):
            sync()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
                loss = ddp(batch).loss
            sync()
            forward_done = time.perf_counter()
            loss.backward()
            sync()
            backward_done = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            done = time.perf_counter()
            if index >= 5:  # warm-up: kernel compilation, NCCL set-up, allocator
                for key, value in (("forward", forward_done - start), ("backward", backward_done - forward_done),
                                   ("optimizer", done - backward_done), ("step", done - start)):
                    phases[key].append(value * 1e3)
        row = {"optimizer": name, **{f"{key}_ms": statistics.median(values) for key, values in phases.items()}}
        row["images_per_s"] = 8 * world_size / row["step_ms"] * 1e3
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else None
        results["rows"].append(row)
        del ddp, model, optimizer
        if on_cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, f"bench_maf_ddp_{world_size}gpu.json"), "w") as f:
            json.dump(results, f, indent=2)
        precision = "bf16 autocast" if on_cuda else "fp32"
        print(f"{results['device']} x {world_size}, torch {results['torch']}, batch 8 per process, {precision}, eager")
        print(f"{'optimizer':12s} {'step ms':>8s} {'forward':>8s} {'backward':>9s} {'optimizer':>10s} {'img/s':>8s}")
        for row in results["rows"]:
            print(f"{row['optimizer']:12s} {row['step_ms']:8.2f} {row['forward_ms']:8.2f} {row['backward_ms']:9.2f} "
                  f"{row['optimizer_ms']:10.2f} {row['images_per_s']:8.1f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
