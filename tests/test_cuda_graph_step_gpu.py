"""hf_dgm_training.CUDAGraphStep on a real GPU: the replayed MAF step must train exactly like the eager one.

Skipped without CUDA (CI has none); run on a GPU machine with `python -m pytest -q tests/test_cuda_graph_step_gpu.py`.
"""

import copy

import pytest
import torch

from hf_dgm_training import CUDAGraphStep
from hf_dgm_training.maf.masked_adam import MaskedAdam
from modeling_maf import MAFConfig, MAFModel
from test_masked_adam import tiny_maf
from test_masked_adam import train as train_steps


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def train(model, batches, use_graphs, optimizer_class):
    if optimizer_class is MaskedAdam:
        optimizer = MaskedAdam(model, lr=1e-3, backend="triton", fused=True, capturable=use_graphs)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True, capturable=use_graphs)

    def step(pixel_values):
        loss = model(pixel_values).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    runner = CUDAGraphStep(step, enabled=use_graphs, reset_fn=lambda: optimizer.zero_grad(set_to_none=True))
    losses = [float(runner(batch).clone()) for batch in batches]
    return losses, runner


@pytest.mark.parametrize("optimizer_class", [torch.optim.Adam, MaskedAdam])
def test_graph_replays_train_like_the_eager_step(optimizer_class):
    torch.manual_seed(0)
    model = MAFModel(MAFConfig(image_size=8, hidden_sizes=[32, 32], num_blocks=2)).cuda()
    # Deterministic dequantisation (eval mode) so that both runs see the same numbers; a last partial batch
    # after the capture runs eagerly and must not disturb the graph.
    model.eval()
    generator = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.rand(4, 3, 8, 8, device="cuda", generator=generator) for _ in range(8)]
    batches.append(batches[0][:3])
    batches += [torch.rand(4, 3, 8, 8, device="cuda", generator=generator) for _ in range(3)]

    eager_model = copy.deepcopy(model)
    eager_losses, _ = train(eager_model, batches, use_graphs=False, optimizer_class=optimizer_class)
    graph_losses, runner = train(model, batches, use_graphs=True, optimizer_class=optimizer_class)

    described = runner.describe()
    assert described["cuda_graphs"] and not described["fallbacks"]
    assert described["graph_replays"] == len(batches) - 3 - 1  # 3 warm-ups, 1 partial batch
    assert graph_losses == pytest.approx(eager_losses, rel=1e-4)
    for (name, graph_param), eager_param in zip(model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(graph_param, eager_param, rtol=1e-4, atol=1e-5, msg=name)
    # The masked connections stayed exactly zero through the replays.
    for block in model.blocks:
        for layer in block.made.layers:
            assert not layer.weight[~layer.mask()].any()


@pytest.mark.parametrize("autocast_bf16", [False, True])
def test_masked_adam_triton_kernel_matches_the_torch_maths(autocast_bf16):
    """The Triton update against MaskedAdam's torch reference (itself tested against torch.optim.Adam on CPU), at a
    size with many tiles of every kind, both permutations, fp32 and bf16 autocast."""
    model = tiny_maf(image_size=16, hidden_sizes=[256, 192], num_blocks=2).cuda()
    reference = copy.deepcopy(model)
    generator = torch.Generator(device="cuda").manual_seed(1)
    # bf16: one step, so both runs cast the same weights (later, rounding-level weight differences can flip bf16
    # roundings of the forward pass, which Adam's first steps then amplify).
    batches = [torch.rand(8, 3, 16, 16, device="cuda", generator=generator) for _ in range(1 if autocast_bf16 else 6)]
    for net, backend in ((model, "triton"), (reference, "torch")):
        optimizer = MaskedAdam(net, lr=1e-3, backend=backend)
        net.eval()  # deterministic dequantisation
        train_steps(net, optimizer, batches, autocast_bf16=autocast_bf16)
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        far = ((ours - theirs).abs() > 1e-5 + 1e-4 * theirs.abs()).float().mean().item()
        # Adam turns a rounding-level gradient difference near zero into a full step: allow a handful of entries.
        assert far < 1e-4, (name, far)
        assert (ours - theirs).abs().max() < 1e-2, name
