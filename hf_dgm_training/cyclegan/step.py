# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""The CycleGAN training step (Zhu et al. 2017) and the options that decide how it runs on a device.

`CycleGANTrainStep` is one iteration of the paper: generator update, image pools, discriminator update. On one CUDA
GPU both updates are replayed as CUDA graphs through `hf_dgm_training.CUDAGraphStep`, with the pools in between on
the host. Every option keeps the paper's maths (bf16 only rounds differently).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch

from ..cuda_graphs import CUDAGraphStep, use_cuda_graphs
from .image_pool import ImagePool


# Order of the values a step returns: the generator update's, then the discriminator update's.
GENERATOR_LOSS_NAMES = ("G_A", "cycle_A", "idt_A", "G_B", "cycle_B", "idt_B")
DISCRIMINATOR_LOSS_NAMES = ("D_A", "D_B")
STEP_LOSS_NAMES = GENERATOR_LOSS_NAMES + DISCRIMINATOR_LOSS_NAMES


def learning_rate_factor(epoch: int, num_epochs: int, num_decay_epochs: int) -> float:
    """The reference's linear rule (epoch counted from 0): 1 for the first num_epochs - num_decay_epochs epochs, then
    1 - k / (num_decay_epochs + 1) in the k-th decay epoch, so the last epoch runs at lr / (num_decay_epochs + 1)."""
    constant_epochs = num_epochs - num_decay_epochs
    return 1.0 - max(0, epoch + 1 - constant_epochs) / float(num_decay_epochs + 1)


@dataclass
class FastPathOptions:
    """How a training step runs. Every choice keeps the paper's maths (bf16 only rounds differently)."""

    device_type: str = "cpu"
    autocast_dtype: torch.dtype | None = None  # torch.bfloat16 for bf16 autocast
    channels_last: bool = False
    fused_optimizer: bool = False  # fused Adam kernels (CUDA)
    batch_passes: bool = False  # passes sharing a network run as one batch (exact with instance norm)
    torch_compile: bool = False
    compile_mode: str = "default"
    cuda_graphs: bool = False
    warmup_steps: int = 3  # eager steps before the CUDA graphs are captured

    def describe(self) -> dict:
        described = asdict(self)
        described["autocast_dtype"] = str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else None
        return described


def resolve_fast_path(args, device: torch.device, num_processes: int, config) -> FastPathOptions:
    """Turns the speed flags ('auto' / 'true' / 'false') into options for this device."""
    on_cuda = device.type == "cuda"
    fast = args.fast_path != "false"

    def choose(flag: str, auto: bool) -> bool:
        return auto if flag == "auto" else flag == "true"

    cuda_graphs = use_cuda_graphs(args.cuda_graphs, device, num_processes, fast)
    return FastPathOptions(
        device_type=device.type,
        autocast_dtype=torch.bfloat16 if args.mixed_precision == "bf16" else None,
        channels_last=choose(args.channels_last, fast and on_cuda),
        fused_optimizer=fast and on_cuda,
        batch_passes=fast and config.norm_type == "instance",
        torch_compile=choose(args.torch_compile, False),  # opt-in: measured 4x slower (see --torch_compile)
        compile_mode=args.torch_compile_mode,
        cuda_graphs=cuda_graphs,
    )


def build_optimizers(model, learning_rate: float, betas: tuple, options: FastPathOptions):
    """One Adam for both generators, one for both discriminators (as the reference)."""
    kwargs = {"lr": learning_rate, "betas": betas}
    if options.fused_optimizer:
        kwargs["fused"] = True
    if options.cuda_graphs:
        kwargs["capturable"] = True  # optimizer step inside the captured graph
    generator_params = [*model.generator_a_to_b.parameters(), *model.generator_b_to_a.parameters()]
    discriminator_params = [*model.discriminator_a.parameters(), *model.discriminator_b.parameters()]
    return torch.optim.Adam(generator_params, **kwargs), torch.optim.Adam(discriminator_params, **kwargs)


