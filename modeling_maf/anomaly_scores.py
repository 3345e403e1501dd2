"""Anomaly scores of a flow, computed from its negative log-likelihood maps, and their calibration.

A flow's NLL is a sum of per-dimension terms; summed over channels they give one map per image, (B, H, W), whose
sum is the image's NLL (a patch flow: each pixel's NLL averaged over the patches that contain it). A score reads the
NLL at one of two grids (`NLLMaps`): the pixel grid (those maps) or the patch grid, (B, Lh, Lw), the NLL of every
patch the flow models at its location (a whole-image flow has one patch, the image, so its grid is (B, 1, 1)). A
patch's NLL is not recoverable from the averaged pixel maps, so the model hands both through. Every score turns the
maps of its grid into the map it looks at and one number per image, higher = more anomalous:

    nll                the image's NLL: the sum of its map (the seed's score).
    map-max            the maximum of the Gaussian-smoothed map: a small defect is diluted in a sum over all
                       pixels, a local peak is not.
    map-topk           the mean of the top `top_k_fraction` pixels of the smoothed map.
    standardized-map   each pixel's NLL as a z-score, (nll - mean) / std with the mean and std of that location
                       over held-out good images, averaged over a `window_size` square; the maximum.
    standardized-topk  the mean of the top `top_k_fraction` pixels of that window-averaged z map.
    positive-z-sum     the sum of the positive z-scores: how much more surprising than usual the image is,
                       wherever that is.
    patch-z-top3       (patch grid) each patch's NLL as a z-score against its location's statistics; the mean of
                       the 3 highest. For a whole-image flow: the z-score of the image's NLL.

The standardised scores need per-location statistics (`LocationStatistics`, one pair per grid) of good images;
`calibrate_scores` computes them, a decision threshold per score at a target false-positive rate, and a display range
per score (`display_range`: one colour scale for the heatmaps of every image). A new score is one function decorated
with `@register_score(name)` in this file (`grid=PATCH_GRID` to read the patch NLL, `in_map_units=True` when the score
is a peak of its map: its maximum or the mean of its top values). These are functions of maps and statistics;
`MAFAnomalyScorer` (anomaly_scorer_maf.py) holds a model's statistics and thresholds, and brings a patch-grid score's
map to pixels.

This file imports only torch: it travels with modeling_maf.py into Hub repos (`trust_remote_code=True`).
"""

import math
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple

import torch


NLL = "nll"
PIXEL_GRID = "pixel"
PATCH_GRID = "patch"
PATCH_TOP_K = 3
# The score of a calibrated model when none is named, chosen by measurement over 3 seeds: for a whole-image flow
# the image NLL (docs/RESULTS.md#whole-image-detector), for a patch flow the top-3 patch z-scores
# (docs/RESULTS.md#patch-detector). An uncalibrated model uses NLL.
DEFAULT_CALIBRATED_SCORE = NLL
DEFAULT_CALIBRATED_PATCH_SCORE = "patch-z-top3"
MIN_CALIBRATION_IMAGES = 3
STD_FLOOR_FRACTION = 0.01
# The colour scale of the heatmaps (`display_range`): the bottom of the bar is this percentile of the good images' map
# values, and the map-level threshold sits at this fraction of the bar (orange in 'jet'; red above it).
DISPLAY_LOW_PERCENTILE = 50.0
DISPLAY_THRESHOLD_POSITION = 0.75
NOT_CALIBRATED = (
    "This model is not calibrated, so it has no anomaly threshold or per-location statistics: call "
    "model.calibrate(good_pixel_values) with held-out good images (float (N, C, H, W) in [0, 1]), then save_pretrained."
)


@dataclass(frozen=True)
class ScoreParameters:
    """Sizes the scores use: Gaussian sigma of map-max/map-topk (pixels), the side of the square averaged by the
    standardised scores (odd, pixels), and the fraction of pixels the top-k scores average."""

    smoothing_sigma: float
    window_size: int
    top_k_fraction: float = 0.01

    @classmethod
    def for_image_size(cls, image_size: int) -> "ScoreParameters":
        """Defaults that scale with the image: sigma = size / 32 and a window of 2 * round(size / 32) + 1
        (4 and 9 pixels at 128x128, 2 and 5 at 64x64)."""
        return cls(smoothing_sigma=image_size / 32, window_size=2 * round(image_size / 32) + 1)

    def to_dict(self) -> dict:
        return asdict(self)


