"""The block-sparse MADE matmul (modeling_maf.masked_matmul) against the dense F.linear.

Tile ranges are checked from real MADE degrees (natural, reversed and randomly permuted input orderings); the Triton
kernel runs on CPU through Triton's interpreter (TRITON_INTERPRET=1, in a subprocess), layer by layer and through a
whole MAF's log_prob, in float32 and bfloat16, forward and input gradient, against float64 references within the
rounding error bound of a float32 sum. The GPU test at the spec shapes is tests/test_masked_matmul_gpu.py.
"""

import os
import subprocess
import sys

import pytest
import torch

import modeling_maf.masked_matmul as mm
from modeling_maf import MAFConfig, MAFModel
from modeling_maf.masked_matmul import DISABLE_ENV, block_sparse_linear, covered_fraction, tile_ranges


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def made_layers(permutation, image_size=4, hidden_sizes=(40, 24), num_blocks=3, degree_assignment="spread"):
    model = MAFModel(MAFConfig(image_size=image_size, hidden_sizes=list(hidden_sizes), num_blocks=num_blocks,
                               permutation=permutation, degree_assignment=degree_assignment))
    return [layer for block in model.blocks for layer in block.made.layers]


@pytest.mark.parametrize("permutation", ["none", "reverse", "random"])
@pytest.mark.parametrize("degree_assignment", ["spread", "random"])
def test_tile_ranges_hold_every_connection_and_are_tight_for_monotonic_degrees(permutation, degree_assignment):
    for layer in made_layers(permutation, degree_assignment=degree_assignment):
        for block_rows, block_cols in ((16, 16), (64, 32), (8, 64)):
            ranges = tile_ranges(layer.out_degrees, layer.in_degrees, layer.strict, block_rows, block_cols)
            covered = torch.zeros(len(ranges), -(-layer.in_features // block_cols), dtype=torch.bool)
            for row_tile, (first, end) in enumerate(ranges.tolist()):
                covered[row_tile, first:end] = True
            covered = covered.repeat_interleave(block_rows, 0).repeat_interleave(block_cols, 1)
            covered = covered[: layer.out_features, : layer.in_features]
            assert not (layer.mask() & ~covered).any()  # no connection outside the ranges
            monotonic = all(bool((d[1:] >= d[:-1]).all() or (d[1:] <= d[:-1]).all())
                            for d in (layer.in_degrees, layer.out_degrees))
            if monotonic:  # then every tile in a range holds a connection
                tiles = layer.mask()[: len(ranges) * block_rows]
                padded = torch.zeros(len(ranges) * block_rows, covered.shape[1] + block_cols, dtype=torch.bool)
                padded[: tiles.shape[0], : tiles.shape[1]] = tiles
                for row_tile, (first, end) in enumerate(ranges.tolist()):
                    for col_tile in range(first, end):
                        assert padded[row_tile * block_rows:(row_tile + 1) * block_rows,
                                      col_tile * block_cols:(col_tile + 1) * block_cols].any()


def test_spec_layers_skip_almost_half_of_every_matrix_in_the_default_ordering():
    with torch.device("meta"):  # degrees only: the weights are never allocated
        model = MAFModel(MAFConfig())
    for block in model.blocks:
        for layer in block.made.layers:
            assert 0.5 <= covered_fraction(layer) < 0.57


def test_the_kernel_runs_only_where_it_measured_faster_than_cublas():
    """`pays`: float32 products through every spec layer, bfloat16 ones for a few rows only; never a layer whose
    random ordering leaves no zero tiles."""
    with torch.device("meta"):
        spec = MAFModel(MAFConfig(num_blocks=2))
        shuffled = MAFModel(MAFConfig(num_blocks=1, permutation="random", degree_assignment="random"))
    for layer in spec.blocks[1].made.layers:
        assert mm.pays(layer, 132, torch.float32, "cpu") and mm.pays(layer, 8, torch.float32, "cpu")
        assert mm.pays(layer, 16, torch.bfloat16, "cpu") and not mm.pays(layer, 17, torch.bfloat16, "cpu")
    for layer in shuffled.blocks[0].made.layers:
        assert not mm.pays(layer, 8, torch.float32, "cpu") and not mm.pays(layer, 8, torch.bfloat16, "cpu")


def test_without_cuda_or_the_interpreter_the_dense_path_runs(monkeypatch):
    layer = made_layers("reverse")[0]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with torch.no_grad():
        assert block_sparse_linear(layer, torch.randn(3, layer.in_features), force=True) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(DISABLE_ENV, "0")
    with torch.no_grad():
        assert block_sparse_linear(layer, torch.randn(3, layer.in_features), force=True) is None


INTERPRETER_CHECK = r"""
import math, torch
import modeling_maf.masked_matmul as mm
from modeling_maf import MAFConfig, MAFModel
from tiny_models import randomize_flow

launches = []
launch = mm._launch
def counted(*args, **kwargs):
    launches.append(kwargs.get("transposed"))
    return launch(*args, **kwargs)
mm._launch = counted

def check(result, reference, magnitude, num_terms, relative=0.0, what=""):
    # float32 sums of num_terms products: |error| <= (num_terms + 16) u sum|terms| (tf32x3's split adds ~12 u)
    bound = (num_terms + 16) * 2.0**-24 * magnitude + relative * reference.abs() + 1e-30
    error = (result.double() - reference).abs()
    assert bool((error <= bound).all()), f"{what}: worst error/bound {float((error / bound).max()):.3g}"
    return float((error / bound).max())

worst = 0.0
for permutation in ("reverse", "random"):
    model = MAFModel(MAFConfig(image_size=8, hidden_sizes=[80, 72], num_blocks=2, permutation=permutation))
    randomize_flow(model, seed=1, std=1.0)
    layers = [layer for block in model.blocks for layer in block.made.layers]
    generator = torch.Generator().manual_seed(0)
    for rows in (5, 40):  # one row tile (and slices of the column ranges), several row tiles
        for layer in layers:
            x = torch.randn(rows, layer.in_features, generator=generator)
            w64, b64, x64 = layer.weight.detach().double(), layer.bias.detach().double(), x.double()
            magnitude = x64.abs() @ w64.abs().T + b64.abs()
            with torch.no_grad():
                y = mm.block_sparse_linear(layer, x, force=True)
            assert y.dtype == torch.float32 and y.shape == (rows, layer.out_features)
            worst = max(worst, check(y, x64 @ w64.T + b64, magnitude, layer.in_features, what="fp32 forward"))
            # bf16 autocast, reading float32 weights: products of bf16 operands (exact in float32), summed in
            # float32, rounded to bf16 once. The operands are bf16 values already, because the interpreter's float32
            # -> bf16 conversion truncates where a GPU rounds; its output conversion truncates too (2^-7, not 2^-8).
            weight = layer.weight.detach().clone()
            with torch.no_grad():
                layer.weight.copy_(weight.bfloat16().float())
            xr, wr = x.bfloat16().double(), layer.weight.detach().double()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                y16 = mm.block_sparse_linear(layer, xr.float(), force=True)
                dense16 = torch.nn.functional.linear(xr.float(), layer.weight, layer.bias)
            assert y16.dtype == dense16.dtype == torch.bfloat16
            check(y16, xr @ wr.T + b64, xr.abs() @ wr.abs().T + b64.abs(), layer.in_features, 2.0**-7, "bf16 forward")
            with torch.no_grad():
                layer.weight.copy_(weight)
            # the input gradient (what refinement takes through a frozen model), weight without gradient
            layer.weight.requires_grad_(False)
            x_grad = x.clone().requires_grad_(True)
            upstream = torch.randn(rows, layer.out_features, generator=generator)
            y = mm.block_sparse_linear(layer, x_grad, force=True)
            y.backward(upstream)
            layer.weight.requires_grad_(True)
            reference = upstream.double() @ w64
            worst = max(worst, check(x_grad.grad, reference, upstream.double().abs() @ w64.abs(), layer.out_features,
                                     what="input gradient"))
assert launches.count(False) >= 24 and launches.count(True) >= 12, launches

# A whole MAF's log_prob: every layer through the kernel (the tiny layers' tiles would not pay on a GPU, so the
# threshold is lifted), float32 and bf16 autocast, against the dense path.
mm.MAX_COVERED_FRACTION = math.inf
model = randomize_flow(MAFModel(MAFConfig(image_size=4, hidden_sizes=[40, 24], num_blocks=3)), seed=2, std=0.1).eval()
pixels = torch.rand(6, 3, 4, 4, generator=generator)
for autocast in (False, True):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        launches.clear()
        ours = model(pixels).log_prob
        assert launches.count(False) == 9, launches
        import os
        os.environ[mm.DISABLE_ENV] = "0"
        dense = model(pixels).log_prob
        del os.environ[mm.DISABLE_ENV]
        assert launches.count(False) == 9, launches
    tolerance = dict(rtol=2e-2, atol=0.5) if autocast else dict(rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(ours, dense, **tolerance)
print("ok", worst)
"""


def test_kernel_matches_float64_within_float32_rounding_in_the_interpreter():
    triton = pytest.importorskip("triton")
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 9):
        # The kernel loops over bounds it loads (its tile ranges); Triton 3.6's interpreter cannot (the GPU test
        # tests/test_masked_matmul_gpu.py runs the compiled kernel there).
        pytest.skip(f"the kernel's interpreter run needs Triton >= 3.9 (found {triton.__version__})")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    env.pop(DISABLE_ENV, None)
    result = subprocess.run([sys.executable, "-c", INTERPRETER_CHECK], env=env, capture_output=True, text=True,
                            timeout=600, cwd=ROOT)
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr[-3000:]


CAST_CHECK = r"""
import math, torch
import modeling_maf.masked_matmul as mm
from modeling_maf import MAFConfig, MAFModel
from tiny_models import randomize_flow

mm.MAX_COVERED_FRACTION = math.inf  # the tiny layers' 64 x 64 tiles skip little: every layer takes the cast
casts = []
cast = mm.connected_weight
mm.connected_weight = lambda *args, **kwargs: casts.append(1) or cast(*args, **kwargs)
generator = torch.Generator().manual_seed(0)
for permutation in ("reverse", "random"):
    model = MAFModel(MAFConfig(image_size=16, hidden_sizes=[200, 136], num_blocks=2, permutation=permutation))
    randomize_flow(model, seed=1, std=1.0)
    for layer in (layer for block in model.blocks for layer in block.made.layers):
        with torch.no_grad():  # bf16 values: the interpreter's conversion truncates where a GPU rounds
            layer.weight.copy_(layer.weight.bfloat16().float())
        written = cast(layer, torch.bfloat16, out=torch.full(layer.weight.shape, math.nan, dtype=torch.bfloat16))
        assert torch.equal(written, layer.weight.detach().bfloat16()), "a tile was left out or not zeroed"
        x = torch.randn(40, layer.in_features, generator=generator)  # more rows than the kernel takes in bf16
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            casts.clear()
            ours = mm.block_sparse_linear(layer, x)
            assert casts == [1], casts
            dense = torch.nn.functional.linear(x, layer.weight, layer.bias)
        assert ours.dtype == torch.bfloat16 and torch.equal(ours, dense)
print("ok")
"""


def test_connected_tiles_cast_equals_the_full_cast_in_the_interpreter():
    """Half-precision products of many rows: cuBLAS on a cast copy of the weight made from its connected tiles
    (``connected_weight``), unconnected tiles written as zeros; the product equals the dense autocast one exactly."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    env.pop(DISABLE_ENV, None)
    result = subprocess.run([sys.executable, "-c", CAST_CHECK], env=env, capture_output=True, text=True,
                            timeout=600, cwd=ROOT)
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr[-3000:]

