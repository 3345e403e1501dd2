"""Every data layout gives the same schema: MVTec with masks for all / some / no defect types, the plain layout,
one merged defect folder, only-good or only-defective test sets, grayscale categories, Hub datasets with image +
label (mask optional) on the loopback Hub; the seeded validation split."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_dgm_training.data.anomaly import (
    ANOMALY_FEATURES,
    AnomalyDataError,
    load_anomaly_dataset,
    load_good_images,
    load_split_as_tensors,
    num_channels_of,
    split_validation,
)
from synthetic_data import make_mvtec_category


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "hf-datasets-cache")


def masks_by_file(split):
    return {row["file"]: row["mask"] for row in split}


@pytest.mark.parametrize("masks", ["all", {"crack"}, "none"], ids=["all-masks", "some-masks", "no-ground-truth"])
def test_mvtec_layout_with_masks_for_all_some_or_none(tmp_path, cache_dir, masks):
    category = make_mvtec_category(str(tmp_path / "cat"), num_train=3, num_test_good=2,
                                   defects=(("crack", 2), ("poke", 2)), masks=masks)
    dataset = load_anomaly_dataset(category, cache_dir=cache_dir)
    assert dataset["test"].features == ANOMALY_FEATURES
    found = masks_by_file(dataset["test"])
    for name, mask in found.items():
        defect = name.split("/")[1]
        expected = defect == "good" or masks == "all" or (masks != "none" and defect in masks)
        assert (mask is not None) == expected, name
        if defect == "good":
            assert not np.asarray(mask).any()
        elif mask is not None:
            assert np.asarray(mask).any()
    tensors = load_split_as_tensors(dataset["test"], 8)
    assert tensors.has_masks.tolist() == [found[name] is not None for name in tensors.files]
    assert tensors.labels.tolist() == [int(not name.startswith("test/good/")) for name in tensors.files]


def test_plain_layout_with_one_merged_defect_folder(tmp_path, cache_dir):
    folder = make_mvtec_category(str(tmp_path / "parts"), size=10, num_train=4, num_test_good=2,
                                 defects=(("defective", 3),), masks="none")
    dataset = load_anomaly_dataset(folder, cache_dir=cache_dir)
    test = dataset["test"]
    assert sorted(set(test["defect_type"])) == ["defective", "good"]
    assert sum(test["label"]) == 3 and len(dataset["train"]) == 4
    assert all(row["mask"] is None for row in test if row["label"] == 1)
    assert dataset["train"][0]["image"].size == (10, 10)


@pytest.mark.parametrize("num_good,defects", [(3, ()), (0, (("scratch", 2),))], ids=["only-good", "only-defective"])
def test_test_sets_with_one_class_load(tmp_path, cache_dir, num_good, defects):
    folder = make_mvtec_category(str(tmp_path / "one-class"), num_test_good=num_good, defects=defects)
    test = load_anomaly_dataset(folder, cache_dir=cache_dir)["test"]
    assert len(set(test["label"])) == 1 and len(test) == num_good + sum(count for _, count in defects)


def test_grayscale_category_stays_one_channel(tmp_path, cache_dir):
    folder = make_mvtec_category(str(tmp_path / "gray"), grayscale=True)
    dataset = load_anomaly_dataset(folder, cache_dir=cache_dir)
    assert num_channels_of(dataset["train"]) == 1 and dataset["train"][0]["image"].mode == "L"
    assert load_split_as_tensors(dataset["test"], 8, num_channels=1).pixel_values.shape == (3, 1, 8, 8)
    rgb = make_mvtec_category(str(tmp_path / "rgb"))
    assert num_channels_of(load_anomaly_dataset(rgb, cache_dir=cache_dir)["train"]) == 3


def test_a_folder_of_good_images(tmp_path):
    folder = tmp_path / "good"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (6, 6), (1, 2, 3)).save(folder / "a.png")
    Image.new("L", (6, 6), 9).save(folder / "sub" / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    good = load_good_images(folder)
    assert good["file"] == ["a.png", "sub/b.jpg"] and good["label"] == [0, 0]
    assert load_split_as_tensors(good, 4).pixel_values.shape == (2, 3, 4, 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnomalyDataError, match="holds no images"):
        load_good_images(tmp_path / "empty")
    with pytest.raises(AnomalyDataError, match="is not a folder"):
        load_good_images(tmp_path / "missing")


# ------------------------------------------------------------------------------------------------------ Hub datasets


def _image(value, size=8, mode="RGB"):
    channels = (size, size, 3) if mode == "RGB" else (size, size)
    return Image.fromarray(np.full(channels, value, dtype=np.uint8), mode=mode)


def _mask(size=8):
    array = np.zeros((size, size), dtype=np.uint8)
    array[2:4, 2:4] = 1
    return Image.fromarray(array, mode="L")


def test_hub_dataset_with_image_and_integer_label(hub_server, tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    train = datasets.Dataset.from_dict({"image": [_image(100), _image(110), _image(120, mode="L")], "label": [0, 0, 0]},
                                       features=features)
    test = datasets.Dataset.from_dict({"image": [_image(100), _image(250)], "label": [0, 1]}, features=train.features)
    repo_id = hub_server.repo_id("anomaly-image-label")
    datasets.DatasetDict({"train": train, "test": test}).push_to_hub(repo_id)

    dataset = load_anomaly_dataset(dataset_name=repo_id, cache_dir=str(tmp_path / "cache"))
    assert dataset["test"].features == ANOMALY_FEATURES
    rows = list(dataset["test"])
    assert [(r["file"], r["label"], r["defect_type"]) for r in rows] == [("test/0", 0, "good"),
                                                                         ("test/1", 1, "anomaly")]
    assert rows[1]["mask"] is None and not np.asarray(rows[0]["mask"]).any()
    assert dataset["train"][2]["image"].mode == "L"
    tensors = load_split_as_tensors(dataset["test"], 4)
    assert tensors.has_masks.tolist() == [True, False] and tensors.files == ["test/0", "test/1"]


def test_hub_dataset_with_class_label_and_optional_masks(hub_server, tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["crack", "good"]),
                                  "mask": datasets.Image(), "file": datasets.Value("string")})
    train = datasets.Dataset.from_dict({"image": [_image(100), _image(105)], "label": [1, 1], "mask": [None, None],
                                        "file": ["g0.png", "g1.png"]}, features=features)
    test = datasets.Dataset.from_dict({"image": [_image(100), _image(250), _image(240)], "label": [1, 0, 0],
                                       "mask": [None, _mask(), None], "file": ["t0.png", "t1.png", "t2.png"]},
                                      features=features)
    repo_id = hub_server.repo_id("anomaly-classlabel")
    datasets.DatasetDict({"train": train, "test": test}).push_to_hub(repo_id)

    dataset = load_anomaly_dataset(dataset_name=repo_id, cache_dir=str(tmp_path / "cache"))
    rows = list(dataset["test"])
    assert [(r["file"], r["label"], r["defect_type"]) for r in rows] == [
        ("t0.png", 0, "good"), ("t1.png", 1, "crack"), ("t2.png", 1, "crack")]
    assert np.asarray(rows[1]["mask"]).max() == 255 and rows[2]["mask"] is None  # binarised; unknown stays None
    assert dataset["train"]["file"] == ["g0.png", "g1.png"]


def test_hub_dataset_errors_name_the_fix(hub_server, tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["ok", "bad"])})
    split = datasets.Dataset.from_dict({"image": [_image(1)], "label": [0]}, features=features)
    repo_id = hub_server.repo_id("anomaly-no-good")
    datasets.DatasetDict({"train": split, "test": split}).push_to_hub(repo_id)
    with pytest.raises(AnomalyDataError, match="no class named 'good'"):
        load_anomaly_dataset(dataset_name=repo_id, cache_dir=str(tmp_path / "cache"))

    anomalous_train = datasets.Dataset.from_dict({"image": [_image(1), _image(2)], "label": [0, 1]})
    repo_id = hub_server.repo_id("anomaly-train-defects")
    datasets.DatasetDict({"train": anomalous_train, "test": anomalous_train}).push_to_hub(repo_id)
    with pytest.raises(AnomalyDataError, match="split train holds 1 anomalous image"):
        load_anomaly_dataset(dataset_name=repo_id, cache_dir=str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------------- validation split


@pytest.fixture
def train_split(tmp_path, cache_dir):
    folder = make_mvtec_category(str(tmp_path / "split"), num_train=20)
    return load_anomaly_dataset(folder, cache_dir=cache_dir)["train"]


def test_validation_split_is_seeded_disjoint_and_independent_of_row_order(train_split):
    train, validation = split_validation(train_split, percentage=10, seed=0)
    assert len(validation) == 2 and len(train) == 18
    assert set(train["file"]).isdisjoint(validation["file"])
    assert sorted(list(train["file"]) + list(validation["file"])) == sorted(train_split["file"])
    assert list(train["file"]) == sorted(train["file"])  # the original (sorted) row order is kept
    again = split_validation(train_split, percentage=10, seed=0)[1]
    assert again["file"] == validation["file"]
    shuffled = split_validation(train_split.shuffle(seed=3), percentage=10, seed=0)[1]
    assert sorted(shuffled["file"]) == validation["file"]
    other_seeds = {tuple(split_validation(train_split, 10, seed)[1]["file"]) for seed in range(1, 6)}
    assert len(other_seeds | {tuple(validation["file"])}) > 1
    # A recorded list of files reproduces the split.
    replayed_train, replayed = split_validation(train_split, validation_files=validation["file"])
    assert replayed["file"] == validation["file"] and replayed_train["file"] == train["file"]


def test_validation_split_sizes_and_errors(train_split):
    assert len(split_validation(train_split, percentage=0)[1]) == 0
    assert len(split_validation(train_split, percentage=1)[1]) == 1  # at least one image when asked for
    assert len(split_validation(train_split, percentage=50)[1]) == 10
    with pytest.raises(AnomalyDataError, match="leaves none to train on"):
        split_validation(train_split.select([0]), percentage=10)
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        split_validation(train_split, percentage=100)
    with pytest.raises(AnomalyDataError, match="not in the training images: train/good/nope.png"):
        split_validation(train_split, validation_files=["train/good/nope.png"])
    validation_pixels = load_split_as_tensors(split_validation(train_split, 10, seed=1)[1], 8).pixel_values
    assert validation_pixels.shape == (2, 3, 8, 8) and validation_pixels.dtype == torch.float32
