"""Decoded rows of the schema (`schema.py`) as torch tensors: images float in [0, 1], masks bool.

Images go through the model's image processor (`MAFImageProcessor`; by default the one of the size and channel count
asked for), so training and inference preprocess the same way.
"""

import io
from typing import Callable, NamedTuple, Optional, Sequence, Union

import datasets
import numpy as np
import torch
from PIL import Image as PILImage

from modeling_maf.image_processing_maf import MAFImageProcessor, levels_to_pixel_values

from .schema import AnomalyDataError


class AnomalyTensors(NamedTuple):
    pixel_values: torch.Tensor  # float32 (N, C, S, S) in [0, 1]
    labels: torch.Tensor  # int64 (N,), 0 good / 1 anomalous
    defect_types: list[str]
    masks: torch.Tensor  # bool (N, S, S), True = defective pixel; all False where the mask is not known
    has_masks: torch.Tensor  # bool (N,): whether the image's mask is known (always for good images)
    files: list[str]  # the schema's `file`: path relative to the data folder, or Hub row id



def _size(image_size: Union[int, Sequence[int]]) -> tuple[int, int]:
    """(width, height) for PIL from an int (square) or (height, width)."""
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return width, height


def image_processor_for(image_size: Union[int, Sequence[int], None] = None, num_channels: Optional[int] = None,
                        image_processor: Optional[MAFImageProcessor] = None) -> MAFImageProcessor:
    """The processor that builds the tensors: `image_processor` when given (then `image_size` and `num_channels`, if
    given, must agree with it), else `MAFImageProcessor` for `image_size` (an int or (height, width)) and
    `num_channels` (default 3)."""
    if image_processor is None:
        if image_size is None:
            raise ValueError("Pass image_size or image_processor (e.g. MAFImageProcessor.from_model_config(config)).")
        width, height = _size(image_size)
        return MAFImageProcessor(size={"height": height, "width": width}, num_channels=num_channels or 3)
    size = image_processor.size
    if image_size is not None and _size(image_size) != (size["width"], size["height"]):
        raise ValueError(f"image_size {image_size!r} differs from the image processor's size {size}; pass one of them.")
    if num_channels is not None and num_channels != image_processor.num_channels:
        raise ValueError(f"num_channels {num_channels} differs from the image processor's "
                         f"{image_processor.num_channels}; pass one of them.")
    return image_processor


def images_to_tensor(images: Sequence[PILImage.Image], image_size: Union[int, Sequence[int], None] = None,
                     dtype: torch.dtype = torch.float32, num_channels: Optional[int] = None,
                     image_processor: Optional[MAFImageProcessor] = None) -> torch.Tensor:
    """(N, C, H, W) tensor of images preprocessed by `image_processor` (default: `MAFImageProcessor` for
    `image_size` and `num_channels`: 3 = RGB with gray repeated, 1 = grayscale; PIL's antialiased bilinear resize).

    Floating dtypes hold pixel/255 in [0, 1] (so `(x * 255).round()` gives back the exact uint8 levels);
    torch.uint8 holds the raw levels 0..255.
    """
    processor = image_processor_for(image_size, num_channels, image_processor)
    levels = processor(list(images), do_rescale=False)["pixel_values"]
    return levels if dtype == torch.uint8 else levels_to_pixel_values(levels, dtype)


def _mask_size(processor: MAFImageProcessor) -> tuple[int, int]:
    return processor.size["height"], processor.size["width"]


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


def anomaly_transform(image_size: Union[int, Sequence[int], None] = None, num_channels: Optional[int] = None,
                      image_processor: Optional[MAFImageProcessor] = None) -> Callable[[dict], dict]:
    """A batch transform for `dataset.with_transform(...)`, giving rows a torch DataLoader can collate:
    pixel_values float (C, H, W) in [0, 1] (see `images_to_tensor`), labels int64, defect_types str, masks bool
    (H, W), has_masks bool, files str."""
    processor = image_processor_for(image_size, num_channels, image_processor)

    def transform(batch: dict) -> dict:
        return {
            "pixel_values": images_to_tensor(batch["image"], image_processor=processor),
            "labels": torch.as_tensor(batch["label"], dtype=torch.int64),
            "defect_types": list(batch["defect_type"]),
            "masks": masks_to_tensor(batch["mask"], _mask_size(processor)),
            "has_masks": _has_masks(batch),
            "files": list(batch["file"]),
        }

    return transform



def load_split_as_tensors(split: datasets.Dataset, image_size: Union[int, Sequence[int], None] = None,
                          num_channels: Optional[int] = None,
                          image_processor: Optional[MAFImageProcessor] = None) -> AnomalyTensors:
    """Decode and preprocess a whole split at once (anomaly data sets are small: MVTec's largest train split has
    about 400 images), for scripts that keep the data on the device instead of decoding every epoch. Images go
    through `image_processor` (default: the one of `image_size` and `num_channels`); masks are resized to its size."""
    if len(split) == 0:
        raise AnomalyDataError("The split is empty: nothing to load.")
    processor = image_processor_for(image_size, num_channels, image_processor)
    batch = split[:]
    return AnomalyTensors(
        pixel_values=images_to_tensor(batch["image"], image_processor=processor),
        labels=torch.as_tensor(list(batch["label"]), dtype=torch.int64),
        defect_types=list(batch["defect_type"]),
        masks=masks_to_tensor(batch["mask"], _mask_size(processor)),
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
