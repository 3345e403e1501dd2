"""Configuration of CycleGAN (Zhu et al. 2017, "Unpaired Image-to-Image Translation using Cycle-Consistent
Adversarial Networks")."""

from transformers import PreTrainedConfig


# Names of the registered architectures; the classes are modeling_cyclegan.GENERATOR_CLASSES / DISCRIMINATOR_CLASSES.
GENERATOR_TYPES = ("resnet",)
DISCRIMINATOR_TYPES = ("patchgan",)
NORM_TYPES = ("instance", "batch")
UPSAMPLE_MODES = ("transposed", "resize_conv")
GAN_MODES = ("lsgan", "vanilla")


class CycleGANConfig(PreTrainedConfig):
    r"""
    Configuration of a [`CycleGANModel`]: two generators (A -> B and B -> A) and two discriminators, by default the
    paper's ResNet generators and 70x70 PatchGANs, plus the weights of the training objective.

    The defaults are the paper's and the reference implementation's (junyanz/pytorch-CycleGAN-and-pix2pix).

    Args:
        image_size (`int`, *optional*, defaults to 256):
            Training resolution (height and width). The networks are fully convolutional and accept any height and
            width that the generator's input-size rule allows (the ResNet generator: multiples of 4); this size
            chooses the default number of residual blocks and the size the image processor resizes to.
        generator_type (`str`, *optional*, defaults to `"resnet"`):
            Architecture of both generators, a key of `GENERATOR_CLASSES`: `"resnet"` (c7s1-64, d128, d256, residual
            blocks, u128, u64, c7s1-3).
        discriminator_type (`str`, *optional*, defaults to `"patchgan"`):
            Architecture of both discriminators, a key of `DISCRIMINATOR_CLASSES`: `"patchgan"` (the 70x70
            PatchGAN with 3 layers).
        num_channels (`int`, *optional*, defaults to 3):
            Channels of the images of both domains.
        generator_filters (`int`, *optional*, defaults to 64):
            Filters of the first generator convolution ("ngf"); the generator uses 1x, 2x and 4x this.
        num_residual_blocks (`int`, *optional*):
            Residual blocks of the generator. Defaults to 6 when `image_size` < 256 and 9 otherwise (the paper).
        discriminator_filters (`int`, *optional*, defaults to 64):
            Filters of the first PatchGAN convolution ("ndf").
        discriminator_layers (`int`, *optional*, defaults to 3):
            Stride-2 layers of the PatchGAN; 3 gives the 70x70 receptive field.
        norm_type (`str`, *optional*, defaults to `"instance"`):
            `"instance"` (InstanceNorm2d without affine parameters or running statistics; convolutions keep their
            bias) or `"batch"` (BatchNorm2d; convolutions before a norm have no bias).
        upsample_mode (`str`, *optional*, defaults to `"transposed"`):
            `"transposed"`: ConvTranspose2d(k3, s2, p1, output_padding 1) as in the paper. `"resize_conv"`:
            nearest-neighbour x2 resize then a 3x3 convolution (same parameter count), against checkerboards.
        gan_mode (`str`, *optional*, defaults to `"lsgan"`):
            `"lsgan"` (least squares: MSE to 1 for real, 0 for fake; the paper) or `"vanilla"` (binary
            cross-entropy on logits).
        lambda_cycle (`float`, *optional*, defaults to 10.0):
            Weight of the cycle-consistency L1 losses (both directions).
        lambda_identity (`float`, *optional*, defaults to 0.5):
            Identity loss weight relative to `lambda_cycle` (the loss is `lambda_identity * lambda_cycle * L1`);
            0 disables it.
        pool_size (`int`, *optional*, defaults to 50):
            Size of each image history buffer the discriminators see fakes from; 0 disables it.
        init_gain (`float`, *optional*, defaults to 0.02):
            Standard deviation of the N(0, init_gain) weight initialisation.
    """

    model_type = "cyclegan"

    def __init__(
        self,
        image_size: int = 256,
        num_channels: int = 3,
        generator_type: str = "resnet",
        discriminator_type: str = "patchgan",
        generator_filters: int = 64,
        num_residual_blocks: int | None = None,
        discriminator_filters: int = 64,
        discriminator_layers: int = 3,
        norm_type: str = "instance",
        upsample_mode: str = "transposed",
        gan_mode: str = "lsgan",
        lambda_cycle: float = 10.0,
        lambda_identity: float = 0.5,
        pool_size: int = 50,
        init_gain: float = 0.02,
        **kwargs,
    ):
        self.image_size = image_size
        self.num_channels = num_channels
        self.generator_type = generator_type
        self.discriminator_type = discriminator_type
        self.generator_filters = generator_filters
        # The paper uses 6 blocks for 128x128 images and 9 for 256x256 and larger.
        if num_residual_blocks is None and isinstance(image_size, int):
            num_residual_blocks = 6 if image_size < 256 else 9
        self.num_residual_blocks = num_residual_blocks
        self.discriminator_filters = discriminator_filters
        self.discriminator_layers = discriminator_layers
        self.norm_type = norm_type
        self.upsample_mode = upsample_mode
        self.gan_mode = gan_mode
        self.lambda_cycle = lambda_cycle
        self.lambda_identity = lambda_identity
        self.pool_size = pool_size
        self.init_gain = init_gain
        self._validate_cyclegan_fields()
        super().__init__(**kwargs)

    def _validate_cyclegan_fields(self) -> None:
        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CycleGANConfig.{name} must be a positive integer, got {value!r}.")

        for name in ("image_size", "num_channels", "generator_filters", "num_residual_blocks"):
            positive_int(name)
        for name in ("discriminator_filters", "discriminator_layers"):
            positive_int(name)
        choices = {
            "generator_type": GENERATOR_TYPES,
            "discriminator_type": DISCRIMINATOR_TYPES,
            "norm_type": NORM_TYPES,
            "upsample_mode": UPSAMPLE_MODES,
            "gan_mode": GAN_MODES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"CycleGANConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        for name in ("lambda_cycle", "lambda_identity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"CycleGANConfig.{name} must be a number >= 0, got {value!r}.")
        if isinstance(self.pool_size, bool) or not isinstance(self.pool_size, int) or self.pool_size < 0:
            raise ValueError("CycleGANConfig.pool_size must be an integer >= 0 (0 disables the pool), got "
                             f"{self.pool_size!r}.")
        if isinstance(self.init_gain, bool) or not isinstance(self.init_gain, (int, float)) or self.init_gain <= 0:
            raise ValueError(f"CycleGANConfig.init_gain must be a positive number, got {self.init_gain!r}.")

    @property
    def use_conv_bias(self) -> bool:
        """Convolutions followed by a norm have a bias only with instance norm (BatchNorm has its own shift)."""
        return self.norm_type == "instance"


__all__ = ["CycleGANConfig"]
