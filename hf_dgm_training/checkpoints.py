# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""Atomic `accelerate` checkpoints that `--resume_from_checkpoint latest` can trust, and that refuse, in one line, to
resume a model of another configuration."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

from .errors import UsageError
from .tracking import write_json


logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
TRAINING_STATE_NAME = "training_state.json"
# Config entries that do not change the model's shape or maths (bookkeeping, the calibration a run adds at its end).
IGNORED_CONFIG_KEYS = frozenset({
    "transformers_version", "architectures", "auto_map", "_name_or_path", "dtype", "torch_dtype", "custom_pipelines",
    "anomaly_calibration", "output_hidden_states", "output_attentions", "return_dict", "use_pretrained_backbone",
})


def config_differences(saved: dict, config) -> dict[str, tuple]:
    """{field: (saved value, new value)} for the fields of `config` (a PreTrainedConfig) that differ from `saved`
    (a config dict as save_pretrained or a checkpoint stores it), bookkeeping fields left out."""
    if saved.get("model_type") != config.model_type:
        return {"model_type": (saved.get("model_type"), config.model_type)}
    old = type(config).from_dict(saved).to_dict()
    new = config.to_dict()
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if key not in IGNORED_CONFIG_KEYS and old.get(key) != new.get(key)}


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
            write_json(os.path.join(temp_dir, TRAINING_STATE_NAME),
                       {"step": step, "epoch": epoch, "extra": extra or {}})
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

    def resume(self, spec: str | None, config=None) -> dict | None:
        """Loads a checkpoint into the accelerator; returns its training state (`step`, `epoch`, `extra`).

        `spec` is None (start fresh), "latest", or the path of a checkpoint folder. With `config` (the model's), a
        checkpoint of a model of another configuration is refused first with a `UsageError` naming the fields that
        differ (from the config the checkpoint records, else the run folder's config.json); a checkpoint whose
        weights do not fit the model anyway is the same one line.
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
        with open(os.path.join(path, TRAINING_STATE_NAME), encoding="utf-8") as f:
            state = json.load(f)
        if config is not None:
            self._check_config(path, state, config)
        logger.info(f"Resuming from checkpoint {path}.")
        try:
            self.accelerator.load_state(path)
        except RuntimeError as error:  # load_state_dict's "size mismatch for ..." / "Missing key(s) ..."
            if "size mismatch" not in str(error) and "key(s)" not in str(error):
                raise
            first = str(error).strip().splitlines()[-1].strip()
            raise UsageError(f"--resume_from_checkpoint {path} holds the weights of a model of another configuration "
                             f"({first}); pass the flags of the run that wrote it, or --overwrite_output_dir to start "
                             "afresh.") from error
        return state

    def _check_config(self, path: str, state: dict, config) -> None:
        saved, source = state.get("extra", {}).get("model_config"), "the checkpoint"
        if saved is None:  # a checkpoint written before the config was kept: the run folder's model, if any
            run_config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.json")
            if not os.path.isfile(run_config):
                return
            with open(run_config, encoding="utf-8") as f:
                saved, source = json.load(f), run_config
        differences = config_differences(saved, config)
        if differences:
            fields = ", ".join(f"{key} {old!r} there, {new!r} now" for key, (old, new) in differences.items())
            raise UsageError(f"--resume_from_checkpoint {path} is of a model of another configuration ({fields}; from "
                             f"{source}): pass the same flags as the run that wrote it, or --overwrite_output_dir to "
                             "start afresh.")

