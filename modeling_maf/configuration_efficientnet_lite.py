"""Configuration of EfficientNet-Lite, the ImageNet CNN used as a frozen feature backbone."""

import math

from transformers import PreTrainedConfig

from .backbone_utils import BackboneConfigMixin


# (width multiplier, depth multiplier, training resolution, classifier dropout) of the Lite family, as in the
# EfficientNet-Lite builder of the TensorFlow TPU models (efficientnet_lite_builder.py).
EFFICIENTNET_LITE_VARIANTS = {
    "efficientnet-lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet-lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet-lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet-lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet-lite4": (1.4, 1.8, 300, 0.3),
}
# Input normalisation of the TensorFlow EfficientNet-Lite checkpoints: (x - 127) / 128 on 8-bit pixels, written for
# pixel values in [0, 1] as image processors take them.
LITE_IMAGE_MEAN = [127.0 / 255.0] * 3
LITE_IMAGE_STD = [128.0 / 255.0] * 3


class EfficientNetLiteConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of an [`EfficientNetLiteBackbone`] (or [`EfficientNetLiteForImageClassification`]).

    EfficientNet-Lite is EfficientNet without squeeze-and-excitation, with ReLU6 instead of swish, and with the stem
    (32 channels) and the head (1280 channels) kept at their size for every width multiplier; the first and last
    stages also keep their depth. The defaults are EfficientNet-Lite0; `EfficientNetLiteConfig.from_variant(
    "efficientnet-lite3")` gives another member of the family. Convolutions pad like TensorFlow's "SAME" (asymmetric
    for stride 2), which is how the ImageNet checkpoints were trained.

    The stages are `stage_names = ["stem", "stage1", ..., "stage7", "head"]`: the stem convolution, the seven groups
    of MBConv blocks (each group's output), and the 1x1 head convolution. For Lite0 their channels are 32, 16, 24, 40,
    80, 112, 192, 320, 1280 and their strides 2, 2, 4, 8, 16, 16, 32, 32, 32.

    Args:
        num_channels (`int`, *optional*, defaults to 3):
            Channels of the input images.
        width_coefficient (`float`, *optional*, defaults to 1.0):
            Width multiplier of the blocks' channels (rounded to multiples of `depth_divisor`).
        depth_coefficient (`float`, *optional*, defaults to 1.0):
            Depth multiplier of the number of blocks of stages 2 to 6 (rounded up).
        depth_divisor (`int`, *optional*, defaults to 8):
            Channel counts are rounded to multiples of this.
        stem_channels (`int`, *optional*, defaults to 32):
            Output channels of the stem (not scaled by `width_coefficient`).
        head_channels (`int`, *optional*, defaults to 1280):
            Output channels of the head convolution (not scaled by `width_coefficient`).
        out_channels (`list[int]`, *optional*, defaults to `[16, 24, 40, 80, 112, 192, 320]`):
            Output channels of every stage before width scaling.
        num_repeats (`list[int]`, *optional*, defaults to `[1, 2, 2, 3, 3, 4, 1]`):
            Blocks of every stage before depth scaling.
        kernel_sizes (`list[int]`, *optional*, defaults to `[3, 3, 5, 3, 5, 5, 3]`):
            Depthwise kernel size of every stage.
        strides (`list[int]`, *optional*, defaults to `[1, 2, 2, 2, 1, 2, 1]`):
            Stride of the first block of every stage.
        expand_ratios (`list[int]`, *optional*, defaults to `[1, 6, 6, 6, 6, 6, 6]`):
            Expansion ratio of the inverted bottleneck of every stage.
        hidden_act (`str`, *optional*, defaults to `"relu6"`):
            Activation (a key of `transformers.activations.ACT2FN`).
        batch_norm_eps (`float`, *optional*, defaults to 1e-3):
            Epsilon of the batch norms (TensorFlow's default for these models).
        batch_norm_momentum (`float`, *optional*, defaults to 0.01):
            PyTorch momentum of the batch norms (TensorFlow's decay 0.99).
        drop_connect_rate (`float`, *optional*, defaults to 0.0):
            Stochastic depth of the residual blocks in training mode, scaled linearly with the block index (the Lite
            recipe trained with 0.2). A frozen backbone in eval mode never uses it.
        dropout_rate (`float`, *optional*, defaults to 0.2):
            Dropout before the classifier of [`EfficientNetLiteForImageClassification`].
        image_size (`int`, *optional*, defaults to 224):
            Resolution the weights were trained at; informative, the network takes any size.
        image_mean (`list[float]`, *optional*, defaults to `[127/255] * 3`):
            Mean to subtract from pixel values in [0, 1] before the network (the image processor's `image_mean`).
        image_std (`list[float]`, *optional*, defaults to `[128/255] * 3`):
            Standard deviation to divide by after subtracting the mean (the image processor's `image_std`).
        out_features (`list[str]`, *optional*):
            Stages to return (names from `stage_names`); default the last. Aligned with `out_indices`.
        out_indices (`list[int]`, *optional*):
            Indices of the stages to return in `stage_names`; aligned with `out_features`.

    Example:
    ```python
    >>> from modeling_maf import EfficientNetLiteBackbone, EfficientNetLiteConfig
    >>> config = EfficientNetLiteConfig(out_features=["stage3", "stage5"])
    >>> backbone = EfficientNetLiteBackbone(config)
    >>> backbone.channels, backbone.strides
    ([40, 112], [8, 16])
    ```
    """

    model_type = "efficientnet_lite"

    def __init__(
        self,
        num_channels: int = 3,
        width_coefficient: float = 1.0,
        depth_coefficient: float = 1.0,
        depth_divisor: int = 8,
        stem_channels: int = 32,
        head_channels: int = 1280,
        out_channels: list[int] | None = None,
        num_repeats: list[int] | None = None,
        kernel_sizes: list[int] | None = None,
        strides: list[int] | None = None,
        expand_ratios: list[int] | None = None,
        hidden_act: str = "relu6",
        batch_norm_eps: float = 1e-3,
        batch_norm_momentum: float = 0.01,
        drop_connect_rate: float = 0.0,
        dropout_rate: float = 0.2,
        image_size: int = 224,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        out_features: list[str] | None = None,
        out_indices: list[int] | None = None,
        **kwargs,
    ):
        kwargs.pop("stage_names", None)  # derived from the stages, rebuilt below
        self.num_channels = num_channels
        self.width_coefficient = width_coefficient
        self.depth_coefficient = depth_coefficient
        self.depth_divisor = depth_divisor
        self.stem_channels = stem_channels
        self.head_channels = head_channels
        self.out_channels = list(out_channels) if out_channels is not None else [16, 24, 40, 80, 112, 192, 320]
        self.num_repeats = list(num_repeats) if num_repeats is not None else [1, 2, 2, 3, 3, 4, 1]
        self.kernel_sizes = list(kernel_sizes) if kernel_sizes is not None else [3, 3, 5, 3, 5, 5, 3]
        self.strides = list(strides) if strides is not None else [1, 2, 2, 2, 1, 2, 1]
        self.expand_ratios = list(expand_ratios) if expand_ratios is not None else [1, 6, 6, 6, 6, 6, 6]
        self.hidden_act = hidden_act
        self.batch_norm_eps = batch_norm_eps
        self.batch_norm_momentum = batch_norm_momentum
        self.drop_connect_rate = drop_connect_rate
        self.dropout_rate = dropout_rate
        self.image_size = image_size
        self.image_mean = list(image_mean) if image_mean is not None else list(LITE_IMAGE_MEAN)
        self.image_std = list(image_std) if image_std is not None else list(LITE_IMAGE_STD)
        self._validate_stages()
        self.stage_names = ["stem"] + [f"stage{index}" for index in range(1, len(self.out_channels) + 1)] + ["head"]
        super().__init__(**kwargs)
        self.set_output_features_output_indices(
            out_features=list(out_features) if out_features is not None else None,
            out_indices=list(out_indices) if out_indices is not None else None,
        )

    def _validate_stages(self):
        lists = {name: getattr(self, name) for name in
                 ("out_channels", "num_repeats", "kernel_sizes", "strides", "expand_ratios")}
        if len({len(value) for value in lists.values()}) != 1 or not self.out_channels:
            raise ValueError(f"EfficientNetLiteConfig: out_channels, num_repeats, kernel_sizes, strides and "
                             f"expand_ratios must be non-empty lists of one length (one entry per stage), got {lists}.")
        if self.width_coefficient <= 0 or self.depth_coefficient <= 0:
            raise ValueError(f"EfficientNetLiteConfig: width_coefficient and depth_coefficient must be positive, got "
                             f"{self.width_coefficient} and {self.depth_coefficient}.")
        if any(size % 2 == 0 for size in self.kernel_sizes):
            raise ValueError(f"EfficientNetLiteConfig: kernel_sizes must be odd, got {self.kernel_sizes}.")
        if len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            raise ValueError(f"EfficientNetLiteConfig: image_mean and image_std need one value per channel "
                             f"(num_channels={self.num_channels}), got {self.image_mean} and {self.image_std}.")

    @classmethod
    def from_variant(cls, name: str = "efficientnet-lite0", **kwargs) -> "EfficientNetLiteConfig":
        """The configuration of one member of the family, `"efficientnet-lite0"` to `"efficientnet-lite4"` (a short
        `"lite2"` works too); keyword arguments override fields (e.g. `out_features`)."""
        key = name if name.startswith("efficientnet-") else f"efficientnet-{name}"
        if key not in EFFICIENTNET_LITE_VARIANTS:
            raise ValueError(f"Unknown EfficientNet-Lite variant {name!r}; use one of "
                             f"{list(EFFICIENTNET_LITE_VARIANTS)}.")
        width, depth, resolution, dropout = EFFICIENTNET_LITE_VARIANTS[key]
        values = {"width_coefficient": width, "depth_coefficient": depth, "image_size": resolution,
                  "dropout_rate": dropout}
        values.update(kwargs)
        return cls(**values)

    def round_channels(self, channels: int) -> int:
        """Channels scaled by `width_coefficient`, rounded to a multiple of `depth_divisor` (never down by more than
        10 %), as in the reference implementation; with `width_coefficient == 1` they are used as given."""
        if self.width_coefficient == 1.0:
            return channels
        divisor = self.depth_divisor
        scaled = channels * self.width_coefficient
        rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
        if rounded < 0.9 * scaled:
            rounded += divisor
        return int(rounded)

    def round_repeats(self, stage: int) -> int:
        """Blocks of stage `stage` (0-based): the first and last stages keep their depth in the Lite family."""
        repeats = self.num_repeats[stage]
        if stage in (0, len(self.num_repeats) - 1):
            return repeats
        return int(math.ceil(self.depth_coefficient * repeats))

    def stage_channels(self) -> list[int]:
        """Output channels of every entry of `stage_names` (stem, stages, head)."""
        return [self.stem_channels] + [self.round_channels(c) for c in self.out_channels] + [self.head_channels]

    def stage_strides(self) -> list[int]:
        """Downsampling factor (input size / feature-map size, for sizes divisible by it) of every entry of
        `stage_names`."""
        strides, total = [], 2  # the stem convolution has stride 2
        strides.append(total)
        for stride in self.strides:
            total *= stride
            strides.append(total)
        strides.append(total)  # the head is a 1x1 convolution
        return strides


__all__ = ["EfficientNetLiteConfig", "EFFICIENTNET_LITE_VARIANTS"]
