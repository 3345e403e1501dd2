"""MVTec AD's layout, for any category, with masks for all, some or none of the defective images:

    <category>/train/good/*.png
    <category>/test/<defect or good>/*.png
    <category>/ground_truth/<defect>/<name>_mask.png      (optional, per image)

and the download of MVTec's official archive for a category. Columns: see `schema.py`.
"""

import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Optional, Union

import datasets
from tqdm.auto import tqdm

from .folder import check_folder_layout, load_image_folder
from .schema import AnomalyDataError, image_extensions


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
MASK_SUFFIX = "_mask"


# --------------------------------------------------------------------------------------------------- loading


def load_mvtec_folder(category_dir: Union[str, os.PathLike], cache_dir: Optional[str] = None) -> datasets.DatasetDict:
    """Splits train/test of a category folder in MVTec's layout; defective images without a mask in
    ground_truth/ get mask None (image metrics use them, pixel metrics skip them)."""
    category_dir = Path(category_dir).resolve()
    return load_image_folder(category_dir, masks=find_masks(category_dir), cache_dir=cache_dir)


def find_masks(category_dir: Path) -> dict[tuple[str, str], Path]:
    """The mask file of every test image that has one, keyed by (defect, stem); a mask without its image is an error."""
    test_images = check_folder_layout(category_dir)
    ground_truth = category_dir / "ground_truth"
    if not ground_truth.is_dir():
        return {}
    extensions = image_extensions()
    masks = {}
    for mask in sorted(ground_truth.glob(f"*/*{MASK_SUFFIX}.*")):
        if mask.suffix.lower() in extensions:
            masks[(mask.parent.name, mask.stem[: -len(MASK_SUFFIX)])] = mask
    orphans = [str(masks[key]) for key in sorted(masks) if key not in test_images]
    if orphans:
        raise AnomalyDataError(
            f"{len(orphans)} mask(s) without a matching test image (expected test/<defect>/<name>.png for "
            f"ground_truth/<defect>/<name>{MASK_SUFFIX}.png): {', '.join(orphans[:10])}"
            + (" ..." if len(orphans) > 10 else "")
        )
    return masks


def find_category_dir(data_dir: Union[str, os.PathLike], category: str) -> Optional[Path]:
    """The folder holding train/ and test/: data_dir itself or data_dir/<category>; None when neither has data."""
    data_dir = Path(data_dir)
    for candidate in (data_dir, data_dir / category):
        if (candidate / "train").is_dir() or (candidate / "test").is_dir():
            return candidate
    return None


def missing_data_message(data_dir, category: str) -> str:
    data_dir = Path(data_dir)
    found = "does not exist" if not data_dir.exists() else "holds no train/ or test/ folder"
    return (
        f"No data for category '{category}': {data_dir} {found}. Put the images there in MVTec's layout "
        f"({data_dir}/train/good/*.png, {data_dir}/test/<good or defect>/*.png, optional masks in "
        f"{data_dir}/ground_truth/<defect>/*_mask.png), or unpack {category}.tar.xz from {MVTEC_HOMEPAGE} into "
        f"{data_dir}, or pass --download (download=True) to fetch MVTec's official archive for '{category}' "
        f"(licence CC BY-NC-SA 4.0)."
    )


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
            raise AnomalyDataError(
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
            raise AnomalyDataError(
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
            raise AnomalyDataError(f"Download of {url} stopped after {received} of {total} bytes; run it again.")
    except OSError as error:  # urllib's URLError/HTTPError are OSErrors
        partial.unlink(missing_ok=True)
        raise AnomalyDataError(
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
                    raise AnomalyDataError(
                        f"Refusing to unpack {archive}: member '{member.name}' would land outside {destination}."
                    )
                if member.issym() or member.islnk():
                    link_base = target.parent if member.issym() else destination
                    if not (link_base / member.linkname).resolve().is_relative_to(destination):
                        raise AnomalyDataError(
                            f"Refusing to unpack {archive}: link '{member.name}' -> '{member.linkname}' points outside."
                        )
                if member.isdev():
                    raise AnomalyDataError(f"Refusing to unpack {archive}: member '{member.name}' is a device file.")
            # The "data" filter (Python >= 3.11.4 / 3.12) repeats these checks inside tarfile and drops odd modes.
            extract_kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            progress = tqdm(members, desc=f"Unpacking {archive.name}", unit="file")
            tar.extractall(destination, members=progress, **extract_kwargs)
    except tarfile.TarError as error:
        raise AnomalyDataError(
            f"{archive} is not a readable tar archive ({error}); delete it and download again."
        ) from error
