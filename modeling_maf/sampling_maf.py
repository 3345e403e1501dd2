"""Sampling of MAF and IAF models: exact draws, patch mosaics, and density-guided refinement.

`MAFSamplingMixin.sample` draws latents from the base distribution and runs the flow's generative direction; a patch
flow draws a mosaic of independent, non-overlapping patches (`PatchLayout.mosaic`). With `refine_steps > 0` the draws
are then moved towards higher density by annealed Langevin dynamics (`refinement_maf.annealed_langevin`), on the logit
image for MAF (its density direction is one pass) and on the latents for IAF (its sampling direction is).

The mixin is part of `MAFModel` (as transformers' `GenerationMixin` is part of its language models): it uses the
model's flow (`_flow_generate`, `_flow_density`, `_pixels_to_logits`, `_logits_to_pixels`), `patch_layout` and
`conditioner_on_noise`.

This file imports only torch and its siblings (`refinement_maf.py`, `flow_graphs.py`, `masked_matmul.py`): it
travels with modeling_maf.py into Hub repos (`trust_remote_code=True`).
"""

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .flow_graphs import can_replay, replay_flow
from .masked_matmul import kernel_settings
from .refinement_maf import annealed_langevin, check_refinement_arguments, frozen, gradient_of


class MAFSamplingMixin:
    """`sample` (and the log-density that refinement ascends) of a `MAFModel`."""

    # Refinement step (`sample(..., refine_steps=K)`): logit units, about 0.6 of an 8-bit level near mid-grey.
    default_refine_step_size = 0.01
    # Refinement's first noise temperature: 0 (preconditioned ascent from each sample's own draw) left the MAF's
    # samples data-like and apart where 1 left them noisy (docs/RESULTS.md#samples).
    default_refine_temperature = 0.0
    # Refinement pays 0.5 nats for every value that strays this far (logits) outside the logits of [0, 1] pixels.
    refine_wall_width = 0.01

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None,
               temperature: float | Sequence[float] = 1.0, show_progress: bool = False, refine_steps: int = 0,
               refine_step_size: float | None = None, refine_temperature: float | None = None,
               refine_batch_size: int = 16) -> torch.Tensor:
        """Draw `num_samples` images (num_samples, C, H, W) in [0, 1]; latents ~ N(0, temperature^2 I).
        `generator` may live on the CPU or on the model's device. A patch model draws a mosaic of independent,
        non-overlapping patches on a patch_size grid, each from log p(patch | its location): not a draw of a whole
        image (needs patch_size % patch_stride == 0 and image_size % patch_size == 0).

        A sequence of temperatures scales the same `num_samples` base draws by each, in one batch: the result is
        (len(temperature) * num_samples, C, H, W), temperature by temperature. Each temperature's exact images are
        those of a call with that temperature alone and the same seed; refined ones start from the same draws and,
        where the refinement draws no noise (`refine_temperature=0`), differ from that call's only by the rounding
        of batched products, which hundreds of ascent steps amplify (as they amplify any change of rounding: another
        kernel, another batch size). One batch is cheaper than one call per temperature where a step's time grows
        less than its rows (a few images, whose steps are bound by reading the weights).

        With `refine_steps=0` (the default) the images are exact draws from the model. With `refine_steps > 0` each
        draw is then moved towards higher density by annealed Langevin dynamics (`refinement_maf.py`, docs/maf.md):
        the results look more like the data but are **density-guided, not draws from the model**. Each step costs
        one forward and backward pass of the one-pass direction: MAF refines the logit image (its density
        direction), IAF its latents (its sampling direction). Each value moves by about `refine_step_size` per step,
        in logit units for MAF and latent units for IAF (default: the class's `default_refine_step_size`). The noise
        temperature falls linearly from `refine_temperature` (1: the model's own density) to 0 at the last step; 0
        throughout is preconditioned gradient ascent, which keeps the samples apart for a few hundred steps because
        each starts from its own draw, and collapses them onto a mode if run long (default: the class's
        `default_refine_temperature`). Samples are refined `refine_batch_size` at a time, which bounds memory; the
        generator also draws the refinement noise, so a seeded generator reproduces the result for the same
        `refine_batch_size` (and the same seed with `refine_steps=0` gives the starting points).
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        temperatures = [temperature] if isinstance(temperature, (int, float)) else list(temperature)
        if not temperatures or not all(value > 0 for value in temperatures):
            raise ValueError(f"temperature must be > 0 (or a non-empty sequence of them), got {temperature}.")
        refine_step_size = self.default_refine_step_size if refine_step_size is None else refine_step_size
        refine_temperature = self.default_refine_temperature if refine_temperature is None else refine_temperature
        check_refinement_arguments(refine_steps, refine_step_size, refine_temperature, refine_batch_size)
        device, layout, num_features = self.device, self.patch_layout, self.config.num_features
        noise_device = generator.device if generator is not None else device
        latents = torch.randn(num_samples, layout.rows_per_sample * num_features, generator=generator,
                              device=noise_device)
        latents = torch.cat([latents.to(device) * value for value in temperatures])
        num_samples = len(latents)
        locations = layout.mosaic_locations(num_samples, device)
        # MAF refines the logit image (its density direction is one pass), IAF its latents (its sampling direction).
        if self.conditioner_on_noise:
            start = latents.to(self._compute_dtype)
        else:
            start = self._flow_generate(latents.view(-1, num_features), show_progress, locations)[0]
            start = start.view(num_samples, -1)
        if refine_steps > 0:
            # The logits of pixel values 0 and 1, as Python numbers: nothing crosses to the host inside the loop.
            pixel_range = self._pixels_to_logits(torch.tensor([[0.0, 1.0]]), random_dequantization=False)[0]
            gradient = functools.partial(self._refinement_gradient, pixel_range=tuple(pixel_range.flatten().tolist()))
            with frozen(self):
                start = annealed_langevin(start, gradient, steps=refine_steps, step_size=refine_step_size,
                                          temperature=refine_temperature, batch_size=refine_batch_size,
                                          generator=generator, show_progress=show_progress)
        rows = start.view(-1, num_features)
        logits = self._flow_generate(rows, show_progress, locations)[0] if self.conditioner_on_noise else rows
        return layout.mosaic(self._logits_to_pixels(logits), num_samples)

    def _refinement_gradient(self, variable, temperature, pixel_range):
        """The gradient of `_refinement_log_density` with respect to `variable`: one refinement step's model work.
        A MAF on CUDA replays it as a CUDA graph (the density direction, its backward and the wall: a fixed sequence
        of kernels whose launches, not the GPU, set a step's time at a few rows), captured per batch shape from the
        second step on (``flow_graphs.py``) unless ``density_cuda_graphs`` is False. An IAF's gradient depends on the
        temperature, which changes at every step, and runs eagerly."""
        def run(inputs, locations=None):
            return (gradient_of(self._refinement_log_density, inputs, temperature, pixel_range),)

        if self.density_cuda_graphs and not self.conditioner_on_noise and can_replay(variable):
            return replay_flow(self, "refinement", run, variable, settings=(kernel_settings(), pixel_range))[0]
        return run(variable)[0]

    def _refinement_log_density(self, variable, temperature, pixel_range):
        """What `annealed_langevin` ascends, per row. MAF: variable = logits v, log p(v) (constants dropped).
        IAF: variable = latents z, log p(v(z)) + temperature * log|dv/dz|: the log-density of p(v)^(1 / temperature)
        carried to z, times temperature (the time unit of a Langevin step); at temperature 1 it is N(0, I).
        Both minus a quadratic wall that keeps v within `pixel_range` (the logits of pixel values 0 and 1): outside,
        the flow's density was never trained and can grow without bound (towards saturated images).
        A patch model's row is a mosaic (its patches side by side): the sum of its patches' log p(patch | location)."""
        num_rows = variable.shape[0]
        rows = variable.view(-1, self.config.num_features)
        locations = self.patch_layout.mosaic_locations(num_rows, variable.device)
        if self.conditioner_on_noise:
            logits, log_det = self._flow_generate(rows, locations=locations)
            log_density = -0.5 * rows.square().sum(dim=1) - (1 - temperature) * log_det.sum(dim=1)
        else:
            logits = rows
            latents, log_det = self._flow_density(logits, locations)
            log_density = (log_det - 0.5 * latents.square()).sum(dim=1)
        low, high = pixel_range
        outside = F.relu(low - logits) + F.relu(logits - high)
        log_density = log_density - 0.5 * (outside / self.refine_wall_width).square().sum(dim=1)
        return log_density.view(num_rows, -1).sum(dim=1)


__all__ = ["MAFSamplingMixin"]
