# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""MVTec AD loading: columns, labels, masks, conversions, bad-data errors, download, tensors, the push script."""

import functools
import http.server
import io
import shutil
import tarfile
import threading
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import hf_dgm_training.data.anomaly as mvtec_data
from hf_dgm_training.data.anomaly import (
    ANOMALY_FEATURES,
    AnomalyDataError,
    anomaly_transform,
    download_mvtec,
    images_to_tensor,
    load_anomaly_dataset,
    load_split_as_tensors,
)


SIZE = 16
GRAY_LEVEL = 77
RGBA_PIXEL = (200, 100, 50, 128)


def _rgb(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def _mask(seed: int, value: int) -> Image.Image:
    """A mask with a defect blob of `value` (not 255: the loader must binarise it)."""
    array = np.zeros((SIZE, SIZE), dtype=np.uint8)
    array[seed : seed + 5, 3:9] = value
    return Image.fromarray(array, mode="L")


def make_category(root: Path, name: str = "toy") -> Path:
    """A tiny category in MVTec's layout: train/good x4 (one grayscale, one RGBA), test/good x2, test/crack x2."""
    category = root / name
    for folder in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
        (category / folder).mkdir(parents=True)
    _rgb(0).save(category / "train/good/000.png")
    _rgb(1).save(category / "train/good/001.png")
    Image.new("L", (SIZE, SIZE), GRAY_LEVEL).save(category / "train/good/002.png")
    Image.new("RGBA", (SIZE, SIZE), RGBA_PIXEL).save(category / "train/good/003.png")
    _rgb(2).save(category / "test/good/000.png")
    _rgb(3).save(category / "test/good/001.png")
    for index, value in enumerate((1, 200)):
        _rgb(10 + index).save(category / f"test/crack/{index:03d}.png")
        _mask(index, value).save(category / f"ground_truth/crack/{index:03d}_mask.png")
    (category / "license.txt").write_text("not an image, ignored")
    return category


@pytest.fixture
def category(tmp_path):
    return make_category(tmp_path / "mvtec")


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "hf-datasets-cache")


def _rows(split):
    return sorted(split, key=lambda row: (row["defect_type"], row["image"].filename))


# --------------------------------------------------------------------------------------------- columns


def test_columns_labels_and_masks(category, cache_dir):
    dataset = load_anomaly_dataset(category, cache_dir=cache_dir)
    assert sorted(dataset) == ["test", "train"]
    for split in dataset.values():
        assert split.features == ANOMALY_FEATURES
    assert dataset["train"].features["label"].names == ["good", "anomaly"]

    train = list(dataset["train"])
    assert len(train) == 4
    assert {row["defect_type"] for row in train} == {"good"} and {row["label"] for row in train} == {0}
    test = _rows(dataset["test"])
    assert [(row["defect_type"], row["label"]) for row in test] == [("crack", 1)] * 2 + [("good", 0)] * 2
    assert [row["file"] for row in test] == ["test/crack/000.png", "test/crack/001.png", "test/good/000.png",
                                             "test/good/001.png"]

    for row in train + test:
        assert row["image"].mode == ("L" if row["file"] == "train/good/002.png" else "RGB")
        assert row["image"].size == (SIZE, SIZE)
        assert row["mask"].mode == "L" and row["mask"].size == (SIZE, SIZE)
        mask = np.asarray(row["mask"])
        if row["defect_type"] == "good":
            assert not mask.any()
    for index, row in enumerate(test[:2]):  # the cracks, with masks binarised from values 1 and 200 to 255
        expected = np.asarray(_mask(index, 255))
        np.testing.assert_array_equal(np.asarray(row["mask"]), expected)
        np.testing.assert_array_equal(np.asarray(row["image"]), np.asarray(_rgb(10 + index)))


