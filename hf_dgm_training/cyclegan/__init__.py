# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""What training a CycleGAN needs beyond the model: the training step and its fast-path options (`step`), and the
image history buffer of the discriminators (`image_pool`)."""

from .image_pool import ImagePool
from .step import (
    STEP_LOSS_NAMES,
    CycleGANTrainStep,
    FastPathOptions,
    build_optimizers,
    learning_rate_factor,
    make_gradient_averager,
    new_batch_buffers,
    prepare_model,
    resolve_fast_path,
)


__all__ = [
    "STEP_LOSS_NAMES",
    "CycleGANTrainStep",
    "FastPathOptions",
    "ImagePool",
    "build_optimizers",
    "learning_rate_factor",
    "make_gradient_averager",
    "new_batch_buffers",
    "prepare_model",
    "resolve_fast_path",
]
