# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""Training infrastructure shared by the hf-dgm scripts, installed with the package.

- `arguments`: the flags every training script shares, and config fields as flags.
- `checkpoints`: atomic `accelerate` checkpoints and exact resume.
- `hub`: the Hub token and a background pusher that never stops training.
- `trainer`: the one training loop; a script supplies a `TrainingTask` (its data, its step, its evaluation).
- `cuda_graphs`: a whole training step replayed as one CUDA graph.
- `cyclegan_step`: CycleGAN's training step and the options of its fast path.
- `outputs`: metrics, JSON, plots, image grids, model cards.
- `sampler`: a shuffle that depends only on (seed, epoch), so a resumed run sees the same batches.
- `model_selection`: the best epoch's weights by a validation metric, and early stopping.
- `inference`: the prologue of the inference scripts (device, output folder, model).
- `image_pool`: CycleGAN's image history buffer.
- `errors`: the errors a user can fix, and `run_main`, the entry point that prints them as one line.
- `loading`: `--model_name_or_path` checked and loaded, never sending a local-looking path to the Hub.
- `images`: images decoded from files and `datasets` columns with errors that name the damaged file.
"""

from .arguments import (
    REPORT_TO_CHOICES,
    add_common_args,
    add_config_override_args,
    auto_bool,
    checkpointing_interval,
    config_overrides_from_args,
    finish_common_args,
)
from .checkpoints import CHECKPOINT_PREFIX, TRAINING_STATE_NAME, CheckpointManager
from .cuda_graphs import CUDAGraphStep
from .errors import (
    DataError,
    HfDgmError,
    ModelLoadError,
    UnreadableImageError,
    UsageError,
    add_debug_arg,
    is_user_error,
    run_main,
)
from .hub import HUB_STAGING_PREFIX, HubPusher, resolve_hub_token
from .image_pool import ImagePool
from .images import check_dataset_images, iter_dataset_images, open_image
from .trainer import PhaseTimer, TrainingLoop, TrainingTask, seconds_since_process_start
from .model_selection import BestModelKeeper
from .sampler import EpochSeededSampler
from .inference import load_model_for_inference, resolve_device
from .loading import load_pretrained, looks_local, resolve_model_path
from .outputs import (
    MetricsLogger,
    device_description,
    metrics_series,
    plot_curves,
    read_metrics,
    save_image_grid,
    save_labelled_grids,
    save_small_grid,
    setup_accelerator,
    write_json,
    write_model_card,
)