class LocationStatistics(NamedTuple):
    """Mean and standard deviation of the per-pixel NLL at every location, (H, W) each (or (B, H, W): one pair per
    image, as leave-one-out calibration uses)."""

    mean: torch.Tensor
    std: torch.Tensor


class NLLMaps(NamedTuple):
    """The NLL of a batch at both grids the scores read: `pixel` (B, H, W), the per-pixel maps, and `patch`
    (B, Lh, Lw), the NLL of every patch at its location ((B, 1, 1) for a whole-image flow: the image's NLL)."""

    pixel: torch.Tensor
    patch: torch.Tensor

    def to(self, *args, **kwargs) -> "NLLMaps":
        return NLLMaps(self.pixel.to(*args, **kwargs), self.patch.to(*args, **kwargs))

    def cpu(self) -> "NLLMaps":
        return self.to("cpu")

    @classmethod
    def cat(cls, parts) -> "NLLMaps":
        """The maps of several batches, concatenated along the batch."""
        parts = list(parts)
        return cls(torch.cat([part.pixel for part in parts]), torch.cat([part.patch for part in parts]))


class AnomalyScore(NamedTuple):
    name: str
    function: Callable  # (nll_maps at its grid, parameters, statistics at its grid) -> (maps, scores)
    needs_statistics: bool
    description: str
    grid: str = PIXEL_GRID
    in_map_units: bool = False  # the score is a peak of its map (max, top-k mean): its threshold is a map value


ANOMALY_SCORES: dict[str, AnomalyScore] = {}


def register_score(name: str, needs_statistics: bool = False, grid: str = PIXEL_GRID, in_map_units: bool = False):
    """Register `function(nll_maps, parameters, statistics) -> (maps, scores (B,))` as a score; its docstring's first
    line describes it in reports. `grid` is the NLL it reads: PIXEL_GRID (per-pixel maps (B, H, W)) or PATCH_GRID
    (per-patch NLL (B, Lh, Lw)); its maps and statistics are at that grid. `in_map_units`: the score is a peak of its
    map (its maximum, or the mean of its highest values), so its threshold is also a level of the map."""
    if grid not in (PIXEL_GRID, PATCH_GRID):
        raise ValueError(f"grid must be {PIXEL_GRID!r} or {PATCH_GRID!r}, got {grid!r}.")

    def decorator(function):
        description = (function.__doc__ or name).strip().splitlines()[0]
        ANOMALY_SCORES[name] = AnomalyScore(name, function, needs_statistics, description, grid, in_map_units)
        return function

    return decorator


# ------------------------------------------------------------------------------------------------ map operations


def _filter_matrix(size: int, radius: int, weights_of, like: torch.Tensor) -> torch.Tensor:
    """The (size, size) matrix of a 1-D filter over `size` samples: row i holds the weights `weights_of(positions)`
    gives for samples i - radius .. i + radius (positions (size, 2 radius + 1), possibly outside [0, size)), each
    position clamped into [0, size) (edge samples replicated)."""
    positions = torch.arange(size, device=like.device)[:, None] + torch.arange(-radius, radius + 1, device=like.device)
    weights = weights_of(positions).to(like).expand(size, -1).contiguous()
    matrix = torch.zeros(size, size, dtype=like.dtype, device=like.device)
    return matrix.scatter_add_(1, positions.clamp(0, size - 1), weights)


