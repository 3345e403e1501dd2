"""MVTec AD as a `datasets.DatasetDict`, from a local category folder, MVTec's archive, or the Hub.

Every split has the columns
    image        Image, RGB
    label        ClassLabel ["good", "anomaly"]
    defect_type  string: "good", or the defect folder name ("crack", "poke", ...)
    mask         Image, mode "L", 255 = defective pixel; all zero (the image's size) for good images

Local data is MVTec's own layout, for any category:

    <category>/train/good/*.png
    <category>/test/<defect or good>/*.png
    <category>/ground_truth/<defect>/<name>_mask.png

Conversion rules (applied once, when the dataset is built):
- Grayscale and palette images become RGB by repeating the gray level.
- Images with transparency (RGBA, LA, palette + transparency) are composited over **black**: a pixel's colour
  is scaled by its opacity, so what is transparent contributes nothing, whatever colour was stored under it.
- Masks are binarised: any nonzero value becomes 255, stored as mode "L".

The torch helpers at the end turn decoded rows into tensors (images float in [0, 1], masks bool).
This module is for scripts: the modeling files must not import it.
"""

import io
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence, Union

import datasets
import numpy as np
import torch
from PIL import Image as PILImage
from tqdm.auto import tqdm


MVTEC_HOMEPAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
_MYDRIVE = "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download"
_MYDRIVE_PILL = "https://www.mydrive.ch/shares/43421/11a215a5749fcfb75e331ddd5f8e43ee/download"
# MVTec's official per-category archives (as linked from MVTEC_HOMEPAGE). Licence: CC BY-NC-SA 4.0.
MVTEC_URLS = {
    "bottle": f"{_MYDRIVE}/420937370-1629951468/bottle.tar.xz",
    "cable": f"{_MYDRIVE}/420937413-1629951498/cable.tar.xz",
    "capsule": f"{_MYDRIVE}/420937454-1629951595/capsule.tar.xz",
    "carpet": f"{_MYDRIVE}/420937484-1629951672/carpet.tar.xz",
    "grid": f"{_MYDRIVE}/420937487-1629951814/grid.tar.xz",
    "hazelnut": f"{_MYDRIVE}/420937545-1629951845/hazelnut.tar.xz",
    "leather": f"{_MYDRIVE}/420937607-1629951964/leather.tar.xz",
    "metal_nut": f"{_MYDRIVE}/420937637-1629952063/metal_nut.tar.xz",
    "pill": f"{_MYDRIVE_PILL}/420938129-1629953099/pill.tar.xz",
    "screw": f"{_MYDRIVE}/420938130-1629953152/screw.tar.xz",
    "tile": f"{_MYDRIVE}/420938133-1629953189/tile.tar.xz",
    "toothbrush": f"{_MYDRIVE}/420938134-1629953256/toothbrush.tar.xz",
    "transistor": f"{_MYDRIVE}/420938166-1629953277/transistor.tar.xz",
    "wood": f"{_MYDRIVE}/420938383-1629953354/wood.tar.xz",
    "zipper": f"{_MYDRIVE}/420938385-1629953449/zipper.tar.xz",
}

GOOD = "good"
LABEL_NAMES = [GOOD, "anomaly"]
MVTEC_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=LABEL_NAMES),
        "defect_type": datasets.Value("string"),
        "mask": datasets.Image(),
    }
)
MASK_SUFFIX = "_mask"
# Bumped when the conversion below changes, so that cached conversions are rebuilt.
_CONVERSION_VERSION = "1"


class MVTecDataError(ValueError):
    """The MVTec data on disk or on the Hub is missing, empty, unreadable or inconsistent."""


# --------------------------------------------------------------------------------------------------- loading


