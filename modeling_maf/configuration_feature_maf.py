"""Configuration of the feature-space MAF anomaly detector: a MAF over the feature maps of a frozen backbone."""

from transformers import AutoConfig, PreTrainedConfig

from .configuration_efficientnet_lite import EfficientNetLiteConfig
from .configuration_maf import DEGREE_ASSIGNMENTS, NORMALIZATIONS, PERMUTATIONS


# The default backbone stages (with the default image_size, 384: a 48x48 grid), chosen by measurement
# (docs/RESULTS.md#feature-space-detector): strides 8 and 16, as PatchCore reads a ResNet's layers 2 and 3.
DEFAULT_STAGES = ("stage3", "stage4")
IMAGE_SCORES = ("map-max", "map-topk", "patch-z-top3", "standardized-topk", "standardized-map")


def backbone_config_from(value, backbone: str | None = None, backbone_kwargs: dict | None = None,
                         use_timm_backbone: bool = False):
    """The backbone's config from what a `FeatureMAFConfig` was given: a config, its dict (`model_type` picks the
    class: this package's `efficientnet_lite`, or any model type transformers knows), or None (EfficientNet-Lite0
    with stages 3 and 4; with `use_timm_backbone`, transformers' `TimmBackboneConfig` of the timm model `backbone`;
    with another `backbone`, None until `train_maf.py` fetches that Hub checkpoint's config)."""
    if isinstance(value, PreTrainedConfig):
        return value
    if value is None and use_timm_backbone:
        if not backbone:
            raise ValueError("use_timm_backbone needs backbone, a timm model name (e.g. backbone='resnet18').")
        # timm knows its architectures by name: the config needs no download.
        return AutoConfig.for_model("timm_backbone", backbone=backbone, **(backbone_kwargs or {}))
    if value is None and backbone is None:
        return EfficientNetLiteConfig(out_features=list(DEFAULT_STAGES))
    if value is None:
        return None  # a Hub checkpoint named by `backbone`: resolved where the network is allowed (training)
    if not isinstance(value, dict):
        raise TypeError(f"backbone_config must be a config, a dict or None, got {type(value).__name__}.")
    value = dict(value)
    model_type = value.pop("model_type", None)
    if model_type in (None, EfficientNetLiteConfig.model_type):
        return EfficientNetLiteConfig(**value)
    config = AutoConfig.for_model(model_type, **value)
    for key, item in (backbone_kwargs or {}).items():
        setattr(config, key, item)
    return config