def _separable(maps: torch.Tensor, radius: int, weights_of) -> torch.Tensor:
    """A separable 2-D filter of (B, H, W) maps as two matrix products, rows @ maps @ columns^T: an order of magnitude
    faster on a CPU than the same filter as convolutions (which run one long kernel over one channel)."""
    rows = _filter_matrix(maps.shape[-2], radius, weights_of, maps)
    columns = _filter_matrix(maps.shape[-1], radius, weights_of, maps)
    return rows @ maps @ columns.T


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps (radius ceil(3 sigma)), edge pixels replicated; sigma <= 0 returns
    the maps."""
    if sigma <= 0:
        return maps
    radius = max(1, int(math.ceil(3 * sigma)))
    kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
    kernel = kernel / kernel.sum()
    return _separable(maps, radius, lambda positions: kernel)


def box_mean(maps: torch.Tensor, window_size: int) -> torch.Tensor:
    """Mean of the `window_size` square (odd) around every pixel of (B, H, W) maps (same size out; at the edges, over
    the pixels inside)."""
    if window_size <= 1:
        return maps

    def inside_mean(positions):  # 1 / (the window's samples inside the map) for those, 0 for those outside
        inside = ((positions >= 0) & (positions < positions.shape[0])).double()
        return inside / inside.sum(dim=1, keepdim=True)

    return _separable(maps, window_size // 2, inside_mean)


def top_k_mean(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the highest `fraction` of each map's pixels (at least one)."""
    flat = maps.flatten(1)
    k = max(1, round(fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)


def standardize(nll_maps: torch.Tensor, statistics: LocationStatistics) -> torch.Tensor:
    """z-score of every pixel against its location's statistics."""
    mean = statistics.mean.to(device=nll_maps.device, dtype=nll_maps.dtype)
    std = statistics.std.to(device=nll_maps.device, dtype=nll_maps.dtype)
    return (nll_maps - mean) / std


# ------------------------------------------------------------------------------------------------------ scores


@register_score(NLL)
def nll_score(nll_maps, parameters, statistics):
    """Negative log-likelihood of the image (nats): the sum of its per-pixel map."""
    return nll_maps, nll_maps.sum(dim=(1, 2))


@register_score("map-max", in_map_units=True)
def map_max(nll_maps, parameters, statistics):
    """Maximum of the Gaussian-smoothed per-pixel NLL map."""
    smoothed = gaussian_smooth(nll_maps, parameters.smoothing_sigma)
    return smoothed, smoothed.flatten(1).max(dim=1).values


@register_score("map-topk", in_map_units=True)
def map_topk(nll_maps, parameters, statistics):
    """Mean of the top-k pixels (top_k_fraction) of the Gaussian-smoothed per-pixel NLL map."""
    smoothed = gaussian_smooth(nll_maps, parameters.smoothing_sigma)
    return smoothed, top_k_mean(smoothed, parameters.top_k_fraction)


@register_score("standardized-map", needs_statistics=True, in_map_units=True)
def standardized_map(nll_maps, parameters, statistics):
    """Maximum of the per-location z-score map averaged over a window_size square."""
    averaged = box_mean(standardize(nll_maps, statistics), parameters.window_size)
    return averaged, averaged.flatten(1).max(dim=1).values


@register_score("standardized-topk", needs_statistics=True, in_map_units=True)
def standardized_topk(nll_maps, parameters, statistics):
    """Mean of the top-k pixels (top_k_fraction) of the window-averaged per-location z-score map."""
    averaged = box_mean(standardize(nll_maps, statistics), parameters.window_size)
    return averaged, top_k_mean(averaged, parameters.top_k_fraction)


@register_score("positive-z-sum", needs_statistics=True)
def positive_z_sum(nll_maps, parameters, statistics):
    """Sum over pixels of the positive per-location z-scores."""
    positive = standardize(nll_maps, statistics).clamp_min(0)
    return positive, positive.sum(dim=(1, 2))


@register_score(DEFAULT_CALIBRATED_PATCH_SCORE, needs_statistics=True, grid=PATCH_GRID, in_map_units=True)
def patch_z_top3(nll_maps, parameters, statistics):
    """Mean of the 3 highest per-location z-scores of the patches' NLL."""
    z = standardize(nll_maps, statistics)
    flat = z.flatten(1)
    return z, flat.topk(min(PATCH_TOP_K, flat.shape[1]), dim=1).values.mean(dim=1)


# ----------------------------------------------------------------------------------------------- compute/calibrate


def _at_grid(value, score: AnomalyScore, what: str):
    """The part of `value` (NLLMaps, statistics per grid, or the bare pixel-grid value) that `score` reads."""
    if isinstance(value, NLLMaps):
        return getattr(value, score.grid)
    if isinstance(value, dict):
        if score.grid not in value:
            raise ValueError(f"The score {score.name!r} needs {what} at the {score.grid} grid; got only {list(value)}.")
        return value[score.grid]
    if score.grid != PIXEL_GRID:
        raise ValueError(f"The score {score.name!r} reads the per-patch NLL: pass NLLMaps (model.nll_maps(pixels)) "
                         f"and {what} per grid, not per-pixel maps alone.")
    return value


def check_score_name(name: str) -> AnomalyScore:
    if name not in ANOMALY_SCORES:
        raise ValueError(f"Unknown anomaly score {name!r}; use one of {list(ANOMALY_SCORES)}.")
    return ANOMALY_SCORES[name]


def compute_score(name: str, nll_maps: NLLMaps | torch.Tensor, parameters: ScoreParameters,
                  statistics: dict | LocationStatistics | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps, scores (B,)) of score `name`, its maps at its grid. `nll_maps`: NLLMaps, or per-pixel maps (B, H, W)
    alone for the pixel-grid scores; `statistics`: per grid name (as `calibrate_scores` returns them for NLLMaps),
    or the pixel grid's alone."""
    score = check_score_name(name)
    if score.needs_statistics and statistics is None:
        raise ValueError(f"The score {name!r} needs per-location statistics of good images. {NOT_CALIBRATED}")
    maps = _at_grid(nll_maps, score, "NLL maps")
    return score.function(maps, parameters, _at_grid(statistics, score, "statistics") if score.needs_statistics
                          else None)


def location_statistics(nll_maps: torch.Tensor) -> LocationStatistics:
    """Per-location mean and unbiased std of (N, H, W) maps of good images, computed in float64.

    The std is floored at STD_FLOOR_FRACTION times its mean over locations, so that a location whose NLL barely
    varies over the good images (a flat background) cannot turn a rounding difference into a huge z-score.
    """
    if nll_maps.shape[0] < 2:
        raise ValueError(f"Per-location statistics need at least 2 good images, got {nll_maps.shape[0]}.")
    maps = nll_maps.double()
    std = maps.std(dim=0, unbiased=True)
    return LocationStatistics(maps.mean(dim=0), std.clamp_min(_std_floor(std)))


def _std_floor(std: torch.Tensor) -> float:
    return STD_FLOOR_FRACTION * float(std.mean())


def _leave_one_out_statistics(nll_maps: torch.Tensor, floor: float) -> LocationStatistics:
    """For every image i, the statistics of the other N - 1 images, (N, H, W) each (float64, same floor)."""
    maps = nll_maps.double()
    count = maps.shape[0]
    mean = maps.mean(dim=0)
    deviation = maps - mean
    sum_of_squares = deviation.square().sum(dim=0)
    others_mean = mean - deviation / (count - 1)
    others_sum_of_squares = (sum_of_squares - deviation.square() * count / (count - 1)).clamp_min(0)
    others_std = (others_sum_of_squares / (count - 2)).sqrt()
    return LocationStatistics(others_mean, others_std.clamp_min(floor))


def threshold_at_fpr(good_scores: torch.Tensor, target_fpr: float) -> tuple[float, float]:
    """The decision threshold t for "anomalous when score > t" that flags at most floor(target_fpr * N) of the N
    good images' scores, and the fraction it flags. t is one of the scores (the (k + 1)-th highest)."""
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr!r}.")
    scores = torch.sort(good_scores.detach().double().cpu()).values
    count = scores.numel()
    allowed = math.floor(target_fpr * count + 1e-9)
    threshold = float(scores[count - 1 - allowed])
    return threshold, float((scores > threshold).sum()) / count


