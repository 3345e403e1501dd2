"""Heatmaps of anomaly maps: the colour scale, the colours, the overlay on the image and its colour bar.

One colour scale (`HeatmapScale`) serves the pipeline's heatmaps, the demo and the reports, so that every picture of a
model's maps can be compared with every other:

- A calibrated model carries a display range per score (`config.anomaly_calibration["display_ranges"]`, made by
  `anomaly_scores.display_range` from the maps of the held-out good images): `low` (a typical good location: blue),
  `map_threshold` (the map level of the decision, at `DISPLAY_THRESHOLD_POSITION` of the bar: orange) and `high` (dark
  red; values above it stay dark red). The same values get the same colours in every image, whatever else is shown
  with it.
- A model that is not calibrated, or was calibrated before display ranges were saved, has none: its maps are scaled
  per image (1st to 99th percentile), which shows where in the image the score comes from but not whether the image is
  anomalous, and the scale's `note` says so.

This file imports only numpy and PIL: the pipeline (pipeline_maf.py) imports it, so it travels with the model into
Hub repos, and the training library's figures import it from here.
"""

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont


PER_IMAGE_PERCENTILES = (1.0, 99.0)
NOT_CALIBRATED_NOTE = "colours scaled per image (1st to 99th percentile): the model is not calibrated"
NO_DISPLAY_RANGE_NOTE = ("colours scaled per image (1st to 99th percentile): the model was calibrated before display "
                         "ranges were saved; calibrate it again for one scale with the threshold marked")


