# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""Atomic `accelerate` checkpoints that `--resume_from_checkpoint latest` can trust."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

from .tracking import write_json


logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
TRAINING_STATE_NAME = "training_state.json"


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

