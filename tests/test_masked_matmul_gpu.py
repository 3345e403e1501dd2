"""The block-sparse MADE matmul on a GPU at the seed spec's layer shapes, against float64.

Skipped without CUDA (CI has none); run on a GPU machine with `python -m pytest -q tests/test_masked_matmul_gpu.py`.
Layers of the spec MAF's first two blocks (natural and reversed input order: 49,152 -> 512 -> 512 -> 2 x 49,152), batch
132 and 8. With small integers for weights and inputs every sum is exact in float32, whatever the order: the kernel
must then equal the float64 result exactly (a tile left out or read twice shows). With random weights: forward in
float32 (tf32x3 and ieee products) and under bf16 autocast, and the input gradient, each within the rounding error bound
of a float32 sum (bf16: of the bf16 operands, plus the output's rounding); the dense cuBLAS result is held to the same
bound, and MaskedLinear.forward takes the kernel.
"""

import pytest
import torch


if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import modeling_maf.masked_matmul as masked_matmul  # noqa: E402
from modeling_maf import MAFConfig, MAFModel  # noqa: E402
from modeling_maf.modeling_maf import MaskedLinear  # noqa: E402


@pytest.fixture(scope="module")
def spec_layers():
    with torch.device("meta"):  # the spec's degrees; its 530 M weights are never allocated
        spec = MAFModel(MAFConfig())
    generator = torch.Generator(device="cuda").manual_seed(0)
    layers = []
    for block in spec.blocks[:2]:
        for meta_layer in block.made.layers:
            with torch.device("cuda"):
                layer = MaskedLinear(meta_layer.in_degrees, meta_layer.out_degrees, meta_layer.strict)
            with torch.no_grad():
                layer.reset_masked_uniform_()
                layer.bias.normal_(0, 0.1, generator=generator)
            layers.append(layer)
    return layers


@pytest.fixture
def every_layer_takes_the_kernel(monkeypatch):
    """The accuracy tests check the kernel on every spec layer and dtype, also where cuBLAS is faster (`pays`)."""
    monkeypatch.setattr(masked_matmul, "MAX_HALF_PRECISION_ROWS", 2**31)


@pytest.mark.parametrize("batch", [132, 8])
def test_integer_sums_are_exact_whatever_the_precision(spec_layers, batch, monkeypatch, every_layer_takes_the_kernel):
    generator = torch.Generator(device="cuda").manual_seed(2)
    for layer in spec_layers:
        weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
        try:
            with torch.no_grad():
                layer.weight.copy_(torch.randint(-2, 3, weight.shape, device="cuda", generator=generator)
                                   * layer.mask())
                layer.bias.copy_(layer.bias.round())
                x = torch.randint(-3, 4, (batch, layer.in_features), device="cuda", generator=generator).float()
                reference = x.double() @ layer.weight.double().T + layer.bias.double()
                for precision in ("tf32x3", "ieee"):
                    monkeypatch.setenv(masked_matmul.FP32_PRECISION_ENV, precision)
                    assert torch.equal(masked_matmul.block_sparse_linear(layer, x).double(), reference), precision
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    assert torch.equal(masked_matmul.block_sparse_linear(layer, x), reference.bfloat16())
        finally:
            with torch.no_grad():
                layer.weight.copy_(weight)
                layer.bias.copy_(bias)


def worst_ratio(result, reference, magnitude, num_terms, relative=0.0):
    """max |result - reference| / bound, bound = (num_terms + 16) u sum|terms| + relative |reference| (u = 2^-24;
    tf32x3's three products add about 12 u per term)."""
    bound = (num_terms + 16) * 2.0**-24 * magnitude + relative * reference.abs() + 1e-30
    return float(((result.double() - reference).abs() / bound).max())


