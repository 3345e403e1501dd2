# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""Model selection on a validation metric: the best epoch's weights, and early stopping."""

from __future__ import annotations

import math


class BestModelKeeper:
    """Keeps a copy of the weights of the epoch with the lowest validation metric, and counts the epochs since it
    for early stopping (`patience`, None: never stop early).

    The copy lives on the model's device (one more set of weights). Register the keeper with
    `accelerator.register_for_checkpointing` so that a resumed run keeps the same best epoch and copy.
    """

    def __init__(self, model, patience: int | None = None):
        self.model, self.patience = model, patience
        self.best_value, self.best_epoch, self.epochs_without_improvement = math.inf, None, 0
        self.weights = None

    def update(self, value: float, epoch: int) -> bool:
        """Records the metric of `epoch` (0-based); returns whether it is the best so far (its weights are kept)."""
        if not math.isfinite(value) or value >= self.best_value:
            self.epochs_without_improvement += 1
            return False
        self.best_value, self.best_epoch, self.epochs_without_improvement = value, epoch, 0
        state = self.model.state_dict()
        if self.weights is None:
            self.weights = {name: tensor.detach().clone() for name, tensor in state.items()}
        else:
            for name, tensor in state.items():
                self.weights[name].copy_(tensor)
        return True

    def should_stop(self) -> bool:
        return self.patience is not None and self.epochs_without_improvement >= self.patience

    def restore(self) -> bool:
        """Loads the best weights into the model; returns False when there are none."""
        if self.weights is None:
            return False
        self.model.load_state_dict(self.weights)
        return True

    def state_dict(self) -> dict:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch,
                "epochs_without_improvement": self.epochs_without_improvement,
                "weights": None if self.weights is None else {k: v.cpu() for k, v in self.weights.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        self.epochs_without_improvement = state["epochs_without_improvement"]
        device = next(self.model.parameters()).device
        self.weights = None if state["weights"] is None else {k: v.to(device) for k, v in state["weights"].items()}