def load_mvtec(
    data_dir: Optional[Union[str, os.PathLike]] = None,
    dataset_name: Optional[str] = None,
    *,
    download: bool = False,
    category: str = "capsule",
    cache_dir: Optional[str] = None,
    token: Optional[Union[str, bool]] = None,
) -> datasets.DatasetDict:
    """Load one MVTec AD category as a DatasetDict with splits train/test (columns: see the module docstring).

    data_dir: a category folder in MVTec's layout (holding train/ and test/), or a folder holding
        `<category>/` (as MVTec's archive unpacks). With `download=True` and no data there, MVTec's official
        archive for `category` is fetched and unpacked into `data_dir/<category>`.
    dataset_name: a Hub dataset id pushed by scripts/push_mvtec_dataset.py (one category per repo, default
        config); used when data_dir is not given.
    cache_dir, token: passed to `datasets.load_dataset`.
    """
    if data_dir is None and dataset_name is None:
        raise MVTecDataError(
            "Pass data_dir (a local MVTec category folder, --data_dir) or dataset_name (a Hub dataset id, "
            "--dataset_name)."
        )
    if data_dir is None:
        return _load_from_hub(dataset_name, cache_dir=cache_dir, token=token)
    category_dir = find_category_dir(data_dir, category)
    if category_dir is None:
        if not download:
            raise FileNotFoundError(_missing_data_message(data_dir, category))
        category_dir = download_mvtec(category, data_dir)
    return _load_local(category_dir, cache_dir=cache_dir)


def find_category_dir(data_dir: Union[str, os.PathLike], category: str) -> Optional[Path]:
    """The folder holding train/ and test/: data_dir itself or data_dir/<category>; None when neither has data."""
    data_dir = Path(data_dir)
    for candidate in (data_dir, data_dir / category):
        if (candidate / "train").is_dir() or (candidate / "test").is_dir():
            return candidate
    return None


def _missing_data_message(data_dir, category: str) -> str:
    data_dir = Path(data_dir)
    found = "does not exist" if not data_dir.exists() else "holds no train/ or test/ folder"
    return (
        f"No MVTec AD data for category '{category}': {data_dir} {found}. Put the category folder in MVTec's "
        f"layout there ({data_dir}/train/good/*.png, {data_dir}/test/<defect>/*.png, "
        f"{data_dir}/ground_truth/<defect>/*_mask.png), or unpack {category}.tar.xz from {MVTEC_HOMEPAGE} into "
        f"{data_dir}, or pass --download (download=True) to fetch MVTec's official archive for '{category}' "
        f"(licence CC BY-NC-SA 4.0)."
    )


def _image_extensions() -> set[str]:
    # The same list imagefolder uses, so that our checks count exactly the files it will load.
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return {ext.lower() for ext in ImageFolder.EXTENSIONS}


def _image_files(folder: Path, extensions: set[str]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)


def _check_layout(category_dir: Path) -> dict[tuple[str, str], Path]:
    """Check MVTec's layout; return the mask file of every defective test image, keyed by (defect, stem)."""
    extensions = _image_extensions()
    train, test, ground_truth = category_dir / "train", category_dir / "test", category_dir / "ground_truth"
    if not (train / GOOD).is_dir():
        raise MVTecDataError(f"{train / GOOD} is missing: MVTec's layout keeps the normal training images there.")
    if not _image_files(train / GOOD, extensions):
        raise MVTecDataError(f"{train / GOOD} holds no images: put the normal training images (*.png) there.")
    others = sorted(p.name for p in train.iterdir() if p.is_dir() and p.name != GOOD)
    if others:
        raise MVTecDataError(
            f"{train} must hold only good/ (training uses normal images only); found {others}. "
            "Move defective images to test/<defect>/."
        )
    if not test.is_dir():
        raise MVTecDataError(f"{test} is missing: MVTec's layout keeps the test images in test/<good or defect>/.")
    test_folders = sorted(p for p in test.iterdir() if p.is_dir())
    if not test_folders:
        raise MVTecDataError(f"{test} holds no folders: put test images in test/good/ and test/<defect>/.")
    for folder in test_folders:
        if not _image_files(folder, extensions):
            raise MVTecDataError(f"{folder} holds no images: add them or remove the empty folder.")

    masks = {}
    if ground_truth.is_dir():
        for mask in sorted(ground_truth.glob(f"*/*{MASK_SUFFIX}.*")):
            if mask.suffix.lower() in extensions:
                masks[(mask.parent.name, mask.stem[: -len(MASK_SUFFIX)])] = mask
    test_images = {(p.parent.name, p.stem) for folder in test_folders for p in _image_files(folder, extensions)}
    orphans = [str(masks[key]) for key in sorted(masks) if key not in test_images]
    if orphans:
        raise MVTecDataError(
            f"{len(orphans)} mask(s) without a matching test image (expected test/<defect>/<name>.png for "
            f"ground_truth/<defect>/<name>{MASK_SUFFIX}.png): {', '.join(orphans[:10])}"
            + (" ..." if len(orphans) > 10 else "")
        )
    unmasked = sorted(f"{test / d / n}.*" for d, n in test_images if d != GOOD and (d, n) not in masks)
    if unmasked:
        raise MVTecDataError(
            f"{len(unmasked)} defective test image(s) have no mask in ground_truth/<defect>/<name>{MASK_SUFFIX}.png "
            f"(pixel metrics need them): {', '.join(unmasked[:10])}" + (" ..." if len(unmasked) > 10 else "")
        )
    return masks


