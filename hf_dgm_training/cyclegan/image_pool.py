# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""The image history buffer of CycleGAN training (Shrivastava et al. 2017), with the reference's semantics."""

from __future__ import annotations

import random

import torch


class ImagePool:
    """History of generated images the discriminator is trained on (Shrivastava et al. 2017), reference semantics.

    Until `pool_size` images are stored, every new image is stored and returned. Afterwards each new image is,
    with probability 0.5, swapped with a randomly chosen stored image (the stored one is returned), and otherwise
    returned as is. `pool_size=0` returns its input. Use one pool per domain.

    The stored images stay on the device of the input and every decision is drawn on the host with Python's
    `random` (the reference's calls, in its order), so a query never waits for the device; seeding `random`
    makes the pool reproducible. `state_dict`/`load_state_dict` let checkpoints restore it.
    """

    def __init__(self, pool_size: int = 50):
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 0:
            raise ValueError(f"pool_size must be an integer >= 0 (0 disables the pool), got {pool_size!r}.")
        self.pool_size = pool_size
        self.num_images = 0
        self.images: torch.Tensor | None = None  # (pool_size, C, H, W), allocated on the first query

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Returns a batch of the same shape as `images`: new images and/or images from the history."""
        if self.pool_size == 0:
            return images
        images = images.detach()
        if self.images is None:
            self.images = images.new_empty((self.pool_size, *images.shape[1:]))
        if self.images.shape[1:] != images.shape[1:]:
            raise ValueError(f"ImagePool stores images of shape {tuple(self.images.shape[1:])}, "
                             f"got {tuple(images.shape[1:])}.")
        if self.images.device != images.device or self.images.dtype != images.dtype:
            self.images = self.images.to(device=images.device, dtype=images.dtype)  # e.g. restored on the CPU
        returned = []
        for image in images:
            if self.num_images < self.pool_size:
                self.images[self.num_images].copy_(image)
                self.num_images += 1
                returned.append(image)
            elif random.uniform(0, 1) > 0.5:
                slot = random.randint(0, self.pool_size - 1)
                returned.append(self.images[slot].clone())
                self.images[slot].copy_(image)
            else:
                returned.append(image)
        return torch.stack(returned)

    def state_dict(self) -> dict:
        stored = None if self.images is None else self.images[: self.num_images].detach().cpu().clone()
        return {"pool_size": self.pool_size, "num_images": self.num_images, "images": stored}

    def load_state_dict(self, state: dict) -> None:
        if state["pool_size"] != self.pool_size:
            raise ValueError(f"Checkpoint pool has size {state['pool_size']}, this pool {self.pool_size}.")
        self.num_images = state["num_images"]
        stored = state["images"]
        if stored is None:
            self.images = None
            return
        self.images = stored.new_zeros((self.pool_size, *stored.shape[1:]))  # moved to the images' device on query
        self.images[: self.num_images].copy_(stored)