def test_grayscale_stays_gray_and_rgba_is_composited_on_black(category, cache_dir):
    dataset = load_anomaly_dataset(category, cache_dir=cache_dir)["train"]
    undecoded = dataset.cast_column("image", datasets.Image(decode=False))
    train = {Path(row["image"]["path"]).name: row for row in undecoded}
    assert train["002.png"]["image"]["bytes"] is None  # L is kept: the row points at the original file
    rgba = np.asarray(Image.open(io.BytesIO(train["003.png"]["image"]["bytes"]))).astype(int)
    red, green, blue, alpha = RGBA_PIXEL
    expected = np.array([red, green, blue]) * alpha / 255  # colour scaled by opacity, over black
    assert np.all(np.abs(rgba - expected) <= 1), rgba[0, 0]
    # RGB files are not rewritten: the row points at the original file.
    assert train["000.png"]["image"]["bytes"] is None
    # Tensors: an RGB model gets the gray level repeated; a one-channel model gets it once.
    gray_row = [i for i, name in enumerate(dataset["file"]) if name.endswith("002.png")]
    rgb = load_split_as_tensors(dataset.select(gray_row), SIZE).pixel_values
    assert rgb.shape == (1, 3, SIZE, SIZE) and torch.all((rgb * 255).round() == GRAY_LEVEL)
    gray = load_split_as_tensors(dataset.select(gray_row), SIZE, num_channels=1).pixel_values
    assert gray.shape == (1, 1, SIZE, SIZE) and torch.all((gray * 255).round() == GRAY_LEVEL)


def test_data_dir_may_be_the_folder_that_holds_the_category(category, cache_dir):
    dataset = load_anomaly_dataset(category.parent, category="toy", cache_dir=cache_dir)
    assert dataset["test"].num_rows == 4


def test_changed_mask_is_picked_up_despite_the_cache(category, cache_dir):
    load_anomaly_dataset(category, cache_dir=cache_dir)
    Image.new("L", (SIZE, SIZE), 0).save(category / "ground_truth/crack/000_mask.png")
    test = load_anomaly_dataset(category, cache_dir=cache_dir)["test"]
    crack = [row for row in test if row["defect_type"] == "crack"]
    assert sorted(bool(np.asarray(row["mask"]).any()) for row in crack) == [False, True]


# ------------------------------------------------------------------------------------------ bad data


def test_missing_data_dir_says_where_and_offers_download(tmp_path, cache_dir):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as error:
        load_anomaly_dataset(missing, category="capsule", cache_dir=cache_dir)
    message = str(error.value)
    assert str(missing) in message and "--download" in message and "train/good" in message


def test_neither_data_dir_nor_dataset_name():
    with pytest.raises(AnomalyDataError, match="--data_dir.*--dataset_name"):
        load_anomaly_dataset()


@pytest.mark.parametrize(
    "corruption",
    [
        lambda path: path.write_bytes(b"this is not a png"),
        lambda path: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2]),  # truncated PNG
    ],
    ids=["garbage", "truncated"],
)
def test_corrupt_image_names_the_file(category, cache_dir, corruption):
    bad = category / "test/crack/001.png"
    corruption(bad)
    with pytest.raises(AnomalyDataError, match=f"Cannot read image file {bad}"):
        load_anomaly_dataset(category, cache_dir=cache_dir)


def test_corrupt_mask_names_the_file(category, cache_dir):
    bad = category / "ground_truth/crack/000_mask.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(AnomalyDataError, match=f"Cannot read image file {bad}"):
        load_anomaly_dataset(category, cache_dir=cache_dir)


def test_mask_without_image_is_named(category, cache_dir):
    _mask(0, 255).save(category / "ground_truth/crack/007_mask.png")
    orphan = r"1 mask\(s\) without a matching test image.*ground_truth/crack/007_mask.png"
    with pytest.raises(AnomalyDataError, match=orphan):
        load_anomaly_dataset(category, cache_dir=cache_dir)


def test_defective_image_without_mask_loads_with_mask_none(category, cache_dir):
    (category / "ground_truth/crack/001_mask.png").unlink()
    test = load_anomaly_dataset(category, cache_dir=cache_dir)["test"]
    masks = {row["file"]: row["mask"] for row in test}
    assert masks["test/crack/001.png"] is None and masks["test/crack/000.png"] is not None
    tensors = load_split_as_tensors(test, 8)
    assert tensors.has_masks.tolist() == [name != "test/crack/001.png" for name in tensors.files]
    assert not tensors.masks[tensors.files.index("test/crack/001.png")].any()


def test_mask_of_another_size(category, cache_dir):
    Image.new("L", (SIZE + 1, SIZE), 255).save(category / "ground_truth/crack/000_mask.png")
    with pytest.raises(AnomalyDataError, match="is 17x16 but its image .*000.png is 16x16"):
        load_anomaly_dataset(category, cache_dir=cache_dir)


def _empty_train_good(category):
    for path in (category / "train/good").iterdir():
        path.unlink()


def _remove_tree(path):
    shutil.rmtree(path)


def _empty_test(category):
    for folder in (category / "test").iterdir():
        shutil.rmtree(folder)
    shutil.rmtree(category / "ground_truth")