def expected_fpr(calibration_fpr: float, count: int) -> float:
    """The expected fraction of *new* good images above a threshold that flags `calibration_fpr` of `count` good
    calibration images, m = calibration_fpr * count of them: (m + 1) / (count + 1). A threshold read off the
    calibration scores sits among them, so a new good image, exchangeable with them, lands above it with probability
    (m + 1) / (count + 1): more than the fraction flagged there, and more than the target with few images (22 images
    at a 5 % target: 1 flagged, 8.7 % expected)."""
    return (round(calibration_fpr * count) + 1) / (count + 1)


def _percentile(values: torch.Tensor, percent: float) -> float:
    """The `percent` percentile of all values (the k-th smallest: no size limit, unlike torch.quantile)."""
    flat = values.detach().flatten().double().cpu()
    return float(flat.kthvalue(min(flat.numel(), max(1, round(percent / 100 * flat.numel())))).values)


def display_range(good_maps: torch.Tensor, threshold: float, in_map_units: bool, target_fpr: float) -> dict:
    """One colour scale for the maps of a score, from its maps of held-out good images (N, H, W) and its threshold:
    `{"low", "high", "map_threshold"}`, map values, and `"label"`, what the colour bar calls `map_threshold`.

    `map_threshold` is the map level that corresponds to the decision: the threshold itself for a score that is a peak
    of its map (`in_map_units`, label "threshold"), else (a sum over the map, such as the image NLL) the level that
    the good images' map maxima exceed at `target_fpr` (label "good peak"). `low` is the
    DISPLAY_LOW_PERCENTILE percentile of the good maps' values, and `high` puts `map_threshold` at
    DISPLAY_THRESHOLD_POSITION of [low, high]: on this scale a typical good location is blue, a location at the
    decision level orange and anything above it red, the same for every image.
    """
    if in_map_units:
        map_threshold, label = float(threshold), "threshold"
    else:
        map_threshold, _ = threshold_at_fpr(good_maps.flatten(1).max(dim=1).values, target_fpr)
        label = "good peak"
    low = _percentile(good_maps, DISPLAY_LOW_PERCENTILE)
    if not map_threshold > low:  # a threshold at or below the typical good value: still a scale that ends above it
        low = map_threshold - max(abs(map_threshold), 1.0) * 1e-3
    high = low + (map_threshold - low) / DISPLAY_THRESHOLD_POSITION
    return {"low": low, "high": high, "map_threshold": map_threshold, "label": label}


