"""Anomaly data from a plain folder layout, with masks when a caller (the MVTec loader) supplies them:

    <folder>/train/good/*.png            normal images, the only ones trained on
    <folder>/test/good/*.png             normal test images (optional)
    <folder>/test/<any name>/*.png       anomalous test images, one folder per defect type (or one for all)

Columns: see `schema.py`. Defective images have no mask here unless `masks` names one.
"""

import os
from pathlib import Path
from typing import Optional, Union

import datasets

from modeling_maf.image_processing_maf import normalize_mode

from .schema import (
    ANOMALY_FEATURES,
    GOOD,
    AnomalyDataError,
    binarize_mask,
    check_mask_size,
    empty_mask,
    image_extensions,
    image_files,
    png_bytes,
    read_image,
)


# Bumped when the conversion below changes, so that cached conversions are rebuilt.
_CONVERSION_VERSION = "2"


def check_folder_layout(folder: Path) -> set[tuple[str, str]]:
    """Check the plain layout; return (test folder name, file stem) of every test image."""
    extensions = image_extensions()
    train, test = folder / "train", folder / "test"
    if not (train / GOOD).is_dir():
        raise AnomalyDataError(f"{train / GOOD} is missing: the layout keeps the normal training images there.")
    if not image_files(train / GOOD, extensions):
        raise AnomalyDataError(f"{train / GOOD} holds no images: put the normal training images (*.png) there.")
    others = sorted(p.name for p in train.iterdir() if p.is_dir() and p.name != GOOD)
    if others:
        raise AnomalyDataError(
            f"{train} must hold only good/ (training uses normal images only); found {others}. "
            "Move defective images to test/<defect>/."
        )
    if not test.is_dir():
        raise AnomalyDataError(f"{test} is missing: the layout keeps the test images in test/<good or defect>/.")
    test_folders = sorted(p for p in test.iterdir() if p.is_dir())
    if not test_folders:
        raise AnomalyDataError(f"{test} holds no folders: put test images in test/good/ and test/<defect>/.")
    stems = set()
    for test_folder in test_folders:
        files = image_files(test_folder, extensions)
        if not files:
            raise AnomalyDataError(f"{test_folder} holds no images: add them or remove the empty folder.")
        stems.update((test_folder.name, p.stem) for p in files)
    return stems


def load_image_folder(folder: Union[str, os.PathLike], masks: Optional[dict[tuple[str, str], Path]] = None,
                      cache_dir: Optional[str] = None) -> datasets.DatasetDict:
    """Splits train/test from the plain layout. `masks` maps (defect folder, file stem) to a mask file; defective
    images it does not name get mask None."""
    folder = Path(folder).resolve()
    check_folder_layout(folder)
    masks = masks or {}
    # Explicit patterns: only train/good and test/<folder>, so nothing else (ground_truth/, notes) enters a split.
    raw = datasets.load_dataset("imagefolder", data_dir=str(folder),
                                data_files={"train": f"train/{GOOD}/*", "test": "test/*/*"}, drop_labels=True,
                                cache_dir=cache_dir)
    # The cache key of the conversion must change when a mask changes (imagefolder only hashes the images).
    mask_signature = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in masks.values())
    converted = {}
    for split, dataset in raw.items():
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
        fingerprint = datasets.fingerprint.Hasher.hash([dataset._fingerprint, mask_signature, _CONVERSION_VERSION])
        converted[split] = dataset.map(
            _convert_row,
            fn_kwargs={"root": str(folder), "masks": {f"{d}/{n}": str(p) for (d, n), p in masks.items()}},
            remove_columns=dataset.column_names,
            features=ANOMALY_FEATURES,
            new_fingerprint=fingerprint,
            desc=f"Checking and converting {split} images",
        )
    return datasets.DatasetDict(converted)


def _convert_row(row: dict, root: str, masks: dict[str, str]) -> dict:
    path = Path(row["image"]["path"])
    defect_type = path.parent.name
    image = read_image(path)
    normalized = normalize_mode(image)
    image_bytes = None if normalized is image else png_bytes(normalized)
    mask = None
    if defect_type == GOOD:
        mask = {"path": None, "bytes": png_bytes(empty_mask(image.size))}
    elif f"{defect_type}/{path.stem}" in masks:
        mask_path = Path(masks[f"{defect_type}/{path.stem}"])
        mask_image = read_image(mask_path)
        check_mask_size(mask_image, image, str(mask_path), str(path))
        mask = {"path": None, "bytes": png_bytes(binarize_mask(mask_image))}
    return {
        "image": {"path": str(path), "bytes": image_bytes},
        "label": int(defect_type != GOOD),
        "defect_type": defect_type,
        "mask": mask,
        "file": path.relative_to(root).as_posix(),
    }


def load_good_images(folder: Union[str, os.PathLike]) -> datasets.Dataset:
    """Every image file under `folder` (recursively) as good images in the schema: e.g. held-out good images to
    calibrate a model on. `file` is the path relative to `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AnomalyDataError(f"{folder} is not a folder: pass a folder of good images (any of *.png, *.jpg, ...).")
    files = image_files(folder, recursive=True)
    if not files:
        raise AnomalyDataError(f"{folder} holds no images: pass a folder of good images (any of *.png, *.jpg, ...).")
    rows = {"image": [], "label": [], "defect_type": [], "mask": [], "file": []}
    for path in files:
        image = read_image(path)
        normalized = normalize_mode(image)
        rows["image"].append({"path": str(path), "bytes": None if normalized is image else png_bytes(normalized)})
        rows["label"].append(0)
        rows["defect_type"].append(GOOD)
        rows["mask"].append({"path": None, "bytes": png_bytes(empty_mask(image.size))})
        rows["file"].append(path.relative_to(folder).as_posix())
    return datasets.Dataset.from_dict(rows, features=ANOMALY_FEATURES)
