"""Issue 14.2: a damaged image is named, with the fix, before training starts; translate.py skips unreadable
images, translates the rest, lists the skipped ones in translate_results.json and says so in its exit status."""

import io
import json
import os

import datasets
import numpy as np
import pytest
from PIL import Image

from hf_dgm_training import DataError, UnreadableImageError, run_main
from hf_dgm_training.data.anomaly import AnomalyDataError
from hf_dgm_training.data.anomaly.hub import normalize_split
from hf_dgm_training.data.unpaired import images_to_uint8_tensor, load_unpaired_split
from script_runner import run_in_process
from synthetic_data import make_mvtec_category, make_unpaired_folder
from tiny_models import save_tiny_cyclegan


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def truncated_jpeg(path, size=32, seed=0):
    """A JPEG cut in half: PIL opens it, and fails only when decoding ("image file is truncated")."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def run_script(script, *args, cwd=ROOT):
    return run_in_process(script, *args, cwd=cwd, expect_ok=False)


def one_error_line(result, script):
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"{script}: error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


# ------------------------------------------------------------------------------------------------- CycleGAN


def test_cyclegan_split_names_every_damaged_file(tmp_path):
    root = tmp_path / "h2z"
    make_unpaired_folder(str(root), size=16)
    first = truncated_jpeg(root / "testB" / "zz_bad.jpg")
    second = root / "testB" / "not_an_image.png"
    second.write_bytes(b"hello")
    with pytest.raises(UnreadableImageError) as raised:
        load_unpaired_split(str(root), split="test")
    message = str(raised.value)
    assert "2 of the testB images cannot be read" in message
    assert f"{first} (image file is truncated" in message and str(second) in message
    assert "Replace them with good copies or delete them" in message
    # A damaged image is an OSError, not the ValueError/FileNotFoundError of a missing (optional) test split.
    assert isinstance(raised.value, OSError) and not isinstance(raised.value, (ValueError, FileNotFoundError))
    # images_to_uint8_tensor names the file too, for datasets that did not go through load_unpaired_split.
    domain_a, domain_b = load_unpaired_split(str(root), split="test", check_images=False)
    assert images_to_uint8_tensor(domain_a, 8, show_progress=False).shape == (2, 3, 8, 8)
    with pytest.raises(UnreadableImageError, match="Cannot read image .*(zz_bad.jpg|not_an_image.png)"):
        images_to_uint8_tensor(domain_b, 8, show_progress=False)


def test_train_cyclegan_stops_before_training_with_one_line(tmp_path):
    root = tmp_path / "h2z"
    make_unpaired_folder(str(root), size=16)
    bad = truncated_jpeg(root / "trainA" / "bad.jpg")
    out = tmp_path / "out"
    result = run_script("train_cyclegan.py", "--data_dir", root, "--output_dir", out, "--image_size", "8",
                        "--generator_filters", "4", "--num_residual_blocks", "1", "--num_train_epochs", "1")
    line = one_error_line(result, "train_cyclegan.py")
    assert f"{bad} (image file is truncated" in line and "delete them" in line
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------------- MVTec


def test_train_maf_names_a_truncated_jpeg_in_one_line(tmp_path):
    category = tmp_path / "capsule"
    make_mvtec_category(str(category), size=8, num_train=2)
    bad = truncated_jpeg(category / "train" / "good" / "009.jpg")
    out = tmp_path / "out"
    result = run_script("train_maf.py", "--data_dir", category, "--output_dir", out, "--image_size", "8",
                        "--hidden_sizes", "16", "--num_blocks", "1", "--num_train_epochs", "1")
    line = one_error_line(result, "train_maf.py")
    assert f"Cannot read image file {bad}: image file is truncated" in line and "delete it" in line
    assert not (out / "metrics.jsonl").exists()


def test_hub_rows_with_damaged_bytes_are_named():
    """A dataset from the Hub keeps images as bytes: the damaged row is named, not a bare PIL error."""
    good = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(good, format="PNG")
    split = datasets.Dataset.from_dict(
        {"image": [{"bytes": good.getvalue(), "path": None}, {"bytes": good.getvalue()[:40], "path": None}],
         "label": [0, 0], "file": ["000.png", "001.png"]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64"),
                                    "file": datasets.Value("string")}),
    )
    with pytest.raises(UnreadableImageError, match=r"Cannot read image the image of row 1 \(001.png\) of user/data"):
        normalize_split(split, "user/data split test", "test")
    assert len(normalize_split(split.select([0]), "user/data split test", "test")) == 1
    assert issubclass(AnomalyDataError, DataError) and issubclass(AnomalyDataError, ValueError)


# ------------------------------------------------------------------------------------------------ translate


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_cyclegan(tmp_path_factory.mktemp("model"))


def translate_exit(*args):
    import translate

    with pytest.raises(SystemExit) as raised:
        run_main(translate.main, [str(arg) for arg in args], exit_status=translate.exit_status)
    return raised.value.code


def test_translate_skips_unreadable_images_and_lists_them(model_dir, tmp_path, caplog):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "c.png", "d.png"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(inputs / name)
    bad = truncated_jpeg(inputs / "b.jpg")
    out = tmp_path / "out"
    # The default batch size (8) puts the bad image in the same batch as every good one.
    assert translate_exit("--model_name_or_path", model_dir, "--input", inputs, "--output_dir", out) == 3
    assert sorted(name for name in os.listdir(out) if name.endswith(".png")) == ["a.png", "c.png", "d.png"]
    results = json.loads((out / "translate_results.json").read_text())
    assert results["images"] == 3
    assert [entry["input"] for entry in results["skipped"]] == [str(bad)]
    assert "image file is truncated" in results["skipped"][0]["error"]
    assert any(f"Skipping {bad}" in record.getMessage() for record in caplog.records)

    # Nothing readable: exit status 1, and the results file still lists what was skipped.
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    truncated_jpeg(only_bad / "x.jpg")
    assert translate_exit("--model_name_or_path", model_dir, "--input", only_bad, "--output_dir", tmp_path / "o2") == 1
    assert json.loads((tmp_path / "o2" / "translate_results.json").read_text())["images"] == 0

    # All good: exit status 0.
    os.remove(bad)
    assert translate_exit("--model_name_or_path", model_dir, "--input", inputs, "--output_dir", tmp_path / "o3") == 0


def test_translate_skips_damaged_dataset_rows(model_dir, tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 50)).save(good, format="PNG")
    dataset = datasets.Dataset.from_dict(
        {"image": [{"bytes": good.getvalue(), "path": None}, {"bytes": b"broken", "path": "b.png"}]},
        features=datasets.Features({"image": datasets.Image()}),
    )
    datasets.DatasetDict({"test": dataset}).save_to_disk(str(tmp_path / "dd"))
    import translate

    results = translate.main(["--model_name_or_path", str(model_dir), "--dataset_name", str(tmp_path / "dd"),
                              "--output_dir", str(tmp_path / "out")])
    assert results["images"] == 1 and [entry["input"] for entry in results["skipped"]] == ["image of row 1 (b.png)"]
