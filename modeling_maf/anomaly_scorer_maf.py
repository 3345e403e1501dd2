"""The anomaly scorer of a density model: anomaly scores, maps, thresholds and decisions from per-location NLL maps,
and their calibration on held-out good images.

`MAFAnomalyScorer` never sees the model that made the maps: it takes `NLLMaps`, the NLL at the pixel grid
(B, H, W) and at the model's location grid (B, Lh, Lw) (the patches of a patch flow, the image of a whole-image flow,
or the feature locations of a flow over CNN features), and a function that brings location-grid maps to pixels. The
scores themselves are the registered functions of `anomaly_scores.py`.

The calibration is the scorer's state, saved with the model as a model's state is:
- the per-location statistics of good images are persistent buffers (`location_mean`, `location_std` at the pixel
  grid, `patch_location_mean`, `patch_location_std` at the location grid), so they travel in model.safetensors;
- the rest (default score, thresholds per score, their false-positive rates, the score sizes, the colour scale of
  every score's heatmaps) is JSON in the model config's `anomaly_calibration` field, so it travels in config.json.
  The scorer reads and writes that field and nothing else does; `None` means not calibrated.

This file imports only torch, transformers and its sibling `anomaly_scores.py`: it travels with modeling_maf.py into
Hub repos (`trust_remote_code=True`).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput, logging

from .anomaly_scores import (
    ANOMALY_SCORES,
    NLL,
    NOT_CALIBRATED,
    PATCH_GRID,
    PIXEL_GRID,
    LocationStatistics,
    NLLMaps,
    ScoreParameters,
    calibrate_scores,
    check_score_name,
    compute_score,
    expected_fpr,
)


logger = logging.get_logger(__name__)


@dataclass
class AnomalyPrediction(ModelOutput):
    """
    Output of [`MAFModel.predict_anomalies`] and [`MAFAnomalyScorer.predict`].

    Args:
        scores (`torch.FloatTensor` of shape `(batch_size,)`):
            Anomaly score of every image under `method` (higher = more anomalous).
        maps (`torch.FloatTensor` of shape `(batch_size, height, width)`):
            The map the score reduces (per-pixel NLL, smoothed NLL or per-location z-scores, by `method`).
        is_anomalous (`torch.BoolTensor` of shape `(batch_size,)`, *optional*):
            `scores > threshold`; None when the model is not calibrated.
        threshold (`float`, *optional*):
            The decision threshold of `method` from `MAFModel.calibrate`; None when the model is not calibrated.
        method (`str`):
            The score's name (see `modeling_maf.anomaly_scores.ANOMALY_SCORES`).
        display_range (`dict`, *optional*):
            The colour scale of `method`'s maps from the calibration, `{"low", "high", "map_threshold"}` in map units
            (`anomaly_scores.display_range`): the same for every image, so that heatmaps can be compared. None when
            the model is not calibrated, or was calibrated before display ranges were saved (heatmaps are then scaled
            per image).
    """

    scores: torch.FloatTensor | None = None
    maps: torch.FloatTensor | None = None
    is_anomalous: torch.BoolTensor | None = None
    threshold: float | None = None
    method: str | None = None
    display_range: dict | None = None


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def upsample_bilinear(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Location-grid maps (B, Lh, Lw) -> (B, H, W), bilinear (a 1 x 1 grid fills the map with its value)."""
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


