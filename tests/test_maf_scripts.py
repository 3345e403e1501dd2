"""The MAF workflow through the real scripts: train -> sample -> detect on a synthetic MVTec folder; exact resume;
bad data."""

import json
import math
import os

import pytest
from safetensors.torch import load_file

from script_runner import run_in_process
from synthetic_data import make_mvtec_category


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image_size", "8", "--hidden_sizes", "16", "16", "--num_blocks", "2", "--per_device_train_batch_size", "4"]


def run(script, *args, expect_ok=True):
    return run_in_process(script, *args, expect_ok=expect_ok)


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    return make_mvtec_category(str(tmp_path_factory.mktemp("mvtec") / "capsule"), size=8, num_train=10,
                               num_test_good=3, defects=(("crack", 3), ("poke", 2)))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_train_sample_detect_write_every_output(category, tmp_path):
    out = tmp_path / "maf"
    # MaskedAdam (the GPU default) with its built-in clipping, through the script.
    run("train_maf.py", "--data_dir", category, "--output_dir", out, "--num_train_epochs", 2, "--max_grad_norm", 1.0,
        "--optimizer", "masked_adam", *TINY)
    for name in ("model.safetensors", "config.json", "modeling_maf.py", "README.md", "metrics.jsonl",
                 "nll_curve.png", "train_results.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == 6 and results["epochs_completed"] == 2  # ceil(10 / 4) = 3 steps per epoch
    assert results["fast_path"]["optimizer"] == "MaskedAdam" and results["skipped_nonfinite_steps_total"] == 0
    assert math.isfinite(results["final_train_bits_per_dim"]) and math.isfinite(results["test_good_bits_per_dim"])
    # Where the script's wall time went: every phase in order, from the process's start on, adding up to the total.
    phases = results["phase_seconds"]
    assert list(phases) == ["imports", "setup", "data", "model", "optimizer_and_prepare", "resume", "training_loop",
                            "best_epoch_and_calibration", "save", "finish"]
    assert all(seconds >= 0 for seconds in phases.values()) and phases["imports"] > 0.1  # torch alone takes longer
    assert sum(phases.values()) == pytest.approx(results["script_seconds"], abs=0.05)
    assert results["train_seconds_this_run"] <= phases["training_loop"] < results["script_seconds"]
    assert 0 < results["warmup_seconds"] <= results["train_seconds_this_run"] and 1 <= results["warmup_steps"] < 6
    lines = read_jsonl(out / "metrics.jsonl")
    step_rows = [r for r in lines if "train/nll" in r]
    assert [r["step"] for r in step_rows] == list(range(1, 7))
    epoch_rows = [r for r in lines if "epoch/train/bits_per_dim" in r]
    assert [(r["step"], r["epoch"]) for r in epoch_rows] == [(3, 1), (6, 2)]
    assert epoch_rows[1]["epoch/train/bits_per_dim"] == pytest.approx(
        sum(r["train/bits_per_dim"] for r in step_rows[3:]) / 3)

    run("sample_maf.py", "--model_name_or_path", out, "--num_samples", 5, "--temperature", 1.0, 0.7)
    samples = json.loads((out / "samples" / "samples.json").read_text())
    assert [r["temperature"] for r in samples["runs"]] == [1.0, 0.7] and samples["temperatures_in_one_batch"]
    assert all(r["seconds_total"] > 0 for r in samples["runs"])
    assert len([f for f in os.listdir(out / "samples") if f.startswith("sample_t1_")]) == 5

    run("detect_anomalies.py", "--model_name_or_path", out, "--data_dir", category)
    report = json.loads((out / "anomaly" / "anomaly_report.json").read_text())
    for key in ("image_auroc", "aupr", "f1_max", "pixel_auroc"):
        assert 0.0 <= report[key] <= 1.0, key
    assert set(report["auroc_per_defect"]) == {"crack", "poke"}
    assert {"nll", "map-max", "map-topk"} <= set(report["metrics_by_score"])
    assert report["num_test_images"] == 8 and all(row["file"].startswith("test/") for row in report["per_image"])
    for name in ("roc_curve.png", "score_histogram.png", "anomaly_maps.png", "misses.png"):
        assert (out / "anomaly" / name).stat().st_size > 1000, name


def test_interrupted_training_resumes_exactly(category, tmp_path):
    """Stop mid-epoch after a checkpoint, resume from `latest`: same steps, same final weights as one run."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    # MaskedAdam (the GPU default): its state goes through accelerate's checkpoint like torch Adam's.
    common = ["--data_dir", category, "--num_train_epochs", 3, "--checkpointing_steps", 2, "--optimizer", "masked_adam",
              *TINY]
    run("train_maf.py", "--output_dir", straight, *common)
    run("train_maf.py", "--output_dir", interrupted, "--max_train_steps", 5, *common)  # checkpoint at step 4
    assert sorted(os.listdir(interrupted / "checkpoints")) == ["step_5"]  # the stop saves (total limit 1)
    run("train_maf.py", "--output_dir", interrupted, "--resume_from_checkpoint", "latest", *common)

    results = json.loads((interrupted / "train_results.json").read_text())
    assert results["global_step"] == 9 and results["resumed_from_step"] == 5 and len(results["epoch_seconds"]) == 3
    # metrics.jsonl is whole: the same lines as the uninterrupted run's (epoch means over the whole epoch included)
    assert read_jsonl(interrupted / "metrics.jsonl") == read_jsonl(straight / "metrics.jsonl")
    expected, actual = load_file(straight / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert (expected[key] == actual[key]).all(), key


def test_missing_data_folder_says_where_to_put_it(tmp_path):
    result = run("train_maf.py", "--data_dir", tmp_path / "nowhere", "--output_dir", tmp_path / "out", *TINY,
                 expect_ok=False)
    assert result.returncode != 0
    assert "--download" in result.stderr and "nowhere" in result.stderr


def test_empty_training_folder_is_a_clear_error(tmp_path):
    category = make_mvtec_category(str(tmp_path / "capsule"), num_train=1)
    os.remove(os.path.join(category, "train", "good", "000.png"))
    result = run("train_maf.py", "--data_dir", category, "--output_dir", tmp_path / "out", *TINY, expect_ok=False)
    assert result.returncode != 0 and "train/good" in result.stderr


def test_help_explains_every_flag():
    for script in ("train_maf.py", "sample_maf.py", "detect_anomalies.py"):
        text = run(script, "--help").stdout
        assert "--output_dir" in text or "--model_name_or_path" in text
        assert "usage" in text


def test_iaf_trains_through_the_script_and_samples(category, tmp_path):
    """IAF's density is the sequential direction: training backpropagates through the segment inverse."""
    out = tmp_path / "iaf"
    run("train_maf.py", "--data_dir", category, "--output_dir", out, "--flow_type", "iaf", "--num_train_epochs", 1,
        *TINY)
    results = json.loads((out / "train_results.json").read_text())
    assert results["flow_type"] == "iaf" and math.isfinite(results["final_train_bits_per_dim"])
    assert json.loads((out / "config.json").read_text())["model_type"] == "iaf"
    run("sample_maf.py", "--model_name_or_path", out, "--num_samples", 2)
    assert json.loads((out / "samples" / "samples.json").read_text())["sequential_passes_per_block"] == [1, 1]


def test_cuda_graphs_true_without_a_gpu_is_a_clear_error(category, tmp_path):
    result = run("train_maf.py", "--data_dir", category, "--output_dir", tmp_path / "out", *TINY,
                 "--num_train_epochs", "1", "--cuda_graphs", "true", expect_ok=False)
    assert result.returncode != 0
    assert "--cuda_graphs true needs one process on a CUDA device" in result.stderr


def test_validation_split_best_epoch_calibration_and_early_stopping(tmp_path):
    """10 % of train/good is held out (named in train_results.json), the best validation epoch is kept, early
    stopping ends the run, and the calibration computed on the validation images travels with the model."""
    category = make_mvtec_category(str(tmp_path / "capsule"), size=8, num_train=30, num_test_good=3,
                                   defects=(("crack", 3),))
    out = tmp_path / "maf"
    run("train_maf.py", "--data_dir", category, "--output_dir", out, "--num_train_epochs", 6,
        "--early_stopping_patience", 1, "--learning_rate", 0.05, *TINY)
    results = json.loads((out / "train_results.json").read_text())
    assert len(results["validation_files"]) == 3
    assert all(f.startswith("train/good/") for f in results["validation_files"])
    lines = read_jsonl(out / "metrics.jsonl")
    validation = [r["epoch/validation_bits_per_dim"] for r in lines if "epoch/validation_bits_per_dim" in r]
    assert results["best_validation_bits_per_dim"] == min(validation)
    assert validation[results["best_epoch"] - 1] == min(validation)
    if results["stopped_early"]:  # patience 1: the epoch after the best was not better
        assert len(validation) == results["best_epoch"] + 1
    calibration = results["anomaly_calibration"]
    assert calibration["num_images"] == 3 and calibration["target_fpr"] == 0.05

    from modeling_maf import MAFModel

    model = MAFModel.from_pretrained(out)
    assert model.is_calibrated and model.config.anomaly_calibration == calibration
    card = (out / "README.md").read_text()
    assert "decision threshold" in card and "validation images (held out of train/good) | 3" in card


def test_non_finite_steps_are_skipped_and_the_weights_stay_finite(category, tmp_path):
    """A learning rate that makes the loss overflow: the overflowing steps are skipped and counted; no NaN or inf
    ever reaches the weights."""
    out = tmp_path / "maf"
    run("train_maf.py", "--data_dir", category, "--output_dir", out, "--num_train_epochs", 2, "--learning_rate", 1e9,
        "--validation_split_percentage", 0, *TINY)
    results = json.loads((out / "train_results.json").read_text())
    assert results["skipped_nonfinite_steps_total"] > 0
    weights = load_file(out / "model.safetensors")
    assert all(bool(tensor.isfinite().all()) for tensor in weights.values())


def test_gradient_clipping_is_on_by_default_and_zero_turns_it_off(tmp_path):
    """--max_grad_norm defaults to 1 (chosen by the clipping study at the default size, docs/RESULTS.md#maf-quality); 0
    turns it off and a negative value is refused with a one-line usage error."""
    import train_maf

    base = ["--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")]
    assert train_maf.parse_args(base).max_grad_norm == 1.0
    assert train_maf.parse_args(base + ["--max_grad_norm", "0"]).max_grad_norm is None
    assert train_maf.parse_args(base + ["--max_grad_norm", "0.5"]).max_grad_norm == 0.5
    with pytest.raises(SystemExit):
        train_maf.parse_args(base + ["--max_grad_norm", "-1"])


def test_batches_gathered_on_the_device_are_the_dataloaders(category, tmp_path, monkeypatch):
    """One process keeps the training set on the device and gathers each batch there; several processes shard a
    DataLoader's batches. Both draw the same images in the same order, so the losses agree step by step."""
    import train_maf

    common = ["--data_dir", category, "--num_train_epochs", 2, "--seed", 3, *TINY]
    run("train_maf.py", "--output_dir", tmp_path / "device", *common)
    monkeypatch.setattr(train_maf, "DEVICE_DATASET_BYTES", 0)  # too large for the device: the DataLoader
    run("train_maf.py", "--output_dir", tmp_path / "loader", *common)
    losses = [[row["train/nll"] for row in read_jsonl(tmp_path / name / "metrics.jsonl") if "train/nll" in row]
              for name in ("device", "loader")]
    assert len(losses[0]) == 6 and losses[0] == losses[1]
