# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""Tracking a run: the accelerator set up from the flags, metrics.jsonl and the trackers, JSON results."""

from __future__ import annotations

import argparse
import json
import logging
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


class ProcessLogger:
    """`accelerate.logging.get_logger(name)`, created when first used: a script can make its logger at import time
    without importing accelerate (and torch) before its `--help` or a refused flag has answered."""

    def __init__(self, name: str):
        self._name, self._logger = name, None

    def __getattr__(self, attribute):
        if self._logger is None:
            from accelerate.logging import get_logger

            self._logger = get_logger(self._name)
        return getattr(self._logger, attribute)


def show_progress_messages(*logger_names: str) -> None:
    """Messages of level INFO and up of this package and of `logger_names` (a script's) on stderr, one line each;
    other libraries keep WARNING and up. A root handler set up before (by the caller or a test) is kept."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.WARNING)
    for name in (__name__.split(".")[0], *logger_names):
        logging.getLogger(name).setLevel(logging.INFO)


def setup_accelerator(args: argparse.Namespace, project_name: str):
    """An `Accelerator` configured from the common flags, with trackers started and every RNG seeded; the script's
    progress messages (its `__main__` logger's and this package's) are shown. The output folder is prepared first
    (`prepare_output_dir`): a folder that holds another run is refused unless `--overwrite_output_dir` (its outputs
    are removed, by the main process) or `--resume_from_checkpoint` is given."""
    show_progress_messages("__main__")
    from .output_dirs import prepare_output_dir

    prepare_output_dir(args.output_dir, overwrite=getattr(args, "overwrite_output_dir", False),
                       resuming=args.resume_from_checkpoint, remove=False)  # every process refuses alike
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
        prepare_output_dir(args.output_dir, overwrite=getattr(args, "overwrite_output_dir", False),
                           resuming=args.resume_from_checkpoint)
    accelerator.wait_for_everyone()
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
    """Writes metrics to a JSONL file (main process only) and, with `to_trackers`, to the accelerator's trackers.

    Each line is `{"step": step, **metrics}`; the file is appended to, so a resumed run continues it.
    """

    def __init__(self, accelerator, path: str, to_trackers: bool = True):
        self.accelerator = accelerator
        self.path = path
        self.to_trackers = to_trackers
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
        if self.to_trackers:
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
