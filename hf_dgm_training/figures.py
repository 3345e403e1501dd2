# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""Figures of a run: loss curves, image grids (plain, titled, small palette PNGs), heatmap colour bars."""

from __future__ import annotations

import math
import os
import tempfile


def _ema(values: list[float], smoothing: float) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing); NaN/inf points are skipped."""
    smoothed, average, weight = [], 0.0, 0.0
    for value in values:
        if math.isfinite(value):
            average = smoothing * average + (1 - smoothing) * value
            weight = smoothing * weight + (1 - smoothing)
        smoothed.append(average / weight if weight > 0 else float("nan"))
    return smoothed


LINE_STYLES = ("-", "--", "-.", ":")
SPARSE_POINTS = 50
MARKERS = ("o", "s", "^", "D", "v", "x")


def plot_curves(
    series: dict[str, tuple[list, list]], path: str, title: str, ylabel: str = "", smoothing: float = 0.9
) -> None:
    """Plots named (steps, values) series: raw values thin and faint, EMA-smoothed in the same colour. A sparse series
    (at most SPARSE_POINTS points, or a fifth of the longest series' points: an evaluation per epoch) is drawn
    unsmoothed, as markers joined by a line, each in its own marker and line style and above the dense series, so that
    sparse series with equal values stay visible."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}.")
    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)  # no pyplot: no global backend state, safe in threads and headless runs
    axes = figure.add_subplot()
    longest = max((len(steps) for steps, _ in series.values()), default=0)
    sparse = 0
    for index, (name, (steps, values)) in enumerate(series.items()):
        steps = [float(s) for s in steps]
        values = [float(v) for v in values]
        if len(steps) != len(values):
            raise ValueError(f"Series {name!r} has {len(steps)} steps but {len(values)} values.")
        color = f"C{index % 10}"
        if len(steps) <= SPARSE_POINTS or 5 * len(steps) <= longest:
            axes.plot(steps, values, color=color, linewidth=1.2, linestyle=LINE_STYLES[(sparse + 1) % len(LINE_STYLES)],
                      marker=MARKERS[sparse % len(MARKERS)], markersize=7 - 1.5 * (sparse % 3),
                      markevery=max(1, len(steps) // SPARSE_POINTS), markerfacecolor="none" if sparse % 2 else color,
                      zorder=3 + sparse, label=name)
            sparse += 1
            continue
        axes.plot(steps, values, color=color, linewidth=0.8, alpha=0.3)
        axes.plot(steps, _ema(values, smoothing), color=color, linewidth=1.5, label=name)
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if series:
        axes.legend()
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path)


