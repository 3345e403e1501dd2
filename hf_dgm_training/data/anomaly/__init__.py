"""Anomaly-detection data as `datasets.DatasetDict`s (splits train and test) in one column schema, from any layout.

Columns of every split (details and conversion rules: `schema.py`):

    image        Image, RGB or L (grayscale kept)
    label        ClassLabel ["good", "anomaly"]: 0 good, 1 anomalous
    defect_type  string: "good" or the defect's name
    mask         Image "L", 255 = defective; all zero for good images; None when a defective image has no mask
    file         string: path relative to the data folder, or Hub row id

Loaders, one module per layout (a new layout is a new module that returns this schema):

    mvtec.py     MVTec AD's layout, masks in ground_truth/ for all, some or none of the defective images; download
    folder.py    the plain layout train/good, test/good, test/<any name>, without masks; a folder of good images
    hub.py       a Hub dataset with `image` + `label` (0/1 or a ClassLabel with "good"), `mask` optional

`load_anomaly_dataset` picks the loader; `split_validation` (splits.py) holds out good training images; the torch
helpers (tensors.py) turn rows into tensors.
"""

import os
from pathlib import Path
from typing import Optional, Union

import datasets

from .folder import load_good_images, load_image_folder
from .hub import load_hub_dataset
from .mvtec import (
    MVTEC_HOMEPAGE,
    MVTEC_URLS,
    download_mvtec,
    find_category_dir,
    load_mvtec_folder,
    missing_data_message,
)
from .schema import (
    ANOMALY_FEATURES,
    GOOD,
    LABEL_NAMES,
    AnomalyDataError,
    binarize_mask,
)
from .splits import split_validation
from .tensors import (
    AnomalyTensors,
    anomaly_transform,
    image_processor_for,
    images_to_tensor,
    load_split_as_tensors,
    masks_to_tensor,
    num_channels_of,
)


def load_anomaly_dataset(
    data_dir: Optional[Union[str, os.PathLike]] = None,
    dataset_name: Optional[str] = None,
    *,
    download: bool = False,
    category: str = "capsule",
    cache_dir: Optional[str] = None,
    token: Optional[Union[str, bool]] = None,
) -> datasets.DatasetDict:
    """Load anomaly data as a DatasetDict with splits train/test in the schema above.

    data_dir: a folder holding train/ and test/ (MVTec's layout, ground_truth/ optional, or the plain layout), or a
        folder holding `<category>/` (as MVTec's archive unpacks). With `download=True` and no data there, MVTec's
        official archive for `category` is fetched and unpacked into `data_dir/<category>`.
    dataset_name: a Hub dataset id (used when data_dir is not given); see hub.py for the columns it needs.
    cache_dir, token: passed to `datasets.load_dataset`.
    """
    if data_dir is None and dataset_name is None:
        raise AnomalyDataError(
            "Pass data_dir (a local folder with train/good and test/, --data_dir) or dataset_name (a Hub dataset id, "
            "--dataset_name)."
        )
    if data_dir is None:
        return load_hub_dataset(dataset_name, cache_dir=cache_dir, token=token)
    category_dir = find_category_dir(data_dir, category)
    if category_dir is None:
        if not download:
            raise FileNotFoundError(missing_data_message(data_dir, category))
        category_dir = download_mvtec(category, data_dir)
    if (Path(category_dir) / "ground_truth").is_dir():
        return load_mvtec_folder(category_dir, cache_dir=cache_dir)
    return load_image_folder(category_dir, cache_dir=cache_dir)



__all__ = [
    "ANOMALY_FEATURES",
    "GOOD",
    "LABEL_NAMES",
    "MVTEC_HOMEPAGE",
    "MVTEC_URLS",
    "AnomalyDataError",
    "AnomalyTensors",
    "anomaly_transform",
    "binarize_mask",
    "download_mvtec",
    "find_category_dir",
    "image_processor_for",
    "images_to_tensor",
    "load_anomaly_dataset",
    "load_good_images",
    "load_hub_dataset",
    "load_image_folder",
    "load_mvtec_folder",
    "load_split_as_tensors",
    "masks_to_tensor",
    "num_channels_of",
    "split_validation",
]