def make_gradient_averager(accelerator):
    """With several processes, averages gradients with one all-reduce per optimizer; None with one process.

    CycleGAN's step calls every network several times and freezes the discriminators during the generator update,
    which DistributedDataParallel's per-forward bookkeeping does not handle; averaging explicitly is exact and simple.
    """
    if accelerator.num_processes == 1:
        return None

    def average_gradients(parameters):
        grads = [p.grad for p in parameters if p.grad is not None]
        flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view(grad.shape))
            offset += grad.numel()

    return average_gradients


class CycleGANTrainStep:
    """One training iteration of the paper: generator update, image pools, discriminator update.

    `step(real_a, real_b)` returns the losses as one device tensor in the order of `STEP_LOSS_NAMES`, without waiting
    for the device. With CUDA graphs each update is a `CUDAGraphStep` (a few eager warm-up steps, then one captured
    graph replayed); the image pools stay outside the graphs, their random choices made on the host every step.

    The reference's order is kept: forward; discriminators frozen; generators' loss, backward, Adam step;
    discriminators unfrozen; fake B through pool B (for D_A = discriminator_b), fake A through pool A; discriminators'
    loss, backward, Adam step.
    """

    def __init__(self, model, optimizer_g: torch.optim.Optimizer, optimizer_d: torch.optim.Optimizer,
                 pool_a: ImagePool, pool_b: ImagePool, options: FastPathOptions, average_gradients=None):
        self.model, self.optimizer_g, self.optimizer_d = model, optimizer_g, optimizer_d
        self.pool_a, self.pool_b = pool_a, pool_b
        self.options = options
        self.average_gradients = average_gradients
        self.generator_params = [*model.generator_a_to_b.parameters(), *model.generator_b_to_a.parameters()]
        self.discriminator_params = [*model.discriminator_a.parameters(), *model.discriminator_b.parameters()]
        self.generator_losses = self._generator_losses
        self.discriminator_losses = self._discriminator_losses
        self.compiled = options.torch_compile
        if options.torch_compile:
            self.generator_losses = torch.compile(self._generator_losses, mode=options.compile_mode, dynamic=False)
            self.discriminator_losses = torch.compile(self._discriminator_losses, mode=options.compile_mode,
                                                      dynamic=False)
        self.steps_done = 0
        self.fallbacks: list[str] = []  # what had to be switched off, and why
        self.generator_step = CUDAGraphStep(self._guarded(self._generator_update), enabled=options.cuda_graphs,
                                            warmup_steps=options.warmup_steps)
        self.discriminator_step = CUDAGraphStep(self._guarded(self._discriminator_update), enabled=options.cuda_graphs,
                                                warmup_steps=options.warmup_steps)

    # -- the maths ------------------------------------------------------------------------------------------

    def _autocast(self):
        dtype = self.options.autocast_dtype
        # No autocast weight cache: it would keep stale casts inside CUDA graphs.
        return torch.autocast(self.options.device_type, dtype=dtype, enabled=dtype is not None, cache_enabled=False)

    def _generator_losses(self, real_a, real_b):
        with self._autocast():
            outputs = self.model(real_a, real_b, batch_passes=self.options.batch_passes)
            losses = self.model.generator_loss(outputs, real_a, real_b)
        values = torch.stack([losses[name] for name in GENERATOR_LOSS_NAMES])
        return losses["total"], values, outputs.fake_a.detach(), outputs.fake_b.detach()

    def _discriminator_losses(self, real_a, real_b, fake_a, fake_b):
        with self._autocast():
            losses = self.model.discriminator_loss(real_a, real_b, fake_a, fake_b,
                                                   batch_passes=self.options.batch_passes)
        return losses["total"], torch.stack([losses[name] for name in DISCRIMINATOR_LOSS_NAMES])

    def _generator_update(self, real_a, real_b):
        for parameter in self.discriminator_params:  # the generators' loss must not train the discriminators
            parameter.requires_grad_(False)
        try:
            self.optimizer_g.zero_grad(set_to_none=True)
            total, values, fake_a, fake_b = self.generator_losses(real_a, real_b)
            total.backward()
            if self.average_gradients is not None:
                self.average_gradients(self.generator_params)
            self.optimizer_g.step()
        finally:
            for parameter in self.discriminator_params:
                parameter.requires_grad_(True)
        return values, fake_a, fake_b

    def _discriminator_update(self, real_a, real_b, pooled_a, pooled_b):
        self.optimizer_d.zero_grad(set_to_none=True)
        total, values = self.discriminator_losses(real_a, real_b, pooled_a, pooled_b)
        total.backward()
        if self.average_gradients is not None:
            self.average_gradients(self.discriminator_params)
        self.optimizer_d.step()
        return values

    # -- running it -----------------------------------------------------------------------------------------

    def _guarded(self, update):
        """`update`, except that if torch.compile fails on the very first step it warns and redoes it eagerly.

        Safe to redo: compilation fails in the forward or backward pass, before the optimizer step changes anything.
        """

        def run(*args):
            if self.steps_done > 0 or not self.compiled:
                return update(*args)
            try:
                return update(*args)
            except Exception as error:  # noqa: BLE001 - any compiler failure: the same maths, eagerly
                self.fallbacks.append(f"torch.compile failed, running eagerly: {type(error).__name__}: {error}"[:500])
                warnings.warn(self.fallbacks[-1])
                self.generator_losses, self.discriminator_losses = self._generator_losses, self._discriminator_losses
                self.compiled = False
                return update(*args)

        return run

    def __call__(self, real_a: torch.Tensor, real_b: torch.Tensor) -> torch.Tensor:
        generator_values, fake_a, fake_b = self.generator_step(real_a, real_b)
        if not self.generator_step.enabled:  # a failed generator capture: both updates run eagerly
            self.discriminator_step.enabled = False
        pooled_b = self.pool_b.query(fake_b)  # reference order: D_A's pool first
        pooled_a = self.pool_a.query(fake_a)
        discriminator_values = self.discriminator_step(real_a, real_b, pooled_a, pooled_b)
        self.steps_done += 1
        return torch.cat([generator_values, discriminator_values])

    def set_learning_rate(self, value: float) -> None:
        """Sets both optimizers' learning rate. With CUDA graphs it is a device tensor updated in place, so the
        captured Adam steps read the new value."""
        for optimizer in (self.optimizer_g, self.optimizer_d):
            for group in optimizer.param_groups:
                device = group["params"][0].device
                if isinstance(group["lr"], torch.Tensor) and group["lr"].device == device:
                    group["lr"].fill_(value)
                elif self.options.cuda_graphs:
                    group["lr"] = torch.tensor(float(value), device=device)
                else:
                    group["lr"] = value

    def describe(self) -> dict:
        """The options actually in use (after any fallback)."""
        runners = (self.generator_step, self.discriminator_step)
        described = self.options.describe()
        described.update(
            torch_compile=self.compiled,
            cuda_graphs=all(runner.enabled and runner.graph is not None for runner in runners),
            graph_replays=self.generator_step.replays,
            fallbacks=self.fallbacks + [reason for runner in runners for reason in runner.fallbacks],
        )
        return described


def prepare_model(model, device, options: FastPathOptions):
    model.to(device)
    if options.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    return model


def new_batch_buffers(batch_size: int, config, device, options: FastPathOptions):
    """The float input tensors every step writes its augmented images into."""
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
    shape = (batch_size, config.num_channels, config.image_size, config.image_size)
    return tuple(torch.empty(shape, device=device).contiguous(memory_format=memory_format) for _ in range(2))