class MAFAnomalyScorer(nn.Module):
    """Anomaly scores, maps, thresholds and decisions from NLL maps, and their calibration.

    Args:
        config: the model's config; the scorer keeps the non-tensor part of its calibration in its
            `anomaly_calibration` field (None until `calibrate`), which config.json saves.
        image_size (`int` or `(height, width)`): the pixel grid of the maps.
        grid_size (`int` or `(height, width)`): the location grid of the per-location NLL (1: one value per image).
        default_method (`str`): the score `calibrate` makes the default when none is named.
        grid_to_pixels (callable, *optional*): location-grid maps (B, Lh, Lw) -> pixel maps (B, H, W), for the maps
            of the location-grid scores; default: bilinear upsampling.
    """

    def __init__(self, config, image_size, grid_size=1, default_method: str = NLL,
                 grid_to_pixels: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 default_parameters: ScoreParameters | None = None):
        super().__init__()
        self._config = config
        self.image_size, self.grid_size = _pair(image_size), _pair(grid_size)
        self.default_method = check_score_name(default_method).name
        self.grid_to_pixels = grid_to_pixels
        self.default_parameters = default_parameters or ScoreParameters.for_image_size(self.image_size[0])
        # Persistent: model.safetensors holds them as `<attribute>.location_mean`, ... Zeros and ones until calibrated.
        self.register_buffer("location_mean", torch.zeros(self.image_size))
        self.register_buffer("location_std", torch.ones(self.image_size))
        self.register_buffer("patch_location_mean", torch.zeros(self.grid_size))
        self.register_buffer("patch_location_std", torch.ones(self.grid_size))

    # ------------------------------------------------------------------------------------------------ state
    @property
    def calibration(self) -> dict | None:
        """What `calibrate` wrote (the default `method`, `target_fpr`, `thresholds`, `calibration_fpr`, `expected_fpr`
        and `display_ranges` per score, `num_images` and the score sizes), as config.json holds it; None when not
        calibrated."""
        return self._config.anomaly_calibration

    @property
    def is_calibrated(self) -> bool:
        return self.calibration is not None

    @property
    def score_parameters(self) -> ScoreParameters:
        """The sizes the scores use: the calibrated ones, else the defaults for the image size."""
        if self.calibration is None:
            return self.default_parameters
        return ScoreParameters(**{key: self.calibration[key] for key in ScoreParameters.__dataclass_fields__})

    def _buffers_by_grid(self) -> dict:
        return {PIXEL_GRID: (self.location_mean, self.location_std),
                PATCH_GRID: (self.patch_location_mean, self.patch_location_std)}

    def get(self) -> dict:
        """The per-location statistics, per grid name (`LocationStatistics` of the buffers)."""
        return {grid: LocationStatistics(mean, std) for grid, (mean, std) in self._buffers_by_grid().items()}

    def store(self, statistics: dict) -> dict:
        """Copy statistics (per grid name) into the buffers (their dtype and device); return them as stored."""
        with torch.no_grad():
            for grid, (mean, std) in self._buffers_by_grid().items():
                mean.copy_(statistics[grid].mean)
                std.copy_(statistics[grid].std)
        return self.get()

    def reset_parameters(self, skip_loaded: bool = False):
        """Zeros and ones; with `skip_loaded`, buffers loaded from a checkpoint (`_is_hf_initialized`) are kept."""
        with torch.no_grad():
            for mean, std in self._buffers_by_grid().values():
                for tensor, value in ((mean, 0.0), (std, 1.0)):
                    if not (skip_loaded and getattr(tensor, "_is_hf_initialized", False)):
                        tensor.fill_(value)

    # ------------------------------------------------------------------------------------------------ scoring
    def resolve_method(self, method: str | None = None) -> str:
        """The score name `method` stands for: itself (checked), or for None the calibrated default, else (not
        calibrated) `default_method` when it needs no statistics, "nll" when it does."""
        if method is None:
            if self.is_calibrated:
                return self.calibration["method"]
            return NLL if ANOMALY_SCORES[self.default_method].needs_statistics else self.default_method
        return check_score_name(method).name

    @property
    def available_scores(self) -> list[str]:
        """The scores computable now: those without statistics, and when calibrated those it has thresholds (and
        statistics) for."""
        calibrated = self.calibration["thresholds"] if self.is_calibrated else {}
        return [name for name, score in ANOMALY_SCORES.items() if not score.needs_statistics or name in calibrated]

    def score(self, nll_maps: NLLMaps | torch.Tensor, method: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(maps (B, H, W), scores (B,))` of `method` (None: the calibrated default, else "nll") from `nll_maps`
        (NLLMaps; per-pixel maps (B, H, W) alone do for the pixel-grid scores). Maps of a location-grid score are
        brought to pixels by `grid_to_pixels`."""
        method = self.resolve_method(method)
        score = check_score_name(method)
        statistics = None
        if self.is_calibrated and score.needs_statistics:
            if method not in self.calibration["thresholds"]:
                raise ValueError(f"This model was calibrated before the score {method!r} existed: call "
                                 "model.calibrate(good_pixel_values) again to add it.")
            statistics = self.get()
        maps, scores = compute_score(method, nll_maps, self.score_parameters, statistics)
        if score.grid == PATCH_GRID:
            maps = self.grid_to_pixels(maps) if self.grid_to_pixels is not None else \
                upsample_bilinear(maps, self.image_size)
        return maps, scores

    def threshold(self, method: str | None = None) -> float:
        """The decision threshold of `method` ("anomalous when score > threshold"); raises when not calibrated."""
        if not self.is_calibrated:
            raise ValueError(NOT_CALIBRATED)
        return float(self.calibration["thresholds"][self.resolve_method(method)])

    def display_range(self, method: str | None = None) -> dict | None:
        """The colour scale of `method`'s maps (`{"low", "high", "map_threshold"}`, see `anomaly_scores.display_range`);
        None when not calibrated or calibrated before display ranges were saved."""
        if not self.is_calibrated:
            return None
        return self.calibration.get("display_ranges", {}).get(self.resolve_method(method))

    def predict(self, nll_maps: NLLMaps | torch.Tensor, method: str | None = None) -> AnomalyPrediction:
        """Scores, maps and decisions (`scores > threshold`) of `method`; when not calibrated, scores and maps with
        `is_anomalous` and `threshold` None (and a warning that says how to calibrate)."""
        method = self.resolve_method(method)
        maps, scores = self.score(nll_maps, method)
        if not self.is_calibrated:
            logger.warning_once(NOT_CALIBRATED)
            return AnomalyPrediction(scores=scores, maps=maps, method=method)
        threshold = self.threshold(method)
        return AnomalyPrediction(scores=scores, maps=maps, is_anomalous=scores.double() > threshold,
                                 threshold=threshold, method=method, display_range=self.display_range(method))

    # ------------------------------------------------------------------------------------------------ calibration
    @torch.no_grad()
    def calibrate(self, nll_maps: NLLMaps, target_fpr: float = 0.05, method: str | None = None,
                  parameters: ScoreParameters | None = None) -> dict:
        """Calibrate on the NLL maps of held-out good images: the per-location statistics go to the buffers, and the
        threshold of every score at `target_fpr` ("anomalous when score > threshold"), the colour scale of its maps,
        `method` as the default score (None: `default_method`) and the score sizes (`parameters`, default:
        `ScoreParameters.for_image_size`) to `config.anomaly_calibration`. Returns `config.anomaly_calibration`."""
        method = check_score_name(method or self.default_method).name
        parameters = parameters or self.default_parameters
        statistics, thresholds, fprs, display_ranges = calibrate_scores(nll_maps, parameters, target_fpr)
        self.store(statistics)
        self._config.anomaly_calibration = {
            "method": method,
            "target_fpr": float(target_fpr),
            "thresholds": thresholds,
            "calibration_fpr": fprs,
            "expected_fpr": {name: expected_fpr(fpr, int(nll_maps.pixel.shape[0])) for name, fpr in fprs.items()},
            "display_ranges": display_ranges,
            "num_images": int(nll_maps.pixel.shape[0]),
            **parameters.to_dict(),
        }
        return self._config.anomaly_calibration

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, grid_size={self.grid_size}, calibrated={self.is_calibrated}"


class AnomalyDetectionMixin:
    """The anomaly-detection API of a density model, delegated to its `anomaly_statistics` (a `MAFAnomalyScorer`).
    A model provides `nll_maps(pixel_values) -> NLLMaps` (deterministic) and the scorer; MAF, IAF and the
    feature-space detector share this API, so the pipeline, the scripts and the demo work with any of them."""

    @property
    def default_anomaly_score(self) -> str:
        """The score `calibrate` makes the default when none is named (the model's choice, by measurement)."""
        return self.anomaly_statistics.default_method

    @property
    def is_calibrated(self) -> bool:
        """Whether `calibrate` has set the anomaly thresholds and per-location statistics."""
        return self.anomaly_statistics.is_calibrated

    @property
    def anomaly_score_parameters(self) -> ScoreParameters:
        """The sizes the scores use: the calibrated ones, else the defaults for this image size."""
        return self.anomaly_statistics.score_parameters

    @property
    def available_anomaly_scores(self) -> list[str]:
        """The scores this model can compute now (`MAFAnomalyScorer.available_scores`)."""
        return self.anomaly_statistics.available_scores

    def resolve_anomaly_method(self, method: str | None = None) -> str:
        """The score name `method` stands for: itself (checked), or for None the calibrated default, else "nll"."""
        return self.anomaly_statistics.resolve_method(method)

    def score_nll_maps(self, nll_maps: NLLMaps | torch.Tensor, method: str | None = None):
        """`(maps (batch, H, W), scores)` of `method` from the maps of `nll_maps(x)`: many scores from one pass."""
        return self.anomaly_statistics.score(nll_maps, method)

    def anomaly_scores(self, pixel_values: torch.Tensor, method: str | None = None) -> torch.Tensor:
        """Per-image anomaly score (batch,), deterministic; higher = more anomalous. `method` is a name of
        `modeling_maf.anomaly_scores.ANOMALY_SCORES`; None = the calibrated default, or "nll" (the sum of the
        per-pixel NLL map; for a whole-image flow the image's negative log-likelihood in nats) for a model that is
        not calibrated."""
        return self.score_nll_maps(self.nll_maps(pixel_values), method)[1]

    def anomaly_maps(self, pixel_values: torch.Tensor, method: str | None = None) -> torch.Tensor:
        """The map (batch, H, W) that `method`'s score reduces; for "nll" the per-pixel NLL map of `nll_maps`."""
        return self.score_nll_maps(self.nll_maps(pixel_values), method)[0]

    def anomaly_threshold(self, method: str | None = None) -> float:
        """The decision threshold of `method` ("anomalous when score > threshold"); raises when not calibrated."""
        return self.anomaly_statistics.threshold(method)

    def anomaly_display_range(self, method: str | None = None) -> dict | None:
        """The calibrated colour scale of `method`'s maps, `{"low", "high", "map_threshold"}` (None when not
        calibrated, or calibrated before display ranges were saved); `modeling_maf.heatmap_maf` draws with it."""
        return self.anomaly_statistics.display_range(method)

    def predict_anomalies(self, pixel_values: torch.Tensor, method: str | None = None) -> AnomalyPrediction:
        """Scores, maps and decisions (`scores > threshold`) of `method` (None = the calibrated default). A model
        that is not calibrated returns scores and maps with `is_anomalous` and `threshold` None."""
        method = self.resolve_anomaly_method(method)
        return self.anomaly_statistics.predict(self.nll_maps(pixel_values), method)

    @torch.no_grad()
    def calibrate(self, good_pixel_values: torch.Tensor | None, target_fpr: float = 0.05, method: str | None = None,
                  batch_size: int = 16, parameters: ScoreParameters | None = None,
                  nll_maps: NLLMaps | None = None) -> dict:
        """Calibrate the anomaly scores on held-out good images (never trained on), float (N, C, H, W) in [0, 1],
        `batch_size` at a time: `MAFAnomalyScorer.calibrate` on their NLL maps (per-location statistics, the
        threshold of every score at `target_fpr`, `method` as the default score, the score sizes `parameters`).
        `nll_maps`: the maps of more good images, scored by models of the same recipe that did not train on them
        (`train_maf.py --calibration_folds`), calibrated on with them (or alone, with `good_pixel_values` None).
        `save_pretrained` saves all of it. Returns `config.anomaly_calibration`."""
        method = check_score_name(method or self.default_anomaly_score).name
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        parts = [] if good_pixel_values is None else [self.nll_maps(chunk.to(self.device))
                                                      for chunk in good_pixel_values.split(batch_size)]
        if nll_maps is not None:
            parts.append(nll_maps.to(self.device))
        if not parts:
            raise ValueError("Pass good_pixel_values or nll_maps to calibrate on.")
        return self.anomaly_statistics.calibrate(NLLMaps.cat(parts), target_fpr, method, parameters)


__all__ = ["AnomalyDetectionMixin", "AnomalyPrediction", "MAFAnomalyScorer", "upsample_bilinear"]
