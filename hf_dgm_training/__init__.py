# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""The library the hf-dgm scripts build on (training and inference), installed with the package.

Layers point one way: scripts -> this package -> the model packages (`modeling_maf`, `modeling_cyclegan`). The
model packages hold what loading a model needs and import nothing from here.

- `arguments`: the flags every training script shares, and config fields as flags.
- `checkpoints`: atomic `accelerate` checkpoints and exact resume.
- `hub`: the Hub token and a background pusher that never stops training.
- `trainer`: the one training loop; a script supplies a `TrainingTask` (its data, its step, its evaluation).
- `cuda_graphs`: a whole training step replayed as one CUDA graph, and the one decision of `--cuda_graphs`.
- `sampler`: a shuffle that depends only on (seed, epoch), so a resumed run sees the same batches.
- `model_selection`: the best epoch's weights by a validation metric, and early stopping.
- `tracking`: the accelerator set up from the flags, metrics.jsonl and the trackers, JSON results.
- `figures`: loss curves and image grids.
- `model_cards`: the model card written next to a trained model.
- `model_loading`: `--model_name_or_path` checked and loaded (never sending a local-looking path to the Hub), and
  the prologue of the inference scripts (device, output folder, model).
- `errors`: the errors a user can fix, and `run_main`, the entry point that prints them as one line.
- `host_memory`: freed host memory kept for reuse (glibc), which `run_main` sets up: CPU jobs without most of
  their page faults.
- `data/`: images decoded with errors that name the file (`images`), anomaly-detection data (`anomaly/`),
  CycleGAN's unpaired domains (`unpaired`).
- `metrics/`: the `anomaly_detection` evaluate module (loaded by path), anomaly evaluation, sample quality.
- `maf/`: MAF's optimizer (`MaskedAdam`) and the non-finite check of its step.
- `cyclegan/`: CycleGAN's training step, its fast-path options, and the image pool.

- `output_dirs`: a run never writes into a folder that holds another run (`prepare_output_dir`).

The names below are the ones every script uses; `data`, `metrics`, `maf` and `cyclegan` are imported from their
subpackages (they pull in `datasets` and the model packages). Every name is imported when it is first used, so that
a script's `--help` (and anything that needs only `arguments` or `errors`) does not wait for torch and transformers.
"""

import importlib
import importlib.util


# name -> the submodule that defines it
_EXPORTS = {
    **dict.fromkeys([
        "REPORT_TO_CHOICES", "add_common_args", "add_config_override_args", "auto_bool", "checkpointing_interval",
        "config_overrides_from_args", "finish_common_args", "check_config_overrides", "Number"
    ], "arguments"),
    **dict.fromkeys(["CHECKPOINT_PREFIX", "TRAINING_STATE_NAME", "CheckpointManager"], "checkpoints"),
    **dict.fromkeys(["CUDAGraphStep", "use_cuda_graphs"], "cuda_graphs"),
    **dict.fromkeys(["check_dataset_images", "iter_dataset_images", "open_image"], "data.images"),
    **dict.fromkeys([
        "DataError", "HfDgmError", "ModelLoadError", "UnreadableImageError", "UsageError", "add_debug_arg",
        "is_user_error", "run_main"
    ], "errors"),
    **dict.fromkeys(["plot_curves", "save_image_grid", "save_labelled_grids", "save_small_grid"], "figures"),
    **dict.fromkeys(["HUB_STAGING_PREFIX", "HubPusher", "resolve_hub_token"], "hub"),
    **dict.fromkeys(["write_model_card"], "model_cards"),
    **dict.fromkeys([
        "load_model_for_inference", "load_pretrained", "looks_local", "resolve_device", "resolve_model_path"
    ], "model_loading"),
    **dict.fromkeys(["BestModelKeeper"], "model_selection"),
    **dict.fromkeys(["find_run_outputs", "prepare_output_dir"], "output_dirs"),
    **dict.fromkeys(["EpochSeededSampler"], "sampler"),
    **dict.fromkeys([
        "MetricsLogger", "ProcessLogger", "device_description", "metrics_series", "read_metrics", "setup_accelerator",
        "write_json"
    ], "tracking"),
    **dict.fromkeys(["PhaseTimer", "TrainingLoop", "TrainingTask", "seconds_since_process_start"], "trainer"),
}


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: hf_dgm_training.trainer, ...
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
