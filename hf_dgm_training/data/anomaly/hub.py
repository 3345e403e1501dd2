"""Anomaly data from a Hub dataset (or any `datasets.load_dataset` name) with splits train and test.

Required columns: `image` and `label`, where `label` is 0 (good) / 1 (anomalous), a bool, or a ClassLabel with a
class named "good" (every other class is a defect type, e.g. the ClassLabel `imagefolder` builds from test folder
names). Optional: `defect_type` (string), `mask` (Image or None; any nonzero pixel is defective) and `file`
(string). Other columns are dropped. The result has the schema of `schema.py`; a row without
`file` is named by its split and index ("test/17").
"""

from typing import Optional, Union

import datasets
from PIL import Image as PILImage

from modeling_maf.image_processing_maf import normalize_mode

from ..images import open_image
from .schema import (
    ANOMALY,
    ANOMALY_FEATURES,
    GOOD,
    AnomalyDataError,
    binarize_mask,
    check_mask_size,
    empty_mask,
    png_bytes,
)


def load_hub_dataset(dataset_name: str, cache_dir: Optional[str] = None, token: Optional[Union[str, bool]] = None,
                     revision: Optional[str] = None) -> datasets.DatasetDict:
    """Splits train/test of `dataset_name` in the schema; the train split must hold good images only."""
    dataset = datasets.load_dataset(dataset_name, cache_dir=cache_dir, token=token, revision=revision)
    missing_splits = [s for s in ("train", "test") if s not in dataset]
    if missing_splits:
        raise AnomalyDataError(
            f"Hub dataset {dataset_name} lacks the split(s) {missing_splits} (has {list(dataset)}); it needs train "
            "(good images) and test (good and anomalous images), e.g. pushed by scripts/push_mvtec_dataset.py."
        )
    result = datasets.DatasetDict(
        {split: normalize_split(dataset[split], f"Hub dataset {dataset_name} split {split}", split)
         for split in ("train", "test")}
    )
    anomalous = sum(result["train"]["label"])
    if anomalous:
        raise AnomalyDataError(
            f"Hub dataset {dataset_name} split train holds {anomalous} anomalous image(s); training uses good images "
            "only: move them to the test split."
        )
    return result


def normalize_split(split: datasets.Dataset, what: str, split_name: str) -> datasets.Dataset:
    """One split with `image` + `label` (+ optional `defect_type`, `mask`, `file`) in the schema."""
    columns = split.column_names
    missing = [c for c in ("image", "label") if c not in columns]
    if missing:
        raise AnomalyDataError(f"{what} lacks column(s) {missing} (has {columns}); it needs `image` and `label` "
                               "(0 good / 1 anomalous, or a ClassLabel with a class named 'good').")
    label_feature = split.features["label"]
    class_names = None
    if isinstance(label_feature, datasets.ClassLabel):
        class_names = list(label_feature.names)
        if GOOD not in class_names:
            raise AnomalyDataError(f"{what}: the ClassLabel `label` has no class named 'good' (names {class_names}); "
                                   "name the normal class 'good', or store 0 (good) / 1 (anomalous).")
    split = split.cast_column("image", datasets.Image(decode=False))
    if "mask" in columns:
        split = split.cast_column("mask", datasets.Image(decode=False))
    return split.map(
        _convert_row,
        with_indices=True,
        fn_kwargs={"class_names": class_names, "split_name": split_name, "what": what},
        remove_columns=columns,
        features=ANOMALY_FEATURES,
        desc=f"Checking and converting {split_name} images",
    )


def _open(encoded: dict, name: str) -> PILImage.Image:
    """The image of an undecoded value, fully decoded; a damaged one raises UnreadableImageError naming `name`."""
    return open_image(encoded, name)


def _convert_row(row: dict, index: int, class_names, split_name: str, what: str) -> dict:
    name = row.get("file") or f"{split_name}/{index}"
    label = row["label"]
    if class_names is not None:
        defect_type = class_names[label]
        is_anomalous = defect_type != GOOD
    else:
        if label not in (0, 1, True, False):
            raise AnomalyDataError(f"{what} row {index} ({name}) has label {label!r}; use 0 (good) or 1 (anomalous).")
        is_anomalous = bool(label)
        defect_type = ANOMALY if is_anomalous else GOOD
    if row.get("defect_type"):
        defect_type = row["defect_type"]
    image = _open(row["image"], f"the image of row {index} ({name}) of {what}")
    normalized = normalize_mode(image)
    image_bytes = row["image"]["bytes"] if normalized is image and row["image"].get("bytes") else png_bytes(normalized)
    mask = None
    if not is_anomalous:
        mask = png_bytes(empty_mask(image.size))
    elif row.get("mask") is not None:
        mask_image = _open(row["mask"], f"the mask of row {index} ({name}) of {what}")
        check_mask_size(mask_image, image, f"of row {index} ({name}) of {what}", "of that row")
        mask = png_bytes(binarize_mask(mask_image))
    return {
        "image": {"path": None, "bytes": image_bytes},
        "label": int(is_anomalous),
        "defect_type": defect_type,
        "mask": None if mask is None else {"path": None, "bytes": mask},
        "file": name,
    }