def _grid_pixels(images, nrow: int, padding: int = 2):
    """(rows, columns, C) uint8 array of images in a grid, `nrow` images per row (like torchvision's `make_grid`).
    `images` is a float tensor (N, C, H, W) with values in [0, 1] and C in {1, 3}, or a list of PIL images."""
    import numpy as np

    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("save_image_grid got no images.")
        arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
        batch = np.stack(arrays).transpose(0, 3, 1, 2)
    else:
        batch = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images, np.float32)
    if batch.ndim != 4 or batch.shape[1] not in (1, 3):
        raise ValueError(f"save_image_grid expects images of shape (N, C, H, W) with C in (1, 3), got {batch.shape}.")
    if nrow < 1:
        raise ValueError(f"nrow must be positive, got {nrow}.")
    count, channels, height, width = batch.shape
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    grid = np.zeros((channels, rows * (height + padding) + padding, columns * (width + padding) + padding), np.float32)
    for index in range(count):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[:, top : top + height, left : left + width] = batch[index]
    return (np.clip(grid, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)


def save_image_grid(images, path: str, nrow: int, padding: int = 2) -> None:
    """Writes images as one PNG grid, `nrow` images per row (like torchvision's `make_grid`).

    `images` is a float tensor (N, C, H, W) with values in [0, 1] and C in {1, 3}, or a list of PIL images.
    """
    from PIL import Image

    pixels = _grid_pixels(images, nrow, padding)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(path, format="PNG")


def save_labelled_grids(panels: list, path: str, nrow: int, panels_per_row: int | None = None) -> None:
    """Writes several image grids into one PNG, each under its own title, e.g. exact and refined samples side by side.

    `panels` is a list of `(title, images)` with images as for `save_image_grid` (`nrow` images per grid row);
    `panels_per_row` grids go side by side (default: all of them), further grids go below.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("save_labelled_grids got no panels.")
    grids = [(str(title), _grid_pixels(images, nrow)) for title, images in panels]
    columns = min(panels_per_row or len(grids), len(grids))
    rows = math.ceil(len(grids) / columns)
    dpi, title_inches = 100, 0.45
    height = max(grid.shape[0] for _, grid in grids)
    width = max(grid.shape[1] for _, grid in grids)
    panel_width = max(width / dpi, 3.0)  # at least room for a title line when the images are tiny
    panel_height = panel_width * height / width + title_inches
    figure = Figure(figsize=(columns * panel_width, rows * panel_height), dpi=dpi)
    FigureCanvasAgg(figure)  # no pyplot: no global backend state
    for index, (title, grid) in enumerate(grids):
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.imshow(grid[:, :, 0] if grid.shape[2] == 1 else grid, cmap="gray", vmin=0, vmax=255,
                    interpolation="nearest")
        axes.set_title(title, fontsize=8, wrap=True)
        axes.set_axis_off()
    figure.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temp_path = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=directory)
    os.close(fd)
    try:
        figure.savefig(temp_path, format="png")
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


def compact_png(path: str, colors: int = 192) -> None:
    """Rewrites an RGB PNG with a palette of `colors` colours (PIL's fast octree, `optimize=True`); 0 keeps it.

    Photos compress badly as lossless PNG; a palette of 192 colours keeps grids of photos about a quarter of their
    full-colour size at a mean error of a few levels of 255."""
    if not colors:
        return
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
    image.quantize(colors=colors, method=Image.Quantize.FASTOCTREE).save(path, format="PNG", optimize=True)


def fit_tiles(images, tile_size: int):
    """Downscales (N, C, H, W) images in [0, 1] so that their larger side is at most `tile_size` (0: unchanged)."""
    import torch

    height, width = images.shape[-2:]
    if not tile_size or max(height, width) <= tile_size:
        return images
    scale = tile_size / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    resized = torch.nn.functional.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    return resized.clamp(0, 1)


def save_small_grid(images, path: str, nrow: int, colors: int = 192, tile_size: int = 128) -> None:
    """save_image_grid of images in [0, 1], tiles at most `tile_size` pixels, written as a `colors`-colour PNG."""
    save_image_grid(fit_tiles(images.float(), tile_size), path, nrow=nrow)
    compact_png(path, colors)


def heatmap_colormap():
    """The heatmaps' 'jet' colours (modeling_maf.heatmap_maf.jet_colors) as a matplotlib colour map, so that figures
    show the pipeline's colours exactly."""
    import numpy as np
    from matplotlib.colors import ListedColormap

    from modeling_maf.heatmap_maf import jet_colors

    return ListedColormap(jet_colors(np.linspace(0.0, 1.0, 256)) / 255.0, name="hf-dgm-jet")


def draw_heatmap_colorbar(figure, axis, scale, label: str = "") -> None:
    """The colour bar of a `modeling_maf.heatmap_maf.HeatmapScale` in `axis`: low, high and the threshold (a black
    line across the bar) labelled on a calibrated scale; on a per-image scale, the bar from each image's 1st to 99th
    percentile."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from modeling_maf.heatmap_maf import level_labels

    if scale.per_image:
        colorbar = figure.colorbar(ScalarMappable(Normalize(0.0, 1.0), heatmap_colormap()), cax=axis)
        colorbar.set_ticks([0.0, 1.0], labels=["image p1", "image p99"])
    else:
        colorbar = figure.colorbar(ScalarMappable(Normalize(scale.low, scale.high), heatmap_colormap()), cax=axis)
        axis.axhline(scale.threshold, color="black", linewidth=2.5)
        low, threshold, high = level_labels([scale.low, scale.threshold, scale.high])
        colorbar.set_ticks([scale.low, scale.threshold, scale.high],
                           labels=[low, f"{scale.threshold_label}\n{threshold}", high])
    colorbar.ax.tick_params(labelsize=7)
    if label:
        colorbar.set_label(label, fontsize=7)
