"""PyTorch CycleGAN (Zhu et al. 2017): ResNet generators, 70x70 PatchGAN discriminators and the paper's losses.

Faithful to the reference implementation (junyanz/pytorch-CycleGAN-and-pix2pix). Its names map to ours:

| reference | here               | role                                                     |
|-----------|--------------------|----------------------------------------------------------|
| G_A       | `generator_a_to_b` | translates A -> B                                        |
| G_B       | `generator_b_to_a` | translates B -> A                                        |
| D_A       | `discriminator_b`  | judges images of domain B (real B vs G_A(A))             |
| D_B       | `discriminator_a`  | judges images of domain A (real A vs G_B(B))             |

Loss names (`G_A`, `D_A`, `cycle_A`, `idt_A`, ...) keep the reference's spelling so logs compare one to one.
The state dict of a generator or discriminator is the reference's with `model.` renamed to `layers.`.

This file imports only torch, transformers and its sibling files (relative imports), because `save_pretrained`
copies it into the model folder for `trust_remote_code=True` loading.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_cyclegan import CycleGANConfig
from .image_processing_cyclegan import CycleGANImageProcessor
from .pipeline_cyclegan import ImageTranslationPipeline


# Loss names logged every step, in the reference's order and spelling.
LOSS_NAMES = ("D_A", "G_A", "cycle_A", "idt_A", "D_B", "G_B", "cycle_B", "idt_B")


def _norm_layer(config: CycleGANConfig, channels: int) -> nn.Module:
    if config.norm_type == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    return nn.BatchNorm2d(channels, affine=True, track_running_stats=True)


def _check_input_size(generator_class: type, height: int, width: int, name: str) -> None:
    """The generator's input-size rule (its `input_size_multiple`), for `config.image_size` and for pixel values."""
    multiple = generator_class.input_size_multiple
    if height % multiple or width % multiple:
        suggestion = max(multiple, multiple * round(height / multiple))
        raise ValueError(
            f"{name} has size {height}x{width}; height and width must be divisible by {multiple} for "
            f"{generator_class.__name__} ({generator_class.input_size_rule}). Resize or crop to e.g. {suggestion}."
        )


def _check_pixel_values(pixel_values: torch.Tensor, config: CycleGANConfig, name: str) -> None:
    """Shape and dtype checks that need no device sync (the value range is checked in `translate`)."""
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (N, C, H, W), got {type(pixel_values).__name__}.")
    if pixel_values.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(pixel_values.shape)}.")
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"{name} must be a float tensor in [-1, 1], got dtype {pixel_values.dtype}; use CycleGANImageProcessor."
        )
    if pixel_values.shape[1] != config.num_channels:
        raise ValueError(
            f"{name} has {pixel_values.shape[1]} channels but the model expects {config.num_channels} "
            "(CycleGANConfig.num_channels); convert grayscale/RGBA images to RGB."
        )
    height, width = pixel_values.shape[-2:]
    _check_input_size(GENERATOR_CLASSES[config.generator_type], height, width, name)


class CycleGANResidualBlock(nn.Module):
    """x + [pad, conv3x3, norm, ReLU, pad, conv3x3, norm](x), with reflection padding."""

    def __init__(self, config: CycleGANConfig, channels: int):
        super().__init__()
        bias = config.use_conv_bias
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, kernel_size=3, bias=bias),
            _norm_layer(config, channels),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, kernel_size=3, bias=bias),
            _norm_layer(config, channels),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.conv_block(hidden_states)


