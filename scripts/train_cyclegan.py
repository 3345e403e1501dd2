#!/usr/bin/env python
# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""Train CycleGAN (Zhu et al. 2017) on unpaired images with `accelerate`.

Defaults are the paper's: ResNet generators, 70x70 PatchGANs, least-squares GAN loss, lambda_cycle 10, identity
weight 0.5, image pools of 50, Adam (2e-4, betas 0.5/0.999), batch 1, learning rate constant for the first half of
the epochs then decaying linearly towards 0, resize to 1.12x then random crop and flip.

    python scripts/train_cyclegan.py --data_dir data/horse2zebra --image_size 128 --output_dir outputs/h2z
    accelerate launch scripts/train_cyclegan.py --dataset_name huggan/horse2zebra --image_size 256 --push_to_hub

Speed: by default the step runs in bf16 autocast with channels_last tensors, fused Adam, no host-device syncs
(losses stay on the device and are fetched every --logging_steps), the dataset held on the device as uint8 with
the augmentation done there, and the whole generator and discriminator updates replayed as CUDA graphs.
torch.compile is off unless asked for (--torch_compile true): on an H200 the default path trained horse2zebra at
128x128 at 101 it/s (106 steady), the same path with torch.compile at 25.6 it/s. The maths is the paper's either
way; `--fast_path false` runs the plain eager float32 step in the reference's call order.

