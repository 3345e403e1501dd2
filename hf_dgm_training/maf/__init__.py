# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""What training a MAF needs beyond the model: `MaskedAdam` (Adam that never forms the dense MADE weight gradients)
and `flag_non_finite_` (the non-finite check of a step, on the device)."""

from .masked_adam import MaskedAdam, connected_fraction, connected_tiles, flag_non_finite_


__all__ = ["MaskedAdam", "connected_fraction", "connected_tiles", "flag_non_finite_"]
