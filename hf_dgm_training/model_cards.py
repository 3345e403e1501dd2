# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""The model card (README.md) a training script writes next to the model."""

from __future__ import annotations

import os


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