class CycleGANResizeConv(nn.Module):
    """Nearest-neighbour x2 resize then a 3x3 convolution: the checkerboard-free alternative to ConvTranspose2d."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool):
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.pad = nn.ReflectionPad2d(1)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pad(self.upsample(hidden_states)))


class CycleGANGenerator(nn.Module):
    """ResNet generator (`generator_type="resnet"`): c7s1-64, d128, d256, R256 x n, u128, u64, c7s1-3, tanh (for 64
    filters)."""

    input_size_multiple = 4
    input_size_rule = "two stride-2 downsamplings, undone by two x2 upsamplings"

    def __init__(self, config: CycleGANConfig):
        super().__init__()
        self.config = config
        filters, bias = config.generator_filters, config.use_conv_bias
        layers = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(config.num_channels, filters, kernel_size=7, bias=bias),
            _norm_layer(config, filters),
            nn.ReLU(True),
        ]
        for multiplier in (1, 2):  # two stride-2 downsamplings
            in_channels, out_channels = filters * multiplier, filters * multiplier * 2
            layers += [
                nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=bias),
                _norm_layer(config, out_channels),
                nn.ReLU(True),
            ]
        layers += [CycleGANResidualBlock(config, filters * 4) for _ in range(config.num_residual_blocks)]
        for multiplier in (4, 2):  # two x2 upsamplings
            in_channels, out_channels = filters * multiplier, filters * multiplier // 2
            if config.upsample_mode == "transposed":
                upsample = nn.ConvTranspose2d(
                    in_channels, out_channels, kernel_size=3, stride=2, padding=1, output_padding=1, bias=bias
                )
            else:
                upsample = CycleGANResizeConv(in_channels, out_channels, bias=bias)
            layers += [upsample, _norm_layer(config, out_channels), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(filters, config.num_channels, kernel_size=7), nn.Tanh()]
        self.layers = nn.Sequential(*layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.layers(pixel_values)


class CycleGANDiscriminator(nn.Module):
    """PatchGAN (`discriminator_type="patchgan"`): C64 (no norm) - C128 - C256 (stride 2) - C512 (stride 1) - 1-channel
    conv, 4x4 kernels, LeakyReLU 0.2. With 3 layers each output cell sees a 70x70 patch; 30x30 outputs for 256x256
    inputs."""

    def __init__(self, config: CycleGANConfig):
        super().__init__()
        filters, bias = config.discriminator_filters, config.use_conv_bias
        layers = [
            nn.Conv2d(config.num_channels, filters, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        multiplier = 1
        for layer in range(1, config.discriminator_layers + 1):
            previous, multiplier = multiplier, min(2**layer, 8)
            stride = 2 if layer < config.discriminator_layers else 1  # the last one keeps the resolution
            layers += [
                nn.Conv2d(filters * previous, filters * multiplier, kernel_size=4, stride=stride, padding=1, bias=bias),
                _norm_layer(config, filters * multiplier),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(filters * multiplier, 1, kernel_size=4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.layers(pixel_values)


# The architectures `CycleGANConfig.generator_type` / `discriminator_type` choose from. A generator class is built
# from the config, maps (N, C, H, W) in [-1, 1] to the same shape, and states its input-size rule as
# `input_size_multiple` (with `input_size_rule`, the reason); a discriminator class maps images to patch scores.
# A new architecture is one class here plus its name in the config's GENERATOR_TYPES / DISCRIMINATOR_TYPES.
GENERATOR_CLASSES = {"resnet": CycleGANGenerator}
DISCRIMINATOR_CLASSES = {"patchgan": CycleGANDiscriminator}


@dataclass
class CycleGANOutput(ModelOutput):
    r"""
    Images produced by one CycleGAN forward pass (all in [-1, 1]). Fields of a domain whose input was not given are
    `None`; identity images are computed when `lambda_identity > 0` (or when asked for).

    fake_b (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
        `generator_a_to_b(pixel_values_a)`.
    fake_a (`torch.FloatTensor`):
        `generator_b_to_a(pixel_values_b)`.
    reconstructed_a (`torch.FloatTensor`):
        `generator_b_to_a(fake_b)`, compared with `pixel_values_a` by the cycle loss (`cycle_A`).
    reconstructed_b (`torch.FloatTensor`):
        `generator_a_to_b(fake_a)`, compared with `pixel_values_b` by the cycle loss (`cycle_B`).
    identity_a (`torch.FloatTensor`):
        `generator_b_to_a(pixel_values_a)`: an A image given to the B -> A generator should come out unchanged
        (identity loss `idt_B`).
    identity_b (`torch.FloatTensor`):
        `generator_a_to_b(pixel_values_b)` (identity loss `idt_A`).
    """

    fake_b: torch.FloatTensor | None = None
    fake_a: torch.FloatTensor | None = None
    reconstructed_a: torch.FloatTensor | None = None
    reconstructed_b: torch.FloatTensor | None = None
    identity_a: torch.FloatTensor | None = None
    identity_b: torch.FloatTensor | None = None


def gan_loss(prediction: torch.Tensor, target_is_real: bool, gan_mode: str = "lsgan") -> torch.Tensor:
    """Adversarial loss of a discriminator output against an all-real or all-fake target.

    `lsgan`: mean squared error to 1 (real) or 0 (fake). `vanilla`: binary cross-entropy on logits. Computed in
    float32 (also under bf16 autocast).
    """
    prediction = prediction.float()
    target = torch.ones_like(prediction) if target_is_real else torch.zeros_like(prediction)
    if gan_mode == "lsgan":
        return F.mse_loss(prediction, target)
    if gan_mode == "vanilla":
        return F.binary_cross_entropy_with_logits(prediction, target)
    raise ValueError(f"gan_mode must be 'lsgan' or 'vanilla', got {gan_mode!r}.")


def _l1(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(prediction.float(), target.float())


# Copied from modeling_maf.modeling_maf.name_custom_pipelines
def name_custom_pipelines(config, pipelines) -> None:
    """Names each of `pipelines` (task -> `Pipeline` subclass) in `config.custom_pipelines`, as transformers'
    `Pipeline.save_pretrained` names them, so `pipeline(task, model=<folder or repo>, trust_remote_code=True)` finds
    it in the file that `save_pretrained` copies next to the model (the pipeline's module is a relative import of the
    modeling file)."""
    custom_pipelines = dict(getattr(config, "custom_pipelines", None) or {})
    for task, pipeline_class in pipelines.items():
        module = pipeline_class.__module__.rsplit(".", 1)[-1]
        custom_pipelines[task] = {"impl": f"{module}.{pipeline_class.__name__}", "pt": ["AutoModel"], "type": "image"}
    config.custom_pipelines = custom_pipelines


class CycleGANPreTrainedModel(PreTrainedModel):
    config_class = CycleGANConfig
    base_model_prefix = "cyclegan"
    main_input_name = "pixel_values_a"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False
    # The transformers pipelines that travel with the model (see `save_pretrained`).
    pipelines = {"image-translation": ImageTranslationPipeline}

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained` (and so `push_to_hub`), with the pipelines of `pipelines` named in
        config.json under `custom_pipelines`, as transformers' `Pipeline.save_pretrained` names them; their file is
        a relative import of this one, so it is copied with it. `pipeline(task, model=<folder or repo>,
        trust_remote_code=True)` then builds them without this package installed."""
        name_custom_pipelines(self.config, self.pipelines)
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        """N(0, init_gain) convolution weights and zero biases; BatchNorm scales N(1, init_gain) (reference)."""
        gain = self.config.init_gain
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            init.normal_(module.weight, mean=0.0, std=gain)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.normal_(module.weight, mean=1.0, std=gain)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)


