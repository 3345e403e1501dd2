"""The seed's change-of-variables exercises, executable.

For an invertible, differentiable map x = f(z) with z ~ p_Z, the density of x is

    p_X(x) = p_Z(f^{-1}(x)) * |det d f^{-1}(x) / dx|  =  p_Z(z) / |det df(z)/dz|.

Each test derives the answer by hand (docstring), computes it with autograd, and checks it against a Monte Carlo
estimate from samples.
"""

import math

import torch


SAMPLES = 400_000


def _histogram_density(samples: torch.Tensor, low: float, high: float, bins: int):
    counts = torch.histc(samples, bins=bins, min=low, max=high)
    width = (high - low) / bins
    centres = low + width * (torch.arange(bins, dtype=torch.float64) + 0.5)
    return centres, counts.double() / (samples.numel() * width)


def _density_by_autograd(inverse, base_density, x: torch.Tensor):
    """p_X(x) = p_Z(g(x)) |g'(x)| with g = f^{-1}, the derivative taken by autograd (1-D, elementwise)."""
    x = x.clone().requires_grad_(True)
    z = inverse(x)
    (dz_dx,) = torch.autograd.grad(z.sum(), x)
    return base_density(z.detach()) * dz_dx.abs()


def test_affine_map_of_uniform():
    """Z ~ U(0, 1), X = 2Z + 1. Then Z = (X - 1)/2, dZ/dX = 1/2, so p_X(x) = 1 * 1/2 = 1/2 on [1, 3] (0 elsewhere)."""
    generator = torch.Generator().manual_seed(0)
    x_samples = 2 * torch.rand(SAMPLES, generator=generator, dtype=torch.float64) + 1
    assert float(x_samples.min()) >= 1 and float(x_samples.max()) <= 3
    centres, empirical = _histogram_density(x_samples, 1.0, 3.0, bins=20)
    analytic = _density_by_autograd(lambda x: (x - 1) / 2, lambda z: torch.ones_like(z), centres)
    torch.testing.assert_close(analytic, torch.full_like(centres, 0.5))
    torch.testing.assert_close(empirical, analytic, rtol=0.03, atol=0)


def test_exponential_map_of_uniform():
    """Z ~ U(0, 2), X = exp(Z). Then Z = log X, dZ/dX = 1/X, so p_X(x) = (1/2) * (1/x) = 1/(2x) on [1, e^2].
    It integrates to (1/2)(log e^2 - log 1) = 1."""
    generator = torch.Generator().manual_seed(1)
    x_samples = torch.exp(2 * torch.rand(SAMPLES, generator=generator, dtype=torch.float64))
    high = math.exp(2)
    centres, empirical = _histogram_density(x_samples, 1.0, high, bins=30)
    analytic = _density_by_autograd(torch.log, lambda z: torch.full_like(z, 0.5), centres)
    torch.testing.assert_close(analytic, 1 / (2 * centres))
    torch.testing.assert_close(empirical, analytic, rtol=0.05, atol=0)
    grid = torch.linspace(1.0, high, 100_001, dtype=torch.float64)
    assert abs(float(torch.trapezoid(1 / (2 * grid), grid)) - 1) < 1e-6


def _mlp(generator, dim_in, dim_out):
    weight_1 = torch.randn(16, dim_in, generator=generator, dtype=torch.float64)
    weight_2 = torch.randn(dim_out, 16, generator=generator, dtype=torch.float64) * 0.3
    return lambda h: torch.tanh(h @ weight_1.T) @ weight_2.T


def test_additive_coupling_has_unit_determinant():
    """z1 = x1, z2 = x2 + m(x1). The Jacobian is [[I, 0], [dm/dx1, I]]: lower block-triangular with identity blocks
    on the diagonal, so det = 1 whatever m is (the volume is preserved)."""
    generator = torch.Generator().manual_seed(2)
    shift_net = _mlp(generator, 3, 3)

    def coupling(x):
        x1, x2 = x[:3], x[3:]
        return torch.cat([x1, x2 + shift_net(x1)])

    for _ in range(5):
        x = torch.randn(6, generator=generator, dtype=torch.float64)
        jacobian = torch.autograd.functional.jacobian(coupling, x)
        assert torch.allclose(torch.linalg.det(jacobian), torch.tensor(1.0, dtype=torch.float64))
        assert torch.all(jacobian[:3, 3:] == 0)  # z1 does not depend on x2


def test_affine_coupling_determinant_is_the_product_of_scales():
    """z1 = x1, z2 = s(x1) * x2 + t(x1) with s > 0. The Jacobian is [[I, 0], [*, diag(s(x1))]], so
    det = prod_i s_i(x1) (for one dimension per half: det = s(x1)); log|det| = sum_i log s_i(x1)."""
    generator = torch.Generator().manual_seed(3)
    log_scale_net, shift_net = _mlp(generator, 3, 3), _mlp(generator, 3, 3)

    def coupling(x):
        x1, x2 = x[:3], x[3:]
        return torch.cat([x1, torch.exp(log_scale_net(x1)) * x2 + shift_net(x1)])

    for _ in range(5):
        x = torch.randn(6, generator=generator, dtype=torch.float64)
        jacobian = torch.autograd.functional.jacobian(coupling, x)
        scales = torch.exp(log_scale_net(x[:3]))
        torch.testing.assert_close(torch.linalg.det(jacobian), scales.prod())

    # Monte Carlo: the volume of the image of a small box around x is |det| times the box's volume.
    x = torch.randn(6, generator=generator, dtype=torch.float64)
    epsilon = 1e-4
    corners = x + epsilon * torch.eye(6, dtype=torch.float64)
    image_edges = torch.stack([coupling(c) for c in corners]) - coupling(x)
    torch.testing.assert_close(torch.linalg.det(image_edges) / epsilon**6, torch.exp(log_scale_net(x[:3])).prod(),
                               rtol=1e-3, atol=0)
