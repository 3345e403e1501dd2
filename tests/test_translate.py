"""scripts/translate.py: folders, single files and dataset splits, both directions, grids, errors."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from modeling_cyclegan import CycleGANModel
from tiny_models import save_tiny_cyclegan


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_cyclegan(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (path / "nested").mkdir()
    for name, size in (("a.png", (20, 24)), ("b.jpg", (16, 16)), ("nested/c.png", (12, 40))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path / name)
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L").save(path / "gray.png")
    (path / "readme.txt").write_text("not an image")
    return path


def translate(*args):
    from translate import main

    return main([str(arg) for arg in args])


def test_folder_both_directions_with_grids(model_dir, images_dir, tmp_path):
    results = translate("--model_name_or_path", model_dir, "--input", images_dir, "--output_dir", tmp_path / "ab",
                        "--save_grids", "--grid_rows", "3", "--batch_size", "3")
    assert results["images"] == 4 and results["direction"] == "a_to_b"
    written = sorted(n for n in os.listdir(tmp_path / "ab") if n.endswith(".png"))
    assert written == ["a.png", "b.png", "gray.png", "nested__c.png"]
    with Image.open(tmp_path / "ab" / "a.png") as image:
        assert image.size == (16, 16) and image.mode == "RGB"
    assert sorted(os.listdir(tmp_path / "ab" / "grids")) == ["grid_000.png", "grid_001.png"]  # 3 pairs + 1 pair
    saved = json.loads((tmp_path / "ab" / "translate_results.json").read_text())
    assert saved["images"] == 4 and saved["images_per_second"] > 0

    # b_to_a uses the other generator
    translate("--model_name_or_path", model_dir, "--input", images_dir, "--output_dir", tmp_path / "ba",
              "--direction", "b_to_a")
    ab = np.asarray(Image.open(tmp_path / "ab" / "a.png"))
    ba = np.asarray(Image.open(tmp_path / "ba" / "a.png"))
    assert not np.array_equal(ab, ba)

    # same pixels as the Python API
    model = CycleGANModel.from_pretrained(model_dir, with_discriminators=False)
    expected = model.translate([Image.open(images_dir / "a.png")], direction="a_to_b")[0]
    assert np.array_equal(np.asarray(expected), ab)


def test_single_file_keep_size_and_default_output_dir(model_dir, images_dir):
    results = translate("--model_name_or_path", model_dir, "--input", images_dir / "nested" / "c.png", "--keep_size")
    assert results["output_dir"] == os.path.join(str(model_dir), "translated_a_to_b")
    with Image.open(os.path.join(results["output_dir"], "c.png")) as image:
        assert image.size == (40, 12)


def test_dataset_split_picks_the_domain_column(model_dir, tmp_path):
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    images = [Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)) for i in range(3)]
    dataset = Dataset.from_dict({"imageA": images, "imageB": images[:1] + [None, None]},
                                features=Features({"imageA": ImageFeature(), "imageB": ImageFeature()}))
    (tmp_path / "ds" / "data").mkdir(parents=True)
    dataset.to_parquet(str(tmp_path / "ds" / "data" / "test-00000-of-00001.parquet"))
    results = translate("--model_name_or_path", model_dir, "--dataset_name", tmp_path / "ds", "--dataset_split", "test",
                        "--direction", "b_to_a", "--output_dir", tmp_path / "out")
    assert results["images"] == 1  # imageB, without the empty rows of the shorter domain
    results = translate("--model_name_or_path", model_dir, "--dataset_name", tmp_path / "ds", "--dataset_split", "test",
                        "--output_dir", tmp_path / "out_a", "--max_images", "2")
    assert results["images"] == 2


def test_bad_input_gives_clear_errors(model_dir, images_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        translate("--model_name_or_path", model_dir, "--input", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        translate("--model_name_or_path", model_dir, "--input", tmp_path / "empty")
    with pytest.raises(ValueError, match="not an image file"):
        translate("--model_name_or_path", model_dir, "--input", images_dir / "readme.txt")
    with pytest.raises(SystemExit):
        translate("--model_name_or_path", model_dir)  # neither --input nor --dataset_name
