"""Configurations of the Masked Autoregressive Flow (MAF) and the Inverse Autoregressive Flow (IAF)."""

from transformers import PreTrainedConfig


# Names of the MADE degree rules; the rules themselves are `modeling_maf.modeling_maf.DEGREE_RULES`.
DEGREE_ASSIGNMENTS = ("spread", "random", "sequential")
PERMUTATIONS = ("reverse", "random", "none")
NORMALIZATIONS = ("none", "batch_norm")

class MAFConfig(PreTrainedConfig):
    r"""
    Configuration of a [`MAFModel`]: a stack of affine MADE blocks over flattened images, or over the square patches
    of the images (`patch_size`).

    The defaults: 128x128x3 images (D = 49,152 dimensions), MADE with two hidden layers of 512 units
    (Linear(D->512), Linear(512->512), Linear(512->2D), all masked) and 7 blocks.

    Args:
        image_size (`int`, *optional*, defaults to 128):
            Height and width of the (square) images.
        num_channels (`int`, *optional*, defaults to 3):
            Number of image channels.
        hidden_sizes (`list[int]`, *optional*, defaults to `[512, 512]`):
            Widths of the hidden layers of every MADE.
        num_blocks (`int`, *optional*, defaults to 7):
            Number of affine autoregressive (MADE) blocks.
        hidden_act (`str`, *optional*, defaults to `"relu"`):
            Activation of the hidden layers (any key of `transformers.activations.ACT2FN`).
        degree_assignment (`str`, *optional*, defaults to `"spread"`):
            The MADE degree rule of the hidden units (`modeling_maf.modeling_maf.DEGREE_RULES`): `"spread"` (evenly
            over [lowest, D-1], where lowest is the smallest degree of the layer below), `"random"` (uniform draws from
            that range, seeded by `degree_seed`) or `"sequential"` (`k mod (D-1) + 1`, the rule of the original MAF
            code and nflows; with D >> H every hidden unit then sees only the first H inputs of the ordering).
        degree_seed (`int`, *optional*, defaults to 0):
            Seed of the `"random"` degree assignment and of the `"random"` permutation (masks are rebuilt from it).
        permutation (`str`, *optional*, defaults to `"reverse"`):
            Ordering of the dimensions from one block to the next: `"reverse"`, `"random"` or `"none"`.
        normalization (`str`, *optional*, defaults to `"none"`):
            Normalisation layer after every block: `"none"` or `"batch_norm"` (the MAF paper's flow batch norm).
        batch_norm_momentum (`float`, *optional*, defaults to 0.1):
            Momentum of the running statistics of the flow batch norm.
        log_scale_clamp (`float`, *optional*, defaults to 3.0):
            Soft bound c of every log-scale: a = c * tanh(a_raw / c). Must be positive.
        logit_alpha (`float`, *optional*, defaults to 0.05):
            alpha of the logit transform v = logit(alpha + (1 - 2 alpha) y); in [0, 0.5).
        num_bins (`int`, *optional*, defaults to 256):
            Number of intensity levels of the data (256 for 8-bit images): pixels are dequantised on this grid.
        patch_size (`int`, *optional*):
            None (the default): the flow models whole images (D = num_channels * image_size**2). An integer P: the flow
            models the P x P patches of the images (D = num_channels * P**2), log p(patch | location): the model is a
            density of patches, not of whole images. Every image is cut into all patches at `patch_stride`.
        patch_stride (`int`, *optional*):
            Step between neighbouring patches (default: patch_size // 2, at least 1); 1 <= stride <= patch_size and
            (image_size - patch_size) % stride == 0, so that the patches cover every pixel.
        condition_on_position (`bool`, *optional*, defaults to `True`):
            With `patch_size`: every MADE adds a learned embedding of the patch's location to the pre-activation of
            its first hidden layer, so the model is log p(patch | location). Ignored for whole-image flows.
        anomaly_calibration (`dict`, *optional*):
            Set by `MAFModel.calibrate` (None until then): the default anomaly score (`method`), the decision threshold
            of every score at `target_fpr` (`thresholds`) and the fraction of the calibration images each flags
            (`calibration_fpr`), `num_images`, and the score sizes (`smoothing_sigma`, `window_size`,
            `top_k_fraction`). The per-location statistics are tensors in the checkpoint (`anomaly_statistics.*`).
    """

    model_type = "maf"

    def __init__(
        self,
        image_size: int = 128,
        num_channels: int = 3,
        hidden_sizes: list[int] | None = None,
        num_blocks: int = 7,
        hidden_act: str = "relu",
        degree_assignment: str = "spread",
        degree_seed: int = 0,
        permutation: str = "reverse",
        normalization: str = "none",
        batch_norm_momentum: float = 0.1,
        log_scale_clamp: float = 3.0,
        logit_alpha: float = 0.05,
        num_bins: int = 256,
        patch_size: int | None = None,
        patch_stride: int | None = None,
        condition_on_position: bool = True,
        anomaly_calibration: dict | None = None,
        **kwargs,
    ):
        self.image_size = image_size
        self.num_channels = num_channels
        self.hidden_sizes = list(hidden_sizes) if hidden_sizes is not None else [512, 512]
        self.num_blocks = num_blocks
        self.hidden_act = hidden_act
        self.degree_assignment = degree_assignment
        self.degree_seed = degree_seed
        self.permutation = permutation
        self.normalization = normalization
        self.batch_norm_momentum = batch_norm_momentum
        self.log_scale_clamp = log_scale_clamp
        self.logit_alpha = logit_alpha
        self.num_bins = num_bins
        self.patch_size = patch_size
        if patch_size is not None and patch_stride is None and isinstance(patch_size, int):
            patch_stride = max(1, patch_size // 2)
        self.patch_stride = patch_stride
        self.condition_on_position = condition_on_position
        self.anomaly_calibration = anomaly_calibration
        self._validate_maf_fields()
        super().__init__(**kwargs)

    @property
    def flow_size(self) -> int:
        """Side of the square the flow models: `patch_size`, or `image_size` for a whole-image flow."""
        return self.patch_size if self.patch_size is not None else self.image_size

    @property
    def num_features(self) -> int:
        """D, the number of dimensions the flow models (channels x side x side of an image, or of a patch)."""
        return self.num_channels * self.flow_size * self.flow_size

    @property
    def patch_grid_size(self) -> int:
        """Patch locations per side (1 for a whole-image flow: its one patch is the image)."""
        if self.patch_size is None:
            return 1
        return (self.image_size - self.patch_size) // self.patch_stride + 1

    @property
    def num_patch_locations(self) -> int:
        """Patches per image, row-major over the patch grid (1 for a whole-image flow)."""
        return self.patch_grid_size**2

    def _validate_maf_fields(self):
        from transformers.activations import ACT2FN

        def positive_int(name, value):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")

        positive_int("image_size", self.image_size)
        positive_int("num_channels", self.num_channels)
        positive_int("num_blocks", self.num_blocks)
        positive_int("num_bins", self.num_bins)
        if len(self.hidden_sizes) == 0:
            raise ValueError("`hidden_sizes` must list at least one hidden layer width, e.g. [512, 512].")
        for width in self.hidden_sizes:
            positive_int("hidden_sizes[i]", width)
        self._validate_patch_fields(positive_int)
        if self.num_features < 2:
            raise ValueError("An autoregressive flow needs at least 2 dimensions (num_channels * image_size**2 >= 2, "
                             "num_channels * patch_size**2 with patches).")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"`hidden_act` {self.hidden_act!r} is unknown; use one of {sorted(ACT2FN)}.")
        choices = {
            "degree_assignment": DEGREE_ASSIGNMENTS,
            "permutation": PERMUTATIONS,
            "normalization": NORMALIZATIONS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}.")
        if not isinstance(self.degree_seed, int):
            raise ValueError(f"`degree_seed` must be an integer, got {self.degree_seed!r}.")
        if not self.log_scale_clamp > 0:
            raise ValueError(f"`log_scale_clamp` must be > 0 (it bounds |log-scale|), got {self.log_scale_clamp!r}.")
        if not 0.0 <= self.logit_alpha < 0.5:
            raise ValueError(f"`logit_alpha` must be in [0, 0.5), got {self.logit_alpha!r}.")
        if self.anomaly_calibration is not None and not isinstance(self.anomaly_calibration, dict):
            raise ValueError("`anomaly_calibration` must be None or the dict that MAFModel.calibrate writes, got "
                             f"{type(self.anomaly_calibration).__name__}.")
        if not 0.0 < self.batch_norm_momentum <= 1.0:
            raise ValueError(f"`batch_norm_momentum` must be in (0, 1], got {self.batch_norm_momentum!r}.")


    def _validate_patch_fields(self, positive_int):
        if not isinstance(self.condition_on_position, bool):
            raise ValueError(f"`condition_on_position` must be True or False, got {self.condition_on_position!r}.")
        if self.patch_size is None:
            if self.patch_stride is not None:
                raise ValueError(f"`patch_stride` ({self.patch_stride!r}) needs a `patch_size`; set both or neither.")
            return
        positive_int("patch_size", self.patch_size)
        positive_int("patch_stride", self.patch_stride)
        size, patch, stride = self.image_size, self.patch_size, self.patch_stride
        if patch > size:
            raise ValueError(f"`patch_size` {patch} exceeds `image_size` {size}; use 1..{size} (or None: whole "
                             "images).")
        if stride > patch:
            raise ValueError(f"`patch_stride` {stride} exceeds `patch_size` {patch}, so some pixels would be in no "
                             f"patch; use 1..{patch}.")
        if (size - patch) % stride:
            fitting = [s for s in range(1, patch + 1) if (size - patch) % s == 0]
            raise ValueError(f"`patch_stride` {stride} does not step patches of {patch} exactly across {size} pixels "
                             f"((image_size - patch_size) % patch_stride must be 0); strides that fit: {fitting}.")


class IAFConfig(MAFConfig):
    r"""
    Configuration of an [`IAFModel`], the Inverse Autoregressive Flow: the same MADE blocks run on the noise side,
    so sampling is one pass per block and the density of data needs the (segment-parallel) sequential inverse.
    Takes exactly the fields of [`MAFConfig`].
    """

    model_type = "iaf"

    def __init__(self, **kwargs):  # an explicit __init__ keeps transformers from generating one without our fields
        super().__init__(**kwargs)


__all__ = ["MAFConfig", "IAFConfig"]