def _load_local(category_dir: Path, cache_dir: Optional[str]) -> datasets.DatasetDict:
    category_dir = Path(category_dir).resolve()
    masks = _check_layout(category_dir)
    # Explicit patterns: only train/good and test/<folder>, so ground_truth/ never enters a split.
    raw = datasets.load_dataset(
        "imagefolder",
        data_dir=str(category_dir),
        data_files={"train": f"train/{GOOD}/*", "test": "test/*/*"},
        drop_labels=True,
        cache_dir=cache_dir,
    )
    # The cache key of the conversion must change when a mask changes (imagefolder only hashes the images).
    mask_signature = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in masks.values())
    converted = {}
    for split, dataset in raw.items():
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
        fingerprint = datasets.fingerprint.Hasher.hash([dataset._fingerprint, mask_signature, _CONVERSION_VERSION])
        converted[split] = dataset.map(
            _convert_row,
            fn_kwargs={"masks": {f"{d}/{n}": str(p) for (d, n), p in masks.items()}},
            remove_columns=dataset.column_names,
            features=MVTEC_FEATURES,
            new_fingerprint=fingerprint,
            desc=f"Checking and converting MVTec {split} images",
        )
    return datasets.DatasetDict(converted)


def _convert_row(row: dict, masks: dict[str, str]) -> dict:
    path = Path(row["image"]["path"])
    defect_type = path.parent.name
    image = _read_image(path)
    image_bytes = None
    if image.mode != "RGB":
        image_bytes = _png_bytes(to_rgb(image))
    if defect_type == GOOD:
        mask = PILImage.new("L", image.size, 0)
    else:
        mask_path = Path(masks[f"{defect_type}/{path.stem}"])
        mask = _read_image(mask_path)
        if mask.size != image.size:
            raise MVTecDataError(
                f"Mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image {path} is "
                f"{image.size[0]}x{image.size[1]}; a mask must have its image's size."
            )
        mask = binarize_mask(mask)
    return {
        "image": {"path": str(path), "bytes": image_bytes},
        "label": int(defect_type != GOOD),
        "defect_type": defect_type,
        "mask": {"path": None, "bytes": _png_bytes(mask)},
    }


def _read_image(path: Path) -> PILImage.Image:
    try:
        with PILImage.open(path) as image:
            image.load()  # decode fully now: a truncated file fails here, not in the middle of training
            return image
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise MVTecDataError(
            f"Cannot read image file {path}: {error}. The file is corrupt or not an image; replace it with a "
            "good copy or delete it."
        ) from error