class FeatureMAFConfig(PreTrainedConfig):
    r"""
    Configuration of a [`FeatureMAFModel`]: an anomaly detector that models ``log p(feature vector | location)`` with
    a MAF over the feature maps of a frozen, pretrained CNN (as DifferNet, CFlow-AD and FastFlow do with other flows).

    Images (``image_size`` square, RGB in [0, 1]) are normalised with ``image_mean``/``image_std`` and passed through
    the backbone; the maps of its ``out_features`` stages are averaged over ``feature_pooling_size`` neighbourhoods,
    brought to the finest of them (bilinear) and concatenated into one vector per location (D = the sum of their
    channels).
    Vectors are standardised with per-channel statistics of the training features and then, with
    ``location_whitening``, whitened by a Gaussian fitted to each location's training vectors (PaDiM's density, in
    closed form): the flow's first, fixed layer, so that the MAF starts from that Gaussian and learns only what the
    data add to it. Both are buffers, saved with the model; the flow is continuous (no dequantisation or logit
    transform). The per-location NLL is the anomaly map, bilinearly upsampled to the image; the image score is read
    from the map (``anomaly_score``).

    Args:
        backbone_config (`PreTrainedConfig` or `dict`, *optional*):
            The frozen backbone, transformers style (``AutoBackbone``): its ``out_features`` / ``out_indices`` choose
            the stages. Default: EfficientNet-Lite0 (this package's port) with ``out_features=["stage3", "stage4"]``
            (40 + 80 channels at 1/8 and 1/16 of the image).
        backbone (`str`, *optional*):
            A Hub checkpoint of a backbone (``microsoft/resnet-18``, ``facebook/dinov2-small``, a timm name with
            ``use_timm_backbone``): `train_maf.py` loads its config and, with ``use_pretrained_backbone``, its weights.
            Recorded here so the detector says where its features come from.
        use_pretrained_backbone (`bool`, *optional*, defaults to `True`):
            Whether training starts from the backbone's pretrained weights. The trained detector saves the backbone's
            weights with its own, so a saved detector is self-contained either way.
        use_timm_backbone (`bool`, *optional*, defaults to `False`):
            ``backbone`` is a timm model name (``resnet18``, ``wide_resnet50_2``, ...), built through transformers'
            ``TimmBackbone`` (needs timm); its pretrained weights come from timm's Hub repos.
        backbone_kwargs (`dict`, *optional*):
            Extra fields for the backbone's config (e.g. ``{"out_indices": [2, 3]}``).
        out_features (`list[str]`, *optional*):
            The backbone stages to read (stored in ``backbone_config.out_features``; e.g. ``["stage2", "stage3"]``).
        out_indices (`list[int]`, *optional*):
            The same by position in the backbone's stage list (stored in ``backbone_config.out_indices``); a timm
            backbone names its stages only once built, so it takes these (e.g. ``[2, 3]``: ``layer2`` and ``layer3``
            of a timm ResNet).
        image_size (`int`, *optional*, defaults to 384):
            Side of the square images the detector reads.
        num_channels (`int`, *optional*, defaults to 3):
            Image channels (the pretrained backbones read RGB).
        image_mean, image_std (`list[float]`, *optional*):
            Normalisation of the [0, 1] images that the backbone's weights expect (default: the backbone config's own
            ``image_mean``/``image_std`` if it has them, else ImageNet's).
        normalize_image_statistics (`bool`, *optional*, defaults to `True`):
            Training fits ``image_reference_mean``/``image_reference_std`` (the training images' average per-channel
            mean and standard deviation), and every image's channels are then standardised to them before the
            backbone: a global change of brightness or colour cast between the training and the test images leaves
            the features as they were. False: images go to the backbone as they are.
        image_reference_mean, image_reference_std (`list[float]`, *optional*):
            Set by `FeatureMAFModel.fit_image_statistics`; None: no per-image standardisation.
        feature_pooling_size (`int`, *optional*, defaults to 3):
            Side of the average over each feature map's neighbourhood (odd; 1 = none).
        backbone_padding (`int`, *optional*, defaults to 0):
            Pixels of the image reflected around it before the backbone, whose aggregated feature maps are then
            cropped back to the image's own locations: the vectors at the image's border are computed from image
            content around them instead of the backbone's zero padding. A multiple of the feature grid's stride (8 for
            the default stages); 0: none, as in configs saved before the field existed. `scripts/train_maf.py` trains
            its detectors with 32: fewer map peaks on the image's edges, more on defects (docs/maf.md).
        hidden_sizes, num_blocks, hidden_act, degree_assignment, degree_seed, permutation, normalization,
        batch_norm_momentum, log_scale_clamp:
            The MAF over the vectors, as in [`MAFConfig`] (defaults: 2 hidden layers of 128, 4 blocks, reversed
            orderings, no normalisation between blocks: larger flows and flow batch norm fitted the training
            features better and detected defects no better or worse, docs/RESULTS.md#feature-space-detector).
        location_whitening (`bool`, *optional*, defaults to `True`):
            Whiten every vector with the Gaussian of its location before the flow: ``z = W_l (x - mu_l)`` with
            ``W_l`` the inverse Cholesky factor of the location's covariance (a buffer of locations x D x D numbers).
            The flow then trains on out-of-fold whitened vectors (each training image whitened by the Gaussians of
            the other images, `FeatureMAFModel.out_of_fold_vectors`), so that it learns how unseen vectors fall.
        whitening_shrinkage (`float`, *optional*, defaults to 0.1):
            Weight of the covariance pooled over all locations in each location's covariance (the rest is the
            location's own): a few hundred images cannot fill a D x D covariance per location.
        whitening_ridge (`float`, *optional*, defaults to 0.01):
            Added to the diagonal of every covariance (standardised units), so that it is invertible.
        condition_on_position (`bool`, *optional*, defaults to `True`):
            Every MADE adds a learned embedding of the feature location to its first hidden layer:
            ``log p(vector | location)``. False: one density for every location.
        position_tolerance (`int`, *optional*, defaults to 0):
            How many grid cells (rows and columns) a feature may lie from where the training images show it. The
            density of a vector at location ``l`` is then the average of the densities at the locations within that
            many cells of ``l`` that lie in the grid: ``p(x | l) = mean_{l'} p(x | l')``, a mixture over a position
            known to ± that many cells, so that a print or an edge a little off its usual place is not read as a
            defect, while a feature seen nowhere near ``l`` still is. It changes how images are scored (maps,
            scores, ``log_prob``), not how the flow trains. Costs ``(2 r + 1)²`` evaluations of the flow per vector.
        anomaly_score (`str`, *optional*, defaults to `"map-max"`):
            The image score `calibrate` makes the default (a name of ``modeling_maf.anomaly_scores.ANOMALY_SCORES``).
        anomaly_calibration (`dict`, *optional*):
            Set by `calibrate`, as for [`MAFConfig`].
    """

    model_type = "feature_maf"
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(
        self,
        backbone_config=None,
        backbone: str | None = None,
        use_pretrained_backbone: bool = True,
        use_timm_backbone: bool = False,
        backbone_kwargs: dict | None = None,
        out_features: list[str] | None = None,
        out_indices: list[int] | None = None,
        image_size: int = 384,
        num_channels: int = 3,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        normalize_image_statistics: bool = True,
        image_reference_mean: list[float] | None = None,
        image_reference_std: list[float] | None = None,
        feature_pooling_size: int = 3,
        backbone_padding: int = 0,
        hidden_sizes: list[int] | None = None,
        num_blocks: int = 4,
        hidden_act: str = "relu",
        degree_assignment: str = "spread",
        degree_seed: int = 0,
        permutation: str = "reverse",
        normalization: str = "none",
        batch_norm_momentum: float = 0.1,
        log_scale_clamp: float = 3.0,
        location_whitening: bool = True,
        whitening_shrinkage: float = 0.1,
        whitening_ridge: float = 0.01,
        condition_on_position: bool = True,
        position_tolerance: int = 0,
        anomaly_score: str = "map-max",
        anomaly_calibration: dict | None = None,
        **kwargs,
    ):
        self.backbone_config = backbone_config_from(backbone_config, backbone, backbone_kwargs, use_timm_backbone)
        # The stages are kept in the backbone's config, where transformers keeps them.
        if out_features is not None and out_indices is not None:
            raise ValueError(f"Give out_features or out_indices, not both (got {out_features} and {out_indices}).")
        # A Hub backbone whose config is not fetched yet (train_maf.py fetches it) keeps them in backbone_kwargs.
        backbone_kwargs = dict(backbone_kwargs or {})
        for name, stages in (("out_features", out_features), ("out_indices", out_indices)):
            if stages is None:
                continue
            if self.backbone_config is None:
                backbone_kwargs[name] = list(stages)
            else:
                setattr(self.backbone_config, name, list(stages))
        self.backbone = backbone
        self.use_pretrained_backbone = bool(use_pretrained_backbone)
        self.use_timm_backbone = bool(use_timm_backbone)
        self.backbone_kwargs = backbone_kwargs
        self.image_size = int(image_size)
        self.num_channels = int(num_channels)
        default_mean = getattr(self.backbone_config, "image_mean", None) or [0.485, 0.456, 0.406]
        default_std = getattr(self.backbone_config, "image_std", None) or [0.229, 0.224, 0.225]
        self.image_mean = [float(value) for value in (image_mean if image_mean is not None else default_mean)]
        self.image_std = [float(value) for value in (image_std if image_std is not None else default_std)]
        self.normalize_image_statistics = bool(normalize_image_statistics)
        self.image_reference_mean = None if image_reference_mean is None else [float(v) for v in image_reference_mean]
        self.image_reference_std = None if image_reference_std is None else [float(v) for v in image_reference_std]
        self.feature_pooling_size = int(feature_pooling_size)
        self.backbone_padding = int(backbone_padding)
        self.hidden_sizes = list(hidden_sizes) if hidden_sizes is not None else [128, 128]
        self.num_blocks = int(num_blocks)
        self.hidden_act = hidden_act
        self.degree_assignment = degree_assignment
        self.degree_seed = int(degree_seed)
        self.permutation = permutation
        self.normalization = normalization
        self.batch_norm_momentum = float(batch_norm_momentum)
        self.log_scale_clamp = float(log_scale_clamp)
        self.location_whitening = bool(location_whitening)
        self.whitening_shrinkage = float(whitening_shrinkage)
        self.whitening_ridge = float(whitening_ridge)
        self.condition_on_position = bool(condition_on_position)
        self.position_tolerance = int(position_tolerance)
        self.anomaly_score = anomaly_score
        self.anomaly_calibration = anomaly_calibration
        super().__init__(**kwargs)
        self.validate()

    def validate(self):
        """Raises ValueError naming the field and what it may be."""
        checks = [
            (self.image_size >= 16, f"image_size must be >= 16, got {self.image_size}"),
            (self.num_channels >= 1, f"num_channels must be >= 1, got {self.num_channels}"),
            (len(self.image_mean) == self.num_channels and len(self.image_std) == self.num_channels,
             f"image_mean and image_std need {self.num_channels} values each, got {self.image_mean} and "
             f"{self.image_std}"),
            (all(value > 0 for value in self.image_std), f"image_std must be positive, got {self.image_std}"),
            ((self.image_reference_mean is None) == (self.image_reference_std is None)
             and (self.image_reference_mean is None or (
                 len(self.image_reference_mean) == len(self.image_reference_std) == self.num_channels
                 and all(value > 0 for value in self.image_reference_std))),
             f"image_reference_mean and image_reference_std must both be None or {self.num_channels} values each "
             f"(std positive), got {self.image_reference_mean} and {self.image_reference_std}"),
            (self.feature_pooling_size >= 1 and self.feature_pooling_size % 2 == 1,
             f"feature_pooling_size must be odd and >= 1, got {self.feature_pooling_size}"),
            (0 <= self.backbone_padding < self.image_size,
             f"backbone_padding must be >= 0 and smaller than image_size ({self.image_size}), got "
             f"{self.backbone_padding}"),
            (len(self.hidden_sizes) >= 1 and all(int(size) >= 1 for size in self.hidden_sizes),
             f"hidden_sizes must be one or more positive widths, got {self.hidden_sizes}"),
            (self.num_blocks >= 1, f"num_blocks must be >= 1, got {self.num_blocks}"),
            (self.degree_assignment in DEGREE_ASSIGNMENTS,
             f"degree_assignment must be one of {DEGREE_ASSIGNMENTS}, got {self.degree_assignment!r}"),
            (self.permutation in PERMUTATIONS, f"permutation must be one of {PERMUTATIONS}, got {self.permutation!r}"),
            (self.normalization in NORMALIZATIONS,
             f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}"),
            (0 < self.batch_norm_momentum <= 1,
             f"batch_norm_momentum must lie in (0, 1], got {self.batch_norm_momentum}"),
            (0 <= self.whitening_shrinkage <= 1,
             f"whitening_shrinkage must lie in [0, 1], got {self.whitening_shrinkage}"),
            (self.whitening_ridge > 0, f"whitening_ridge must be positive, got {self.whitening_ridge}"),
            (self.log_scale_clamp > 0, f"log_scale_clamp must be positive, got {self.log_scale_clamp}"),
            (self.position_tolerance >= 0, f"position_tolerance must be >= 0, got {self.position_tolerance}"),
            (self.anomaly_score in IMAGE_SCORES,
             f"anomaly_score must be one of {IMAGE_SCORES}, got {self.anomaly_score!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message + ".")


__all__ = ["DEFAULT_STAGES", "FeatureMAFConfig", "IMAGE_SCORES", "backbone_config_from"]