class CycleGANModel(CycleGANPreTrainedModel):
    r"""
    CycleGAN: `generator_a_to_b`, `generator_b_to_a` and `discriminator_a`, `discriminator_b` (`discriminator_b` judges
    images of domain B), of the classes `config.generator_type` and `config.discriminator_type` name (by default
    ResNet generators and 70x70 PatchGANs).

    Args:
        config ([`CycleGANConfig`]): Model configuration.
        with_discriminators (`bool`, *optional*, defaults to `True`):
            Build the discriminators. Inference only needs the generators:
            `CycleGANModel.from_pretrained(path, with_discriminators=False)` loads the two generators and skips the
            discriminator weights (without warnings), and `save_pretrained` of such a model writes an
            inference-only checkpoint.
    """

    def __init__(self, config: CycleGANConfig, with_discriminators: bool = True):
        super().__init__(config)
        generator_class = GENERATOR_CLASSES[config.generator_type]
        _check_input_size(generator_class, config.image_size, config.image_size, "CycleGANConfig.image_size")
        self.generator_a_to_b = generator_class(config)
        self.generator_b_to_a = generator_class(config)
        if with_discriminators:
            discriminator_class = DISCRIMINATOR_CLASSES[config.discriminator_type]
            self.discriminator_a = discriminator_class(config)
            self.discriminator_b = discriminator_class(config)
        else:
            self.discriminator_a = self.discriminator_b = None
            # Loading a full checkpoint into a generators-only model: the discriminator weights are not wanted.
            self._keys_to_ignore_on_load_unexpected = [r"^discriminator_[ab]\."]
        self.post_init()

    @property
    def has_discriminators(self) -> bool:
        return self.discriminator_a is not None

    def _require_discriminators(self, what: str) -> None:
        if not self.has_discriminators:
            raise ValueError(
                f"{what} needs the discriminators, but this model was built with with_discriminators=False "
                "(inference only). Load it with CycleGANModel.from_pretrained(path) to train."
            )

    def forward(
        self,
        pixel_values_a: torch.Tensor | None = None,
        pixel_values_b: torch.Tensor | None = None,
        compute_identity: bool | None = None,
        batch_passes: bool | None = None,
        return_dict: bool | None = None,
    ) -> CycleGANOutput | tuple:
        r"""
        Runs the generators the way one training step does: A -> B -> A and B -> A -> B, plus the identity
        mappings.

        Args:
            pixel_values_a (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`, *optional*):
                Images of domain A in [-1, 1] (see [`CycleGANImageProcessor`]).
            pixel_values_b (`torch.FloatTensor`, *optional*):
                Images of domain B in [-1, 1].
            compute_identity (`bool`, *optional*):
                Also compute `identity_a`/`identity_b`. Defaults to `config.lambda_identity > 0`.
            batch_passes (`bool`, *optional*):
                Run the passes that share a generator as one batch: 3 generator calls instead of 6. Exact with
                instance norm (each image is normalised on its own); with batch norm it would change the
                statistics, so it defaults to `True` only for `norm_type="instance"`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if pixel_values_a is None and pixel_values_b is None:
            raise ValueError("Pass pixel_values_a, pixel_values_b or both.")
        for name, values in (("pixel_values_a", pixel_values_a), ("pixel_values_b", pixel_values_b)):
            if values is not None:
                _check_pixel_values(values, self.config, name)
        if compute_identity is None:
            compute_identity = self.config.lambda_identity > 0
        if batch_passes is None:
            batch_passes = self.config.norm_type == "instance"
        both = pixel_values_a is not None and pixel_values_b is not None
        if both and pixel_values_a.shape != pixel_values_b.shape:
            batch_passes = False  # cannot concatenate different shapes

        if both and batch_passes:
            a, b = pixel_values_a, pixel_values_b
            n = a.shape[0]
            # 1) G_A on [A, B] -> fake B (and identity B). 2) G_B on [B, fake B, A] -> fake A, reconstructed A
            # (and identity A). 3) G_A on fake A -> reconstructed B.
            first = self.generator_a_to_b(torch.cat([a, b]) if compute_identity else a)
            fake_b = first[:n]
            identity_b = first[n:] if compute_identity else None
            second = self.generator_b_to_a(torch.cat([b, fake_b, a] if compute_identity else [b, fake_b]))
            fake_a, reconstructed_a = second[:n], second[n : 2 * n]
            identity_a = second[2 * n :] if compute_identity else None
            reconstructed_b = self.generator_a_to_b(fake_a)
        else:
            fake_b = reconstructed_a = identity_a = fake_a = reconstructed_b = identity_b = None
            if pixel_values_a is not None:
                fake_b = self.generator_a_to_b(pixel_values_a)
                reconstructed_a = self.generator_b_to_a(fake_b)
                identity_a = self.generator_b_to_a(pixel_values_a) if compute_identity else None
            if pixel_values_b is not None:
                fake_a = self.generator_b_to_a(pixel_values_b)
                reconstructed_b = self.generator_a_to_b(fake_a)
                identity_b = self.generator_a_to_b(pixel_values_b) if compute_identity else None

        output = CycleGANOutput(
            fake_b=fake_b,
            fake_a=fake_a,
            reconstructed_a=reconstructed_a,
            reconstructed_b=reconstructed_b,
            identity_a=identity_a,
            identity_b=identity_b,
        )
        return output if return_dict else output.to_tuple()

    def generator_loss(
        self, outputs: CycleGANOutput, pixel_values_a: torch.Tensor, pixel_values_b: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        r"""
        The generators' objective of the paper, from a forward pass on both domains:

            G_A = GAN(D_A(G_A(a)), real)      cycle_A = lambda_cycle * |G_B(G_A(a)) - a|_1
            G_B = GAN(D_B(G_B(b)), real)      cycle_B = lambda_cycle * |G_A(G_B(b)) - b|_1
            idt_A = lambda_cycle * lambda_identity * |G_A(b) - b|_1
            idt_B = lambda_cycle * lambda_identity * |G_B(a) - a|_1

        (reference names: D_A is `discriminator_b`, D_B is `discriminator_a`). Returns these six float32 scalars
        and their sum under `"total"`. Freeze the discriminators (`requires_grad_(False)`) before the backward
        pass if their gradients are not wanted, as the reference does.
        """
        self._require_discriminators("generator_loss")
        if outputs.fake_a is None or outputs.fake_b is None:
            raise ValueError("generator_loss needs a forward pass on both domains (pixel_values_a and pixel_values_b).")
        config = self.config
        losses = {
            "G_A": gan_loss(self.discriminator_b(outputs.fake_b), True, config.gan_mode),
            "G_B": gan_loss(self.discriminator_a(outputs.fake_a), True, config.gan_mode),
            "cycle_A": _l1(outputs.reconstructed_a, pixel_values_a) * config.lambda_cycle,
            "cycle_B": _l1(outputs.reconstructed_b, pixel_values_b) * config.lambda_cycle,
        }
        identity_weight = config.lambda_cycle * config.lambda_identity
        if identity_weight > 0:
            if outputs.identity_a is None or outputs.identity_b is None:
                raise ValueError("lambda_identity > 0 but the forward pass computed no identity images.")
            losses["idt_A"] = _l1(outputs.identity_b, pixel_values_b) * identity_weight
            losses["idt_B"] = _l1(outputs.identity_a, pixel_values_a) * identity_weight
        else:
            zero = losses["G_A"].new_zeros(())
            losses["idt_A"] = losses["idt_B"] = zero
        losses["total"] = sum(losses[name] for name in ("G_A", "G_B", "cycle_A", "cycle_B", "idt_A", "idt_B"))
        return losses

    def discriminator_loss(
        self,
        real_a: torch.Tensor,
        real_b: torch.Tensor,
        fake_a: torch.Tensor,
        fake_b: torch.Tensor,
        batch_passes: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        r"""
        The discriminators' objective: `D_A = 0.5 * (GAN(D_A(b), real) + GAN(D_A(fake_b), fake))` for
        `discriminator_b` (reference D_A) and `D_B` likewise for `discriminator_a` on `real_a`/`fake_a`. The fakes
        are detached (pass them through an [`ImagePool`] first, as the paper does). Returns `D_A`, `D_B` and their
        sum under `"total"`. `batch_passes` scores real and fake in one call (exact with instance norm).
        """
        self._require_discriminators("discriminator_loss")
        if batch_passes is None:
            batch_passes = self.config.norm_type == "instance"
        gan_mode = self.config.gan_mode

        def one_side(discriminator, real, fake):
            fake = fake.detach()
            if batch_passes and real.shape == fake.shape:
                pred_real, pred_fake = discriminator(torch.cat([real, fake])).chunk(2)
            else:
                pred_real, pred_fake = discriminator(real), discriminator(fake)
            return 0.5 * (gan_loss(pred_real, True, gan_mode) + gan_loss(pred_fake, False, gan_mode))

        losses = {
            "D_A": one_side(self.discriminator_b, real_b, fake_b),
            "D_B": one_side(self.discriminator_a, real_a, fake_a),
        }
        losses["total"] = losses["D_A"] + losses["D_B"]
        return losses

    @torch.no_grad()
    def translate(self, images, direction: str = "a_to_b", image_processor: CycleGANImageProcessor | None = None):
        r"""
        Translates images with one generator (no gradients; the train/eval mode is left as it is).

        Args:
            images: a float tensor `(N, C, H, W)` in [-1, 1], or PIL images (one or a list).
            direction (`str`): `"a_to_b"` or `"b_to_a"`.
            image_processor ([`CycleGANImageProcessor`], *optional*): used for PIL inputs; defaults to one that
                resizes to `config.image_size`.

        Returns:
            a tensor in [-1, 1] for tensor inputs; a list of PIL images for PIL inputs.
        """
        generators = {"a_to_b": self.generator_a_to_b, "b_to_a": self.generator_b_to_a}
        if direction not in generators:
            raise ValueError(f"direction must be 'a_to_b' or 'b_to_a', got {direction!r}.")
        generator = generators[direction]
        if isinstance(images, torch.Tensor):
            _check_pixel_values(images, self.config, "images")
            low, high = images.min().item(), images.max().item()
            if low < -1.001 or high > 1.001:
                raise ValueError(
                    f"translate expects pixel values in [-1, 1], got [{low:.3g}, {high:.3g}]; preprocess images with "
                    "CycleGANImageProcessor (or pass PIL images)."
                )
            parameter = next(generator.parameters())
            return generator(images.to(device=parameter.device, dtype=parameter.dtype))
        processor = image_processor or CycleGANImageProcessor(size=self.config.image_size)
        pixel_values = processor(images, return_tensors="pt")["pixel_values"]
        return processor.postprocess(self.translate(pixel_values, direction), output_type="pil")


__all__ = [
    "CycleGANPreTrainedModel",
    "CycleGANModel",
    "CycleGANOutput",
    "CycleGANGenerator",
    "CycleGANDiscriminator",
    "GENERATOR_CLASSES",
    "DISCRIMINATOR_CLASSES",
    "gan_loss",
    "LOSS_NAMES",
]
