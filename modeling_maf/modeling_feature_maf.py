"""The feature-space MAF anomaly detector: log p(feature vector | location) over the feature maps of a frozen backbone.

The backbone (default: EfficientNet-Lite0, `modeling_efficientnet_lite.py`) is part of the model and saved with it, so
a saved or pushed detector needs nothing else at load time. The flow is the project's MAF (`MADEBlock` of
`modeling_maf.py`) over D-dimensional vectors, one per feature location, each MADE conditioned on the location by a
learned embedding in its first layer (as the patch MAF is). Before the flow, a fixed first layer whitens each vector by
a Gaussian fitted in closed form to its location's training vectors (`location_whitening`), so that the MAF starts from
that per-location Gaussian (PaDiM's density) and learns what the data add to it. Scoring and calibration are the pixel
models' own (`MAFAnomalyScorer`): the per-location NLL is the location grid, and its bilinear upsampling the pixel map.

This file imports only torch, transformers and its siblings, relatively: it travels with the weights into Hub repos.
"""

import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .anomaly_scorer_maf import AnomalyDetectionMixin, MAFAnomalyScorer, upsample_bilinear
from .anomaly_scores import NLLMaps, ScoreParameters
from .configuration_efficientnet_lite import EfficientNetLiteConfig
from .configuration_feature_maf import FeatureMAFConfig
from .modeling_efficientnet_lite import EfficientNetLiteBackbone
from .modeling_maf import MAFPreTrainedModel, MaskedLinear, build_blocks, check_pixel_values, checked_pixel_values


