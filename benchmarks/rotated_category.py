"""A copy of an anomaly category (MVTec AD's layout) with every image rotated by its own random angle about its
centre, and each mask by its image's angle: a category whose objects are not aligned, like MVTec's screw or
metal_nut, made from one that is, to check what a detector's per-location densities cost there.

    python benchmarks/rotated_category.py data/mvtec_capsule data/capsule_rotated
    python benchmarks/detector_calibration_study.py --data_dir data/capsule_rotated --output_dir runs/rotated_study

The angle (uniform in [0, 360) degrees) is drawn from the image's path, so a second run writes the same files; a mask
takes its image's angle. Images are resampled bicubically; the corners that rotation uncovers are filled with the
median colour of the image's border, so that they read as background. Masks are resampled to their nearest pixel
and stay binary. Other files (licence, readme) are copied as they are.
"""

import argparse
import os
import shutil
import sys
import zlib

import numpy as np
from PIL import Image


def rotation_angle(image_path: str) -> float:
    """The angle of an image of the category, drawn from its path relative to the category's folder (e.g.
    `test/crack/001.png`): the same file gets the same angle in every run."""
    key = image_path.replace(os.sep, "/")
    return float(np.random.default_rng(zlib.crc32(key.encode())).uniform(0, 360))


def image_of_mask(source: str, mask_path: str) -> str:
    """The relative path of the image a mask (`ground_truth/<defect>/<name>_mask.<ext>`) belongs to
    (`test/<defect>/<name>.<any ext>`); the mask's own path when no such image exists."""
    folder, name = os.path.split(os.path.relpath(mask_path, "ground_truth"))
    stem = os.path.splitext(name)[0].removesuffix("_mask")
    test_folder = os.path.join(source, "test", folder)
    for candidate in sorted(os.listdir(test_folder)) if os.path.isdir(test_folder) else []:
        if os.path.splitext(candidate)[0] == stem:
            return os.path.join("test", folder, candidate)
    return mask_path


def rotate_image(image: Image.Image, angle: float) -> Image.Image:
    """`image` rotated by `angle` degrees about its centre, its size kept; uncovered corners take the median colour of
    the image's border."""
    mode = "L" if image.mode in ("L", "I;16", "I") else "RGB"
    image = image.convert(mode)
    pixels = np.asarray(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    fill = np.median(border, axis=0)
    fill = int(fill) if mode == "L" else tuple(int(value) for value in fill)
    return image.rotate(angle, resample=Image.BICUBIC, fillcolor=fill)


def rotate_mask(mask: Image.Image, angle: float) -> Image.Image:
    return mask.convert("L").rotate(angle, resample=Image.NEAREST, fillcolor=0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="The category's folder (train/good, test/<defect>, optional ground_truth/).")
    parser.add_argument("destination", help="The rotated copy's folder (created; must not exist yet).")
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(args.source, "train")):
        parser.error(f"{args.source}: no train/ folder; give a category in MVTec AD's layout.")
    if os.path.exists(args.destination):
        parser.error(f"{args.destination} exists already; give a new folder.")
    temporary = args.destination.rstrip("/") + ".partial"
    shutil.rmtree(temporary, ignore_errors=True)
    count = 0
    for root, _, files in os.walk(args.source):
        for name in sorted(files):
            relative = os.path.relpath(os.path.join(root, name), args.source)
            target = os.path.join(temporary, relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                with Image.open(os.path.join(root, name)) as image:
                    image.load()
            except OSError:  # not an image: copied as it is
                shutil.copy(os.path.join(root, name), target)
                continue
            is_mask = relative.replace(os.sep, "/").startswith("ground_truth/")
            if is_mask:
                rotated = rotate_mask(image, rotation_angle(image_of_mask(args.source, relative)))
            else:
                rotated = rotate_image(image, rotation_angle(relative))
            rotated.save(target, **({"quality": 95} if target.lower().endswith((".jpg", ".jpeg")) else {}))
            count += 1
    os.replace(temporary, args.destination)  # the copy appears whole or not at all
    print(f"{count} images rotated into {args.destination}", file=sys.stderr)


if __name__ == "__main__":
    main()
