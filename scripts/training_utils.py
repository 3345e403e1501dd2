# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""Pieces shared by the training scripts in `scripts/`.

The scripts follow the HF `examples/pytorch/*_no_trainer.py` layout: argparse flags, an explicit `accelerate`
loop, checkpoints through `Accelerator.save_state`, optional `--push_to_hub`. What every script needs in the
same way lives here, so the scripts only hold what is specific to their model:

- `add_common_args` / `add_config_override_args` / `config_overrides_from_args`: command-line flags.
- `setup_accelerator`: mixed precision, trackers and seeding from those flags.
- `MetricsLogger`: a JSONL file of metrics plus `accelerator.log`.
- `CheckpointManager`: atomic checkpoints that `--resume_from_checkpoint latest` can trust.
- `resolve_hub_token` / `HubPusher`: Hub uploads in a background thread that never stop training.
- `write_json`, `plot_curves`, `save_image_grid`, `write_model_card`: outputs of a run.

Scripts run as `python scripts/x.py` or `accelerate launch scripts/x.py`, so `scripts/` is on `sys.path` and
they import this module as `from training_utils import ...`.
"""

from __future__ import annotations

import argparse
import fnmatch
import inspect
import json
import logging
import math
import os
import queue
import re
import shutil
import tempfile
import threading
import types
import typing
from collections.abc import Sequence


logger = logging.getLogger(__name__)

REPORT_TO_CHOICES = ("none", "tensorboard", "trackio", "wandb", "all")
CHECKPOINT_PREFIX = "step_"
TRAINING_STATE_NAME = "training_state.json"
# Staging folders of `HubPusher` sit next to the folder being uploaded; never upload or resume from them.
HUB_STAGING_PREFIX = ".hub-upload-"


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser, *, defaults: dict | None = None) -> None:
    """Adds the flags every training script shares (named as in the HF example scripts).

    `defaults` overrides the default of any of these flags for one script, e.g. `{"learning_rate": 2e-4}`.
    """
    group = parser.add_argument_group("data")
    group.add_argument("--data_dir", type=str, default=None, help="Local folder with the training images.")
    group.add_argument(
        "--dataset_name", type=str, default=None, help="Name of a dataset on the Hub (used when --data_dir is not set)."
    )
    group.add_argument("--image_size", type=int, default=None, help="Images are resized to this size (pixels).")
    group.add_argument(
        "--dataloader_num_workers", type=int, default=0, help="Worker processes for data loading (0: main process)."
    )

    group = parser.add_argument_group("training")
    group.add_argument("--output_dir", type=str, default="outputs", help="Where checkpoints, logs and the model go.")
    group.add_argument("--num_train_epochs", type=int, default=1, help="Number of passes over the training data.")
    group.add_argument(
        "--max_train_steps", type=int, default=None, help="Stop after this many optimisation steps (for smoke runs)."
    )
    group.add_argument("--per_device_train_batch_size", type=int, default=8, help="Batch size per device.")
    group.add_argument("--learning_rate", type=float, default=1e-3, help="Initial learning rate.")
    group.add_argument("--seed", type=int, default=42, help="Seed for Python, NumPy and torch (all devices).")
    group.add_argument(
        "--mixed_precision",
        type=str,
        default="no",
        choices=["no", "fp16", "bf16"],
        help="Mixed precision mode of `accelerate`.",
    )

    group = parser.add_argument_group("checkpoints and logging")
    group.add_argument(
        "--checkpointing_steps",
        type=str,
        default=None,
        help="Save a checkpoint every N steps (an integer), at the end of every epoch ('epoch'), or never ('no').",
    )
    group.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints (oldest go)."
    )
    group.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="Resume from a checkpoint folder, or 'latest' for the newest one in <output_dir>/checkpoints.",
    )
    group.add_argument(
        "--report_to",
        type=str,
        default="none",
        choices=list(REPORT_TO_CHOICES),
        help="Experiment trackers to log to, besides the metrics.jsonl file that is always written.",
    )

    group = parser.add_argument_group("hub")
    group.add_argument("--push_to_hub", action="store_true", help="Upload checkpoints and the final model to the Hub.")
    group.add_argument(
        "--hub_model_id", type=str, default=None, help="Repository on the Hub, e.g. 'user/maf-capsule'."
    )
    group.add_argument(
        "--hub_token", type=str, default=None, help="Hub token (default: HF_TOKEN or the `hf auth login` token)."
    )
    group.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repository as private.")

    if defaults:
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(defaults) - known)
        if unknown:
            raise ValueError(f"add_common_args got defaults for unknown flags {unknown}; known flags: {sorted(known)}.")
        parser.set_defaults(**defaults)


def checkpointing_interval(value: str | None) -> str | int | None:
    """Parses `--checkpointing_steps`: "epoch", a positive step count, or "no" / "none" for no checkpoints at all
    (returned as "no"); None (the flag left out) stays None and means the script's default."""
    if value is None or value == "epoch":
        return value
    if value.lower() in ("no", "none"):
        return "no"
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise ValueError(f"--checkpointing_steps must be 'epoch', a positive integer or 'no', got {value!r}.")


