# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""A data order that a resumed run reproduces exactly."""

import torch


class EpochSeededSampler(torch.utils.data.Sampler):
    """A shuffle that depends only on (seed, epoch), so a resumed run sees exactly the batches it would have.

    The epoch is set with `use_epoch`, not `set_epoch`: accelerate calls `set_epoch` with the number of times the
    (prepared) loader was iterated, which restarts at 0 for the loader that skips the batches already done."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def use_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self):
        return self.size
