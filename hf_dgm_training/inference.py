# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""The prologue of the inference scripts: device, output folder, model."""

from __future__ import annotations

import argparse
import os

from .loading import load_pretrained


def resolve_device(name: str | None = None):
    """The device an inference script runs on: `name` (e.g. from --device), else CUDA when available, else CPU."""
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_model_for_inference(args: argparse.Namespace, default_subfolder: str,
                             model_types: tuple[str, ...] | None = None):
    """The prologue of the inference scripts: the device of ``--device``, the output folder (``--output_dir``, else
    ``default_subfolder`` inside the model folder; created) and the model of ``--model_name_or_path`` (local folder
    or Hub id, through the Auto classes, checked by `load_pretrained`: a wrong path or a model of another type than
    ``model_types`` is one `ModelLoadError`) on that device in eval mode. Returns ``(device, output_dir, model)``.
    The model is loaded before the output folder is created, so a wrong path leaves nothing behind."""
    from transformers import AutoModel

    device = resolve_device(args.device)
    model = load_pretrained(AutoModel, args.model_name_or_path, model_types=model_types, token=args.hub_token)
    model = model.to(device).eval()
    output_dir = args.output_dir or os.path.join(os.path.expanduser(args.model_name_or_path), default_subfolder)
    os.makedirs(output_dir, exist_ok=True)
    return device, output_dir, model

