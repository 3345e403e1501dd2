"""MaskedAdam (hf_dgm_training.maf.masked_adam): the same training as torch.optim.Adam, without dense MADE gradients.

The torch path is checked against torch.optim.Adam; the Triton kernel runs on CPU through Triton's interpreter
(TRITON_INTERPRET=1, in a subprocess) against the torch path at a size with many tiles in both directions; the
multi-process path (all-gathered factors, MADE weights left out of DDP) against one process on the whole batch.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch

from hf_dgm_training.maf.masked_adam import MaskedAdam, connected_fraction, connected_tiles
from modeling_maf import IAFConfig, IAFModel, MAFConfig, MAFModel


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_maf(seed=0, **overrides):
    """A small MAF (both permutations) whose output layer is non-zero, so every layer gets gradients at once."""
    torch.manual_seed(seed)
    config = {**dict(image_size=4, hidden_sizes=[40, 24], num_blocks=3, permutation="reverse"), **overrides}
    model = MAFModel(MAFConfig(**config))
    with torch.no_grad():  # a non-zero output layer, so that every layer gets gradients from the first step
        for block in model.blocks:
            last = block.made.layers[-1]
            last.weight.normal_(0, 1e-2).mul_(last.mask())
    return model


def train(model, optimizer, batches, autocast_bf16=False):
    losses = []
    for batch in batches:
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            loss = model(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def batches(count=5, size=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(size, 3, 4, 4, generator=generator) for _ in range(count)]


def assert_same_parameters(model, reference, **tolerances):
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, msg=lambda message, name=name: f"{name}: {message}", **tolerances)


def test_trains_like_torch_adam_and_never_forms_the_dense_gradient():
    reference = tiny_maf()
    model = copy.deepcopy(reference)
    adam = torch.optim.Adam(reference.parameters(), lr=1e-2)
    masked = MaskedAdam(model, lr=1e-2, backend="torch")
    data = batches()
    torch.manual_seed(5)
    expected = train(reference, adam, data)
    torch.manual_seed(5)  # the same dequantisation noise
    assert train(model, masked, data) == pytest.approx(expected, rel=1e-5)
    assert_same_parameters(model, reference, rtol=1e-5, atol=1e-6)
    for block in model.blocks:
        for layer in block.made.layers:
            assert layer.weight.grad is None  # the gradient went to the optimizer as factors
            assert not layer.weight[~layer.mask()].any()  # masked connections are still exactly zero


def test_a_step_flagged_in_found_inf_changes_nothing_and_a_clean_one_is_adams():
    """found_inf (as fused torch.optim.Adam reads it): 1 skips the update entirely, 0 is a normal step; MaskedAdam
    also flags non-finite gradient factors itself."""
    reference = tiny_maf()
    model = copy.deepcopy(reference)
    adam = torch.optim.Adam(reference.parameters(), lr=1e-2, fused=True)
    masked = MaskedAdam(model, lr=1e-2, backend="torch", fused=True)
    adam.found_inf, masked.found_inf = torch.zeros(()), torch.zeros(())
    reference.eval(), model.eval()  # deterministic dequantisation
    data = batches(3)
    train(reference, adam, data[:2])
    train(model, masked, data[:2])
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(masked.state_dict())
    masked.found_inf.fill_(1.0)
    train(model, masked, data[2:])
    assert all(torch.equal(tensor, saved[0][name]) for name, tensor in model.state_dict().items())
    assert str(masked.state_dict()) == str(saved[1])  # moments and step counts unchanged too

    masked.found_inf.zero_()
    model(data[2] * float("nan")).loss.backward()  # non-finite factors: flagged by MaskedAdam itself
    masked.step()
    masked.zero_grad()
    assert float(masked.found_inf) == 1.0
    assert all(torch.equal(tensor, saved[0][name]) for name, tensor in model.state_dict().items())
    masked.found_inf.zero_()
    train(model, masked, data[2:])
    train(reference, adam, data[2:])
    assert_same_parameters(model, reference, rtol=1e-5, atol=1e-6)


def test_clipping_is_clip_grad_norm_over_every_parameter():
    reference = tiny_maf()
    model = copy.deepcopy(reference)
    adam = torch.optim.Adam(reference.parameters(), lr=1e-2)
    masked = MaskedAdam(model, lr=1e-2, backend="torch", max_grad_norm=0.5)
    for batch in batches(count=4):
        torch.manual_seed(7)
        reference(batch).loss.backward()
        expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        adam.step()
        adam.zero_grad()
        torch.manual_seed(7)
        model(batch).loss.backward()
        masked.step()
        masked.zero_grad()
        assert expected_norm > 0.5  # clipping is active
        torch.testing.assert_close(masked.last_grad_norm, expected_norm, rtol=1e-5, atol=0)
    # The clip factor is applied to the gradient in another order than clip_grad_norm_ does: rounding-level.
    assert_same_parameters(model, reference, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_trains_like_torch_adam():
    reference = tiny_maf()
    model = copy.deepcopy(reference)
    data = batches(count=3)
    torch.manual_seed(5)
    train(reference, torch.optim.Adam(reference.parameters(), lr=1e-3), data, autocast_bf16=True)
    torch.manual_seed(5)
    train(model, MaskedAdam(model, lr=1e-3, backend="torch"), data, autocast_bf16=True)
    # bf16 weight gradients (autograd) against float32 products of bf16 factors (MaskedAdam): bf16 tolerance.
    assert_same_parameters(model, reference, rtol=2e-2, atol=2e-3)


def test_state_dict_is_torch_adams_and_resumes_either_way():
    data = batches(count=6)
    straight = tiny_maf().eval()  # deterministic dequantisation: the runs below draw no noise
    straight_optimizer = MaskedAdam(straight, lr=1e-2, backend="torch")
    train(straight, straight_optimizer, data)

    first = tiny_maf().eval()
    first_optimizer = MaskedAdam(first, lr=1e-2, backend="torch")
    train(first, first_optimizer, data[:3])
    state = copy.deepcopy(first_optimizer.state_dict())  # load_state_dict may share tensors: each run gets a copy
    # The saved state is torch.optim.Adam's: a plain Adam loads it and continues...
    adam_model = copy.deepcopy(first)
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-2)
    adam.load_state_dict(copy.deepcopy(state))
    train(adam_model, adam, data[3:])
    # ...and so does a fresh MaskedAdam (after a restart), landing where the uninterrupted run did.
    resumed = copy.deepcopy(first)
    resumed_optimizer = MaskedAdam(resumed, lr=1e-2, backend="torch")
    resumed_optimizer.load_state_dict(copy.deepcopy(state))
    train(resumed, resumed_optimizer, data[3:])
    assert_same_parameters(resumed, straight, rtol=1e-5, atol=1e-6)
    assert_same_parameters(adam_model, straight, rtol=1e-5, atol=1e-6)


def test_release_hands_the_gradients_back_to_autograd():
    model = tiny_maf()
    optimizer = MaskedAdam(model, lr=1e-2, backend="torch")
    optimizer.release()
    model(batches(1)[0]).loss.backward()
    first = model.blocks[0].made.layers[0]
    assert first.weight.grad is not None and first.linear_with_grad is None
    assert not first.weight.grad[~first.mask()].any()


def test_iaf_is_plain_adam():
    torch.manual_seed(0)
    reference = IAFModel(IAFConfig(image_size=2, hidden_sizes=[16], num_blocks=2))
    model = copy.deepcopy(reference)
    optimizer = MaskedAdam(model, lr=1e-2, backend="torch")
    assert not optimizer._deferred  # IAF trains through the sequential direction: autograd forms its gradients
    data = [torch.rand(4, 3, 2, 2) for _ in range(3)]
    torch.manual_seed(1)
    train(reference, torch.optim.Adam(reference.parameters(), lr=1e-2), data)
    torch.manual_seed(1)
    train(model, optimizer, data)
    assert_same_parameters(model, reference, rtol=1e-5, atol=1e-6)


def test_a_failing_triton_kernel_falls_back_to_the_torch_path(monkeypatch):
    import hf_dgm_training.maf.masked_adam as masked_adam

    class FailingKernel:  # what a kernel that does not compile on this machine does at its first launch
        def __getitem__(self, grid):
            def launch(*args, **meta):
                raise RuntimeError("no compiler for this GPU")
            return launch

    monkeypatch.setattr(masked_adam, "_masked_adam_kernel", FailingKernel(), raising=False)
    monkeypatch.setattr(masked_adam, "_masked_grad_square_sum_kernel", FailingKernel(), raising=False)
    reference = tiny_maf().eval()
    model = copy.deepcopy(reference)
    data = batches(count=3)
    train(reference, MaskedAdam(reference, lr=1e-2, backend="torch", max_grad_norm=0.5), data)
    optimizer = MaskedAdam(model, lr=1e-2, max_grad_norm=0.5)
    # Pretend this is a GPU with Triton, so that "auto" takes the Triton path until it fails.
    monkeypatch.setattr(optimizer, "_uses_triton", lambda parameter, inputs: optimizer.triton_error is None)
    with pytest.warns(RuntimeWarning, match="no compiler for this GPU"):
        train(model, optimizer, data)
    assert "no compiler for this GPU" in optimizer.triton_error
    assert_same_parameters(model, reference, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="no compiler"):  # an explicit backend="triton" does not hide the failure
        explicit = MaskedAdam(copy.deepcopy(reference), lr=1e-2, backend="torch")
        explicit.backend = "triton"
        explicit._launch(masked_adam._masked_adam_kernel, 1)


def test_bad_arguments_are_named():
    model = tiny_maf()
    with pytest.raises(ValueError, match="weight_decay"):
        MaskedAdam(model, lr=1e-3, weight_decay=0.1)
    with pytest.raises(ValueError, match="backend"):
        MaskedAdam(model, lr=1e-3, backend="cuda")
    with pytest.raises(ValueError, match="max_grad_norm"):
        MaskedAdam(model, lr=1e-3, max_grad_norm=0.0)


def test_tiles_cover_every_connection_and_little_else():
    out_degrees = torch.linspace(1, 299, 70).round().long()
    in_degrees = torch.randperm(300) + 1
    for strict in (False, True):
        mask = out_degrees[:, None] > in_degrees[None, :] if strict else out_degrees[:, None] >= in_degrees[None, :]
        tiles = connected_tiles(out_degrees, in_degrees, strict, 16, 32)
        assert tiles.is_contiguous() and tiles.dtype == torch.int32
        covered = torch.zeros(5 * 16, 10 * 32, dtype=torch.bool)
        for row, col in tiles.tolist():
            covered[row * 16:(row + 1) * 16, col * 32:(col + 1) * 32] = True
        assert covered[:70, :300][mask].all()
        # every listed tile holds a connection
        for row, col in tiles.tolist():
            assert mask[row * 16:(row + 1) * 16, col * 32:(col + 1) * 32].any()
    # In the natural order (the default configuration's first block) the tiles cover about half of the weights, like
    # the masks.
    fractions = connected_fraction(MAFModel(MAFConfig(image_size=16, hidden_sizes=[256, 256], num_blocks=1)))
    assert 0.49 < fractions["connected"] < 0.52 and fractions["connected"] < fractions["tiles"] < 0.65


TRITON_CHECK = r"""
import copy, torch
from hf_dgm_training.maf.masked_adam import MaskedAdam
from test_masked_adam import tiny_maf
model = tiny_maf(image_size=16, hidden_sizes=[256, 192], num_blocks=2)
reference = copy.deepcopy(model)
generator = torch.Generator().manual_seed(1)
data = [torch.rand(8, 3, 16, 16, generator=generator) for _ in range(2)]
clipped, clipped_reference = copy.deepcopy(model), copy.deepcopy(model)
norms = {}
for net, backend, max_grad_norm in ((model, "triton", None), (reference, "torch", None),
                                    (clipped, "triton", 1.0), (clipped_reference, "torch", 1.0)):
    optimizer = MaskedAdam(net, lr=1e-3, backend=backend, max_grad_norm=max_grad_norm)
    net.eval()
    for batch in data:
        net(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if max_grad_norm is not None:
            norms.setdefault(backend, []).append(float(optimizer.last_grad_norm))
worst = 0.0
for ours_model, theirs_model in ((model, reference), (clipped, clipped_reference)):
    for (name, ours), theirs in zip(ours_model.named_parameters(), theirs_model.parameters()):
        far = ((ours - theirs).abs() > 1e-5 + 1e-4 * theirs.abs()).float().mean().item()
        worst = max(worst, far)
        # Adam turns a rounding-level gradient difference near zero into a full step: allow a handful of entries.
        assert far < 1e-4, (name, far)
        assert (ours - theirs).abs().max() < 5e-3, name
assert min(norms["torch"]) > 1.0, norms  # clipping was active
for ours, theirs in zip(norms["triton"], norms["torch"]):
    assert abs(ours - theirs) <= 1e-4 * theirs, norms
# The kernel with the non-finite guard: a clean step (flag 0) is bit for bit the step without the guard; a flagged
# step (flag 1) writes nothing, in the kernel as in fused Adam, and the step counts stay.
guarded, unguarded = copy.deepcopy(model), copy.deepcopy(model)
optimizers = [MaskedAdam(net, lr=1e-3, backend="triton", fused=True) for net in (guarded, unguarded)]
optimizers[0].found_inf = torch.zeros(())
for net, optimizer in zip((guarded, unguarded), optimizers):
    net(data[0]).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
for (name, ours), theirs in zip(guarded.named_parameters(), unguarded.parameters()):
    assert torch.equal(ours, theirs), name
optimizer = optimizers[0]
weights = [p.detach().clone() for p in guarded.parameters()]
state = [(s["exp_avg"].clone(), s["exp_avg_sq"].clone()) for s in optimizer.state.values()]
optimizer.found_inf.fill_(1.0)
guarded(data[1]).loss.backward()
optimizer.step()
assert all(torch.equal(a, p) for a, p in zip(weights, guarded.parameters()))
assert all(torch.equal(m, s["exp_avg"]) and torch.equal(v, s["exp_avg_sq"])
           for (m, v), s in zip(state, optimizer.state.values()))
assert all(float(s["step"]) == 1 for s in optimizer.state.values())
print("ok", worst, norms)
"""


def test_triton_kernel_matches_the_torch_maths_in_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.path.join(ROOT, "tests"))
    result = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr[-3000:]


DDP_WORKER = r"""
import os, sys, torch, torch.distributed as dist
from hf_dgm_training.maf.masked_adam import MaskedAdam
from test_masked_adam import tiny_maf
rank, world = int(sys.argv[1]), 2
dist.init_process_group("gloo", init_method=f"file://{os.environ['RENDEZVOUS']}", rank=rank, world_size=world)
model = tiny_maf(num_blocks=2)
optimizer = MaskedAdam(model, lr=1e-2, backend="torch")  # before DDP: its MADE weights leave DDP's all-reduce
ddp = torch.nn.parallel.DistributedDataParallel(model)
ddp.eval()  # deterministic dequantisation, as in the single-process reference
data = torch.load(os.environ["DATA"])
for batch in data:
    ddp(batch.chunk(world)[rank]).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
torch.save(model.state_dict(), os.environ["RESULT"] + f".{rank}")
dist.destroy_process_group()
"""


def test_two_processes_update_like_one_process_on_the_whole_batch(tmp_path):
    data = batches(count=3, size=8)
    torch.save(data, tmp_path / "data.pt")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests"), DATA=str(tmp_path / "data.pt"),
               RESULT=str(tmp_path / "result"), RENDEZVOUS=str(tmp_path / "rendezvous"))
    workers = [subprocess.Popen([sys.executable, "-c", DDP_WORKER, str(rank)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    assert all(worker.returncode == 0 for worker in workers), "\n".join(outputs)[-4000:]

    reference = tiny_maf(num_blocks=2)
    optimizer = MaskedAdam(reference, lr=1e-2, backend="torch")
    reference.eval()
    train(reference, optimizer, data)
    for rank in range(2):
        state = torch.load(f"{tmp_path / 'result'}.{rank}")
        for name, expected in reference.state_dict().items():
            torch.testing.assert_close(state[name], expected, rtol=1e-5, atol=1e-6,
                                       msg=lambda message, name=name: f"rank {rank}: {name}: {message}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_flag_non_finite_reads_any_float_dtype_and_never_clears(dtype):
    from hf_dgm_training.maf.masked_adam import flag_non_finite_

    found = torch.zeros(())
    flag_non_finite_(found, [torch.ones(3, dtype=dtype), torch.full((2,), 6e4, dtype=dtype)])
    assert float(found) == 0.0  # large but finite
    flag_non_finite_(found, [torch.full((2,), torch.finfo(dtype).max, dtype=dtype)])
    assert float(found) == 0.0  # finite values whose sum overflows (the CPU's screen by sums must look closer)
    flag_non_finite_(found, [torch.ones(3), torch.tensor([-float("inf"), 1.0], dtype=dtype)])
    assert float(found) == 1.0  # an infinity, in a group of its own dtype
    found.zero_()
    flag_non_finite_(found, [torch.tensor([1.0, float("nan")], dtype=dtype)])
    assert float(found) == 1.0
    flag_non_finite_(found, [torch.ones(3, dtype=dtype)])
    assert float(found) == 1.0
