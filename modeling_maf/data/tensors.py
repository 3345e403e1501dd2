"""Decoded rows of the schema (`modeling_maf.data.schema`) as torch tensors: images float in [0, 1], masks bool."""

import io
from typing import Callable, NamedTuple, Sequence, Union

import datasets
import numpy as np
import torch
from PIL import Image as PILImage

from .schema import AnomalyDataError, to_mode


class AnomalyTensors(NamedTuple):
    pixel_values: torch.Tensor  # float32 (N, C, S, S) in [0, 1]
    labels: torch.Tensor  # int64 (N,), 0 good / 1 anomalous
    defect_types: list[str]
    masks: torch.Tensor  # bool (N, S, S), True = defective pixel; all False where the mask is not known
    has_masks: torch.Tensor  # bool (N,): whether the image's mask is known (always for good images)
    files: list[str]  # the schema's `file`: path relative to the data folder, or Hub row id


MVTecTensors = AnomalyTensors  # the name the MVTec loader has always used


def _size(image_size: Union[int, Sequence[int]]) -> tuple[int, int]:
    """(width, height) for PIL from an int (square) or (height, width)."""
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return width, height


def images_to_tensor(images: Sequence[PILImage.Image], image_size: Union[int, Sequence[int]],
                     dtype: torch.dtype = torch.float32, num_channels: int = 3) -> torch.Tensor:
    """(N, num_channels, H, W) tensor of images resized with PIL's antialiased bilinear filter; num_channels 3 = RGB
    (gray repeated), 1 = grayscale.

    Floating dtypes hold pixel/255 in [0, 1] (so `(x * 255).round()` gives back the exact uint8 levels);
    torch.uint8 holds the raw levels 0..255.
    """
    size = _size(image_size)
    arrays = [np.asarray(to_mode(image, num_channels).resize(size, PILImage.BILINEAR)) for image in images]
    batch = torch.from_numpy(np.stack(arrays))
    batch = batch[:, None] if batch.ndim == 3 else batch.permute(0, 3, 1, 2)
    batch = batch.contiguous()
    return batch if dtype == torch.uint8 else batch.to(dtype) / 255.0


def masks_to_tensor(masks: Sequence[PILImage.Image | None], image_size: Union[int, Sequence[int]]) -> torch.Tensor:
    """(N, H, W) bool tensor of masks resized with nearest neighbour (no blurred edges); True = defective; a
    missing mask (None) gives all False."""
    size = _size(image_size)
    width, height = size
    arrays = [np.zeros((height, width), dtype=bool) if mask is None
              else np.asarray(mask.convert("L").resize(size, PILImage.NEAREST)) != 0 for mask in masks]
    return torch.from_numpy(np.stack(arrays))


def _has_masks(batch: dict) -> torch.Tensor:
    return torch.as_tensor([mask is not None or label == 0 for mask, label in zip(batch["mask"], batch["label"])],
                           dtype=torch.bool)


def anomaly_transform(image_size: Union[int, Sequence[int]], num_channels: int = 3) -> Callable[[dict], dict]:
    """A batch transform for `dataset.with_transform(...)`, giving rows a torch DataLoader can collate:
    pixel_values float (C, H, W) in [0, 1], labels int64, defect_types str, masks bool (H, W), has_masks bool,
    files str."""

    def transform(batch: dict) -> dict:
        return {
            "pixel_values": images_to_tensor(batch["image"], image_size, num_channels=num_channels),
            "labels": torch.as_tensor(batch["label"], dtype=torch.int64),
            "defect_types": list(batch["defect_type"]),
            "masks": masks_to_tensor(batch["mask"], image_size),
            "has_masks": _has_masks(batch),
            "files": list(batch["file"]),
        }

    return transform


mvtec_transform = anomaly_transform  # the name the MVTec loader has always used


def load_split_as_tensors(split: datasets.Dataset, image_size: Union[int, Sequence[int]],
                          num_channels: int = 3) -> AnomalyTensors:
    """Decode and resize a whole split at once (anomaly data sets are small: MVTec's largest train split has
    about 400 images), for scripts that keep the data on the device instead of decoding every epoch."""
    if len(split) == 0:
        raise AnomalyDataError("The split is empty: nothing to load.")
    batch = split[:]
    return AnomalyTensors(
        pixel_values=images_to_tensor(batch["image"], image_size, num_channels=num_channels),
        labels=torch.as_tensor(list(batch["label"]), dtype=torch.int64),
        defect_types=list(batch["defect_type"]),
        masks=masks_to_tensor(batch["mask"], image_size),
        has_masks=_has_masks(batch),
        files=list(batch["file"]),
    )


def num_channels_of(split: datasets.Dataset) -> int:
    """1 when every image of the split is grayscale (mode L), else 3: the channel count a model of it needs."""
    modes = set()
    for encoded in split.cast_column("image", datasets.Image(decode=False))["image"]:
        source = io.BytesIO(encoded["bytes"]) if encoded.get("bytes") is not None else encoded["path"]
        with PILImage.open(source) as image:  # reads the header only
            modes.add(image.mode)
    return 1 if modes == {"L"} else 3