@pytest.mark.parametrize(
    "break_layout, message",
    [
        (_empty_train_good, r"train/good holds no images"),
        (lambda c: _remove_tree(c / "train/good"), r"train/good is missing"),
        (lambda c: (c / "train/crack").mkdir(), r"must hold only good/"),
        (lambda c: _remove_tree(c / "test"), r"test is missing"),
        (_empty_test, r"test holds no folders"),
        (lambda c: (c / "test/poke").mkdir(), r"test/poke holds no images"),
    ],
    ids=["empty-train-good", "missing-train-good", "defects-in-train", "missing-test", "empty-test", "empty-defect"],
)
def test_broken_layout(category, cache_dir, break_layout, message):
    break_layout(category)
    with pytest.raises(AnomalyDataError, match=message):
        load_anomaly_dataset(category, cache_dir=cache_dir)


# ------------------------------------------------------------------------------------------- download


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def file_server(tmp_path):
    """Serves tmp_path/served on 127.0.0.1 (a free port) from a thread; yields the base URL."""
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _tar_xz(archive: Path, members: dict[str, Path]) -> None:
    with tarfile.open(archive, "w:xz") as tar:
        for name, path in members.items():
            tar.add(path, arcname=name)


def test_download_fetches_unpacks_and_loads(tmp_path, file_server, cache_dir, monkeypatch):
    served, base_url = file_server
    source = make_category(tmp_path / "source", name="toy")
    _tar_xz(served / "toy.tar.xz", {"toy": source})  # MVTec's archives hold <category>/ at the top
    root = tmp_path / "data"

    monkeypatch.setitem(mvtec_data.MVTEC_URLS, "toy", f"{base_url}/toy.tar.xz")
    dataset = load_anomaly_dataset(root, category="toy", download=True, cache_dir=cache_dir)
    assert dataset["train"].num_rows == 4 and dataset["test"].num_rows == 4
    assert sorted(p.name for p in root.iterdir()) == ["toy"]  # no archive, .part or temporary folder left
    assert (root / "toy/ground_truth/crack/000_mask.png").is_file()
    # Already there: a second call downloads nothing (the server would 404 now).
    (served / "toy.tar.xz").unlink()
    assert download_mvtec("toy", root, url=f"{base_url}/toy.tar.xz") == root / "toy"


def test_download_refuses_members_outside_the_target(tmp_path, file_server):
    served, base_url = file_server
    payload = tmp_path / "payload.txt"
    payload.write_text("escape")
    _tar_xz(served / "evil.tar.xz", {"../evil.txt": payload})
    root = tmp_path / "data"
    with pytest.raises(AnomalyDataError, match=r"member '\.\./evil.txt' would land outside"):
        download_mvtec("toy", root, url=f"{base_url}/evil.tar.xz")
    assert not (tmp_path / "evil.txt").exists() and not (root / "evil.txt").exists()
    assert not (root / "toy").exists()


def test_download_rejects_archive_without_category_and_http_errors(tmp_path, file_server):
    served, base_url = file_server
    other = tmp_path / "other"
    other.mkdir()
    (other / "readme.txt").write_text("no images here")
    _tar_xz(served / "other.tar.xz", {"other": other})
    root = tmp_path / "data"
    with pytest.raises(AnomalyDataError, match="holds no MVTec category"):
        download_mvtec("toy", root, url=f"{base_url}/other.tar.xz")
    with pytest.raises(AnomalyDataError, match=r"Could not download .*/missing.tar.xz.*404"):
        download_mvtec("toy", root, url=f"{base_url}/missing.tar.xz")
    assert not (root / "toy").exists()
    assert not any(p.name.endswith(".part") or p.name.startswith(".toy-") for p in root.iterdir())


def test_unknown_category_has_no_url(tmp_path):
    with pytest.raises(AnomalyDataError, match="No download address known for category 'nope'"):
        download_mvtec("nope", tmp_path)


# --------------------------------------------------------------------------------------------- tensors


