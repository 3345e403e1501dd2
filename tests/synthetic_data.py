"""Tiny synthetic datasets in the layouts the scripts read, made by the tests themselves (never real data)."""

import os

import numpy as np
from PIL import Image


def _save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def make_mvtec_category(root, size=8, num_train=3, num_test_good=1, defects=(("crack", 2),), seed=0, masks="all",
                        grayscale=False):
    """A category in MVTec AD's layout: train/good, test/good, test/<defect> with masks in ground_truth/<defect>.
    Defective images carry a bright square where their mask is set, so a model of the good images can find it.

    masks: "all", "none" (no ground_truth/ folder: the plain layout), or the defect names that get masks.
    grayscale: save every image as mode L (a one-channel category). num_test_good or defects may be empty.
    """
    rng = np.random.default_rng(seed)
    channels = () if grayscale else (3,)

    def normal():
        return np.clip(rng.normal(120, 20, (size, size, *channels)), 0, 255).astype(np.uint8)

    for index in range(num_train):
        _save(os.path.join(root, "train", "good", f"{index:03d}.png"), normal())
    for index in range(num_test_good):
        _save(os.path.join(root, "test", "good", f"{index:03d}.png"), normal())
    side = max(2, size // 3)
    for defect, count in defects:
        for index in range(count):
            image, mask = normal(), np.zeros((size, size), dtype=np.uint8)
            top = index % (size - side + 1)
            image[top : top + side, 1 : 1 + side] = 255
            mask[top : top + side, 1 : 1 + side] = 255
            _save(os.path.join(root, "test", defect, f"{index:03d}.png"), image)
            if masks == "all" or (masks != "none" and defect in masks):
                _save(os.path.join(root, "ground_truth", defect, f"{index:03d}_mask.png"), mask)
    return root


def make_unpaired_folder(root, counts=(("trainA", 6), ("trainB", 5), ("testA", 2), ("testB", 3)), size=32, seed=0):
    """CycleGAN layout with bright A images and dark B images; one grayscale and one RGBA image in trainB."""
    rng = np.random.default_rng(seed)
    for folder, count in counts:
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        base = 190 if folder.endswith("A") else 60
        for index in range(count):
            image = Image.fromarray(np.clip(rng.normal(base, 30, (size, size, 3)), 0, 255).astype(np.uint8))
            if folder == "trainB" and index == 0:
                image = image.convert("L")
            if folder == "trainB" and index == 1:
                image = image.convert("RGBA")
            image.save(os.path.join(root, folder, f"{index}.png"))
    return root
