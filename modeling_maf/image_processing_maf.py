"""Image processor of the MAF and IAF: images to pixel values in [0, 1] and back.

Self-contained (torch, numpy, PIL and transformers only): `save_pretrained` copies this file next to the processor's
config, so that a Hub repository loads with `AutoImageProcessor.from_pretrained(repo_id, trust_remote_code=True)`
without this package. Training tensors are built through the same class (`hf_dgm_training.data.anomaly`), so
training and inference preprocess the same way.
"""

import os

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature


IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
NUM_LEVELS = 256  # 8-bit images: levels 0..255


def levels_to_pixel_values(levels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """8-bit levels 0..255 (any dtype) -> pixel values in [0, 1] of `dtype`: ``x / 255``, so that
    ``(pixel_values * 255).round()`` gives back the exact levels."""
    return levels.to(dtype) / (NUM_LEVELS - 1)


def pixel_values_to_levels(pixel_values: torch.Tensor) -> torch.Tensor:
    """Pixel values in [0, 1] -> uint8 levels, the nearest of the 256 (values outside [0, 1] are clipped)."""
    return (pixel_values.detach().float().clamp(0, 1) * (NUM_LEVELS - 1)).round().to(torch.uint8)


# Colour conversion, the one set of rules for the data sets (applied once when they are built,
# hf_dgm_training.data.anomaly) and for the model's input (applied here):
# - RGB and L images are kept; 1-bit images become L; 16-bit grayscale becomes L (divided by 257); every other mode
#   (palette, CMYK, ...) becomes RGB.
# - Images with transparency (RGBA, LA, palette + transparency) are composited over black: a pixel's colour is scaled
#   by its opacity, so what is transparent contributes nothing, whatever colour was stored under it.
# - A model of 3 channels gets RGB (gray levels repeated), a model of 1 channel L (colour to luma, ITU-R 601-2).
_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def normalize_mode(image: Image.Image) -> Image.Image:
    """The image as RGB or L, by the rules above."""
    if image.mode in ("RGB", "L"):
        return image
    if image.mode == "1":
        return image.convert("L")
    if image.mode in _SIXTEEN_BIT_MODES:
        levels = np.asarray(image).astype(np.float64)
        if levels.max(initial=0) > 255:
            levels = levels / 257.0
        return Image.fromarray(np.clip(np.round(levels), 0, 255).astype(np.uint8), mode="L")
    if image.mode in _TRANSPARENT_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        composited = Image.alpha_composite(black, rgba).convert("RGB")
        return composited.convert("L") if image.mode in ("LA", "La") else composited
    return image.convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of `image`: gray levels repeated; transparency composited over black (the rules above)."""
    image = normalize_mode(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def to_mode(image: Image.Image, num_channels: int) -> Image.Image:
    """The image with `num_channels` channels: 3 = RGB (gray repeated), 1 = L (colour to luma, ITU-R 601-2)."""
    if num_channels == 3:
        return to_rgb(image)
    if num_channels == 1:
        image = normalize_mode(image)
        return image if image.mode == "L" else image.convert("L")
    raise ValueError(f"num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels}.")


def _to_pil(image) -> Image.Image:
    """One image (PIL, uint8 or [0, 1] float array/tensor, HW / HWC / CHW with C in 1, 3, 4) as a PIL image."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"Expected PIL images, NumPy arrays or torch tensors, got {type(image).__name__}.")
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
        image = image.transpose(1, 2, 0)  # CHW -> HWC
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
        raise ValueError(
            f"Expected an image of shape (H, W), (H, W, C) or (C, H, W) with C in (1, 3, 4), got {image.shape}."
        )
    if np.issubdtype(image.dtype, np.floating):
        if image.size and (image.min() < 0.0 or image.max() > 1.0):
            raise ValueError(
                f"Float images must have values in [0, 1], got [{image.min():.3g}, {image.max():.3g}]. Pass uint8 "
                "arrays for 0..255 values."
            )
        image = (image * (NUM_LEVELS - 1) + 0.5).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"Expected uint8 or float images, got dtype {image.dtype}.")
    return Image.fromarray(image)


def _size_dict(size) -> dict:
    if isinstance(size, int) and not isinstance(size, bool):
        size = {"height": size, "width": size}
    if not isinstance(size, dict) or set(size) != {"height", "width"}:
        raise ValueError(f"size must be an int or a dict with 'height' and 'width', got {size!r}.")
    for side in ("height", "width"):
        value = size[side]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"size {side} must be a positive integer, got {value!r}.")
    return {"height": size["height"], "width": size["width"]}


