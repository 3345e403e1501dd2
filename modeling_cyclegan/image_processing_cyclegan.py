"""Image processor of CycleGAN: images to pixel values in [-1, 1] and back.

The mapping between 8-bit levels and the generators' [-1, 1] lives here, once (`levels_to_pixel_values`,
`pixel_values_to_levels`, `pixel_values_to_unit_interval`); the processor, the training data and the scripts use it.

Self-contained (torch, numpy, PIL and transformers only): `save_pretrained` copies this file next to the model so
that a Hub repository loads with `trust_remote_code=True` without this package.
"""

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature


HALF_RANGE = 127.5  # 8-bit levels 0..255 map linearly onto [-1, 1]: x / 127.5 - 1


def levels_to_pixel_values(levels: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """8-bit levels 0..255 -> generator pixel values in [-1, 1]: ``x / 127.5 - 1``.

    ``inplace=True`` rewrites ``levels`` itself, which must then be a float tensor holding the levels (a training
    batch buffer filled from uint8 crops, without a new allocation); otherwise the result is a new float32 tensor.
    """
    if inplace:
        return levels.div_(HALF_RANGE).sub_(1.0)
    return levels.float() / HALF_RANGE - 1.0


def pixel_values_to_levels(pixel_values: torch.Tensor) -> torch.Tensor:
    """Generator pixel values in [-1, 1] -> uint8 levels, the nearest of the 256 (outside values are clipped)."""
    return ((pixel_values.detach().float().clamp(-1, 1) + 1.0) * HALF_RANGE).round().to(torch.uint8)


def pixel_values_to_unit_interval(pixel_values: torch.Tensor) -> torch.Tensor:
    """Generator pixel values in [-1, 1] -> [0, 1] (for image grids and plots), clipped."""
    return ((pixel_values.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def _size_dict(size) -> dict:
    if isinstance(size, int):
        size = {"height": size, "width": size}
    if not isinstance(size, dict) or set(size) != {"height", "width"}:
        raise ValueError(f"size must be an int or a dict with 'height' and 'width', got {size!r}.")
    for side in ("height", "width"):
        value = size[side]
        if isinstance(value, bool) or not isinstance(value, int) or value < 4 or value % 4 != 0:
            raise ValueError(
                f"size {side} must be a positive multiple of 4 (the generator downsamples twice by 2), got {value!r}."
            )
    return {"height": size["height"], "width": size["width"]}


def _to_pil_rgb(image) -> Image.Image:
    """One image (PIL, uint8 or [0, 1] float array/tensor, HW / HWC / CHW) as an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")  # grayscale, palette and RGBA images become RGB
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = image.permute(1, 2, 0)  # CHW -> HWC
        image = image.numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"Expected PIL images, NumPy arrays or torch tensors, got {type(image).__name__}.")
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
        image = image.transpose(1, 2, 0)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
        raise ValueError(
            f"Expected an image of shape (H, W), (H, W, C) or (C, H, W) with C in (1, 3, 4), got {image.shape}."
        )
    if image.dtype == np.uint8:
        pixels = image
    elif np.issubdtype(image.dtype, np.floating):
        if image.size and (image.min() < 0.0 or image.max() > 1.0):
            raise ValueError(
                f"Float images must have values in [0, 1], got [{image.min():.3g}, {image.max():.3g}]. Pass uint8 "
                "arrays for 0..255 values."
            )
        pixels = (image * 255.0 + 0.5).astype(np.uint8)
    else:
        raise ValueError(f"Expected uint8 or float images, got dtype {image.dtype}.")
    return Image.fromarray(pixels).convert("RGB")


class CycleGANImageProcessor(BaseImageProcessor):
    r"""
    Turns images into the generator's input and its output back into images.

    `preprocess` converts each image to RGB, resizes it to `size` with bicubic interpolation (as the reference
    implementation) and maps 0..255 to [-1, 1] (`levels_to_pixel_values`: `x / 127.5 - 1`). `postprocess` inverts
    the mapping and returns PIL images (or uint8 arrays).

    Args:
        size (`int` or `dict[str, int]`, *optional*, defaults to 256):
            Output size, `{"height": h, "width": w}` or one int for both; multiples of 4.
        do_resize (`bool`, *optional*, defaults to `True`):
            Resize to `size`. When `False` images keep their size, which must then be a multiple of 4 and the same
            for the whole batch.
        resample (`int`, *optional*, defaults to `PIL.Image.BICUBIC`):
            PIL resampling filter.
    """

    model_input_names = ["pixel_values"]

    def __init__(self, size=256, do_resize: bool = True, resample: int = int(Image.BICUBIC), **kwargs):
        super().__init__(**kwargs)
        self.size = _size_dict(size)
        self.do_resize = do_resize
        self.resample = int(resample)

    def preprocess(self, images, size=None, do_resize: bool | None = None, return_tensors="pt",
                   **kwargs) -> BatchFeature:
        """Images (one or a list) -> `BatchFeature` with `pixel_values` of shape (N, 3, H, W) in [-1, 1]."""
        if kwargs:
            raise ValueError(f"Unexpected arguments {sorted(kwargs)}; CycleGANImageProcessor takes size and do_resize.")
        if return_tensors not in ("pt", None):
            raise ValueError("CycleGANImageProcessor returns torch tensors (return_tensors='pt'), got "
                             f"{return_tensors!r}.")
        size = self.size if size is None else _size_dict(size)
        do_resize = self.do_resize if do_resize is None else do_resize
        if isinstance(images, (Image.Image, np.ndarray)) or (isinstance(images, torch.Tensor) and images.ndim <= 3):
            images = [images]
        if isinstance(images, torch.Tensor):
            images = list(images)
        if len(images) == 0:
            raise ValueError("CycleGANImageProcessor got no images.")

        arrays = []
        for image in images:
            image = _to_pil_rgb(image)
            if do_resize:
                image = image.resize((size["width"], size["height"]), resample=self.resample)
            elif image.width % 4 or image.height % 4:
                raise ValueError(
                    f"Image of size {image.width}x{image.height} is not a multiple of 4; resize it (do_resize=True)."
                )
            arrays.append(np.asarray(image, dtype=np.uint8))
        if len({array.shape for array in arrays}) > 1:
            raise ValueError(
                f"Images of different sizes {sorted({array.shape[:2] for array in arrays})} cannot be batched; "
                "use do_resize=True."
            )
        levels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return BatchFeature(data={"pixel_values": levels_to_pixel_values(levels)})

    def postprocess(self, pixel_values: torch.Tensor, output_type: str = "pil"):
        """Generator output (N, 3, H, W) in [-1, 1] -> list of PIL images (`"pil"`), uint8 HWC arrays (`"np"`)
        or a uint8 tensor (N, 3, H, W) (`"pt"`)."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"postprocess expects a tensor of shape (N, 3, H, W), got {shape}.")
        pixel_values = pixel_values.detach().float().cpu()
        low, high = pixel_values.min().item(), pixel_values.max().item()
        if low < -1.001 or high > 1.001:
            raise ValueError(
                f"postprocess expects generator outputs in [-1, 1], got values in [{low:.3g}, {high:.3g}]."
            )
        pixels = pixel_values_to_levels(pixel_values)
        if output_type == "pt":
            return pixels
        arrays = [array.permute(1, 2, 0).numpy() for array in pixels]
        return arrays if output_type == "np" else [Image.fromarray(array) for array in arrays]


__all__ = [
    "CycleGANImageProcessor", "levels_to_pixel_values", "pixel_values_to_levels", "pixel_values_to_unit_interval"
]