def to_rgb(image: PILImage.Image) -> PILImage.Image:
    """RGB copy of `image`: gray levels repeated; transparency composited over black (see the module docstring)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        black = PILImage.new("RGBA", rgba.size, (0, 0, 0, 255))
        return PILImage.alpha_composite(black, rgba).convert("RGB")
    return image.convert("RGB")


def binarize_mask(mask: PILImage.Image) -> PILImage.Image:
    """Mode "L" mask with 255 where any channel of `mask` is nonzero, 0 elsewhere."""
    values = np.asarray(mask)
    if values.ndim == 3:
        values = values.any(axis=-1)
    return PILImage.fromarray(np.where(values != 0, 255, 0).astype(np.uint8), mode="L")


def _png_bytes(image: PILImage.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _load_from_hub(dataset_name: str, cache_dir: Optional[str], token) -> datasets.DatasetDict:
    dataset = datasets.load_dataset(dataset_name, cache_dir=cache_dir, token=token)
    missing_splits = [s for s in ("train", "test") if s not in dataset]
    if missing_splits:
        raise MVTecDataError(
            f"Hub dataset {dataset_name} lacks the split(s) {missing_splits} (has {list(dataset)}); push an MVTec "
            "category with scripts/push_mvtec_dataset.py to get train and test."
        )
    for split in ("train", "test"):
        missing = [c for c in MVTEC_FEATURES if c not in dataset[split].column_names]
        if missing:
            raise MVTecDataError(
                f"Hub dataset {dataset_name} split {split} lacks column(s) {missing} (has "
                f"{dataset[split].column_names}); push it with scripts/push_mvtec_dataset.py, which writes "
                f"{list(MVTEC_FEATURES)}."
            )
    return datasets.DatasetDict({split: dataset[split] for split in ("train", "test")})


# -------------------------------------------------------------------------------------------------- download


def download_mvtec(category: str, root: Union[str, os.PathLike], url: Optional[str] = None) -> Path:
    """Fetch MVTec's archive for `category` into `root/<category>` and return that folder.

    Atomic: the archive is streamed to a .part file, unpacked into a temporary folder inside `root`, and only
    then renamed into place, so an interrupted run leaves no half-written category. Archive members that
    would land outside the target (absolute paths, "..", links pointing out, devices) are refused.
    `url` overrides the official address (MVTEC_URLS), e.g. for a mirror or a test server.
    """
    root = Path(root)
    existing = find_category_dir(root, category)
    if existing is not None:
        return existing
    target = root / category
    if url is None:
        if category not in MVTEC_URLS:
            raise MVTecDataError(
                f"No download address known for category '{category}' (known: {sorted(MVTEC_URLS)}); pass url=."
            )
        url = MVTEC_URLS[category]
    root.mkdir(parents=True, exist_ok=True)
    archive = root / f"{category}.tar.xz"
    _fetch(url, archive)
    workdir = Path(tempfile.mkdtemp(prefix=f".{category}-unpacking-", dir=root))
    try:
        _safe_extract(archive, workdir)
        unpacked = workdir / category if (workdir / category).is_dir() else workdir
        if not ((unpacked / "train").is_dir() and (unpacked / "test").is_dir()):
            raise MVTecDataError(
                f"The archive from {url} holds no MVTec category (expected {category}/train and {category}/test); "
                f"found {sorted(p.name for p in workdir.iterdir())}."
            )
        if target.exists() and not any(target.iterdir()):
            target.rmdir()  # an empty folder left by the user is fine to replace
        os.replace(unpacked, target)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    archive.unlink()
    return target


def _fetch(url: str, destination: Path) -> None:
    partial = destination.with_name(destination.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            received = 0
            with open(partial, "wb") as out, tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"Downloading {destination.name}"
            ) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            raise MVTecDataError(f"Download of {url} stopped after {received} of {total} bytes; run it again.")
    except OSError as error:  # urllib's URLError/HTTPError are OSErrors
        partial.unlink(missing_ok=True)
        raise MVTecDataError(
            f"Could not download {url}: {error}. Without internet, fetch the archive elsewhere from "
            f"{MVTEC_HOMEPAGE} and unpack it into {destination.parent}."
        ) from error
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, destination)


def _safe_extract(archive: Path, destination: Path) -> None:
    destination = destination.resolve()
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                target = (destination / member.name).resolve()
                if not target.is_relative_to(destination):
                    raise MVTecDataError(
                        f"Refusing to unpack {archive}: member '{member.name}' would land outside {destination}."
                    )
                if member.issym() or member.islnk():
                    link_base = target.parent if member.issym() else destination
                    if not (link_base / member.linkname).resolve().is_relative_to(destination):
                        raise MVTecDataError(
                            f"Refusing to unpack {archive}: link '{member.name}' -> '{member.linkname}' points outside."
                        )
                if member.isdev():
                    raise MVTecDataError(f"Refusing to unpack {archive}: member '{member.name}' is a device file.")
            # The "data" filter (Python >= 3.11.4 / 3.12) repeats these checks inside tarfile and drops odd modes.
            extract_kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            progress = tqdm(members, desc=f"Unpacking {archive.name}", unit="file")
            tar.extractall(destination, members=progress, **extract_kwargs)
    except tarfile.TarError as error:
        raise MVTecDataError(
            f"{archive} is not a readable tar archive ({error}); delete it and download again."
        ) from error


# ----------------------------------------------------------------------------------------------- torch side


class MVTecTensors(NamedTuple):
    pixel_values: torch.Tensor  # float32 (N, 3, S, S) in [0, 1]
    labels: torch.Tensor  # int64 (N,), 0 good / 1 anomaly
    defect_types: list[str]
    masks: torch.Tensor  # bool (N, S, S), True = defective pixel


def _size(image_size: Union[int, Sequence[int]]) -> tuple[int, int]:
    """(width, height) for PIL from an int (square) or (height, width)."""
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return width, height


def images_to_tensor(
    images: Sequence[PILImage.Image], image_size: Union[int, Sequence[int]], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(N, 3, H, W) tensor of RGB images resized with PIL's antialiased bilinear filter.

    Floating dtypes hold pixel/255 in [0, 1] (so `(x * 255).round()` gives back the exact uint8 levels);
    torch.uint8 holds the raw levels 0..255.
    """
    size = _size(image_size)
    arrays = [np.asarray(to_rgb(image).resize(size, PILImage.BILINEAR)) for image in images]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return batch if dtype == torch.uint8 else batch.to(dtype) / 255.0