def test_load_split_as_tensors(category, cache_dir):
    test = load_anomaly_dataset(category, cache_dir=cache_dir)["test"]
    tensors = load_split_as_tensors(test, 8)
    assert tensors.pixel_values.shape == (4, 3, 8, 8) and tensors.pixel_values.dtype == torch.float32
    assert 0.0 <= tensors.pixel_values.min() and tensors.pixel_values.max() <= 1.0
    assert tensors.labels.dtype == torch.int64
    assert tensors.labels.tolist() == [int(t != "good") for t in tensors.defect_types]
    assert tensors.masks.shape == (4, 8, 8) and tensors.masks.dtype == torch.bool
    for mask, defect in zip(tensors.masks, tensors.defect_types):
        assert mask.any() == (defect == "crack")
    # Masks are resized with nearest neighbour (crack/000 is the first test row: files are sorted).
    assert tensors.defect_types[0] == "crack"
    np.testing.assert_array_equal(tensors.masks[0].numpy(), np.asarray(_mask(0, 255).resize((8, 8), Image.NEAREST)) > 0)
    # Full size keeps the exact uint8 levels: x * 255 rounds back to the stored pixels.
    full = load_split_as_tensors(test, SIZE)
    levels = (full.pixel_values[0] * 255).round().byte().permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(levels, np.asarray(test[0]["image"]))


def test_images_to_tensor_uint8_and_rectangular():
    image = Image.new("RGB", (SIZE, SIZE), (10, 20, 30))
    levels = images_to_tensor([image, image], (4, 6), dtype=torch.uint8)
    assert levels.shape == (2, 3, 4, 6) and levels.dtype == torch.uint8
    assert levels[:, :, 0, 0].tolist() == [[10, 20, 30]] * 2


def test_with_transform_feeds_a_dataloader(category, cache_dir):
    train = load_anomaly_dataset(category, cache_dir=cache_dir)["train"].with_transform(anomaly_transform(8))
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=3)))
    assert batch["pixel_values"].shape == (3, 3, 8, 8) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].tolist() == [0, 0, 0] and batch["defect_types"] == ["good"] * 3
    assert batch["masks"].shape == (3, 8, 8) and not batch["masks"].any()
    assert batch["has_masks"].all()
    assert batch["files"] == ["train/good/000.png", "train/good/001.png", "train/good/002.png"]


# --------------------------------------------------------------------------------------- push script


def test_push_script_arguments(capsys):
    import push_mvtec_dataset

    args = push_mvtec_dataset.parse_args(["--data_dir", "d", "--repo_id", "me/mv"])
    def summary(args):
        return args.hub_dataset_id, args.category, args.private, args.download, args.hub_token

    assert summary(args) == ("me/mv", "capsule", False, False, None)
    args = push_mvtec_dataset.parse_args(
        ["--data_dir", "d", "--hub_dataset_id", "me/mv", "--private", "--download", "--category", "screw",
         "--hub_token", "t"]
    )
    assert summary(args) == ("me/mv", "screw", True, True, "t")
    with pytest.raises(SystemExit):
        push_mvtec_dataset.parse_args(["--data_dir", "d"])  # no repo id
    with pytest.raises(SystemExit):
        push_mvtec_dataset.parse_args(["--help"])
    help_text = capsys.readouterr().out
    flags = ("--data_dir", "--category", "--hub_dataset_id", "--repo_id", "--hub_token", "--private", "--download")
    for flag in flags + ("--cache_dir",):
        assert flag in help_text
    assert "CC BY-NC-SA 4.0" in help_text
    for action in push_mvtec_dataset.build_parser()._actions:
        assert action.help and len(action.help) > 20, f"{action.option_strings} needs a help text"


def test_push_script_converts_and_pushes(category, cache_dir, monkeypatch):
    import push_mvtec_dataset

    pushed = {}

    def fake_push_to_hub(self, repo_id, **kwargs):
        pushed.update(dataset=self, repo_id=repo_id, **kwargs)

    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", fake_push_to_hub)
    code = push_mvtec_dataset.main(
        ["--data_dir", str(category.parent), "--category", "toy", "--repo_id", "me/mv", "--hub_token", "t",
         "--cache_dir", cache_dir]
    )
    assert code == 0
    assert (pushed["repo_id"], pushed["token"], pushed["private"]) == ("me/mv", "t", None)
    assert {split: ds.num_rows for split, ds in pushed["dataset"].items()} == {"train": 4, "test": 4}
    assert pushed["dataset"]["test"].features == ANOMALY_FEATURES


def test_push_script_missing_data_fails_before_pushing(tmp_path, cache_dir):
    import push_mvtec_dataset

    with pytest.raises(FileNotFoundError, match="--download"):
        push_mvtec_dataset.main(["--data_dir", str(tmp_path / "none"), "--repo_id", "me/mv", "--cache_dir", cache_dir])
