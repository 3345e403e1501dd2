"""modeling_maf.sequential_solver: the segment-parallel sequential direction gives what the previous implementation
gave (kept in benchmarks/time_maf_sampling.py, which times the two) for MAF sampling and IAF density, whole-image
and patch flows, with and without position conditioning; its Triton tail (through Triton's interpreter on CPU)
matches the torch tail; and on CUDA the graphed sampler matches the eager one.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from modeling_maf import MAFConfig, MAFModel, flow_graphs, sequential_solver
from modeling_maf.modeling_maf import MADEBlock
from tiny_models import FLOWS, random_flow, randomize_flow


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHOLE = dict(image_size=4, num_channels=2, hidden_sizes=[12, 10], num_blocks=3)
PATCH = dict(image_size=8, num_channels=2, hidden_sizes=[16, 16], num_blocks=2, patch_size=4, patch_stride=2)


def _previous_solver():
    """The sequential solver as it was before sequential_solver.py; its one home is the sampling benchmark, which
    times it against the current one."""
    path = os.path.join(ROOT, "benchmarks", "time_maf_sampling.py")
    spec = importlib.util.spec_from_file_location("time_maf_sampling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.previous_solve_sequential


reference_solve_sequential = _previous_solver()


def with_reference_solver(monkeypatch, run):
    """``run()`` with MADEBlock.solve_sequential replaced by the reference."""
    with monkeypatch.context() as patch:
        patch.setattr(MADEBlock, "solve_sequential", reference_solve_sequential)
        return run()


CASES = {
    "whole-reverse": WHOLE,
    "whole-random-permutation": {**WHOLE, "permutation": "random", "degree_assignment": "random"},
    "whole-sequential-degrees": {**WHOLE, "degree_assignment": "sequential"},
    "patch-position": PATCH,
    "patch-no-position": {**PATCH, "condition_on_position": False},
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", FLOWS)
def test_samples_match_the_previous_solver(monkeypatch, kind, case):
    model = random_flow(kind, CASES[case])
    def sample():
        return model.sample(3, generator=torch.Generator().manual_seed(5), temperature=0.8)
    torch.testing.assert_close(sample(), with_reference_solver(monkeypatch, sample), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", FLOWS)
def test_density_and_latents_match_the_previous_solver(monkeypatch, kind, case):
    model = random_flow(kind, CASES[case], seed=1)
    size, channels = model.config.image_size, model.config.num_channels
    pixels = torch.rand(3, channels, size, size, generator=torch.Generator().manual_seed(2))
    def run():
        return (model(pixels).log_prob, model.encode(pixels))
    (log_prob, latents), (expected_log_prob, expected_latents) = run(), with_reference_solver(monkeypatch, run)
    torch.testing.assert_close(latents, expected_latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(log_prob, expected_log_prob, rtol=1e-6, atol=1e-4)


def test_iaf_density_gradients_match_the_previous_solver(monkeypatch):
    """With gradients the solver builds its result out of place: training an IAF through its sequential direction."""
    model = random_flow("iaf", PATCH, seed=2).train()
    pixels = torch.rand(2, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    ours = torch.autograd.grad(model(pixels).loss, list(model.parameters()))
    torch.manual_seed(0)
    theirs = with_reference_solver(monkeypatch,
                                   lambda: torch.autograd.grad(model(pixels).loss, list(model.parameters())))
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max()))


def test_refined_samples_follow_the_exact_start(monkeypatch):
    model = random_flow("maf", WHOLE, seed=3)
    def sample():
        return model.sample(2, generator=torch.Generator().manual_seed(4), refine_steps=3)
    torch.testing.assert_close(sample(), with_reference_solver(monkeypatch, sample), rtol=0, atol=1e-5)


@pytest.mark.parametrize("solve", [sequential_solver.affine_generate, sequential_solver.affine_density,
                                   lambda z, shift, a: z * torch.exp(a) + shift])
def test_every_tail_gives_the_reference_in_float64(solve):
    """The in-place tails (and a solve given as any callable) against the reference, to float64 rounding."""
    model = randomize_flow(MAFModel(MAFConfig(**{**WHOLE, "permutation": "random"})).double(), seed=4, std=0.3)
    known = torch.randn(3, model.config.num_features, dtype=torch.float64)
    for block in model.blocks:
        with torch.no_grad():
            solved, log_scale = block.solve_sequential(known, solve)
            expected_solved, expected_log_scale = reference_solve_sequential(block, known, solve)
        torch.testing.assert_close(solved, expected_solved, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(log_scale, expected_log_scale, rtol=1e-12, atol=1e-12)


TRITON_TAIL = r"""
import torch
from modeling_maf import sequential_solver as solver
generator = torch.Generator().manual_seed(0)
products = torch.randn(2, 5, 96, generator=generator) * 4  # raw log-scales up to the clamp and beyond
bias = (torch.randn(2, 300, generator=generator) * 2)[:, 7:103]  # (2, 96) with a row stride of 300
known = torch.randn(5, 300, generator=generator)[:, 50:146]  # a strided (batch, 96) view
shift, raw = products[0] + bias[0], products[1] + bias[1]
for invert, solve in ((0, solver.affine_generate), (1, solver.affine_density)):
    out = torch.zeros(5, 2, 200)
    solved, log_scale = out[:, 0, 13:109], out[:, 1, 100:196]
    solver._affine_tail(products, bias, known, solved, log_scale, 3.0, invert)
    expected_log_scale = 3.0 * torch.tanh(raw / 3.0)
    torch.testing.assert_close(log_scale, expected_log_scale, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(solved, solve(known, shift, expected_log_scale), rtol=1e-5, atol=1e-5)
    untouched = out.clone()
    untouched[:, 0, 13:109] = 0
    untouched[:, 1, 100:196] = 0
    assert not untouched.any(), "the tail wrote outside its segment"
    running = torch.randn(5, 96, generator=generator)  # a running log-determinant: the log-scales are subtracted
    log_det, solved = running.clone(), torch.zeros(5, 96)
    solver._affine_tail(products, bias, known, solved, log_det, 3.0, invert, subtract=True)
    torch.testing.assert_close(log_det, running - expected_log_scale, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(solved, solve(known, shift, expected_log_scale), rtol=1e-5, atol=1e-5)
print("ok")
"""


TRITON_TAIL_WITH_UPDATE = r"""
import torch
from modeling_maf import sequential_solver as solver
generator = torch.Generator().manual_seed(1)
products = torch.randn(2, 5, 96, generator=generator) * 4
bias = (torch.randn(2, 300, generator=generator) * 2)[:, 7:103]
known = torch.randn(5, 300, generator=generator)[:, 50:146]
weight = torch.randn(40, 300, generator=generator)[:, 100:196]  # the segment's first-layer columns: 40 units, 2 blocks
shift, raw = products[0] + bias[0], products[1] + bias[1]
for invert, solve in ((0, solver.affine_generate), (1, solver.affine_density)):
    solved, log_scale = torch.zeros(5, 96), torch.zeros(5, 96)
    pre = torch.randn(5, 40, generator=generator)
    hidden = torch.full((5, 40), -1.0)
    expected_pre = pre.clone()
    solver._affine_tail(products, bias, known, solved, log_scale, 3.0, invert, update=(weight, pre, hidden))
    expected_log_scale = 3.0 * torch.tanh(raw / 3.0)
    expected_solved = solve(known, shift, expected_log_scale)
    torch.testing.assert_close(log_scale, expected_log_scale, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(solved, expected_solved, rtol=1e-5, atol=1e-5)
    expected_pre = expected_pre + expected_solved @ weight.T
    torch.testing.assert_close(pre, expected_pre, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hidden, expected_pre.relu(), rtol=1e-5, atol=1e-4)
print("ok")
"""


FUSED_DENSITY = r"""
import torch
from modeling_maf import sequential_solver as solver
from tiny_models import random_flow
generator = torch.Generator().manual_seed(0)
cases = (dict(image_size=4, num_channels=2, hidden_sizes=[12, 10], num_blocks=3),
         dict(image_size=8, num_channels=2, hidden_sizes=[16, 16], num_blocks=2, patch_size=4, patch_stride=2))
for fields in cases:
    model = random_flow("maf", fields, seed=1)
    pixels = torch.rand(3, fields["num_channels"], fields["image_size"], fields["image_size"], generator=generator)
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            calls = []
            original = solver._affine_tail
            solver._affine_tail = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
            fused = model(pixels)
            solver._affine_tail = original
            assert len(calls) == fields["num_blocks"], calls
            solver.FUSE_WITH_TRITON = False
            reference = model(pixels)
            solver.FUSE_WITH_TRITON = True
        torch.testing.assert_close(fused.log_prob, reference.log_prob, rtol=1e-6, atol=1e-3)
        torch.testing.assert_close(fused.latents, reference.latents, rtol=1e-5, atol=1e-5)
print("ok")
"""


SEGMENT_ROWS = r"""
import torch
from modeling_maf import sequential_solver as solver
generator = torch.Generator().manual_seed(0)
for rows, hidden_size, width in ((5, 512, 96), (1, 40, 3), (32, 100, 17)):
    hidden = torch.randn(rows, hidden_size + 3, generator=generator)[:, 3:]  # rows with a stride of their own
    output_weight = torch.randn(2, 300, hidden_size, generator=generator)  # (shifts | log-scales, D, H)
    weight = output_weight[:, 50:50 + width]  # one segment's rows: a view
    expected = torch.bmm(hidden.expand(2, -1, -1), weight.transpose(1, 2))
    torch.testing.assert_close(solver._segment_rows(hidden, weight), expected, rtol=1e-5, atol=1e-4)
print("ok")
"""


def _run_in_interpreter(script):
    pytest.importorskip("triton")
    environment = {**os.environ, "TRITON_INTERPRET": "1",
                   "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_triton_tail_with_the_first_layer_update_matches_torch_in_the_interpreter():
    """The pass's one Triton kernel on CUDA: the tail, then pre-activation += solved @ W.T and its ReLU."""
    _run_in_interpreter(TRITON_TAIL_WITH_UPDATE)


def test_density_with_the_fused_tail_matches_the_torch_path_in_the_interpreter():
    """A MAF block's parallel direction on CUDA without gradients: one MADE evaluation read once by the Triton tail."""
    _run_in_interpreter(FUSED_DENSITY)


def test_triton_segment_rows_match_the_batched_matmul_in_the_interpreter():
    """The pass's output rows for a few float32 rows: one Triton kernel instead of cuBLAS's batched matmul."""
    _run_in_interpreter(SEGMENT_ROWS)


def test_triton_tail_matches_the_torch_tail_in_the_interpreter():
    _run_in_interpreter(TRITON_TAIL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs of sampling need a GPU")
@pytest.mark.parametrize("case", ["whole-reverse", "whole-random-permutation", "patch-position"])
@pytest.mark.parametrize("kind", FLOWS)
def test_graphed_sampling_matches_eager_sampling_on_cuda(monkeypatch, kind, case):
    model = random_flow(kind, {**CASES[case], "image_size": CASES[case]["image_size"] * 2}).cuda()
    def sample(seed):
        return model.sample(3, generator=torch.Generator("cuda").manual_seed(seed))
    # Eager (first call at this shape), captured and replayed, then replayed twice more.
    graphed = [sample(seed) for seed in (1, 2, 1, 2)]
    assert flow_graphs.num_graphs(model, "generation") == 1
    assert not torch.equal(graphed[2], graphed[3])
    monkeypatch.setattr(model, "sampling_cuda_graphs", False)
    monkeypatch.setattr(sequential_solver, "FUSE_WITH_TRITON", False)
    eager = [sample(seed) for seed in (1, 2, 1, 2)]
    torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-5)
    # The graph reads the weights where they live: an in-place update is seen by the next replay.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(0.5)
    eager = sample(1)
    monkeypatch.setattr(model, "sampling_cuda_graphs", True)
    torch.testing.assert_close(sample(1), eager, rtol=0, atol=1e-5)
    assert flow_graphs.num_graphs(model, "generation") == 1
