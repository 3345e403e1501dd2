"""Time the feature detector's backbone on the CPU with freed host memory kept for reuse (`run_main`'s default,
hf_dgm_training/host_memory.py) and given back to the system (HF_DGM_KEEP_FREED_MEMORY=0), at several batch sizes.

    python benchmarks/time_cpu_feature_extraction.py --output_json runs/cpu_features.json
    python benchmarks/time_cpu_feature_extraction.py --smoke          # tiny sizes: checks that it runs

Every (setting, batch size) runs in a process of its own, since the allocator's settings hold for a whole process:
EfficientNet-Lite0 (random weights: the time does not depend on them) up to stage 5, in eval mode, over
--num_images random images of --image_size, channels last as `FeatureMAFModel.extract_features` feeds it; one batch
first to warm up. Rows: seconds, images/s, and the system time and minor page faults of the timed batches. Malloc
tuning variables of the environment (MALLOC_*_, GLIBC_TUNABLES) are left out of both processes.
"""

import argparse
import json
import os
import subprocess
import sys


CHILD = """
import json, resource, sys, time
import torch
from hf_dgm_training.errors import run_main
from modeling_maf import EfficientNetLiteBackbone, EfficientNetLiteConfig

def time_batches(argv=None):
    num_images, image_size, batch_size, threads = (int(value) for value in sys.argv[1:5])
    torch.set_num_threads(threads)
    backbone = EfficientNetLiteBackbone(EfficientNetLiteConfig(out_features=["stage4", "stage5"])).eval()
    images = torch.rand(num_images, 3, image_size, image_size)
    with torch.no_grad():
        backbone(images[:batch_size].contiguous(memory_format=torch.channels_last))
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for chunk in images.split(batch_size):
            backbone(chunk.contiguous(memory_format=torch.channels_last))
        seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": seconds, "images_per_s": num_images / seconds,
                      "system_s": after.ru_stime - before.ru_stime,
                      "minor_faults": after.ru_minflt - before.ru_minflt}))

run_main(time_batches, [])
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=96)
    parser.add_argument("--image_size", type=int, default=384)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 8, 4])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--output_json", default=None)
    parser.add_argument("--smoke", action="store_true", help="4 images of 64x64 in batches of 2.")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_images, args.image_size, args.batch_sizes = 4, 64, [2]
    return args


def run_child(args, batch_size, keep_freed_memory):
    from hf_dgm_training.host_memory import MALLOC_ENVIRONMENT, OPT_OUT_ENV

    # The two settings differ in the switch alone: malloc tuned by the environment would override both.
    env = {name: value for name, value in os.environ.items() if name not in MALLOC_ENVIRONMENT}
    env[OPT_OUT_ENV] = "1" if keep_freed_memory else "0"
    command = [sys.executable, "-c", CHILD, str(args.num_images), str(args.image_size), str(batch_size),
               str(args.threads)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"the timing process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    rows = []
    print(f"{args.num_images} images of {args.image_size}x{args.image_size}, {args.threads} threads")
    print(f"{'batch':>5}  {'freed memory':<12} {'seconds':>8} {'images/s':>9} {'sys s':>7} {'faults':>10}")
    for batch_size in args.batch_sizes:
        for keep in (True, False):
            row = {"batch_size": batch_size, "keep_freed_memory": keep, **run_child(args, batch_size, keep)}
            rows.append(row)
            print(f"{batch_size:>5}  {'kept' if keep else 'given back':<12} {row['seconds']:>8.2f} "
                  f"{row['images_per_s']:>9.1f} {row['system_s']:>7.2f} {row['minor_faults']:>10}")
    result = {"num_images": args.num_images, "image_size": args.image_size, "threads": args.threads, "rows": rows}
    if args.output_json:
        from hf_dgm_training import write_json

        write_json(args.output_json, result)
    return result


if __name__ == "__main__":
    main()