@dataclass
class FeatureMAFOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`):
            Mean negative log-likelihood (nats) of the feature vectors of the batch.
        log_prob (`torch.FloatTensor` of shape `(batch_size,)`):
            Per image, the mean over its locations of log p(vector | location) (nats).
        nll_map (`torch.FloatTensor` of shape `(batch_size, height, width)`):
            The negative log-likelihood of the vector at every feature location.
    """

    loss: torch.FloatTensor | None = None
    log_prob: torch.FloatTensor | None = None
    nll_map: torch.FloatTensor | None = None


def is_efficientnet_lite(backbone_config) -> bool:
    """Whether a backbone config is this package's EfficientNet-Lite. By model_type, not class: loaded with
    trust_remote_code, the config's class and the one this file imports come from different copies of the same
    module (transformers keeps one copy per model file's hash), so isinstance would say no."""
    return getattr(backbone_config, "model_type", None) == EfficientNetLiteConfig.model_type


def build_backbone(config: FeatureMAFConfig) -> nn.Module:
    """The backbone module of `config`, with random weights (`load_pretrained_backbone` or a saved detector brings
    the trained ones): this package's EfficientNet-Lite, or any `AutoBackbone` transformers can build from a config."""
    backbone_config = config.backbone_config
    if is_efficientnet_lite(backbone_config):
        return EfficientNetLiteBackbone(backbone_config)
    if backbone_config is None:
        raise ValueError(f"The backbone {config.backbone!r} has no config: build the detector with "
                         "FeatureMAFConfig(backbone_config=AutoConfig.from_pretrained(...)) (train_maf.py does).")
    if backbone_config.model_type == "timm_backbone" and importlib.util.find_spec("timm") is None:
        raise ImportError(f"This detector's backbone is the timm model {backbone_config.backbone!r}: pip install timm "
                          "(it needs torchvision).")
    from transformers import AutoBackbone

    return AutoBackbone.from_config(backbone_config)


class FeatureAggregator(nn.Module):
    """Backbone feature maps -> one vector per location: each map averaged over a k x k neighbourhood, brought to the
    finest map's size (bilinear) and concatenated along the channels."""

    def __init__(self, pooling_size: int):
        super().__init__()
        self.pooling_size = pooling_size

    def forward(self, feature_maps) -> torch.Tensor:
        size = max((tuple(feature_map.shape[-2:]) for feature_map in feature_maps),
                   key=lambda shape: shape[0] * shape[1])
        pooled = []
        for feature_map in feature_maps:
            feature_map = feature_map.float()
            if self.pooling_size > 1:
                feature_map = F.avg_pool2d(feature_map, self.pooling_size, stride=1, padding=self.pooling_size // 2,
                                           count_include_pad=False)
            if tuple(feature_map.shape[-2:]) != size:
                feature_map = F.interpolate(feature_map, size=size, mode="bilinear", align_corners=False)
            pooled.append(feature_map)
        return torch.cat(pooled, dim=1)


def backbone_feature_maps(backbone: nn.Module, aggregator: FeatureAggregator, images: torch.Tensor,
                          padding: int) -> torch.Tensor:
    """The aggregated feature maps (B, D, h, w) of normalised `images` (B, C, S, S). With `padding` > 0 the images
    are first extended by that many reflected pixels on every side, and the maps cropped back to the locations of
    the image itself, so that the border vectors (and their neighbourhood averages) read image content rather than
    the backbone's zero padding."""
    if padding == 0:
        return aggregator(backbone(images).feature_maps)
    maps = aggregator(backbone(F.pad(images, (padding,) * 4, mode="reflect")).feature_maps)
    stride = (images.shape[-1] + 2 * padding) / maps.shape[-1]
    crop = padding / stride
    if crop != int(crop):
        suggestion = f" (e.g. {max(1, round(crop)) * stride:g})" if stride == int(stride) else ""
        raise ValueError(f"backbone_padding={padding} is not a whole number of feature grid cells ({stride:g} pixels "
                         f"each): set it to a multiple of the grid's stride{suggestion}, or 0.")
    crop = int(crop)
    return maps[..., crop:maps.shape[-2] - crop, crop:maps.shape[-1] - crop]


def fit_location_gaussians(vectors: torch.Tensor, shrinkage: float, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-location Gaussians of `vectors` (L, N, D) (N vectors at each of L locations): their means (L, D) and the
    whitening matrices (L, D, D), the inverse lower Cholesky factors W_l of the covariances
    ``(1 - shrinkage) * S_l + shrinkage * mean_l(S_l) + ridge * I``, so that ``W_l (x - mu_l)`` is white under the
    Gaussian of location l. Computed in float64."""
    vectors = vectors.double()
    mean = vectors.mean(dim=1)
    centred = vectors - mean[:, None]
    covariance = centred.transpose(1, 2) @ centred / max(vectors.shape[1] - 1, 1)
    identity = torch.eye(vectors.shape[2], dtype=torch.float64, device=vectors.device)
    covariance = (1 - shrinkage) * covariance + shrinkage * covariance.mean(dim=0) + ridge * identity
    lower = torch.linalg.cholesky(covariance)
    whitening = torch.linalg.solve_triangular(lower, identity.expand_as(lower), upper=False)
    return mean, whitening


class VectorFlowSpec:
    """What a `MADEBlock` reads from a config, for a flow over `num_features`-dimensional vectors at
    `num_patch_locations` locations (MAFConfig's names, so that the MADE code serves both)."""

    def __init__(self, config: FeatureMAFConfig, num_features: int, num_locations: int):
        self.num_features = num_features
        self.hidden_sizes = config.hidden_sizes
        self.hidden_act = config.hidden_act
        self.degree_assignment = config.degree_assignment
        self.log_scale_clamp = config.log_scale_clamp
        self.condition_on_position = config.condition_on_position
        self.patch_size = 1  # one "patch" per location: MADE adds a location embedding when condition_on_position
        self.num_patch_locations = num_locations


def _channel_statistics(pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel mean and standard deviation (B, C, 1, 1) of images (B, C, H, W); the standard deviation
    floored at 1e-3 (a uniform channel)."""
    pixel_values = pixel_values.float()
    return (pixel_values.mean(dim=(2, 3), keepdim=True),
            pixel_values.std(dim=(2, 3), keepdim=True).clamp_min(1e-3))


CPU_BACKBONE_BATCH_SIZE = 8  # images through the backbone at a time on the CPU
MAX_WHITENING_NUMBERS = 2 ** 27  # 512 MiB of float32 whitening matrices


class FeatureMAFPreTrainedModel(MAFPreTrainedModel):
    """Weights, initialisation and loading of the feature detector: the MAF's rules (masks applied on every load,
    blocks starting as the identity); the backbone keeps its own initialisation until its weights are loaded."""

    config_class = FeatureMAFConfig
    base_model_prefix = "feature_maf"

    def _init_weights(self, module):
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) and not isinstance(module, MaskedLinear):
            return  # backbone modules
        if isinstance(module, FeatureMAFPreTrainedModel):
            # The statistics start as "no change" (a detector saved before they existed loads as it was saved);
            # tensors loaded from a checkpoint carry `_is_hf_initialized` and are left untouched.
            for name, value in (("feature_mean", 0.0), ("feature_std", 1.0), ("whitening_mean", 0.0)):
                tensor = getattr(module, name, None)
                if tensor is not None and not getattr(tensor, "_is_hf_initialized", False):
                    tensor.data.fill_(value)
            matrix = getattr(module, "whitening_matrix", None)
            if matrix is not None and not getattr(matrix, "_is_hf_initialized", False):
                matrix.data.copy_(torch.eye(matrix.shape[-1], dtype=matrix.dtype).expand_as(matrix))
            return
        super()._init_weights(module)


class FeatureMAFModel(AnomalyDetectionMixin, FeatureMAFPreTrainedModel):
    r"""
    Anomaly detector: a MAF over the feature vectors of a frozen backbone, ``log p(vector | location)``.

    ``pixel_values`` are images (batch, 3, image_size, image_size) in [0, 1], as [`MAFImageProcessor`] makes them; the
    model normalises them for its backbone. The anomaly API (`nll_maps`, `anomaly_scores`, `anomaly_maps`,
    `calibrate`, `predict_anomalies`) is [`MAFModel`]'s.

    Example:
    ```python
    >>> from modeling_maf import FeatureMAFConfig, FeatureMAFModel
    >>> model = FeatureMAFModel(FeatureMAFConfig(backbone_padding=32))  # as train_maf.py builds it; random weights
    >>> model.load_pretrained_backbone()                  # ImageNet EfficientNet-Lite0 (pip install "hf-dgm[features]")
    >>> model.fit_image_statistics(images)                # the training images' channel statistics
    >>> features = model.extract_features(images)         # (B, 120, 48, 48) for 384x384 images
    >>> model.fit_feature_statistics(features)            # standardisation and per-location Gaussians
    >>> vectors, locations = model.out_of_fold_vectors(features)  # then train: model(vectors=..., locations=...).loss
    >>> model.predict_anomalies(images)                   # scores, maps, decisions once calibrated
    ```
    """

    def __init__(self, config: FeatureMAFConfig):
        super().__init__(config)
        self.backbone = build_backbone(config)
        self.backbone.requires_grad_(False)
        self.aggregator = FeatureAggregator(config.feature_pooling_size)
        num_features, grid = self._feature_shape()
        self.num_features, self.feature_grid = num_features, grid
        # Standardisation of the vectors: per-channel statistics of the training features (`fit_feature_statistics`).
        self.register_buffer("feature_mean", torch.zeros(num_features))
        self.register_buffer("feature_std", torch.ones(num_features))
        if config.location_whitening:  # the identity until `fit_feature_statistics` fits the per-location Gaussians
            num_locations = grid[0] * grid[1]
            if num_locations * num_features ** 2 > MAX_WHITENING_NUMBERS:
                raise ValueError(
                    f"location_whitening needs {num_locations} x {num_features} x {num_features} numbers for "
                    f"{num_locations} locations of {num_features} channels: too many; read fewer channels "
                    "(out_features), a smaller image_size, or set location_whitening=False.")
            self.register_buffer("whitening_mean", torch.zeros(num_locations, num_features))
            self.register_buffer("whitening_matrix", torch.eye(num_features).repeat(num_locations, 1, 1))
        self.blocks, self.norms = build_blocks(config, VectorFlowSpec(config, num_features, grid[0] * grid[1]))
        size = config.image_size
        self.anomaly_statistics = MAFAnomalyScorer(
            config, size, grid, config.anomaly_score, grid_to_pixels=self.grid_maps_to_pixels,
            default_parameters=ScoreParameters(smoothing_sigma=size / 64, window_size=2 * round(size / 64) + 1))
        self.post_init()

    def _feature_shape(self) -> tuple[int, tuple[int, int]]:
        """(channels of the concatenated vectors, (height, width) of the feature grid), from a forward pass of a
        copy of the backbone on the meta device (shapes only: no memory, no compute)."""
        size = self.config.image_size
        with torch.device("meta"), torch.no_grad():
            probe = build_backbone(self.config).eval()
            features = backbone_feature_maps(probe, self.aggregator, torch.zeros(1, self.config.num_channels, size,
                                                                                 size), self.config.backbone_padding)
        return int(features.shape[1]), (int(features.shape[2]), int(features.shape[3]))

    def train(self, mode: bool = True):
        """The backbone stays in eval mode (frozen batch-norm statistics) whatever the flow's mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def load_pretrained_backbone(self, name_or_path: str | None = None, **kwargs) -> None:
        """Loads pretrained backbone weights: `name_or_path` (default: `config.backbone`) as a transformers
        `AutoBackbone` checkpoint (Hub id or folder; `kwargs` go to its `from_pretrained`); with
        `config.use_timm_backbone`, timm's pretrained weights of that model name (timm downloads them from its Hub
        repos and reads the token from the environment: `kwargs` unused); or, for this package's EfficientNet-Lite
        with no name, the ImageNet Lite0 weights of the `features` extra (`kwargs` unused)."""
        name_or_path = name_or_path or self.config.backbone
        backbone_config = self.config.backbone_config
        if name_or_path is None and is_efficientnet_lite(backbone_config):
            from .modeling_efficientnet_lite import efficientnet_lite0_weights_file

            pretrained = EfficientNetLiteBackbone.from_efficientnet_pytorch(efficientnet_lite0_weights_file(),
                                                                            config=backbone_config)
        elif name_or_path is None:
            raise ValueError("No pretrained backbone to load: pass a checkpoint name or set config.backbone.")
        elif self.config.use_timm_backbone:
            from transformers import TimmBackbone

            pretrained = TimmBackbone.from_pretrained(name_or_path, config=backbone_config)
        else:
            from transformers import AutoBackbone

            pretrained = AutoBackbone.from_pretrained(name_or_path, config=backbone_config, **kwargs)
        self.backbone.load_state_dict(pretrained.state_dict())
        self.backbone.eval()

    # ------------------------------------------------------------------------------------------- features
    @torch.no_grad()
    def fit_image_statistics(self, pixel_values: torch.Tensor) -> None:
        """With `normalize_image_statistics`, sets the config's reference channel statistics to the training images'
        (B, C, S, S) average per-image channel mean and standard deviation (`extract_features` standardises every
        image's channels to them)."""
        if not self.config.normalize_image_statistics:
            return
        check_pixel_values(pixel_values, self.config)  # the pixel models' check: shape, float, values in [0, 1]
        mean, std = (torch.cat(parts) for parts in zip(*map(_channel_statistics, pixel_values.split(64))))
        self.config.image_reference_mean = [float(value) for value in mean.mean(dim=0).flatten().double()]
        self.config.image_reference_std = [float(value) for value in std.mean(dim=0).flatten().double()]

    def _standardise_image_statistics(self, pixel_values):
        """Each image's channels moved to the reference mean and standard deviation, when the config has them."""
        if self.config.image_reference_mean is None:
            return pixel_values
        mean, std = _channel_statistics(pixel_values)
        reference_mean, reference_std = (torch.tensor(values, device=pixel_values.device).view(1, -1, 1, 1)
                                         for values in (self.config.image_reference_mean,
                                                        self.config.image_reference_std))
        return (pixel_values - mean) / std * reference_std + reference_mean

    @torch.no_grad()
    def extract_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) in [0, 1] -> the aggregated feature maps (B, D, h, w), float32, before
        standardisation. Each image's channels are first standardised to the reference statistics, when fitted
        (`fit_image_statistics`)."""
        with checked_pixel_values(pixel_values, self.config):
            pixel_values = self._standardise_image_statistics(pixel_values.float())
            mean, std = (torch.tensor(values, device=pixel_values.device).view(1, -1, 1, 1)
                         for values in (self.config.image_mean, self.config.image_std))
            parameter = next(self.backbone.parameters())
            normalized = ((pixel_values.float() - mean) / std).to(device=parameter.device, dtype=parameter.dtype)
            padding = self.config.backbone_padding
            if normalized.device.type != "cpu":
                return backbone_feature_maps(self.backbone, self.aggregator, normalized, padding)
            # On the CPU, oneDNN's convolutions take about half the time on NHWC images, and a few images at a time
            # beat large batches, whose feature maps only add memory traffic (time_cpu_feature_extraction.py).
            normalized = normalized.contiguous(memory_format=torch.channels_last)
            return torch.cat([backbone_feature_maps(self.backbone, self.aggregator, chunk, padding)
                              for chunk in normalized.split(CPU_BACKBONE_BATCH_SIZE)])

    @torch.no_grad()
    def fit_feature_statistics(self, features: torch.Tensor) -> None:
        """Fits what prepares the vectors for the flow to the training features (B, D, h, w): the per-channel mean and
        standard deviation that standardise every vector and, with `location_whitening`, the Gaussian of every
        location (`fit_location_gaussians`) that whitens them."""
        flat = features.transpose(0, 1).reshape(self.num_features, -1).double()
        self.feature_mean.copy_(flat.mean(dim=1).to(self.feature_mean))
        self.feature_std.copy_(flat.std(dim=1).clamp_min(1e-6).to(self.feature_std))
        if self.config.location_whitening:
            mean, whitening = self._fit_whitening(features)
            self.whitening_mean.copy_(mean)
            self.whitening_matrix.copy_(whitening)

    def _fit_whitening(self, features):
        standardised = self._standardise(features)
        by_location = standardised.transpose(0, 1)  # (h * w, B, D)
        return fit_location_gaussians(by_location, self.config.whitening_shrinkage, self.config.whitening_ridge)

    def _standardise(self, features):
        """(B, D, h, w) -> standardised vectors (B, h * w, D)."""
        return (features.flatten(2).transpose(1, 2) - self.feature_mean) / self.feature_std

    @staticmethod
    def _whiten(vectors, mean, whitening):
        """Vectors (B, h * w, D) -> W_l (x - mu_l) at every location l, (B, h * w, D)."""
        centred = (vectors - mean.to(vectors)).transpose(0, 1)  # (h * w, B, D)
        return (centred @ whitening.to(vectors).transpose(1, 2)).transpose(0, 1)

    def vectors(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature maps (B, D, h, w) -> the flow's input vectors (B * h * w, D), standardised and (with
        `location_whitening`) whitened by their location's Gaussian, and their locations (B * h * w,), row-major over
        the grid."""
        vectors = self._standardise(features)
        if self.config.location_whitening:
            vectors = self._whiten(vectors, self.whitening_mean, self.whitening_matrix)
        return self._with_locations(vectors)

    def _with_locations(self, vectors):
        """Vectors (B, h * w, D) -> (B * h * w, D) and their locations (B * h * w,), row-major over the grid."""
        batch_size, num_locations, _ = vectors.shape
        locations = torch.arange(num_locations, device=vectors.device).repeat(batch_size)
        return vectors.reshape(-1, self.num_features), locations

    @torch.no_grad()
    def out_of_fold_vectors(self, features: torch.Tensor, num_folds: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """The training vectors the flow learns from, as `vectors(features)` returns them, except that with
        `location_whitening` each image is whitened by the Gaussians fitted to the images of the other folds (image i
        is in fold i mod `num_folds`): whitened by Gaussians fitted to themselves, a few hundred images' vectors
        look far more typical than any unseen image's, and a flow trained on them learns that."""
        if not self.config.location_whitening or features.shape[0] < 2:
            return self.vectors(features)
        num_folds = min(num_folds, features.shape[0])
        fold = torch.arange(features.shape[0], device=features.device) % num_folds
        standardised = self._standardise(features)
        whitened = torch.empty_like(standardised)
        for index in range(num_folds):
            held_out = fold == index
            mean, whitening = self._fit_whitening(features[~held_out])
            whitened[held_out] = self._whiten(standardised[held_out], mean, whitening)
        return self._with_locations(whitened)

    def whitening_log_det(self) -> torch.Tensor:
        """log |det| of every location's whitening (h * w,): zeros without `location_whitening`."""
        if not self.config.location_whitening:
            return torch.zeros(self.feature_grid[0] * self.feature_grid[1], device=self.feature_mean.device)
        return torch.diagonal(self.whitening_matrix, dim1=1, dim2=2).log().sum(dim=1)

    # ------------------------------------------------------------------------------------------ the flow
    def vector_log_prob(self, vectors: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        """log p(vector | location) (N,) of the flow's input vectors (N, D) (`vectors`) at `locations` (N,), float32;
        the whitening's log-determinant at the location is included (the standardisation's, the same everywhere, is
        not)."""
        hidden = vectors.float()
        log_det = self.whitening_log_det()[locations]
        for index, block in enumerate(self.blocks):
            shift, log_scale = block(hidden, locations)
            hidden = (hidden - shift) * torch.exp(-log_scale)
            log_det = log_det - log_scale.sum(dim=1)
            if self.norms is not None:
                hidden, norm_log_det = self.norms[index](hidden)
                log_det = log_det + norm_log_det.sum(dim=1)
        base = -0.5 * hidden.square().sum(dim=1) - 0.5 * self.num_features * math.log(2 * math.pi)
        return base + log_det

    def location_log_prob(self, features: torch.Tensor) -> torch.Tensor:
        """log p(vector | location) of every vector of feature maps (B, D, h, w) -> (B, h, w), float32. With
        `config.position_tolerance` r > 0, the density at location l is the mean of the densities at the locations
        within r rows and columns of l that lie in the grid: for every offset s, the maps are moved by s, so that each
        vector is read at location l + s (that location's whitening and position), and the densities moved back."""
        batch_size, _, height, width = features.shape

        def own_locations(maps):
            vectors, locations = self.vectors(maps)
            return self.vector_log_prob(vectors, locations).view(batch_size, height, width)

        radius = self.config.position_tolerance
        if radius == 0:
            return own_locations(features)
        rows = torch.arange(height, device=features.device)[:, None]
        columns = torch.arange(width, device=features.device)[None, :]
        terms, count = [], torch.zeros(height, width, device=features.device)
        for row_offset in range(-radius, radius + 1):
            for column_offset in range(-radius, radius + 1):
                inside = ((rows + row_offset >= 0) & (rows + row_offset < height)
                          & (columns + column_offset >= 0) & (columns + column_offset < width))
                if not inside.any():
                    continue
                # the vector of l goes to l + offset, is scored there, and its density comes back to l
                moved = own_locations(features.roll((row_offset, column_offset), dims=(2, 3)))
                moved_back = moved.roll((-row_offset, -column_offset), dims=(1, 2))
                terms.append(moved_back.masked_fill(~inside, float("-inf")))
                count += inside
        return torch.logsumexp(torch.stack(terms), dim=0) - count.log()

    def forward(self, pixel_values: torch.Tensor | None = None, features: torch.Tensor | None = None,
                vectors: torch.Tensor | None = None, locations: torch.Tensor | None = None,
                return_dict: bool | None = None, **kwargs) -> FeatureMAFOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
            Images with values in [0, 1].
        features (`torch.FloatTensor` of shape `(batch_size, D, h, w)`, *optional*):
            Their aggregated feature maps (`extract_features`) instead of the images: training extracts them once.
        vectors, locations (`torch.FloatTensor` of shape `(N, D)`, `torch.LongTensor` of shape `(N,)`, *optional*):
            The flow's input vectors (`vectors(features)`, or `out_of_fold_vectors` in training) at their locations,
            from any images: a training batch. The output then has the loss (mean NLL) alone.
        """
        if vectors is not None:
            output = FeatureMAFOutput(loss=-self.vector_log_prob(vectors, locations).mean())
            return output if return_dict is not False else output.to_tuple()
        if features is None:
            if pixel_values is None:
                raise ValueError("Pass pixel_values (images) or features (from extract_features).")
            features = self.extract_features(pixel_values)
        log_prob = self.location_log_prob(features)
        output = FeatureMAFOutput(loss=-log_prob.mean(), log_prob=log_prob.flatten(1).mean(dim=1), nll_map=-log_prob)
        return output if return_dict is not False else output.to_tuple()

    # ------------------------------------------------------------------------------------ anomaly maps
    def grid_maps_to_pixels(self, maps: torch.Tensor) -> torch.Tensor:
        """Maps at the feature grid (B, h, w) -> maps at the image's pixels (B, H, W), bilinear."""
        size = self.config.image_size
        return upsample_bilinear(maps.float(), (size, size))

    @torch.no_grad()
    def nll_maps(self, pixel_values: torch.Tensor, batch_size: int = 32) -> NLLMaps:
        """The NLL at both grids the anomaly scores read, `batch_size` images at a time: `pixel` (B, H, W), the
        per-location NLL upsampled to the image, and `patch` (B, h, w), the NLL of every feature vector at its
        location. Deterministic (eval mode)."""
        was_training = self.training
        self.eval()
        try:
            nll_map = torch.cat([self(pixel_values=chunk).nll_map for chunk in pixel_values.split(batch_size)])
        finally:
            self.train(was_training)
        return NLLMaps(self.grid_maps_to_pixels(nll_map), nll_map)


__all__ = [
    "FeatureMAFModel", "FeatureMAFOutput", "FeatureMAFPreTrainedModel", "FeatureAggregator", "build_backbone",
    "fit_location_gaussians",
]