def masks_to_tensor(masks: Sequence[PILImage.Image], image_size: Union[int, Sequence[int]]) -> torch.Tensor:
    """(N, H, W) bool tensor of masks resized with nearest neighbour (no blurred edges); True = defective."""
    size = _size(image_size)
    arrays = [np.asarray(mask.convert("L").resize(size, PILImage.NEAREST)) != 0 for mask in masks]
    return torch.from_numpy(np.stack(arrays))


def mvtec_transform(image_size: Union[int, Sequence[int]]) -> Callable[[dict], dict]:
    """A batch transform for `dataset.with_transform(...)`, giving rows a torch DataLoader can collate:
    pixel_values float (3, H, W) in [0, 1], labels int64, defect_types str, masks bool (H, W)."""

    def transform(batch: dict) -> dict:
        return {
            "pixel_values": images_to_tensor(batch["image"], image_size),
            "labels": torch.as_tensor(batch["label"], dtype=torch.int64),
            "defect_types": list(batch["defect_type"]),
            "masks": masks_to_tensor(batch["mask"], image_size),
        }

    return transform


def load_split_as_tensors(split: datasets.Dataset, image_size: Union[int, Sequence[int]]) -> MVTecTensors:
    """Decode and resize a whole split at once (MVTec categories are small: capsule train is 219 images),
    for scripts that keep the data on the GPU instead of decoding every epoch."""
    if len(split) == 0:
        raise MVTecDataError("The split is empty: nothing to load.")
    return MVTecTensors(
        pixel_values=images_to_tensor(split["image"], image_size),
        labels=torch.as_tensor(list(split["label"]), dtype=torch.int64),
        defect_types=list(split["defect_type"]),
        masks=masks_to_tensor(split["mask"], image_size),
    )
