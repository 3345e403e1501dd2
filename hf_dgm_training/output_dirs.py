# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""Output folders that never mix two runs: a run is refused a folder that holds another run's outputs unless it is
told to replace them (`--overwrite_output_dir`) or to continue them (`--resume_from_checkpoint`).

What counts as an output of ours is known by name: the files and folders the training, sampling, detection and
translation scripts write into a run folder (the model and its copied modeling files, the card, checkpoints,
metrics, results, figures, samples/, anomaly/, ...). Replacing a run deletes exactly those; anything else in the
folder (a user's own notes, data, another run in a subfolder of another name) stays, and the log says so.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import shutil

from .errors import UsageError


logger = logging.getLogger(__name__)

# Files whose presence marks a run folder (config.json only when it is one of our models').
RUN_FILES = ("config.json", "model.safetensors", "metrics.jsonl", "train_results.json")
# Further files a run writes next to its model.
MODEL_FILES = ("model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
               "preprocessor_config.json", "generation_config.json", "nll_curve.png", "preview.png",
               "translate_results.json", "pipeline_results.json")
SHARD_PATTERN = "model-*-of-*.safetensors"
# Folders the scripts write inside a run folder: checkpoints and logs (training), samples/ (sample_maf.py),
# anomaly/ (detect_anomalies.py), plots/ and grids/ (train_cyclegan.py), translated_*/ (translate.py) and the main
# job's detectors, detector/ and patch_detector/.
RUN_FOLDERS = ("checkpoints", "logs", "samples", "anomaly", "plots", "grids", "translated_a_to_b", "translated_b_to_a",
               "detector", "patch_detector")
MODEL_TYPES = ("maf", "iaf", "feature_maf", "cyclegan", "efficientnet_lite")
MODEL_PACKAGES = ("modeling_maf", "modeling_cyclegan")


def _model_package_modules() -> set[str]:
    """File names of the model packages' modules, which save_pretrained copies next to a model (found without
    importing the packages)."""
    names = set()
    for package in MODEL_PACKAGES:
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            names.update(name for name in os.listdir(folder) if name.endswith(".py") and name != "__init__.py")
    return names


def _is_our_config(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and config.get("model_type") in MODEL_TYPES


def _is_our_card(path: str) -> bool:
    """A README.md written by `write_model_card` (YAML front matter tagged hf-dgm), not a user's own."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
    front = text.split("\n---", 1)[0] if text.startswith("---") else ""
    return "- hf-dgm" in front


def find_run_outputs(output_dir: str) -> list[str]:
    """The names in `output_dir` that are outputs of an hf-dgm run (the model, metrics and checkpoints first; empty
    when the folder is missing or holds none). The copied modeling files and the card count only next to one of our
    models' config.json."""
    if not os.path.isdir(output_dir):
        return []
    present = set(os.listdir(output_dir))

    def is_file(name):
        return os.path.isfile(os.path.join(output_dir, name))

    found = [name for name in RUN_FILES + MODEL_FILES if name in present and is_file(name)]
    if "config.json" in found and not _is_our_config(os.path.join(output_dir, "config.json")):
        found.remove("config.json")
    found += [os.path.basename(path) for path in glob.glob(os.path.join(glob.escape(output_dir), SHARD_PATTERN))]
    found += [name for name in RUN_FOLDERS if os.path.isdir(os.path.join(output_dir, name))]
    if "config.json" in found:
        found += sorted(name for name in present & _model_package_modules() if is_file(name))
        if "README.md" in present and _is_our_card(os.path.join(output_dir, "README.md")):
            found.append("README.md")
    order = {name: rank for rank, name in enumerate(RUN_FILES + RUN_FOLDERS)}  # what shows a run, first
    return sorted(set(found), key=lambda name: (order.get(name, len(order)), name))


def _shown(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit] + ([f"... ({len(names)} in all)"] if len(names) > limit else []))


def prepare_output_dir(output_dir: str, *, overwrite: bool = False, resuming: bool | str | None = False,
                       what: str = "another run", hint: str | None = None, remove: bool = True) -> list[str]:
    """Makes `output_dir` ready for a run; returns the names of the previous run's outputs it removed.

    - Missing or without outputs of ours (`find_run_outputs`): created; nothing else happens.
    - Holding a run and `resuming` (true, or the `--resume_from_checkpoint` value): left as it is, so training
      continues it. With "latest" the folder must hold a complete checkpoint, else a fresh run would mix with the
      old outputs.
    - Holding a run and `overwrite`: the run's outputs are deleted (when `remove`: on the main process only; the
      others check), other files stay (logged).
    - Otherwise `UsageError`, one line naming the folder and the ways out: `hint` (default: the training scripts'
      flags, "pass --overwrite_output_dir ... or --resume_from_checkpoint latest ...").

    `what` names the folder's content in the message (e.g. "another run of the main job").
    """
    found = find_run_outputs(output_dir)
    if found and resuming:
        if resuming == "latest" and not _has_complete_checkpoint(output_dir):
            raise UsageError(
                f"--resume_from_checkpoint latest: {output_dir} holds {what} ({_shown(found)}) but no complete "
                "checkpoint to continue from; pass --overwrite_output_dir to replace that run, or another "
                "--output_dir."
            )
        return []
    if found and not overwrite:
        hint = hint or ("pass --overwrite_output_dir to replace it (its outputs are deleted, other files stay) or "
                        "--resume_from_checkpoint latest to continue it, or choose another --output_dir")
        raise UsageError(f"{output_dir} already holds {what} ({_shown(found)}): {hint}.")
    if found and remove:
        for name in found:
            path = os.path.join(output_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        kept = sorted(os.listdir(output_dir))
        logger.warning(f"--overwrite_output_dir: removed the previous run's outputs from {output_dir} "
                       f"({_shown(found, 8)})" + (f"; kept files that are not outputs of hf-dgm: {_shown(kept, 8)}."
                                                  if kept else "."))
    if remove:
        os.makedirs(output_dir, exist_ok=True)
    return found if remove else []


def _has_complete_checkpoint(output_dir: str) -> bool:
    from .checkpoints import CHECKPOINT_PREFIX, TRAINING_STATE_NAME

    pattern = os.path.join(glob.escape(output_dir), "checkpoints", f"{CHECKPOINT_PREFIX}*", TRAINING_STATE_NAME)
    return bool(glob.glob(pattern))
