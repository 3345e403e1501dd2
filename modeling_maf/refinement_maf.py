"""Density-guided refinement of flow samples: annealed Langevin dynamics on log p with an RMSprop preconditioner.

A flow's exact samples are draws from its typical set, which for an image flow can look like static while the
model's high-density region looks like the data. Refinement moves samples towards higher density while keeping
them apart. For k = 1..K, with g the gradient of log p at x:

    m <- beta * m + (1 - beta) * g^2,    r = sqrt(m / (1 - beta^k)),    r <- max(r, rho * mean(r)),
    G = 1 / (r + delta),
    x <- x + eps * G * g + sqrt(2 * eps * tau_k * G) * noise,        tau_k = tau_0 * (1 - k / K)

This is preconditioned Langevin dynamics (Li et al., 2016, "pSGLD"): at a fixed temperature tau its stationary law
is close to p(x)^(1 / tau) (tau = 1: the model itself; tau -> 0: gradient ascent to a mode), and the RMSprop
preconditioner G makes every coordinate move about eps per step however steep log p is along it, as Adam does;
the floor rho (relative to the sample's mean over coordinates) keeps a coordinate whose first gradients happen to
be near 0 from taking a huge noise step. The temperature falls linearly from tau_0 to 0 at the last step: noise keeps
the samples apart early, the last steps sharpen them. The results are no longer draws from the model.

This file imports only torch, so a Hub repo made by ``save_pretrained`` loads with ``trust_remote_code=True``.
"""

import contextlib
import math

import torch


SQUARED_GRADIENT_DECAY = 0.99  # beta: the preconditioner averages the squared gradient over ~100 steps
# A value whose gradient happens to be near 0 early on would get a huge G and a huge noise kick: its RMS gradient
# counts as at least this fraction of the sample's mean RMS gradient.
RMS_FLOOR = 0.1
PRECONDITIONER_EPS = 1e-8  # delta


def check_refinement_arguments(steps, step_size, temperature, batch_size) -> None:
    """Raise a ValueError naming the first bad refinement argument."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"refine_steps must be an integer >= 0 (0 = exact samples), got {steps!r}.")
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not 0 < step_size < math.inf:
        raise ValueError(f"refine_step_size must be a finite number > 0, got {step_size!r}.")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"refine_temperature must be a finite number >= 0 (0 = no noise), got {temperature!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"refine_batch_size must be an integer >= 1, got {batch_size!r}.")


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """Eval mode (running statistics) and parameters without requires_grad, so that a gradient with respect to the
    inputs forms nothing else (no weight gradients, nothing handed to an optimizer's gradient sink); the module is
    left as it was."""
    parameters = [parameter for parameter in module.parameters() if parameter.requires_grad]
    was_training = module.training
    module.eval()
    try:
        for parameter in parameters:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)
        module.train(was_training)


def gradient_of(log_density, x, *args):
    """The gradient with respect to ``x`` (N, D) of ``log_density(x, *args).sum()``, a per-row log-density: what
    ``annealed_langevin`` ascends. Only that gradient is formed (no parameter's), so the model is run ``frozen``."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(log_density(x, *args).sum(), x)
    return gradient


def annealed_langevin(start, gradient, *, steps, step_size, temperature, batch_size, generator=None,
                      show_progress=False):
    """Refine ``start`` (N, D) with ``steps`` annealed Langevin steps, ``batch_size`` rows at a time.

    ``gradient(x, tau)`` is the gradient with respect to ``x`` (B, D) of the per-row log-density to ascend at
    temperature ``tau`` (``gradient_of`` makes one from a log-density). Noise comes from ``generator`` (CPU or on
    ``start``'s device). The caller runs this under ``torch.no_grad`` with the model's parameters ``frozen``.
    """
    noise_device = generator.device if generator is not None else start.device
    progress = None
    if show_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=steps * math.ceil(len(start) / batch_size), desc="refining", unit="step")
    refined = []
    for chunk in start.split(batch_size):
        x = chunk.detach().clone()
        mean_square = torch.zeros_like(x)
        for step in range(1, steps + 1):
            tau = temperature * (1 - step / steps)
            ascent = gradient(x, tau)
            mean_square.mul_(SQUARED_GRADIENT_DECAY).addcmul_(ascent, ascent, value=1 - SQUARED_GRADIENT_DECAY)
            rms = (mean_square / (1 - SQUARED_GRADIENT_DECAY**step)).sqrt()
            rms = torch.maximum(rms, RMS_FLOOR * rms.mean(dim=1, keepdim=True))
            preconditioner = 1 / (rms + PRECONDITIONER_EPS)
            x = x + step_size * preconditioner * ascent
            if tau > 0:
                noise = torch.randn(x.shape, generator=generator, device=noise_device, dtype=x.dtype).to(x.device)
                x = x + (2 * step_size * tau * preconditioner).sqrt() * noise
            if progress is not None:
                progress.update()
        refined.append(x)
    if progress is not None:
        progress.close()
    return torch.cat(refined)