class MAFImageProcessor(BaseImageProcessor):
    r"""
    Turns images into a flow's `pixel_values` and samples back into images.

    `preprocess` converts each image to the model's colour mode (`to_mode`: RGB with gray levels repeated, or
    grayscale; transparency composited over black), resizes it to `size` with `resample` (PIL's antialiased
    bilinear filter by default) and divides the 8-bit levels by 255: `pixel_values` is float32 (N, C, H, W) in [0, 1],
    and `(pixel_values * 255).round()` gives back the levels. `postprocess` maps [0, 1] back to PIL images.

    Args:
        size (`int` or `dict[str, int]`, *optional*, defaults to 128):
            Output size, `{"height": h, "width": w}` or one int for both; a model takes `config.image_size`.
        num_channels (`int`, *optional*, defaults to 3):
            3 for RGB, 1 for grayscale (`config.num_channels`).
        do_resize (`bool`, *optional*, defaults to `True`):
            Resize to `size`. When `False` images keep their size, which must then be the same for the whole batch.
        resample (`int`, *optional*, defaults to `PIL.Image.BILINEAR`):
            PIL resampling filter.
        do_rescale (`bool`, *optional*, defaults to `True`):
            Divide the levels by 255. When `False`, `pixel_values` holds the uint8 levels themselves.
    """

    model_input_names = ["pixel_values"]

    def __init__(self, size=128, num_channels: int = 3, do_resize: bool = True, resample: int = int(Image.BILINEAR),
                 do_rescale: bool = True, **kwargs):
        super().__init__(**kwargs)
        if num_channels not in (1, 3):
            raise ValueError("MAFImageProcessor makes RGB (num_channels=3) or grayscale (num_channels=1) pixel "
                             f"values, got num_channels={num_channels!r}; build tensors of other channel counts "
                             "yourself.")
        self.size = _size_dict(size)
        self.num_channels = num_channels
        self.do_resize = do_resize
        self.resample = int(resample)
        self.do_rescale = do_rescale

    @classmethod
    def from_model_config(cls, config, **kwargs) -> "MAFImageProcessor":
        """The processor of a model configuration: its `image_size` and `num_channels`."""
        return cls(size=config.image_size, num_channels=config.num_channels, **kwargs)

    @classmethod
    def from_model(cls, pretrained_model_name_or_path, config, **kwargs) -> "MAFImageProcessor":
        """The processor saved with a model (folder or Hub id); for a model saved without one, the processor of its
        `config`. `kwargs` (`token`, `revision`, `cache_dir`, ...) go to `from_pretrained`."""
        try:
            return cls.from_pretrained(pretrained_model_name_or_path, **kwargs)
        except OSError:  # no preprocessor_config.json next to the model
            if os.path.isfile(os.path.join(str(pretrained_model_name_or_path), IMAGE_PROCESSOR_FILE)):
                raise
            return cls.from_model_config(config)

    def convert(self, image) -> Image.Image:
        """One image as a PIL image in the model's colour mode ("RGB" or "L"), not resized."""
        return to_mode(_to_pil(image), self.num_channels)

    def preprocess(self, images, size=None, do_resize: bool | None = None, resample: int | None = None,
                   do_rescale: bool | None = None, return_tensors="pt", **kwargs) -> BatchFeature:
        """Images (one or a list, or a (N, C, H, W) tensor) -> `BatchFeature` with `pixel_values` (N, C, H, W)."""
        if kwargs:
            raise ValueError(f"Unexpected arguments {sorted(kwargs)}; MAFImageProcessor takes size, do_resize, "
                             "resample and do_rescale.")
        if return_tensors not in ("pt", None):
            raise ValueError(f"MAFImageProcessor returns torch tensors (return_tensors='pt'), got {return_tensors!r}.")
        size = self.size if size is None else _size_dict(size)
        do_resize = self.do_resize if do_resize is None else do_resize
        resample = self.resample if resample is None else int(resample)
        do_rescale = self.do_rescale if do_rescale is None else do_rescale
        if isinstance(images, (Image.Image, np.ndarray)) or (isinstance(images, torch.Tensor) and images.ndim <= 3):
            images = [images]
        images = list(images)
        if len(images) == 0:
            raise ValueError("MAFImageProcessor got no images.")

        arrays = []
        for image in images:
            image = self.convert(image)
            if do_resize and image.size != (size["width"], size["height"]):
                image = image.resize((size["width"], size["height"]), resample=resample)
            arrays.append(np.asarray(image, dtype=np.uint8).reshape(image.height, image.width, self.num_channels))
        if len({array.shape for array in arrays}) > 1:
            raise ValueError(f"Images of different sizes {sorted({array.shape[:2] for array in arrays})} cannot be "
                             "batched; use do_resize=True.")
        levels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        return BatchFeature(data={"pixel_values": levels_to_pixel_values(levels) if do_rescale else levels})

    def postprocess(self, pixel_values: torch.Tensor, output_type: str = "pil"):
        """Model output (N, C, H, W) in [0, 1] (e.g. `model.sample(...)`) -> list of PIL images (`"pil"`), uint8 HWC
        arrays (`"np"`) or a uint8 tensor (N, C, H, W) (`"pt"`)."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1] not in (1, 3):
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"postprocess expects a tensor of shape (N, 1 or 3, H, W), got {shape}.")
        low, high = float(pixel_values.min()), float(pixel_values.max())
        if low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(f"postprocess expects pixel values in [0, 1], got values in [{low:.3g}, {high:.3g}].")
        levels = pixel_values_to_levels(pixel_values.cpu())
        if output_type == "pt":
            return levels
        arrays = [array.permute(1, 2, 0).numpy() for array in levels]
        if output_type == "np":
            return arrays
        return [Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array) for array in arrays]


__all__ = [
    "MAFImageProcessor", "levels_to_pixel_values", "normalize_mode", "pixel_values_to_levels", "to_mode", "to_rgb"
]