@pytest.mark.parametrize("batch", [132, 8])
def test_forward_matches_float64_within_float32_rounding(spec_layers, batch, monkeypatch, every_layer_takes_the_kernel):
    generator = torch.Generator(device="cuda").manual_seed(batch)
    report = []
    for index, layer in enumerate(spec_layers):
        weight = layer.weight.detach()
        x = torch.randn(batch, layer.in_features, device="cuda", generator=generator)
        if index % 3:  # hidden layers see ReLU outputs
            x = x.relu()
        x64, w64, b64 = x.double(), weight.double(), layer.bias.detach().double()
        reference, magnitude = x64 @ w64.T + b64, x64.abs() @ w64.abs().T + b64.abs()
        with torch.no_grad():
            dense = torch.nn.functional.linear(x, weight, layer.bias)
            assert worst_ratio(dense, reference, magnitude, layer.in_features) <= 1
            for precision in ("tf32x3", "ieee"):
                monkeypatch.setenv(masked_matmul.FP32_PRECISION_ENV, precision)
                ours = masked_matmul.block_sparse_linear(layer, x)
                assert ours is not None, "the spec layer should take the kernel"
                ratio = worst_ratio(ours, reference, magnitude, layer.in_features)
                report.append((index, precision, ratio))
                assert ratio <= 1, (index, precision, ratio)
            monkeypatch.delenv(masked_matmul.FP32_PRECISION_ENV)
            assert torch.equal(layer(x), masked_matmul.block_sparse_linear(layer, x))  # forward takes the kernel
            with torch.autocast("cuda", dtype=torch.bfloat16):
                ours16 = layer(x)
                dense16 = torch.nn.functional.linear(x, weight, layer.bias)
            assert ours16.dtype == dense16.dtype == torch.bfloat16
            xr, wr = x.bfloat16().double(), weight.bfloat16().double()
            reference16, magnitude16 = xr @ wr.T + b64, xr.abs() @ wr.abs().T + b64.abs()
            ratio = worst_ratio(ours16, reference16, magnitude16, layer.in_features, 2.0**-8)
            report.append((index, "bf16", ratio))
            assert ratio <= 1, (index, "bf16", ratio)
    print(report)


def test_input_gradient_matches_float64_within_float32_rounding(spec_layers, every_layer_takes_the_kernel):
    generator = torch.Generator(device="cuda").manual_seed(1)
    for layer in spec_layers:
        layer.weight.requires_grad_(False)
        try:
            x = torch.randn(8, layer.in_features, device="cuda", generator=generator, requires_grad=True)
            upstream = torch.randn(8, layer.out_features, device="cuda", generator=generator)
            layer(x).backward(upstream)
        finally:
            layer.weight.requires_grad_(True)
        w64 = layer.weight.detach().double()
        reference = upstream.double() @ w64
        assert worst_ratio(x.grad, reference, upstream.double().abs() @ w64.abs(), layer.out_features) <= 1


def test_log_prob_of_a_spec_sized_block_matches_the_dense_path(monkeypatch):
    """Two spec-size blocks end to end (eval, no grad): the kernel's log_prob against the dense path's."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MAFModel(MAFConfig(num_blocks=2)).eval()
    with torch.no_grad():
        for block in model.blocks:
            last = block.made.layers[-1]
            last.weight.normal_(0, 1e-3).mul_(last.mask())
    pixels = torch.rand(8, 3, 128, 128, device="cuda")
    with torch.no_grad():
        ours = model(pixels).log_prob
        monkeypatch.setenv(masked_matmul.DISABLE_ENV, "0")
        dense = model(pixels).log_prob
    torch.testing.assert_close(ours, dense, rtol=1e-5, atol=0.05)  # |log_prob| ~ 1e5 nats: the sums' rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_products_of_many_rows_use_the_connected_tiles_cast(spec_layers, dtype, monkeypatch):
    """Autocast, 132 rows (cuBLAS's side of `pays`): the weight's cast copy is made from its connected tiles only and
    equals Tensor.to (rounding to nearest) bit for bit; a CUDA graph capture of the layer takes it, and the product
    equals the dense path's exactly."""
    generator = torch.Generator(device="cuda").manual_seed(5)
    casts = []
    cast = masked_matmul.connected_weight
    monkeypatch.setattr(masked_matmul, "connected_weight", lambda *args, **kwargs: casts.append(1) or cast(*args,
                                                                                                          **kwargs))
    for layer in spec_layers:
        assert not masked_matmul.pays(layer, 132, dtype, "cuda")
        written = cast(layer, dtype, out=torch.full_like(layer.weight, float("nan"), dtype=dtype))
        assert torch.equal(written, layer.weight.detach().to(dtype))
        x = torch.randn(132, layer.in_features, device="cuda", generator=generator)
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, cache_enabled=False):
            casts.clear()
            eager = layer(x)  # autocast's cast (a Triton launch from Python costs more than it saves); makes the plan
            assert casts == []
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = layer(x)
            assert casts == [1]
            graph.replay()
            dense = torch.nn.functional.linear(x, layer.weight, layer.bias)
        assert captured.dtype == dtype and torch.equal(captured, dense) and torch.equal(eager, dense)
