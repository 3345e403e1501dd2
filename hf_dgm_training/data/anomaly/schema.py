"""The column schema every anomaly-detection loader returns, and the image conversions the loaders share.

Every split (train, test) of every loader has the columns

    image        Image: RGB, or L for grayscale images (kept gray; the tensor helpers repeat it for RGB models)
    label        ClassLabel ["good", "anomaly"]: 0 = good, 1 = anomalous
    defect_type  string: "good", or the defect's name (a test folder's name, a Hub dataset's class name, "anomaly")
    mask         Image, mode "L", 255 = defective pixel, the image's size; all zero for good images; None for a
                 defective image whose mask is not known (pixel metrics then skip it)
    file         string: the image's path relative to the data folder ("test/crack/000.png"), or its Hub row id
                 ("test/17") when the Hub dataset names no file

Conversion rules (applied once, when the dataset is built):
- Images become RGB or L by the colour rules of `modeling_maf.image_processing_maf` (`normalize_mode`), the same
  rules the model's image processor applies: RGB and L kept, 1-bit and 16-bit grayscale to L, transparency composited
  over **black**, every other mode to RGB.
- Masks are binarised: any nonzero value becomes 255, stored as mode "L".
"""

import io
from pathlib import Path

import datasets
import numpy as np
from PIL import Image as PILImage

from ...errors import DataError


GOOD = "good"
ANOMALY = "anomaly"
LABEL_NAMES = [GOOD, ANOMALY]
ANOMALY_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=LABEL_NAMES),
        "defect_type": datasets.Value("string"),
        "mask": datasets.Image(),
        "file": datasets.Value("string"),
    }
)


class AnomalyDataError(DataError):
    """The data on disk or on the Hub is missing, empty, unreadable or inconsistent."""



def image_extensions() -> set[str]:
    """The extensions `imagefolder` loads, lower case, so that the checks count exactly the files it will load."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return {ext.lower() for ext in ImageFolder.EXTENSIONS}


def image_files(folder: Path, extensions: set[str] | None = None, recursive: bool = False) -> list[Path]:
    extensions = extensions or image_extensions()
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if p.is_file() and p.suffix.lower() in extensions)


def read_image(path: Path) -> PILImage.Image:
    """Decode a file fully now (a truncated file fails here, not in the middle of training), naming it on error."""
    try:
        with PILImage.open(path) as image:
            image.load()
            return image
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise AnomalyDataError(
            f"Cannot read image file {path}: {error}. The file is corrupt or not an image; replace it with a "
            "good copy or delete it."
        ) from error


def binarize_mask(mask: PILImage.Image) -> PILImage.Image:
    """Mode "L" mask with 255 where any channel of `mask` is nonzero, 0 elsewhere."""
    values = np.asarray(mask)
    if values.ndim == 3:
        values = values.any(axis=-1)
    return PILImage.fromarray(np.where(values != 0, 255, 0).astype(np.uint8), mode="L")


def empty_mask(size: tuple[int, int]) -> PILImage.Image:
    return PILImage.new("L", size, 0)


def png_bytes(image: PILImage.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def check_mask_size(mask: PILImage.Image, image: PILImage.Image, mask_name: str, image_name: str) -> None:
    if mask.size != image.size:
        raise AnomalyDataError(
            f"Mask {mask_name} is {mask.size[0]}x{mask.size[1]} but its image {image_name} is "
            f"{image.size[0]}x{image.size[1]}; a mask must have its image's size."
        )