def jet_colors(values: np.ndarray) -> np.ndarray:
    """The 'jet' colour map (blue -> cyan -> yellow -> red) of values in [0, 1], as uint8 RGB (..., 3)."""
    values = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25])  # where red, green and blue peak
    return (np.clip(1.5 - np.abs(4.0 * (values - centres)), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class HeatmapScale:
    """Map values `low` -> blue, `high` -> dark red, linear between and clipped outside; `threshold` is the map level
    of the decision (None on a per-image scale) and `threshold_label` its name on the colour bar; `note` says why a
    scale is per image (None when calibrated)."""

    low: float
    high: float
    threshold: float | None = None
    note: str | None = None
    threshold_label: str = "threshold"

    @property
    def per_image(self) -> bool:
        return self.note is not None

    def normalize(self, values) -> np.ndarray:
        """Values -> [0, 1] on this scale (0 for a scale of zero width)."""
        values = np.asarray(values, dtype=np.float32)
        if not self.high > self.low:
            return np.zeros_like(values)
        return np.clip((values - self.low) / (self.high - self.low), 0.0, 1.0).astype(np.float32)

    def to_dict(self) -> dict:
        return asdict(self)


def heatmap_scale(anomaly_map: np.ndarray, display_range: dict | None = None, calibrated: bool = False
                  ) -> HeatmapScale:
    """The colour scale of `anomaly_map`: the calibrated `display_range` (`{"low", "high", "map_threshold"}`) when
    the model has one, else the map's own 1st to 99th percentile with a note (`calibrated`: whether the model is
    calibrated, to say why it has no range)."""
    if display_range is not None:
        return HeatmapScale(float(display_range["low"]), float(display_range["high"]),
                            float(display_range["map_threshold"]), None, display_range.get("label", "threshold"))
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    low, high = (float(value) for value in np.percentile(anomaly_map, PER_IMAGE_PERCENTILES))
    if high <= low:
        low, high = float(anomaly_map.min()), float(anomaly_map.max())
    return HeatmapScale(low, high, None, NO_DISPLAY_RANGE_NOTE if calibrated else NOT_CALIBRATED_NOTE)


def heatmap_overlay(image: Image.Image, anomaly_map: np.ndarray, alpha: float = 0.5,
                    scale: HeatmapScale | None = None) -> Image.Image:
    """The map (H, W) in jet colours on `scale` (default: the map's own, `heatmap_scale(anomaly_map)`), resized to
    the image (bilinear) and blended over it with `alpha`: an RGB image of the image's size."""
    scale = scale or heatmap_scale(anomaly_map)
    scaled = scale.normalize(anomaly_map)
    scaled = np.asarray(Image.fromarray(scaled, mode="F").resize(image.size, resample=Image.BILINEAR))
    colours = Image.fromarray(jet_colors(scaled), mode="RGB")
    return Image.blend(image.convert("RGB"), colours, alpha)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one small bitmap font
        return ImageFont.load_default()


def level_labels(values) -> list[str]:
    """Labels of the levels of a colour bar: the fewest significant digits (at least 3) that tell them apart."""
    values = [float(value) for value in values]
    for digits in range(3, 10):
        labels = [f"{value:.{digits}g}" for value in values]
        if len(set(labels)) == len(set(values)):
            return labels
    return labels


def colorbar_image(scale: HeatmapScale, height: int) -> Image.Image:
    """A vertical colour bar of `scale` (`height` pixels, high at the top), labelled with `low`, `high` and, on a
    calibrated scale, the threshold marked by a line across the bar; a per-image scale is labelled as such. As wide
    as its labels need."""
    font = _font(max(10, height // 22))
    margin = max(6, height // 20)
    bar_left, bar_width = 4, max(10, height // 16)
    top, bottom = margin, height - margin
    text_left = bar_left + bar_width + 5
    if scale.per_image:
        marks = [(scale.high, "image p99"), (scale.low, "image p1")]
    else:
        low, threshold, high = level_labels([scale.low, scale.threshold, scale.high])
        marks = [(scale.high, high), (scale.threshold, f"{scale.threshold_label}\n{threshold}"), (scale.low, low)]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = text_left + 4 + max(measure.multiline_textbbox((0, 0), text, font=font)[2] for _, text in marks)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    levels = np.linspace(1.0, 0.0, max(1, bottom - top), dtype=np.float32)
    canvas.paste(Image.fromarray(np.repeat(jet_colors(levels)[:, None, :], bar_width, axis=1), mode="RGB"),
                 (bar_left, top))
    draw.rectangle((bar_left, top, bar_left + bar_width - 1, bottom - 1), outline=(0, 0, 0))
    for value, text in marks:
        y = top + (1.0 - float(scale.normalize(value))) * (bottom - top - 1)
        draw.line((bar_left + bar_width, y, text_left - 1, y), fill=(0, 0, 0))
        box = draw.multiline_textbbox((0, 0), text, font=font)
        draw.multiline_text((text_left, min(max(0, y - (box[3] + box[1]) / 2), height - box[3])), text,
                            fill=(0, 0, 0), font=font)
    if not scale.per_image:
        y = top + (1.0 - float(scale.normalize(scale.threshold))) * (bottom - top - 1)
        draw.line((bar_left - 3, y, bar_left + bar_width + 2, y), fill=(0, 0, 0), width=max(2, height // 120))
    return canvas


def with_colorbar(heatmap: Image.Image, scale: HeatmapScale, min_height: int = 256) -> Image.Image:
    """The heatmap enlarged (sharp pixels) to at least `min_height` pixels, its colour bar to the right."""
    factor = max(1, -(-min_height // heatmap.height))
    enlarged = heatmap.resize((heatmap.width * factor, heatmap.height * factor), resample=Image.NEAREST)
    bar = colorbar_image(scale, enlarged.height)
    combined = Image.new("RGB", (enlarged.width + bar.width, enlarged.height), (255, 255, 255))
    combined.paste(enlarged.convert("RGB"), (0, 0))
    combined.paste(bar, (enlarged.width, 0))
    return combined


__all__ = ["HeatmapScale", "colorbar_image", "heatmap_overlay", "heatmap_scale", "jet_colors", "level_labels",
           "with_colorbar"]
