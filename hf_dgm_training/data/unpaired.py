"""Unpaired image data for CycleGAN training, through `datasets`, with the reference's sampling and augmentation.

The model package (`modeling_cyclegan`) does not need it: `from hf_dgm_training.data.unpaired import ...`.

- `load_unpaired_split`: the two domains of one split, from a local folder in the CycleGAN layout
  (`trainA`, `trainB`, `testA`, `testB`) or from a Hub dataset with `imageA`/`imageB` columns (HugGAN).
  Every image of the split is decoded once here, so a damaged file stops the script before training with an
  error that names it (and every other damaged file).
- `images_to_uint8_tensor`: every image converted to RGB and resized (bicubic) once to the load size. CycleGAN
  datasets are small (a few thousand images), so they are held as one uint8 tensor, on the GPU when training
  on one: no data loader, no per-step host work beyond drawing random numbers.
- `UnpairedSampler`: the reference's order (an epoch has max(|A|, |B|) steps; A in a shuffled order, index
  modulo |A|; B drawn at random every step) and augmentation (random crop of the resized image, horizontal
  flip with probability 0.5), with every random number drawn from Python's `random` so checkpoints restore it.
"""

from __future__ import annotations

import os
import random

import torch

from modeling_cyclegan.image_processing_cyclegan import levels_to_pixel_values

from ..errors import DataError, UsageError
from .images import check_dataset_images, iter_dataset_images, open_image


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# The reference resizes to 286 before cropping 256 (x 1.117); the same ratio at any size.
LOAD_SIZE_RATIO = 286 / 256


def default_load_size(image_size: int) -> int:
    return int(round(image_size * LOAD_SIZE_RATIO))


def _image_files(folder: str) -> list[str]:
    found = []
    for root, _, names in os.walk(folder):
        found += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _load_local_domain(data_dir: str, folder: str):
    from datasets import load_dataset

    path = os.path.join(data_dir, folder)
    if not os.path.isdir(path):
        present = sorted(n for n in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, n)))
        raise FileNotFoundError(  # not a DataError: train_cyclegan.py treats a missing test split as optional
            f"{path} does not exist. A CycleGAN data folder holds trainA, trainB, testA and testB (one folder of "
            f"images per domain and split); {data_dir} has {present or 'no sub-folders'}."
        )
    if not _image_files(path):
        raise DataError(f"{path} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}).")
    dataset = load_dataset("imagefolder", data_dir=path, split="train")
    return dataset.select_columns(["image"])


def _hub_domain(dataset, column: str):
    """One column of a HugGAN-style dataset, without the empty rows of the shorter domain."""
    from datasets import Image as ImageFeature

    undecoded = dataset.select_columns([column]).cast_column(column, ImageFeature(decode=False))
    keep = [i for i, value in enumerate(undecoded[column]) if value is not None]
    domain = dataset.select_columns([column]).select(keep).rename_column(column, "image")
    if len(domain) == 0:
        raise DataError(f"Column {column!r} of the dataset has no images.")
    return domain


def load_unpaired_split(
    data_dir: str | None = None,
    dataset_name: str | None = None,
    split: str = "train",
    token: str | None = None,
    cache_dir: str | None = None,
    check_images: bool = True,
):
    """The two domains of `split` ("train" or "test") as two `datasets.Dataset`s with an `image` column.

    Local folders: `<data_dir>/<split>A` and `<data_dir>/<split>B`. Hub datasets: the `imageA` and `imageB`
    columns of `split` (rows where one domain is empty are dropped from that domain only).

    Every image is decoded once (`check_images=False` skips that): a damaged or truncated one raises
    `UnreadableImageError` naming all such files, before any training starts.
    """
    if (data_dir is None) == (dataset_name is None):
        raise UsageError("Pass exactly one of --data_dir (a local CycleGAN folder) or --dataset_name (a Hub dataset).")
    if data_dir is not None:
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(
                f"--data_dir {data_dir} does not exist; it should hold trainA, trainB, testA and testB image folders."
            )
        domains = _load_local_domain(data_dir, f"{split}A"), _load_local_domain(data_dir, f"{split}B")
    else:
        domains = _load_hub_split(dataset_name, split, token, cache_dir)
    if check_images:
        for letter, domain in zip("AB", domains):
            check_dataset_images(domain, what=f"{split}{letter} images")
    return domains