Outputs in --output_dir: metrics.jsonl (the eight losses every step), plots/*.png, preview.png, grids/epoch_*.png
(192-colour palette PNGs, under 250 KB at 128x128; --grid_colors 0 for lossless), checkpoints/step_*, the final
model (save_pretrained, image processor, model card) and train_results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm



from hf_dgm_training import (
    ImagePool,
    CheckpointManager,
    HubPusher,
    MetricsLogger,
    add_common_args,
    add_config_override_args,
    checkpointing_interval,
    config_overrides_from_args,
    plot_curves,
    resolve_hub_token,
    save_image_grid,
    setup_accelerator,
    device_description,
    write_json,
    write_model_card,
)

from modeling_cyclegan import LOSS_NAMES, CycleGANConfig, CycleGANImageProcessor, CycleGANModel
from modeling_cyclegan.data import (
    UnpairedSampler,
    default_load_size,
    images_to_uint8_tensor,
    load_unpaired_split,
    to_pixel_values,
)


GENERATOR_LOSS_NAMES = ("G_A", "cycle_A", "idt_A", "G_B", "cycle_B", "idt_B")
DISCRIMINATOR_LOSS_NAMES = ("D_A", "D_B")
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "train_results.json"


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def _auto_bool(value: str) -> str:
    lowered = str(value).lower()
    if lowered not in ("auto", "true", "false"):
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {value!r}")
    return lowered


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(
        parser,
        defaults={
            "num_train_epochs": 20,
            "per_device_train_batch_size": 1,
            "learning_rate": 2e-4,
            "mixed_precision": None,  # resolved below: bf16 on the fast path on a GPU, else no
            "checkpointing_steps": "epoch",
        },
    )
    parser.add_argument(
        "--model_name_or_path",
        type=str,
        default=None,
        help="Start from this CycleGAN (local folder or Hub id, with discriminators) instead of a fresh one.",
    )
    parser.add_argument("--adam_beta1", type=float, default=0.5, help="Adam beta1 (paper: 0.5).")
    parser.add_argument("--adam_beta2", type=float, default=0.999, help="Adam beta2 (paper: 0.999).")
    parser.add_argument(
        "--num_decay_epochs",
        type=int,
        default=None,
        help="Epochs over which the learning rate decays linearly towards 0, at the end of training "
        "(default: half of --num_train_epochs, as the paper's 100 + 100).",
    )
    parser.add_argument(
        "--load_size",
        type=int,
        default=None,
        help="Images are resized to this size before the random crop of --image_size (default: 1.117 x image_size, "
        "the reference's 286 for 256).",
    )
    parser.add_argument("--no_flip", action="store_true", help="Disable the random horizontal flips.")
    parser.add_argument(
        "--num_grid_images", type=int, default=4, help="Test images per domain in the per-epoch grids (0: no grids)."
    )
    parser.add_argument(
        "--grid_colors",
        type=int,
        default=192,
        help="Palette size of the PNGs of the per-epoch grids and the preview (2-256; 0: lossless full colour). "
        "192 colours keep a horse2zebra grid of 4 rows of 128x128 images at 215-240 KB instead of ~820 KB, with a "
        "mean error of ~6 of 255 levels.",
    )
    parser.add_argument(
        "--grid_tile_size",
        type=int,
        default=128,
        help="Largest side of one image in the grids and the preview; larger images are downscaled (0: full size).",
    )
    parser.add_argument(
        "--logging_steps",
        type=int,
        default=100,
        help="Fetch the losses from the device every N steps (every step is still logged; larger = fewer syncs).",
    )
    parser.add_argument(
        "--test_split",
        type=str,
        default="test",
        help="Split with the images of the epoch grids and the final evaluation (local folders <split>A, <split>B).",
    )
    fast = parser.add_argument_group("speed (the maths is the same on every path)")
    fast.add_argument(
        "--fast_path",
        type=_auto_bool,
        default="true",
        help="true (default): bf16 autocast, channels_last, fused Adam, batched generator passes, CUDA graphs where "
        "possible. false: the plain eager float32 step in the reference's call order.",
    )
    fast.add_argument(
        "--torch_compile",
        type=_auto_bool,
        default="auto",
        help="torch.compile the generator and discriminator loss computations (auto: off; true to opt in). Off by "
        "default because it was measured slower: horse2zebra at 128x128, batch 1, bf16 + CUDA graphs on one H200 "
        "(torch 2.11) trained at 25.6 it/s with it and 101 it/s without (two runs on the same card type). Compiling "
        "also takes a minute or two at start; if it fails the step runs eagerly and train_results.json says why.",
    )
    fast.add_argument("--torch_compile_mode", type=str, default="default", help="Mode for torch.compile.")
    fast.add_argument(
        "--cuda_graphs",
        type=_auto_bool,
        default="auto",
        help="Replay the generator and discriminator updates as CUDA graphs after 3 eager warm-up steps (auto: on for "
        "one CUDA GPU on the fast path; off with several processes).",
    )
    fast.add_argument(
        "--channels_last", type=_auto_bool, default="auto", help="channels_last tensors (auto: on CUDA on the fast path)."
    )
    add_config_override_args(parser, CycleGANConfig)
    args = parser.parse_args(argv)

    if args.mixed_precision == "fp16":
        parser.error("--mixed_precision fp16 needs loss scaling, which this script does not do; use bf16 or no.")
    if args.mixed_precision is None:
        on_gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        args.mixed_precision = "bf16" if args.fast_path != "false" and on_gpu else "no"
    if args.num_train_epochs < 1:
        parser.error("--num_train_epochs must be at least 1.")
    if args.num_decay_epochs is None:
        args.num_decay_epochs = args.num_train_epochs // 2
    if not 0 <= args.num_decay_epochs <= args.num_train_epochs:
        parser.error(f"--num_decay_epochs must be in [0, {args.num_train_epochs}], got {args.num_decay_epochs}.")
    if args.logging_steps < 1:
        parser.error("--logging_steps must be positive.")
    if args.grid_colors != 0 and not 2 <= args.grid_colors <= 256:
        parser.error("--grid_colors must be 0 (lossless) or in [2, 256].")
    if args.grid_tile_size < 0:
        parser.error("--grid_tile_size must be 0 (full size) or positive.")
    try:
        args.checkpointing_steps = checkpointing_interval(args.checkpointing_steps)
    except ValueError as error:
        parser.error(str(error))
    return args


# ----------------------------------------------------------------------------------------------------------
# Schedule and fast path
# ----------------------------------------------------------------------------------------------------------


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


def resolve_fast_path(args, device: torch.device, num_processes: int, config: CycleGANConfig) -> FastPathOptions:
    """Turns the speed flags ('auto' / 'true' / 'false') into options for this device."""
    on_cuda = device.type == "cuda"
    fast = args.fast_path != "false"

    def choose(flag: str, auto: bool) -> bool:
        return auto if flag == "auto" else flag == "true"

    cuda_graphs = choose(args.cuda_graphs, fast and on_cuda and num_processes == 1)
    if cuda_graphs and not on_cuda:
        raise ValueError("--cuda_graphs true needs a CUDA device.")
    if cuda_graphs and num_processes > 1:
        raise ValueError("--cuda_graphs is for one process; with several, leave it on auto (off) or false.")
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


def build_optimizers(model: CycleGANModel, learning_rate: float, betas: tuple, options: FastPathOptions):
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

    `step(real_a, real_b)` returns the losses as device tensors, `(generator_losses, discriminator_losses)` in the
    order of GENERATOR_LOSS_NAMES and DISCRIMINATOR_LOSS_NAMES, without waiting for the device. With CUDA graphs the
    returned tensors are overwritten by the next call: copy them before calling again.

    The reference's order is kept: forward; discriminators frozen; generators' loss, backward, Adam step;
    discriminators unfrozen; fake B through pool B (for D_A = discriminator_b), fake A through pool A; discriminators'
    loss, backward, Adam step.
    """

    def __init__(
        self,
        model: CycleGANModel,
        optimizer_g: torch.optim.Optimizer,
        optimizer_d: torch.optim.Optimizer,
        pool_a: ImagePool,
        pool_b: ImagePool,
        options: FastPathOptions,
        average_gradients=None,
    ):
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
            self.discriminator_losses = torch.compile(self._discriminator_losses, mode=options.compile_mode, dynamic=False)
        self.use_graphs = options.cuda_graphs
        self.eager_steps_done = 0
        self.graph_g = self.graph_d = None
        self.fallbacks: list[str] = []  # what had to be switched off, and why

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
            losses = self.model.discriminator_loss(real_a, real_b, fake_a, fake_b, batch_passes=self.options.batch_passes)
        return losses["total"], torch.stack([losses[name] for name in DISCRIMINATOR_LOSS_NAMES])

    def _generator_update(self, real_a, real_b):
        for parameter in self.discriminator_params:  # the generators' loss must not train the discriminators
            parameter.requires_grad_(False)
        self.optimizer_g.zero_grad(set_to_none=True)
        total, values, fake_a, fake_b = self.generator_losses(real_a, real_b)
        total.backward()
        if self.average_gradients is not None:
            self.average_gradients(self.generator_params)
        self.optimizer_g.step()
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

    def _eager_step(self, real_a, real_b):
        generator_values, fake_a, fake_b = self._first_step_guard(self._generator_update, real_a, real_b)
        pooled_b = self.pool_b.query(fake_b)  # reference order: D_A's pool first
        pooled_a = self.pool_a.query(fake_a)
        return generator_values, self._first_step_guard(self._discriminator_update, real_a, real_b, pooled_a, pooled_b)

    # -- running it -----------------------------------------------------------------------------------------

    def describe(self) -> dict:
        """The options actually in use (after any fallback)."""
        described = self.options.describe()
        described.update(
            torch_compile=self.compiled,
            cuda_graphs=self.use_graphs,
            fallbacks=list(self.fallbacks),
        )
        return described

    def _thaw_discriminators(self):
        for parameter in self.discriminator_params:
            parameter.requires_grad_(True)

    def _first_step_guard(self, update, *args):
        """Runs an update; if torch.compile fails on the very first step, warns and redoes it eagerly.

        Safe to redo: compilation fails in the forward or backward pass, before the optimizer step changes anything.
        """
        if self.eager_steps_done > 0 or not self.compiled:
            return update(*args)
        try:
            return update(*args)
        except Exception as error:  # noqa: BLE001 - any compiler failure: fall back to the same maths, eagerly
            self.fallbacks.append(f"torch.compile failed, running eagerly: {type(error).__name__}: {error}"[:500])
            warnings.warn(self.fallbacks[-1])
            self.generator_losses, self.discriminator_losses = self._generator_losses, self._discriminator_losses
            self.compiled = False
            self._thaw_discriminators()
            return update(*args)

    def set_learning_rate(self, value: float) -> None:
        """Sets both optimizers' learning rate. With CUDA graphs it is a device tensor updated in place, so the
        captured Adam steps read the new value."""
        for optimizer in (self.optimizer_g, self.optimizer_d):
            for group in optimizer.param_groups:
                device = group["params"][0].device
                if isinstance(group["lr"], torch.Tensor) and group["lr"].device == device:
                    group["lr"].fill_(value)
                elif self.use_graphs:
                    group["lr"] = torch.tensor(float(value), device=device)
                else:
                    group["lr"] = value

    def __call__(self, real_a: torch.Tensor, real_b: torch.Tensor):
        if not self.use_graphs:
            result = self._eager_step(real_a, real_b)
            self.eager_steps_done += 1
            return result
        if self.graph_g is None and self.eager_steps_done < self.options.warmup_steps:
            # Warm-up steps (real training steps) on a side stream, as CUDA graph capture requires: they create
            # the optimizer states, pick the cuDNN algorithms and run torch.compile.
            side_stream = torch.cuda.Stream()
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream):
                result = self._eager_step(real_a, real_b)
            torch.cuda.current_stream().wait_stream(side_stream)
            self.eager_steps_done += 1
            return result
        if self.graph_g is None:
            try:
                self._capture(real_a, real_b)
            except Exception as error:  # noqa: BLE001 - nothing ran during capture: continue without graphs
                self.fallbacks.append(f"CUDA graph capture failed, running eagerly: {type(error).__name__}: {error}"[:500])
                warnings.warn(self.fallbacks[-1])
                self.graph_g = self.graph_d = None
                self.use_graphs = False
                self._thaw_discriminators()
                torch.cuda.synchronize()
                return self(real_a, real_b)
        self.static_a.copy_(real_a)
        self.static_b.copy_(real_b)
        self.graph_g.replay()
        # The pools stay outside the graphs: their random choices are made on the host for every step.
        self.static_pooled_b.copy_(self.pool_b.query(self.static_fake_b))
        self.static_pooled_a.copy_(self.pool_a.query(self.static_fake_a))
        self.graph_d.replay()
        return self.static_generator_values, self.static_discriminator_values

    def _capture(self, real_a, real_b):
        self.static_a = real_a.clone(memory_format=torch.preserve_format)
        self.static_b = real_b.clone(memory_format=torch.preserve_format)
        torch.cuda.synchronize()
        graph_g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph_g):
            self.static_generator_values, self.static_fake_a, self.static_fake_b = self._generator_update(
                self.static_a, self.static_b
            )
        self.static_pooled_a = torch.empty_like(self.static_fake_a)
        self.static_pooled_b = torch.empty_like(self.static_fake_b)
        graph_d = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph_d):
            self.static_discriminator_values = self._discriminator_update(
                self.static_a, self.static_b, self.static_pooled_a, self.static_pooled_b
            )
        self.graph_g, self.graph_d = graph_g, graph_d


def prepare_model(model: CycleGANModel, device, options: FastPathOptions) -> CycleGANModel:
    model.to(device)
    if options.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    return model


def new_batch_buffers(batch_size: int, config: CycleGANConfig, device, options: FastPathOptions):
    """The float input tensors every step writes its augmented images into."""
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
    shape = (batch_size, config.num_channels, config.image_size, config.image_size)
    return tuple(torch.empty(shape, device=device).contiguous(memory_format=memory_format) for _ in range(2))


# ----------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------


def read_metrics(path: str) -> list[dict]:
    """Metrics lines of a run, one per step (the last line wins when a step appears twice)."""
    if not os.path.isfile(path):
        return []
    by_step = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                record = json.loads(line)
                by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def truncate_metrics(path: str, last_step: int) -> None:
    """Drops lines logged after `last_step` (a run resumed from that step logs them again)."""
    records = [r for r in read_metrics(path) if r["step"] <= last_step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def write_loss_plots(records: list[dict], plots_dir: str, with_identity: bool) -> dict[str, str]:
    """One PNG per loss (G_A, G_B, D_A, D_B), cycle A and B, identity A and B (when on), and all eight together."""
    if not records:
        return {}
    steps = [r["step"] for r in records]
    smoothing = 0.99 if len(records) > 2000 else 0.9

    def series(*names):
        return {name: (steps, [r[name] for r in records]) for name in names}

    figures = {
        "G_A": (series("G_A"), "Generator A->B adversarial loss (G_A)"),
        "G_B": (series("G_B"), "Generator B->A adversarial loss (G_B)"),
        "D_A": (series("D_A"), "Discriminator of domain B (D_A)"),
        "D_B": (series("D_B"), "Discriminator of domain A (D_B)"),
        "cycle": (series("cycle_A", "cycle_B"), "Cycle-consistency losses (x lambda)"),
    }
    if with_identity:
        figures["identity"] = (series("idt_A", "idt_B"), "Identity losses (x lambda x lambda_identity)")
    figures["all"] = (series(*LOSS_NAMES), "CycleGAN losses")
    paths = {}
    for name, (data, title) in figures.items():
        paths[name] = os.path.join(plots_dir, f"loss_{name}.png")
        plot_curves(data, paths[name], title=title, ylabel="loss", smoothing=smoothing)
    return paths


def compact_png(path: str, colors: int = 192) -> None:
    """Rewrites an RGB PNG with a palette of `colors` colours (PIL's fast octree, `optimize=True`); 0 keeps it.

    Photos compress badly as lossless PNG: a 4-row grid of 128x128 horse2zebra tiles is ~820 KB in full colour,
    235-260 KB with 256 colours and 215-240 KB with 192, small enough to fetch back from a GPU machine and to put
    into documentation."""
    if not colors:
        return
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
    image.quantize(colors=colors, method=Image.Quantize.FASTOCTREE).save(path, format="PNG", optimize=True)


def fit_tiles(images: torch.Tensor, tile_size: int) -> torch.Tensor:
    """Downscales (N, C, H, W) images in [0, 1] so that their larger side is at most `tile_size` (0: unchanged)."""
    height, width = images.shape[-2:]
    if not tile_size or max(height, width) <= tile_size:
        return images
    scale = tile_size / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return torch.nn.functional.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def save_small_grid(images: torch.Tensor, path: str, nrow: int, colors: int = 192, tile_size: int = 128) -> None:
    """save_image_grid of images in [0, 1], tiles at most `tile_size` pixels, written as a `colors`-colour PNG."""
    save_image_grid(fit_tiles(images.float(), tile_size), path, nrow=nrow)
    compact_png(path, colors)


def save_epoch_grid(
    model: CycleGANModel, grid_a: torch.Tensor, grid_b: torch.Tensor, path: str, colors: int = 192, tile_size: int = 128
) -> None:
    """Rows of [A | G_A(A) | G_B(G_A(A)) | B | G_B(B) | G_A(G_B(B))] for the fixed test images."""
    with torch.no_grad():
        fake_b = model.generator_a_to_b(grid_a)
        reconstructed_a = model.generator_b_to_a(fake_b)
        fake_a = model.generator_b_to_a(grid_b)
        reconstructed_b = model.generator_a_to_b(fake_a)
    columns = (grid_a, fake_b, reconstructed_a, grid_b, fake_a, reconstructed_b)
    rows = torch.stack([torch.stack([column[i] for column in columns]) for i in range(len(grid_a))])
    images = ((rows.flatten(0, 1).float() + 1) / 2).clamp(0, 1).contiguous()
    save_small_grid(images, path, nrow=len(columns), colors=colors, tile_size=tile_size)


def grid_images(domain, count: int, size: int, device) -> torch.Tensor:
    return to_pixel_values(images_to_uint8_tensor(domain.select(range(count)), size, "grid images", False)).to(device)


def evaluate_cycle_consistency(model: CycleGANModel, test_a, test_b, size: int, device, batch_size: int = 16) -> dict:
    """Mean L1 distance (pixel values in [-1, 1]) between held-out images and their reconstructions:
    |G_B(G_A(a)) - a| over domain A and |G_A(G_B(b)) - b| over domain B."""
    results = {}
    directions = (("A", test_a, model.generator_a_to_b, model.generator_b_to_a),
                  ("B", test_b, model.generator_b_to_a, model.generator_a_to_b))
    for name, domain, forward, backward in directions:
        pixels = images_to_uint8_tensor(domain, size, f"evaluation images {name}", False)
        total = torch.zeros((), device=device)
        with torch.no_grad():
            for chunk in pixels.split(batch_size):
                images = to_pixel_values(chunk.to(device))
                total += (backward(forward(images)) - images).abs().mean(dim=(1, 2, 3)).sum()
        results[f"cycle_l1_{name}"] = total.item() / len(pixels)
    return results


def model_card_body(args, config: CycleGANConfig, results: dict, data_name: str) -> str:
    hyper_parameters = {
        "image size": config.image_size,
        "load size (before the random crop)": results["load_size"],
        "residual blocks": config.num_residual_blocks,
        "generator / discriminator filters": f"{config.generator_filters} / {config.discriminator_filters}",
        "norm": config.norm_type,
        "upsampling": config.upsample_mode,
        "GAN loss": config.gan_mode,
        "lambda_cycle": config.lambda_cycle,
        "lambda_identity": config.lambda_identity,
        "image pool size": config.pool_size,
        "epochs (decay epochs)": f"{args.num_train_epochs} ({args.num_decay_epochs})",
        "batch size per device x processes": f"{args.per_device_train_batch_size} x {results['num_processes']}",
        "Adam lr, betas": f"{args.learning_rate}, ({args.adam_beta1}, {args.adam_beta2})",
        "mixed precision": args.mixed_precision,
        "seed": args.seed,
    }
    table = "\n".join(f"| {key} | {value} |" for key, value in hyper_parameters.items())
    grid = results["grids"].get("last")
    grid_text = f"![Translations after the last epoch]({grid})\n\nEach row: A, G_A(A), G_B(G_A(A)), B, G_B(B), G_A(G_B(B)).\n" if grid else ""
    return f"""
# CycleGAN trained on {data_name}

Unpaired image-to-image translation (Zhu et al. 2017, "Unpaired Image-to-Image Translation using
Cycle-Consistent Adversarial Networks"), trained with `hf-dgm`'s `scripts/train_cyclegan.py`.
`generator_a_to_b` is the reference's G_A, `generator_b_to_a` G_B; `discriminator_b` (D_A) judges domain B.

## Use

```python
from modeling_cyclegan import CycleGANModel  # or AutoModel.from_pretrained(repo, trust_remote_code=True)
model = CycleGANModel.from_pretrained("{results['repo_id']}", with_discriminators=False)
translated = model.translate(pil_images, direction="a_to_b")  # list of PIL images
```

## Training

| hyper-parameter | value |
|---|---|
{table}

Held-out cycle-consistency L1 ({results['evaluation_split']} images, pixel values in [-1, 1]):
A -> B -> A {results['evaluation']['cycle_l1_A']:.4f}, B -> A -> B {results['evaluation']['cycle_l1_B']:.4f}.

Steps: {results['global_step']}, wall time {results['train_seconds']:.0f} s, {results['iterations_per_second']:.1f} it/s
on {results['device']}.

![Losses](plots/loss_all.png)

{grid_text}"""


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    script_start = time.perf_counter()
    import logging

    from accelerate.logging import get_logger

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger = get_logger(__name__)
    accelerator = setup_accelerator(args, "train_cyclegan")
    device = accelerator.device
    is_main = accelerator.is_main_process
    # Sampling and the pools draw from Python's `random`: give each process its own stream.
    random.seed(args.seed + accelerator.process_index)

    pusher = None
    if args.push_to_hub and is_main:
        pusher = HubPusher(
            args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)),
            resolve_hub_token(args.hub_token),
            private=args.hub_private_repo,
        )

    # Model and config.
    overrides = config_overrides_from_args(args, CycleGANConfig)
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    if args.model_name_or_path:
        model = CycleGANModel.from_pretrained(args.model_name_or_path, token=args.hub_token, **overrides)
        config = model.config
    else:
        config = CycleGANConfig(**overrides)
        model = CycleGANModel(config)
    load_size = args.load_size or default_load_size(config.image_size)
    if load_size < config.image_size:
        raise ValueError(f"--load_size {load_size} is smaller than the crop size --image_size {config.image_size}.")
    options = resolve_fast_path(args, device, accelerator.num_processes, config)
    if options.cuda_graphs or options.torch_compile or options.channels_last:
        torch.backends.cudnn.benchmark = True  # static shapes: let cuDNN pick the fastest kernels once
    logger.info(f"Step options: {options.describe()}", main_process_only=True)

    # Data: both domains resized once to the load size, kept on the device as uint8.
    evaluation_split = args.test_split
    with accelerator.main_process_first():  # the main process fills the datasets cache, the others read it
        train_a, train_b = load_unpaired_split(args.data_dir, args.dataset_name, "train", token=args.hub_token)
        try:
            test_a, test_b = load_unpaired_split(args.data_dir, args.dataset_name, evaluation_split, token=args.hub_token)
        except (FileNotFoundError, ValueError) as error:
            logger.warning(f"No test images ({error}); grids and evaluation use training images.", main_process_only=True)
            test_a, test_b, evaluation_split = train_a, train_b, "train"
    images_a = images_to_uint8_tensor(train_a, load_size, "domain A", is_main).to(device)
    images_b = images_to_uint8_tensor(train_b, load_size, "domain B", is_main).to(device)
    batch_size = args.per_device_train_batch_size
    sampler = UnpairedSampler(
        images_a, images_b, config.image_size, batch_size, args.seed, accelerator.process_index,
        accelerator.num_processes, flip=not args.no_flip,
    )
    steps_per_epoch = sampler.steps_per_epoch
    num_grid = min(args.num_grid_images, len(test_a), len(test_b))
    grid_a = grid_images(test_a, num_grid, config.image_size, device) if num_grid else None
    grid_b = grid_images(test_b, num_grid, config.image_size, device) if num_grid else None
    if is_main:
        preview_rng = random.Random(args.seed)  # its own stream: the training stream stays as checkpointed
        picks = [images[preview_rng.randrange(len(images))] for images in (images_a, images_b) for _ in range(8)]
        # The training images at the crop size (capped at --grid_tile_size), as a palette PNG.
        preview_tile = min(config.image_size, args.grid_tile_size) if args.grid_tile_size else config.image_size
        save_small_grid(torch.stack(picks).float().div(255), os.path.join(args.output_dir, "preview.png"), nrow=8,
                        colors=args.grid_colors, tile_size=preview_tile)

    # Networks, optimizers, pools, checkpoints.
    prepare_model(model, device, options)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        for tensor in model.state_dict().values():  # identical start on every process
            tensor.copy_(broadcast(tensor.clone(), from_process=0))
    optimizer_g, optimizer_d = build_optimizers(model, args.learning_rate, (args.adam_beta1, args.adam_beta2), options)
    pool_a, pool_b = ImagePool(config.pool_size), ImagePool(config.pool_size)
    train_step = CycleGANTrainStep(
        model, optimizer_g, optimizer_d, pool_a, pool_b, options, make_gradient_averager(accelerator)
    )
    accelerator.register_for_checkpointing(model, optimizer_g, optimizer_d, pool_a, pool_b)
    checkpoints = CheckpointManager(accelerator, args.output_dir, args.checkpoints_total_limit)
    state = checkpoints.resume(args.resume_from_checkpoint)
    global_step, start_epoch, skip_steps = 0, 0, 0
    if state is not None:
        global_step, start_epoch = state["step"], state["epoch"]
        skip_steps = state["extra"].get("step_in_epoch", 0)
        logger.info(f"Resumed at step {global_step} (epoch {start_epoch + 1}, step {skip_steps} of it).", main_process_only=True)
    metrics_path = os.path.join(args.output_dir, METRICS_FILE)
    if is_main:
        truncate_metrics(metrics_path, global_step)
    metrics = MetricsLogger(accelerator, metrics_path)

    # The loop. Losses stay on the device until `flush` fetches them all at once.
    real_a, real_b = new_batch_buffers(batch_size, config, device, options)
    history_g = torch.zeros((args.logging_steps, len(GENERATOR_LOSS_NAMES)), device=device)
    history_d = torch.zeros((args.logging_steps, len(DISCRIMINATOR_LOSS_NAMES)), device=device)
    pending: list[tuple[int, int, float]] = []  # (step, epoch, lr) of the rows in the histories
    total_steps = args.num_train_epochs * steps_per_epoch
    max_steps = min(total_steps, args.max_train_steps) if args.max_train_steps else total_steps
    step_interval = args.checkpointing_steps if isinstance(args.checkpointing_steps, int) else None
    checkpointing = args.checkpointing_steps != "no"  # "no": not even at the end of an epoch
    progress = tqdm(total=max_steps, initial=min(global_step, max_steps), disable=not is_main, desc="Training")

    grids_dir = os.path.join(args.output_dir, "grids")
    # Throughput excludes the start (warm-up, compile, capture) and the time spent on checkpoints and grids.
    timing = {"startup_seconds": None, "startup_steps": 0, "overhead_seconds": 0.0}

    def save_checkpoint(epoch: int, step_in_epoch: int) -> None:
        if not checkpointing:
            return
        started = time.perf_counter()
        path = checkpoints.save(global_step, epoch, {"step_in_epoch": step_in_epoch})
        if pusher is not None:  # uploads in the background; training goes on
            pusher.push_folder(path, path_in_repo=f"checkpoints/{os.path.basename(path)}",
                               commit_message=f"Checkpoint at step {global_step}")
        timing["overhead_seconds"] += time.perf_counter() - started

    def flush():
        if not pending:
            return
        count = len(pending)
        rows = torch.cat([history_g[:count], history_d[:count]], dim=1)
        if accelerator.num_processes > 1:
            rows = accelerator.reduce(rows.clone(), reduction="mean")
        names = GENERATOR_LOSS_NAMES + DISCRIMINATOR_LOSS_NAMES
        for (step, epoch, lr), values in zip(pending, rows.tolist()):  # the one device sync
            record = dict(zip(names, values))
            metrics.log({name: record[name] for name in LOSS_NAMES} | {"epoch": epoch, "lr": lr}, step=step)
        progress.set_postfix({name: f"{record[name]:.3f}" for name in ("G_A", "D_A", "cycle_A")})
        pending.clear()

    epoch_seconds, steps_this_run, stopped_early = [], 0, False
    loop_start = time.perf_counter()
    for epoch in range(start_epoch, args.num_train_epochs):
        if global_step >= max_steps:
            stopped_early = global_step < total_steps
            break
        learning_rate = args.learning_rate * learning_rate_factor(epoch, args.num_train_epochs, args.num_decay_epochs)
        train_step.set_learning_rate(learning_rate)
        batches = sampler.epoch_order(epoch)
        first_step = skip_steps if epoch == start_epoch else 0
        epoch_start = time.perf_counter()
        step_in_epoch = first_step
        for step_in_epoch in range(first_step, steps_per_epoch):
            if global_step >= max_steps:
                break
            sampler.fill_batch(real_a, real_b, batches[step_in_epoch])
            generator_values, discriminator_values = train_step(real_a, real_b)
            history_g[len(pending)].copy_(generator_values)
            history_d[len(pending)].copy_(discriminator_values)
            global_step += 1
            steps_this_run += 1
            pending.append((global_step, epoch + 1, learning_rate))
            progress.update(1)
            if steps_this_run == options.warmup_steps + 2:  # compile and graph capture are behind us
                flush()
                timing.update(startup_seconds=time.perf_counter() - loop_start, startup_steps=steps_this_run,
                              overhead_seconds=0.0)
            if len(pending) == args.logging_steps:
                flush()
            if step_interval and global_step % step_interval == 0 and step_in_epoch + 1 < steps_per_epoch:
                flush()
                save_checkpoint(epoch, step_in_epoch + 1)
        else:
            step_in_epoch = steps_per_epoch
        flush()
        if step_in_epoch < steps_per_epoch:  # stopped by --max_train_steps inside the epoch
            save_checkpoint(epoch, step_in_epoch)
            stopped_early = True
            break
        epoch_seconds.append(time.perf_counter() - epoch_start)
        if grid_a is not None and is_main:
            started = time.perf_counter()
            save_epoch_grid(model, grid_a, grid_b, os.path.join(grids_dir, f"epoch_{epoch + 1:03d}.png"),
                            colors=args.grid_colors, tile_size=args.grid_tile_size)
            timing["overhead_seconds"] += time.perf_counter() - started
        save_checkpoint(epoch + 1, 0)
    train_seconds = time.perf_counter() - loop_start
    progress.close()
    metrics.close()
    accelerator.wait_for_everyone()

    # Results, plots, final model.
    if is_main:
        records = read_metrics(metrics_path)
        plots = write_loss_plots(records, os.path.join(args.output_dir, "plots"), config.lambda_identity > 0)
        grid_names = sorted(os.listdir(grids_dir)) if os.path.isdir(grids_dir) else []
        grids = {}
        if grid_names:
            grids = {
                "first": f"grids/{grid_names[0]}",
                "middle": f"grids/{grid_names[(len(grid_names) - 1) // 2]}",
                "last": f"grids/{grid_names[-1]}",
            }
        last_epoch = records[-1]["epoch"] if records else None
        final_losses = {
            name: sum(r[name] for r in records if r["epoch"] == last_epoch)
            / max(1, sum(1 for r in records if r["epoch"] == last_epoch))
            for name in LOSS_NAMES
        } if records else {}
        evaluation = evaluate_cycle_consistency(model, test_a, test_b, config.image_size, device)
        iterations_per_second = steps_this_run / train_seconds if train_seconds > 0 else 0.0
        steady_rate = None
        if timing["startup_seconds"] is not None:
            steady_seconds = train_seconds - timing["startup_seconds"] - timing["overhead_seconds"]
            steady_steps = steps_this_run - timing["startup_steps"]
            steady_rate = steady_steps / steady_seconds if steady_steps > 0 and steady_seconds > 0 else None
        global_batch = batch_size * accelerator.num_processes
        results = {
            "completed": global_step >= total_steps,
            "stopped_early": stopped_early,
            "global_step": global_step,
            "total_steps": total_steps,
            "epochs_completed": global_step // steps_per_epoch,
            "num_train_epochs": args.num_train_epochs,
            "steps_per_epoch": steps_per_epoch,
            "steps_this_run": steps_this_run,
            "train_seconds": train_seconds,
            "script_seconds": time.perf_counter() - script_start,
            "startup_seconds": timing["startup_seconds"],
            "checkpoint_and_grid_seconds": timing["overhead_seconds"],
            "epoch_seconds": epoch_seconds,
            "iterations_per_second": iterations_per_second,
            "images_per_second": iterations_per_second * global_batch,
            "steady_iterations_per_second": steady_rate,
            "steady_images_per_second": steady_rate * global_batch if steady_rate else None,
            "images_per_second_counts": "images of one domain per second; every step also processes as many of the other",
            "num_processes": accelerator.num_processes,
            "per_device_train_batch_size": batch_size,
            "load_size": load_size,
            "train_images": {"A": len(images_a), "B": len(images_b)},
            "device": device_description(device),
            "torch_version": torch.__version__,
            "mixed_precision": args.mixed_precision,
            "fast_path": train_step.describe(),
            "final_epoch_mean_losses": final_losses,
            "evaluation": evaluation,
            "evaluation_split": evaluation_split,
            "repo_id": pusher.repo_id if pusher is not None else (args.hub_model_id or os.path.abspath(args.output_dir)),
            "grids": grids,
            "plots": {name: os.path.relpath(path, args.output_dir) for name, path in plots.items()},
            "preview": "preview.png",
            "config": config.to_diff_dict() if hasattr(config, "to_diff_dict") else config.to_dict(),
            "args": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "hub_token"},
        }
        # The final model: contiguous weights (channels_last is a training-time layout), image processor, card.
        state_dict = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        model.save_pretrained(args.output_dir, state_dict=state_dict)
        CycleGANImageProcessor(size=config.image_size).save_pretrained(args.output_dir)
        data_name = args.dataset_name or os.path.basename(os.path.normpath(args.data_dir))
        write_model_card(
            args.output_dir,
            model_name=os.path.basename(os.path.abspath(args.output_dir)),
            metadata={
                "library_name": "transformers",
                "license": "apache-2.0",
                "tags": ["cyclegan", "image-to-image", "unpaired-image-translation", "hf-dgm"],
                "pipeline_tag": "image-to-image",
                **({"datasets": [args.dataset_name]} if args.dataset_name else {}),
                "eval_results": [
                    {
                        "task_type": "image-to-image",
                        "dataset_type": args.dataset_name or data_name,
                        "dataset_name": data_name,
                        "dataset_split": evaluation_split,
                        "metric_type": f"cycle_l1_{domain}",
                        "metric_name": f"Cycle-consistency L1, {domain} -> {other} -> {domain}",
                        "metric_value": evaluation[f"cycle_l1_{domain}"],
                    }
                    for domain, other in (("A", "B"), ("B", "A"))
                ],
            },
            body=model_card_body(args, config, results, data_name),
        )
        write_json(os.path.join(args.output_dir, RESULTS_FILE), results)
        logger.info(
            f"Done: {global_step}/{total_steps} steps, {iterations_per_second:.1f} it/s "
            f"(steady {steady_rate or 0:.1f} it/s). Results in {args.output_dir}.",
            main_process_only=True,
        )
        if pusher is not None:
            pusher.push_folder(
                args.output_dir,
                commit_message=f"CycleGAN after {global_step} steps",
                ignore_patterns=["checkpoints/*", "logs/*", "*.tmp-*"],
            )
            pusher.wait()
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