def _str2bool(value) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _flag_type(default, annotation):
    """(element type, is_list) of a config field, from its default value, else from its annotation."""
    if isinstance(default, bool):
        return _str2bool, False
    if isinstance(default, (int, float, str)):
        return type(default), False
    if isinstance(default, (list, tuple)):
        element = type(default[0]) if default else str
        return (_str2bool if element is bool else element), True

    # Default is None (or unusual): read `int | None`, `list[int] | None`, `Optional[float]`...
    if isinstance(annotation, str) or annotation is inspect.Parameter.empty:
        return str, False
    candidates = [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        candidates = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    for candidate in candidates:
        if candidate is bool:
            return _str2bool, False
        if candidate in (int, float, str):
            return candidate, False
        if typing.get_origin(candidate) in (list, tuple):
            args = [arg for arg in typing.get_args(candidate) if arg is not Ellipsis]
            element = args[0] if args and args[0] in (int, float, str, bool) else str
            return (_str2bool if element is bool else element), True
    return str, False


def _config_fields(config_class) -> list[inspect.Parameter]:
    signature = inspect.signature(config_class.__init__)
    return [
        parameter
        for name, parameter in signature.parameters.items()
        if name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    ]


def add_config_override_args(parser: argparse.ArgumentParser, config_class, skip: tuple = ()) -> None:
    """Adds one `--<field>` flag per field of `config_class.__init__`, defaulting to None (= keep the config's).

    Types come from the field's default (int/float/str; a list becomes `nargs="+"`; a bool reads true/false,
    and a bare `--flag` means true). Fields named in `skip` or already defined on the parser (e.g. a common
    `--image_size`) get no flag; the script handles those itself.
    """
    group = parser.add_argument_group(f"{config_class.__name__} overrides")
    added = []
    for parameter in _config_fields(config_class):
        option = f"--{parameter.name}"
        if parameter.name in skip or option in parser._option_string_actions:
            continue
        element_type, is_list = _flag_type(parameter.default, parameter.annotation)
        kwargs = {"type": element_type, "default": None}
        if is_list:
            kwargs["nargs"] = "+"
        elif element_type is _str2bool:
            kwargs.update(nargs="?", const=True)
        default_text = "" if parameter.default is inspect.Parameter.empty else f" (config default: {parameter.default!r})"
        group.add_argument(option, help=f"Overrides `{config_class.__name__}.{parameter.name}`{default_text}.", **kwargs)
        added.append(parameter.name)

    # Remember which flags belong to the config, so fields skipped here never leak into the overrides.
    registry = dict(parser.get_default("_config_override_fields") or {})
    registry[config_class.__name__] = added
    parser.set_defaults(_config_override_fields=registry)


def config_overrides_from_args(args: argparse.Namespace, config_class) -> dict:
    """The config fields the user set on the command line, as keyword arguments for `config_class`."""
    registry = getattr(args, "_config_override_fields", None) or {}
    names = registry.get(config_class.__name__)
    if names is None:
        names = [parameter.name for parameter in _config_fields(config_class)]
    overrides = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = list(value) if isinstance(value, (list, tuple)) else value
    return overrides


# ----------------------------------------------------------------------------------------------------------
# Accelerator, metrics, checkpoints
# ----------------------------------------------------------------------------------------------------------


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


class CheckpointManager:
    """Atomic `accelerate` checkpoints in `<output_dir>/checkpoints/step_<N>`.

    A checkpoint is written into a temporary folder next to its final place, completed with
    `training_state.json`, and only then renamed into place. A run killed mid-save therefore never leaves a
    half-written `step_<N>` that `latest()` would pick.
    """

    def __init__(self, accelerator, output_dir: str, total_limit: int | None = None):
        if total_limit is not None and total_limit < 1:
            raise ValueError(f"total_limit must be at least 1 (or None for no limit), got {total_limit}.")
        self.accelerator = accelerator
        self.checkpoints_dir = os.path.join(output_dir, "checkpoints")
        self.total_limit = total_limit

    def _completed(self) -> list[tuple[int, str]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not os.path.isdir(self.checkpoints_dir):
            return []
        found = []
        for name in os.listdir(self.checkpoints_dir):
            match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", name)
            path = os.path.join(self.checkpoints_dir, name)
            if match and os.path.isfile(os.path.join(path, TRAINING_STATE_NAME)):
                found.append((int(match.group(1)), path))
        return sorted(found)

    def save(self, step: int, epoch: int, extra: dict | None = None) -> str:
        """Saves the accelerator state for `step`; returns the checkpoint folder."""
        accelerator = self.accelerator
        final_dir = os.path.join(self.checkpoints_dir, f"{CHECKPOINT_PREFIX}{step}")
        # The same name on every process: each one writes its own RNG state into this folder.
        temp_dir = os.path.join(self.checkpoints_dir, f".tmp-{CHECKPOINT_PREFIX}{step}")
        if accelerator.is_main_process:
            os.makedirs(self.checkpoints_dir, exist_ok=True)
            shutil.rmtree(temp_dir, ignore_errors=True)  # left over by a run killed while saving
        accelerator.wait_for_everyone()

        accelerator.save_state(temp_dir)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json(os.path.join(temp_dir, TRAINING_STATE_NAME), {"step": step, "epoch": epoch, "extra": extra or {}})
            if os.path.exists(final_dir):  # saving the same step again (e.g. the end of an epoch): replace it
                shutil.rmtree(final_dir)
            os.replace(temp_dir, final_dir)
            self._prune()
        accelerator.wait_for_everyone()
        return final_dir

    def _prune(self) -> None:
        if self.total_limit is None:
            return
        completed = self._completed()
        for _, path in completed[: max(0, len(completed) - self.total_limit)]:
            logger.info(f"Removing old checkpoint {path} (checkpoints_total_limit={self.total_limit}).")
            shutil.rmtree(path, ignore_errors=True)

    def latest(self) -> str | None:
        """The newest complete checkpoint, or None."""
        completed = self._completed()
        return completed[-1][1] if completed else None

    def resume(self, spec: str | None) -> dict | None:
        """Loads a checkpoint into the accelerator; returns its training state (`step`, `epoch`, `extra`).

        `spec` is None (start fresh), "latest", or the path of a checkpoint folder.
        """
        if spec is None:
            return None
        if spec == "latest":
            path = self.latest()
            if path is None:
                logger.info(f"No checkpoint in {self.checkpoints_dir} to resume from; starting from scratch.")
                return None
        else:
            path = spec
            if not os.path.isfile(os.path.join(path, TRAINING_STATE_NAME)):
                raise FileNotFoundError(
                    f"--resume_from_checkpoint {path!r} is not a complete checkpoint (no {TRAINING_STATE_NAME}). "
                    f"Pass a folder under {self.checkpoints_dir} or 'latest'."
                )
        logger.info(f"Resuming from checkpoint {path}.")
        self.accelerator.load_state(path)
        with open(os.path.join(path, TRAINING_STATE_NAME), encoding="utf-8") as f:
            return json.load(f)


# ----------------------------------------------------------------------------------------------------------
# Hub
# ----------------------------------------------------------------------------------------------------------


def resolve_hub_token(token: str | None) -> str:
    """The Hub token to push with: `token`, else the one huggingface_hub finds (HF_TOKEN, `hf auth login`)."""
    if token:
        return token
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ValueError(
            "--push_to_hub needs a Hub token with write access: pass --hub_token, set the HF_TOKEN environment "
            "variable, or run `hf auth login` before training."
        )
    return token


class HubPusher:
    """Uploads folders to a Hub repository in a background thread, in order, without ever stopping training.

    A Hub that fails or cannot be reached only produces warnings: the local files are left untouched. Each
    folder is snapshotted (hard links, or a copy where linking fails) when it is queued, so pruning an old
    checkpoint while its upload waits does not break the upload. Create it on the main process only.
    """

    def __init__(self, repo_id: str, token: str | None, private: bool = False):
        from huggingface_hub import HfApi

        self.api = HfApi(token=token)
        self.repo_id = repo_id
        self.enabled = True
        try:
            self.repo_id = self.api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        except Exception as error:  # noqa: BLE001 - any Hub failure must leave training running
            logger.warning(
                f"Could not create or reach Hub repository {repo_id!r} ({type(error).__name__}: {error}). "
                "Pushing to the Hub is disabled for this run; checkpoints and the model are still saved locally."
            )
            self.enabled = False
        self.failed_uploads: list[str] = []  # folders whose upload failed (each also logged as a warning)
        self._queue: queue.Queue = queue.Queue()
        self._worker = None

    def push_folder(
        self,
        folder: str,
        path_in_repo: str | None = None,
        commit_message: str = "",
        ignore_patterns: Sequence[str] | str | None = None,
    ) -> None:
        """Queues `folder` for upload to `path_in_repo` (the repo root when None) and returns at once."""
        if not self.enabled:
            logger.warning(f"Hub pushing is disabled; {folder} stays local only.")
            return
        if isinstance(ignore_patterns, str):
            ignore_patterns = [ignore_patterns]
        patterns = list(ignore_patterns or []) + [f"*{HUB_STAGING_PREFIX}*", f"*.tmp-{CHECKPOINT_PREFIX}*"]
        try:
            staging = self._snapshot(folder, patterns)
        except OSError as error:
            logger.warning(f"Could not prepare {folder} for upload ({error}); it stays local only.")
            return
        self._queue.put((folder, staging, path_in_repo, commit_message or f"Upload {os.path.basename(folder)}", patterns))
        if self._worker is None:
            # Daemon: an upload stuck on a dead connection must not keep the finished process alive.
            self._worker = threading.Thread(target=self._run, name="hub-pusher", daemon=True)
            self._worker.start()

    @staticmethod
    def _snapshot(folder: str, ignore_patterns: list[str]) -> str:
        """Hard-links (or copies) the files to upload into a staging folder next to `folder`."""
        folder = os.path.abspath(folder)
        staging = tempfile.mkdtemp(prefix=HUB_STAGING_PREFIX, dir=os.path.dirname(folder))

        def link_or_copy(source, destination):
            try:
                os.link(source, destination)
            except OSError:
                shutil.copy2(source, destination)

        def ignored(directory, names):
            # The patterns of `upload_folder` (fnmatch on the path relative to the folder), applied early so that
            # skipped files (e.g. checkpoints/*) are not even linked.
            relative = os.path.relpath(directory, folder)
            skipped = set()
            for name in names:
                path = name if relative == "." else f"{relative}/{name}".replace(os.sep, "/")
                candidates = [path, f"{path}/"] if os.path.isdir(os.path.join(directory, name)) else [path]
                if any(fnmatch.fnmatch(c, pattern) for c in candidates for pattern in ignore_patterns):
                    skipped.add(name)
            return skipped

        try:
            shutil.copytree(folder, os.path.join(staging, "content"), copy_function=link_or_copy, ignore=ignored)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    def _run(self) -> None:
        while True:
            folder, staging, path_in_repo, commit_message, ignore_patterns = self._queue.get()
            try:
                self.api.upload_folder(
                    repo_id=self.repo_id,
                    folder_path=os.path.join(staging, "content"),
                    path_in_repo=path_in_repo,
                    commit_message=commit_message,
                    ignore_patterns=ignore_patterns,
                )
                logger.info(f"Uploaded {folder} to {self.repo_id}/{path_in_repo or ''}.")
            except Exception as error:  # noqa: BLE001 - a failed upload must not stop training
                self.failed_uploads.append(folder)
                logger.warning(
                    f"Upload of {folder} to Hub repository {self.repo_id!r} failed ({type(error).__name__}: "
                    f"{error}). Training continues; the local copy is kept."
                )
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                self._queue.task_done()

    def wait(self, timeout: float | None = None) -> None:
        """Blocks until every queued upload has finished (or `timeout` seconds have passed)."""
        with self._queue.all_tasks_done:
            finished = self._queue.all_tasks_done.wait_for(lambda: self._queue.unfinished_tasks == 0, timeout)
        if not finished:
            logger.warning(f"Hub uploads still running after {timeout} s; they are abandoned when the process exits.")


# ----------------------------------------------------------------------------------------------------------
# The training step
# ----------------------------------------------------------------------------------------------------------


class CUDAGraphStep:
    """Runs ``step_fn(*inputs)`` (a whole training step: forward, backward, optimizer) and, once it has run
    ``warmup_steps`` times eagerly on a side stream (capture needs warmed-up optimizer states and libraries), captures
    it as one CUDA graph and replays that for inputs of the captured shapes and dtypes: the step then costs no host
    work beyond one copy of the inputs. Inputs of other shapes (a last partial batch) run eagerly, and so does every
    step after a failed capture (the reason is kept in ``fallbacks``; nothing runs during a capture, so no training
    step is lost). ``reset_fn`` runs before every eager step: gradients must not accumulate into the graph's own.

    A replay returns the graph's static output tensors: clone what you keep beyond the next call. The optimizer must
    be built with ``capturable=True`` and a tensor or constant learning rate.
    """

    def __init__(self, step_fn, *, enabled: bool, reset_fn=None, warmup_steps: int = 3):
        self.step_fn, self.reset_fn = step_fn, reset_fn
        self.enabled, self.warmup_steps = enabled, warmup_steps
        self.eager_steps_done, self.replays = 0, 0
        self.graph = self.static_inputs = self.static_outputs = self.static_signature = None
        self.fallbacks: list[str] = []

    @staticmethod
    def _signature(inputs):
        return tuple((tuple(tensor.shape), tensor.dtype) for tensor in inputs)

    def _eager(self, *inputs):
        if self.reset_fn is not None:
            self.reset_fn()
        self.eager_steps_done += 1
        return self.step_fn(*inputs)

    def __call__(self, *inputs):
        import torch

        if not self.enabled:
            return self._eager(*inputs)
        if self.graph is None and self.eager_steps_done < self.warmup_steps:
            side_stream = torch.cuda.Stream()
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream):
                outputs = self._eager(*inputs)
            torch.cuda.current_stream().wait_stream(side_stream)
            return outputs
        if self.graph is None:
            try:
                self._capture(inputs)
            except Exception as error:  # noqa: BLE001 - reported in fallbacks and as a warning, then eager
                self.fallbacks.append(f"CUDA graph capture failed, running eagerly: {type(error).__name__}: {error}"[:500])
                logging.getLogger(__name__).warning(self.fallbacks[-1])
                self.graph, self.enabled = None, False
                torch.cuda.synchronize()
                return self._eager(*inputs)
        if self._signature(inputs) != self.static_signature:
            return self._eager(*inputs)
        for static, value in zip(self.static_inputs, inputs):
            static.copy_(value, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        return self.static_outputs

    def _capture(self, inputs):
        import torch

        if self.reset_fn is not None:
            self.reset_fn()  # the graph allocates its own gradients
        self.static_inputs = tuple(tensor.clone() for tensor in inputs)
        self.static_signature = self._signature(inputs)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_outputs = self.step_fn(*self.static_inputs)
        self.graph = graph

    def describe(self) -> dict:
        return {"cuda_graphs": self.enabled and self.graph is not None, "graph_replays": self.replays,
                "eager_steps": self.eager_steps_done, "fallbacks": self.fallbacks}


# ----------------------------------------------------------------------------------------------------------
# Outputs of a run
# ----------------------------------------------------------------------------------------------------------


def resolve_device(name: str | None = None):
    """The device an inference script runs on: `name` (e.g. from --device), else CUDA when available, else CPU."""
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_model_for_inference(args: argparse.Namespace, default_subfolder: str):
    """The prologue of the inference scripts: the device of ``--device``, the output folder (``--output_dir``, else
    ``default_subfolder`` inside the model folder; created) and the model of ``--model_name_or_path`` (local folder
    or Hub id, through the Auto classes) on that device in eval mode. Returns ``(device, output_dir, model)``."""
    from transformers import AutoModel

    device = resolve_device(args.device)
    output_dir = args.output_dir or os.path.join(args.model_name_or_path, default_subfolder)
    os.makedirs(output_dir, exist_ok=True)
    model = AutoModel.from_pretrained(args.model_name_or_path, token=args.hub_token).to(device).eval()
    return device, output_dir, model


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


def save_image_grid(images, path: str, nrow: int, padding: int = 2) -> None:
    """Writes images as one PNG grid, `nrow` images per row (like torchvision's `make_grid`).

    `images` is a float tensor (N, C, H, W) with values in [0, 1] and C in {1, 3}, or a list of PIL images.
    """
    import numpy as np
    from PIL import Image

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
    pixels = (np.clip(grid, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels).save(path, format="PNG")


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