def _load_hub_split(dataset_name: str, split: str, token, cache_dir):
    from datasets import load_dataset

    dataset = load_dataset(dataset_name, split=split, token=token, cache_dir=cache_dir)
    missing = [c for c in ("imageA", "imageB") if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"Dataset {dataset_name!r} (split {split!r}) has columns {dataset.column_names}; CycleGAN needs one image "
            f"column per domain named imageA and imageB (missing: {missing}), as the HugGAN datasets have."
        )
    return _hub_domain(dataset, "imageA"), _hub_domain(dataset, "imageB")


def images_to_uint8_tensor(dataset, size: int, description: str = "images", show_progress: bool = True) -> torch.Tensor:
    """All images of a dataset (`image` column) as RGB, resized to size x size (bicubic): uint8 (N, 3, size, size).

    A damaged image raises `UnreadableImageError` naming its file."""
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    if len(dataset) == 0:
        raise DataError(f"No {description} to load.")
    pixels = torch.empty((len(dataset), 3, size, size), dtype=torch.uint8)
    images = tqdm(iter_dataset_images(dataset), total=len(dataset), desc=f"Loading {description}",
                  disable=not show_progress)
    count = 0
    for _, name, value in images:
        image = open_image(value, name).convert("RGB").resize((size, size), resample=Image.BICUBIC)
        pixels[count] = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        count += 1
    if count != len(dataset):
        raise DataError(f"{len(dataset) - count} of the {description} are empty rows; drop them from the dataset.")
    return pixels




class UnpairedSampler:
    """The reference's sampling order and augmentation over two uint8 image tensors (on any device).

    Args:
        images_a, images_b: uint8 tensors (N, 3, L, L) at the load size.
        crop_size: size of the random crops.
        batch_size: images per domain and step.
        seed: seeds the per-epoch order of domain A (identical on every process; each takes its share).
        process_index, num_processes: this process's share of every epoch.
        flip: random horizontal flips.
    """

    def __init__(
        self,
        images_a: torch.Tensor,
        images_b: torch.Tensor,
        crop_size: int,
        batch_size: int = 1,
        seed: int = 0,
        process_index: int = 0,
        num_processes: int = 1,
        flip: bool = True,
    ):
        for name, images in (("images_a", images_a), ("images_b", images_b)):
            if images.dtype != torch.uint8 or images.ndim != 4 or len(images) == 0:
                raise ValueError(f"{name} must be a non-empty uint8 tensor (N, C, H, W), got {images.dtype} "
                                 f"{tuple(images.shape)}.")
            if min(images.shape[-2:]) < crop_size:
                raise ValueError(f"{name} are {tuple(images.shape[-2:])}, smaller than the crop size {crop_size}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.images_a, self.images_b = images_a, images_b
        self.crop_size, self.batch_size, self.seed, self.flip = crop_size, batch_size, seed, flip
        self.process_index, self.num_processes = process_index, num_processes
        epoch_length = max(len(images_a), len(images_b))
        # Static batch shapes (CUDA graphs): an incomplete last batch is dropped (nothing is dropped at batch 1).
        self.steps_per_epoch = epoch_length // (num_processes * batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"An epoch has {epoch_length} images per domain, fewer than one batch of {batch_size} on each of "
                f"{num_processes} processes; lower --per_device_train_batch_size."
            )

    def epoch_order(self, epoch: int) -> list[list[int]]:
        """This process's batches of domain-A indices for `epoch` (the same for a given seed and epoch)."""
        length = max(len(self.images_a), len(self.images_b))
        order = list(range(length))
        random.Random(self.seed * 100_003 + epoch).shuffle(order)
        share = order[self.process_index :: self.num_processes]
        share = [index % len(self.images_a) for index in share]
        size = self.batch_size
        return [share[step * size : (step + 1) * size] for step in range(self.steps_per_epoch)]

    def _augment_into(self, out: torch.Tensor, images: torch.Tensor, indices: list[int]) -> None:
        height, width = images.shape[-2:]
        size = self.crop_size
        for slot, index in enumerate(indices):
            top, left = random.randint(0, height - size), random.randint(0, width - size)
            crop = images[index, :, top : top + size, left : left + size]
            if self.flip and random.random() > 0.5:
                crop = crop.flip(-1)
            out[slot].copy_(crop)  # uint8 -> float on the device, no host round trip
        levels_to_pixel_values(out, inplace=True)

    def fill_batch(self, out_a: torch.Tensor, out_b: torch.Tensor, indices_a: list[int]) -> None:
        """Writes one augmented batch of each domain into the float tensors `out_a` and `out_b` (in [-1, 1]).

        B images are drawn uniformly at random for every step, as in the reference.
        """
        indices_b = [random.randint(0, len(self.images_b) - 1) for _ in indices_a]
        self._augment_into(out_a, self.images_a, indices_a)
        self._augment_into(out_b, self.images_b, indices_b)