def calibrate_scores(nll_maps: NLLMaps | torch.Tensor, parameters: ScoreParameters, target_fpr: float):
    """Calibrate every registered score on the NLL maps of held-out good images: NLLMaps (every score), or per-pixel
    maps (N, H, W) alone (the pixel-grid scores only).

    Returns `(statistics, thresholds, fprs, display_ranges)`: the per-location statistics (float64; per grid name for
    NLLMaps, else the pixel grid's), and per score name the threshold at `target_fpr`, the fraction of these images it
    flags and the colour scale of its maps (`display_range`, from the same maps).

    The thresholds of the standardised scores come from leave-one-out scores: each image is standardised by the
    statistics of the other N - 1, so that it is scored as a new good image would be (an image standardised by
    statistics it contributed to looks more typical than it is, and the threshold would be too low).
    """
    grids = nll_maps._asdict() if isinstance(nll_maps, NLLMaps) else {PIXEL_GRID: nll_maps}
    count = grids[PIXEL_GRID].shape[0]
    if count < MIN_CALIBRATION_IMAGES:
        raise ValueError(
            f"Calibration needs at least {MIN_CALIBRATION_IMAGES} held-out good images, got {count}: pass more (e.g. a "
            "larger --validation_split_percentage)."
        )
    statistics = {grid: location_statistics(maps) for grid, maps in grids.items()}
    leave_one_out = {grid: _leave_one_out_statistics(maps, _std_floor(maps.double().std(dim=0, unbiased=True)))
                     for grid, maps in grids.items()}
    thresholds, fprs, display_ranges = {}, {}, {}
    for name, score in ANOMALY_SCORES.items():
        if score.grid not in grids:
            continue
        maps = grids[score.grid]
        if score.needs_statistics:
            score_maps, scores = score.function(maps.double(), parameters, leave_one_out[score.grid])
        else:
            score_maps, scores = score.function(maps, parameters, None)
        thresholds[name], fprs[name] = threshold_at_fpr(scores, target_fpr)
        display_ranges[name] = display_range(score_maps, thresholds[name], score.in_map_units, target_fpr)
    statistics = statistics if isinstance(nll_maps, NLLMaps) else statistics[PIXEL_GRID]
    return statistics, thresholds, fprs, display_ranges


__all__ = [
    "ANOMALY_SCORES",
    "DEFAULT_CALIBRATED_PATCH_SCORE",
    "DEFAULT_CALIBRATED_SCORE",
    "DISPLAY_LOW_PERCENTILE",
    "DISPLAY_THRESHOLD_POSITION",
    "NLL",
    "NOT_CALIBRATED",
    "PATCH_GRID",
    "PATCH_TOP_K",
    "PIXEL_GRID",
    "NLLMaps",
    "AnomalyScore",
    "LocationStatistics",
    "ScoreParameters",
    "box_mean",
    "calibrate_scores",
    "check_score_name",
    "compute_score",
    "display_range",
    "expected_fpr",
    "gaussian_smooth",
    "location_statistics",
    "register_score",
    "standardize",
    "threshold_at_fpr",
    "top_k_mean",
]
