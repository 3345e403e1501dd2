# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""Outputs of a run: metrics, JSON, plots, image grids, model cards, the accelerator set up from the flags."""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile


def _tracker_config(args: argparse.Namespace) -> dict:
    """Arguments as a flat dict that every tracker accepts (TensorBoard hparams take only scalars and strings)."""
    config = {}
    for key, value in vars(args).items():
        if key.startswith("_") or key == "hub_token":  # private bookkeeping; never log a secret
            continue
        config[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return config


def setup_accelerator(args: argparse.Namespace, project_name: str):
    """An `Accelerator` configured from the common flags, with trackers started and every RNG seeded."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    project_config = ProjectConfiguration(
        project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")
    )
    log_with = None if args.report_to == "none" else args.report_to
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, log_with=log_with, project_config=project_config
    )
    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    if log_with is not None:
        accelerator.init_trackers(project_name, config=_tracker_config(args))
    return accelerator


def _to_python(value):
    """Tensors and NumPy scalars as plain Python numbers (or lists), for JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


class MetricsLogger:
    """Writes metrics to a JSONL file (main process only) and to the accelerator's trackers.

    Each line is `{"step": step, **metrics}`; the file is appended to, so a resumed run continues it.
    """

    def __init__(self, accelerator, path: str):
        self.accelerator = accelerator
        self.path = path
        self._file = None
        if accelerator.is_main_process:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")

    def log(self, metrics: dict, step: int) -> None:
        metrics = {key: _to_python(value) if not isinstance(value, (int, float, str, bool)) else value
                   for key, value in metrics.items()}
        if self._file is not None:
            self._file.write(json.dumps({"step": step, **metrics}) + "\n")
            self._file.flush()
        self.accelerator.log(metrics, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def device_description(device) -> str:
    """What to record next to a measurement: the GPU's name (e.g. "NVIDIA H200"), or the device type."""
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def write_json(path: str, obj) -> None:
    """Writes `obj` as indented JSON, atomically: readers see the old file or the new one, never half of one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temp_path = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, default=_to_python)
            f.write("\n")
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


def _ema(values: list[float], smoothing: float) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing); NaN/inf points are skipped."""
    smoothed, average, weight = [], 0.0, 0.0
    for value in values:
        if math.isfinite(value):
            average = smoothing * average + (1 - smoothing) * value
            weight = smoothing * weight + (1 - smoothing)
        smoothed.append(average / weight if weight > 0 else float("nan"))
    return smoothed


def plot_curves(
    series: dict[str, tuple[list, list]], path: str, title: str, ylabel: str = "", smoothing: float = 0.9
) -> None:
    """Plots named (steps, values) series: raw values thin and faint, EMA-smoothed in the same colour."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}.")
    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)  # no pyplot: no global backend state, safe in threads and headless runs
    axes = figure.add_subplot()
    for index, (name, (steps, values)) in enumerate(series.items()):
        steps = [float(s) for s in steps]
        values = [float(v) for v in values]
        if len(steps) != len(values):
            raise ValueError(f"Series {name!r} has {len(steps)} steps but {len(values)} values.")
        color = f"C{index % 10}"
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


def write_model_card(output_dir: str, *, model_name: str, metadata: dict, body: str) -> str:
    """Writes `<output_dir>/README.md`: YAML metadata (built by huggingface_hub) followed by `body`.

    `metadata` keys: `library_name`, `tags`, `datasets`, `license`, `pipeline_tag`, any other model-card
    field, and `eval_results`: a list of dicts with `huggingface_hub.EvalResult` fields (`task_type`,
    `dataset_type`, `dataset_name`, `metric_type`, `metric_value`, ...), which becomes `model-index`.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    metadata = dict(metadata)
    eval_results = [
        result if isinstance(result, EvalResult) else EvalResult(**result)
        for result in metadata.pop("eval_results", None) or []
    ]
    card_data = ModelCardData(model_name=model_name, eval_results=eval_results or None, **metadata)
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body.strip()}\n")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "README.md")
    card.save(path)
    return path


def read_metrics(path: str) -> list[dict]:
    """The lines of a run's metrics.jsonl, in order (empty when there is none)."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def metrics_series(records: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of `key` over the metrics lines that have it (for `plot_curves`)."""
    rows = [record for record in records if record.get(key) is not None]
    return [record["step"] for record in rows], [record[key] for record in rows]


def truncate_metrics(path: str, last_step: int) -> None:
    """Drops the lines logged after `last_step`: a run resumed from that step logs them again."""
    if not os.path.isfile(path):
        return
    records = [record for record in read_metrics(path) if record["step"] <= last_step]
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp_path = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=directory)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    os.replace(temp_path, path)


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
    return torch.nn.functional.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def save_small_grid(images, path: str, nrow: int, colors: int = 192, tile_size: int = 128) -> None:
    """save_image_grid of images in [0, 1], tiles at most `tile_size` pixels, written as a `colors`-colour PNG."""
    save_image_grid(fit_tiles(images.float(), tile_size), path, nrow=nrow)
    compact_png(path, colors)
