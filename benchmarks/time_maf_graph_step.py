"""Time the seed-spec MAF training step with MaskedAdam replayed as one CUDA graph (fp32, batch 8), optionally with
the non-finite guard train_maf.py uses (`found_inf`). Prints the median of repeats 3-8 of 50 steps.

    python benchmarks/time_maf_graph_step.py now              # the kernel without the skip mask
    python benchmarks/time_maf_graph_step.py now found_inf    # train_maf.py's step: skip mask + factor check

Runs from an older checkout too (it then takes CUDAGraphStep from scripts/training_utils.py, which must be on the
path), so that two trees can be compared in one device call.
"""

import statistics
import sys
import time

import torch

from modeling_maf import MAFConfig, MAFModel
from modeling_maf.optimization_maf import MaskedAdam


try:
    from hf_dgm_training import CUDAGraphStep
except ImportError:  # a checkout from before the training package
    from training_utils import CUDAGraphStep


def main():
    torch.manual_seed(0)
    model = MAFModel(MAFConfig()).cuda()
    optimizer = MaskedAdam(model, lr=1e-4, fused=True, capturable=True)
    if "found_inf" in sys.argv[2:]:
        optimizer.found_inf = torch.zeros((), device="cuda")

    def step(pixel_values):
        loss = model(pixel_values).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    runner = CUDAGraphStep(step, enabled=True, reset_fn=lambda: optimizer.zero_grad(set_to_none=True))
    batch = torch.rand(8, 3, 128, 128, device="cuda")
    times = []
    for _ in range(8):
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(50):
            runner(batch)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - started) / 50 * 1000)
    print(sys.argv[1:], "MaskedAdam + graph fp32 step ms: median", round(statistics.median(times[2:]), 3),
          [round(t, 2) for t in times])


if __name__ == "__main__":
    main()
