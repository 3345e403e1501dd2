"""Tests for the hf_dgm_training package: flags, checkpoints, metrics, Hub pusher, figures, model cards."""

import argparse
import json
import logging
import os
import shutil
import socket
import threading

import pytest
import torch
from accelerate import Accelerator
from transformers import PreTrainedConfig

import hf_dgm_training
from hf_dgm_training import (
    CheckpointManager,
    HubPusher,
    MetricsLogger,
    add_common_args,
    add_config_override_args,
    checkpointing_interval,
    config_overrides_from_args,
    plot_curves,
    resolve_hub_token,
    save_image_grid,
    setup_accelerator,
    write_json,
    write_model_card,
)
from hf_dgm_training import tracking as training_outputs


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class TinyConfig(PreTrainedConfig):
    model_type = "tiny-test"

    def __init__(
        self,
        hidden_sizes=(16, 8),
        num_blocks: int = 2,
        dropout: float = 0.1,
        ordering: str = "spread",
        use_bias: bool = True,
        clamp: float | None = None,
        image_size=32,
        **kwargs,
    ):
        self.hidden_sizes = list(hidden_sizes)
        self.num_blocks = num_blocks
        self.dropout = dropout
        self.ordering = ordering
        self.use_bias = use_bias
        self.clamp = clamp
        self.image_size = image_size
        super().__init__(**kwargs)


def make_parser():
    parser = argparse.ArgumentParser()
    add_common_args(parser, defaults={"learning_rate": 2e-4})
    add_config_override_args(parser, TinyConfig, skip=("dropout",))
    return parser


def test_common_args_defaults_and_choices():
    args = make_parser().parse_args([])
    assert args.learning_rate == 2e-4
    assert args.report_to == "none" and args.mixed_precision == "no" and not args.push_to_hub
    with pytest.raises(SystemExit):
        make_parser().parse_args(["--mixed_precision", "fp8"])
    with pytest.raises(ValueError, match="unknown flags"):
        add_common_args(argparse.ArgumentParser(), defaults={"learning_rat": 1.0})


def test_config_overrides_lists_bools_and_skips():
    parser = make_parser()
    args = parser.parse_args(["--hidden_sizes", "32", "64", "--use_bias", "false", "--clamp", "2.5",
                              "--num_blocks", "3"])
    overrides = config_overrides_from_args(args, TinyConfig)
    assert overrides == {"hidden_sizes": [32, 64], "use_bias": False, "clamp": 2.5, "num_blocks": 3}
    assert TinyConfig(**overrides).hidden_sizes == [32, 64]
    # Nothing set -> nothing overridden; --image_size belongs to the common flags, --dropout was skipped.
    args = parser.parse_args(["--image_size", "64"])
    assert config_overrides_from_args(args, TinyConfig) == {}
    assert "--dropout" not in parser._option_string_actions
    # A bare boolean flag means true; a bad boolean is refused.
    assert config_overrides_from_args(parser.parse_args(["--use_bias"]), TinyConfig) == {"use_bias": True}
    with pytest.raises(SystemExit):
        parser.parse_args(["--use_bias", "maybe"])


def test_config_override_help_names_the_scripts_default_beside_the_configs():
    parser = argparse.ArgumentParser()
    add_config_override_args(parser, TinyConfig, script_defaults={"num_blocks": 5, "learning_rate": 1.0})
    helps = {action.dest: action.help for action in parser._actions}
    assert helps["num_blocks"].endswith("(default here: 5; config default: 2).")
    assert helps["ordering"].endswith("(config default: 'spread').")
    assert parser.parse_args([]).num_blocks is None  # the script applies its default; the flag only records one given


def test_config_overrides_the_config_refuses_are_a_usage_error():
    from hf_dgm_training import UsageError
    from modeling_maf import MAFConfig

    parser = argparse.ArgumentParser()
    add_config_override_args(parser, MAFConfig)
    args = parser.parse_args(["--num_blocks", "0", "--hidden_sizes", "16", "16"])
    with pytest.raises(UsageError, match=r"`num_blocks` must be a positive integer, got 0 \(from the flags "
                                         r"--hidden_sizes 16 16 --num_blocks 0; see --help\)\.$"):
        config_overrides_from_args(args, MAFConfig)


def test_config_overrides_are_checked_with_the_fields_the_script_sets_itself():
    """A patch size is checked against the script's --image_size, not the config's default image size."""
    from hf_dgm_training import UsageError
    from modeling_maf import MAFConfig

    parser = argparse.ArgumentParser()
    add_config_override_args(parser, MAFConfig, skip=("image_size",))
    args = parser.parse_args(["--patch_size", "5", "--patch_stride", "2"])
    with pytest.raises(UsageError, match=r"across 16 pixels.*\(from the flags --image_size 16 --patch_size 5 "
                                         r"--patch_stride 2; see --help\)\.$"):
        config_overrides_from_args(args, MAFConfig, with_fields={"image_size": 16})
    good = parser.parse_args(["--patch_size", "4", "--patch_stride", "2"])
    assert config_overrides_from_args(good, MAFConfig, with_fields={"image_size": 16}) == {"patch_size": 4,
                                                                                           "patch_stride": 2}


def tiny_training_state(tmp_path, seed=0):
    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True, project_dir=str(tmp_path))
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def train_one_step(model, optimizer):
    loss = model(torch.randn(4, 3)).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_checkpoint_save_resume_and_prune(tmp_path):
    accelerator, model, optimizer = tiny_training_state(tmp_path)
    manager = CheckpointManager(accelerator, str(tmp_path), total_limit=2)
    assert manager.latest() is None and manager.resume("latest") is None and manager.resume(None) is None

    for step in (1, 2, 3):
        train_one_step(model, optimizer)
        path = manager.save(step, epoch=0, extra={"best": step * 0.5})
        assert path == os.path.join(str(tmp_path), "checkpoints", f"step_{step}")
    saved_weight = model.weight.detach().clone()
    # Pruned to the newest two; no temporary folders left.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_2", "step_3"]
    assert manager.latest().endswith("step_3")

    train_one_step(model, optimizer)
    assert not torch.equal(model.weight, saved_weight)
    state = manager.resume("latest")
    assert state == {"step": 3, "epoch": 0, "extra": {"best": 1.5}}
    assert torch.equal(model.weight, saved_weight)

    assert manager.resume(str(tmp_path / "checkpoints" / "step_2"))["step"] == 2
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        manager.resume(str(tmp_path / "checkpoints" / "step_1"))


def test_checkpoint_killed_mid_save_is_never_latest(tmp_path, monkeypatch):
    accelerator, model, optimizer = tiny_training_state(tmp_path)
    manager = CheckpointManager(accelerator, str(tmp_path))
    manager.save(1, epoch=0)
    original_save_state = accelerator.save_state

    def save_state_then_die(output_dir, **kwargs):
        original_save_state(output_dir, **kwargs)
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(accelerator, "save_state", save_state_then_die)
    with pytest.raises(KeyboardInterrupt):
        manager.save(2, epoch=0)
    assert manager.latest().endswith("step_1")
    assert not (tmp_path / "checkpoints" / "step_2").exists()
    assert manager.resume("latest")["step"] == 1

    # The next save cleans the leftover and succeeds.
    monkeypatch.setattr(accelerator, "save_state", original_save_state)
    manager.save(2, epoch=1)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_1", "step_2"]


def test_setup_accelerator_and_metrics_logger(tmp_path):
    args = make_parser().parse_args(["--output_dir", str(tmp_path / "run"), "--seed", "7"])
    accelerator = setup_accelerator(args, "test-project")
    first = torch.rand(3)
    setup_accelerator(args, "test-project")
    assert torch.equal(torch.rand(3), first)  # seeded

    metrics_logger = MetricsLogger(accelerator, str(tmp_path / "run" / "metrics.jsonl"))
    metrics_logger.log({"loss": torch.tensor(1.5), "lr": 1e-3}, step=1)
    metrics_logger.log({"loss": 0.5}, step=2)
    metrics_logger.close()
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert lines == [{"step": 1, "loss": 1.5, "lr": 1e-3}, {"step": 2, "loss": 0.5}]


def test_tracker_config_drops_the_token():
    args = make_parser().parse_args(["--hub_token", "hf_secret", "--hidden_sizes", "1", "2"])
    config = training_outputs._tracker_config(args)
    assert "hub_token" not in config and config["hidden_sizes"] == "[1, 2]"
    assert all(isinstance(value, (bool, int, float, str)) for value in config.values())


def test_write_json_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json(str(path), {"auroc": torch.tensor(0.75), "steps": [1, 2]})
    assert json.loads(path.read_text()) == {"auroc": 0.75, "steps": [1, 2]}

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(json, "dump", fail)
    with pytest.raises(RuntimeError):
        write_json(str(path), {"auroc": 0.1})
    assert json.loads(path.read_text())["auroc"] == 0.75
    assert os.listdir(tmp_path) == ["results.json"]


def test_plot_curves_and_image_grid(tmp_path):
    steps = list(range(50))
    plot_curves(
        {"D_A": (steps, [1 / (s + 1) for s in steps]), "G_A": (steps, [float("nan")] + [0.5] * 49)},
        str(tmp_path / "plots" / "loss.png"),
        title="losses",
        ylabel="loss",
    )
    assert (tmp_path / "plots" / "loss.png").read_bytes()[:8] == PNG_SIGNATURE

    from PIL import Image

    images = torch.rand(5, 3, 8, 6)
    save_image_grid(images, str(tmp_path / "grid.png"), nrow=3, padding=2)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.format == "PNG" and grid.size == (3 * (6 + 2) + 2, 2 * (8 + 2) + 2)
    # First image lands at (padding, padding).
    pixel = grid.getpixel((2, 2))
    assert pixel == tuple(int(v * 255 + 0.5) for v in images[0, :, 0, 0].tolist())

    save_image_grid([Image.new("RGB", (4, 4), (255, 0, 0))] * 2, str(tmp_path / "pil.png"), nrow=2, padding=0)
    assert Image.open(tmp_path / "pil.png").size == (8, 4)
    save_image_grid(torch.rand(2, 1, 4, 4), str(tmp_path / "gray.png"), nrow=1)
    assert Image.open(tmp_path / "gray.png").mode == "L"
    with pytest.raises(ValueError, match="shape"):
        save_image_grid(torch.rand(2, 4, 4), str(tmp_path / "bad.png"), nrow=1)


def test_write_model_card(tmp_path):
    from huggingface_hub import ModelCard

    path = write_model_card(
        str(tmp_path),
        model_name="maf-capsule",
        metadata={
            "library_name": "transformers",
            "license": "apache-2.0",
            "tags": ["normalizing-flow", "anomaly-detection"],
            "datasets": ["mvtec-ad"],
            "eval_results": [
                {
                    "task_type": "anomaly-detection",
                    "dataset_type": "mvtec-ad",
                    "dataset_name": "MVTec AD capsule",
                    "metric_type": "roc_auc",
                    "metric_value": 0.75,
                }
            ],
        },
        body="# MAF\n\nUsage: ...",
    )
    card = ModelCard.load(path)
    assert card.data.library_name == "transformers" and card.data.tags == ["normalizing-flow", "anomaly-detection"]
    assert card.data.eval_results[0].metric_value == 0.75
    assert "model-index" in card.content and card.text.strip().startswith("# MAF")


def closed_loopback_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed when the block ends: connections get refused


def test_hub_pusher_unreachable_hub_warns_and_never_raises(tmp_path, monkeypatch, caplog):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_loopback_port()}")
    folder = tmp_path / "checkpoints" / "step_1"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")

    with caplog.at_level(logging.WARNING, logger="hf_dgm_training.hub"):
        pusher = HubPusher("user/unreachable", token="hf_test_token")
        pusher.push_folder(str(folder), path_in_repo="checkpoints/step_1")
        pusher.wait(timeout=30)
    assert not pusher.enabled
    assert "Pushing to the Hub is disabled" in caplog.text
    assert (folder / "model.safetensors").read_bytes() == b"weights"


def test_hub_pusher_failed_upload_warns_and_keeps_local_files(tmp_path, monkeypatch, caplog):
    from huggingface_hub import HfApi

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: type("Url", (), {"repo_id": repo_id})())
    uploaded = []

    def flaky_upload(self, *, folder_path, path_in_repo, **kwargs):
        if path_in_repo == "bad":
            raise ConnectionError("hub went away")
        uploaded.append((path_in_repo, sorted(os.listdir(folder_path))))

    monkeypatch.setattr(HfApi, "upload_folder", flaky_upload)
    folder = tmp_path / "step_1"
    folder.mkdir()
    (folder / "a.txt").write_text("a")
    with caplog.at_level(logging.WARNING, logger="hf_dgm_training.hub"):
        pusher = HubPusher("user/repo", token="hf_test_token")
        pusher.push_folder(str(folder), path_in_repo="bad")
        pusher.push_folder(str(folder), path_in_repo="good")
        pusher.wait(timeout=30)
    assert "hub went away" in caplog.text and "Training continues" in caplog.text
    assert uploaded == [("good", ["a.txt"])]
    assert pusher.failed_uploads == [str(folder)]
    assert sorted(os.listdir(tmp_path)) == ["step_1"]  # staging snapshots removed, local files kept
    assert (folder / "a.txt").read_text() == "a"


def test_hub_pusher_snapshots_so_pruning_a_queued_folder_is_safe(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: type("Url", (), {"repo_id": repo_id})())
    release, uploaded = threading.Event(), []

    def slow_upload(self, *, folder_path, ignore_patterns, **kwargs):
        release.wait(30)
        uploaded.append(sorted(os.path.relpath(os.path.join(root, name), folder_path)
                               for root, _, names in os.walk(folder_path) for name in names))

    monkeypatch.setattr(HfApi, "upload_folder", slow_upload)
    run = tmp_path / "run"
    (run / "checkpoints" / "step_1").mkdir(parents=True)
    (run / "checkpoints" / "step_1" / "model.safetensors").write_bytes(b"w1")
    (run / "config.json").write_text("{}")
    (run / "logs").mkdir()
    (run / "logs" / "events").write_text("tb")

    pusher = HubPusher("user/repo", token="hf_test_token")
    pusher.push_folder(str(run / "checkpoints" / "step_1"), path_in_repo="checkpoints/step_1")
    pusher.push_folder(str(run), ignore_patterns=["checkpoints/*", "logs/*"])
    shutil.rmtree(run / "checkpoints" / "step_1")  # pruned (checkpoints_total_limit) while its upload waits
    release.set()
    pusher.wait(timeout=30)
    assert uploaded == [["model.safetensors"], ["config.json"]]
    assert not pusher.failed_uploads
    assert sorted(os.listdir(run)) == ["checkpoints", "config.json", "logs"]  # staging folders removed


def test_resolve_hub_token(monkeypatch, tmp_path):
    assert resolve_hub_token("hf_explicit") == "hf_explicit"
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert resolve_hub_token(None) == "hf_from_env"
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setattr("huggingface_hub.constants.HF_STORED_TOKENS_PATH", str(tmp_path / "stored_tokens"))
    with pytest.raises(ValueError, match="--hub_token"):
        resolve_hub_token(None)


def test_cuda_graph_step_disabled_runs_every_step_eagerly_after_a_reset():
    """Without a GPU (or with graphs off) the runner is a plain call that resets the gradients first, so gradients
    never accumulate across steps; this is the path every CPU and multi-process run takes."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)

    def step(inputs):
        loss = (weight * inputs).sum()
        loss.backward()
        optimizer.step()
        return loss.detach()

    runner = hf_dgm_training.CUDAGraphStep(step, enabled=False, reset_fn=lambda: optimizer.zero_grad(set_to_none=True))
    inputs = torch.tensor([1.0, 2.0, 3.0])
    losses = [float(runner(inputs)) for _ in range(3)]
    # Gradient = inputs every step (not 2x, 3x inputs): 1 - 0.1 * k * inputs after k steps.
    assert torch.allclose(weight.detach(), 1 - 0.3 * inputs)
    assert losses == pytest.approx([6.0, 6.0 - 0.1 * 14, 6.0 - 0.2 * 14])
    assert runner.describe() == {"cuda_graphs": False, "graph_replays": 0, "eager_steps": 3, "fallbacks": []}


PROCESS_AGE = r"""
import time
time.sleep(0.5)  # before the helper is even imported: its clock must still see it
from hf_dgm_training import PhaseTimer, seconds_since_process_start
age = seconds_since_process_start()
timer = PhaseTimer()
time.sleep(0.2)
timer.lap("work")
time.sleep(0.1)
print(age, timer.seconds["imports"], timer.seconds["work"], timer.total())
"""


def test_phase_timer_counts_from_the_process_start_and_adds_up(tmp_path):
    """The first phase is the time from the process's start (interpreter, imports) to the timer; laps follow."""
    import subprocess
    import sys

    if not os.path.exists("/proc/self/stat"):
        pytest.skip("the process start time comes from /proc (Linux)")
    result = subprocess.run([sys.executable, "-c", PROCESS_AGE], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ,
                                     PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert result.returncode == 0, result.stderr[-2000:]
    age, imports, work, total = map(float, result.stdout.split())
    assert 0.5 <= age <= imports < age + 0.1  # /proc counts in 10 ms ticks
    assert 0.2 <= work < 0.3
    assert total == pytest.approx(imports + work + 0.1, abs=0.05)


def test_phase_timer_laps_add_to_a_phase_that_ran_before(monkeypatch):
    clock = iter([10.0, 11.0, 13.0, 16.0, 20.0])
    monkeypatch.setattr(hf_dgm_training.trainer.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(hf_dgm_training.trainer, "seconds_since_process_start", lambda: None)
    timer = hf_dgm_training.PhaseTimer()  # 10: no process start known, so no first phase
    assert timer.lap("a") == 1.0 and timer.lap("b") == 2.0 and timer.lap("a") == 3.0  # at 11, 13, 16
    assert timer.seconds == {"a": 4.0, "b": 2.0}
    assert timer.total() == 10.0  # at 20: since the timer started


SHARED_TRAINING_FLAGS = {
    # flag: a value it accepts in both trainers
    "--data_dir": "data", "--dataset_name": "user/data", "--image_size": "32", "--dataloader_num_workers": "0",
    "--output_dir": "out", "--model_name_or_path": "user/model", "--num_train_epochs": "2", "--max_train_steps": "5",
    "--per_device_train_batch_size": "2", "--learning_rate": "0.001", "--seed": "3", "--mixed_precision": "no",
    "--fast_path": "false", "--cuda_graphs": "false", "--logging_steps": "7", "--checkpointing_steps": "10min",
    "--checkpoints_total_limit": "2", "--resume_from_checkpoint": "latest", "--report_to": "none",
    "--hub_model_id": "user/repo", "--hub_token": "hf_x", "--hub_private_repo": None, "--push_to_hub": None,
}


@pytest.mark.parametrize("flag", sorted(SHARED_TRAINING_FLAGS))
def test_both_trainers_accept_the_shared_flags_and_read_them_the_same_way(flag):
    from train_cyclegan import parse_args as cyclegan_args
    from train_maf import parse_args as maf_args

    value = SHARED_TRAINING_FLAGS[flag]
    base = ["--data_dir", "data"] if flag != "--data_dir" else []
    argv = [*base, flag] + ([value] if value is not None else [])
    parsed = [maf_args(argv), cyclegan_args(argv)]
    name = flag[2:]
    assert getattr(parsed[0], name) == getattr(parsed[1], name), flag
    if flag == "--checkpointing_steps":
        assert parsed[0].checkpointing_steps == 600.0


def test_push_to_hub_without_hub_model_id_is_named_after_the_output_folder_in_both_trainers():
    from train_cyclegan import parse_args as cyclegan_args
    from train_maf import parse_args as maf_args

    for parse in (maf_args, cyclegan_args):
        args = parse(["--data_dir", "data", "--output_dir", "runs/my-model", "--push_to_hub"])
        assert args.hub_model_id == "my-model"


@pytest.mark.parametrize("value, expected", [("epoch", "epoch"), ("25", 25), ("no", "no"), ("None", "no"),
                                             ("90s", 90.0), ("10min", 600.0), ("1.5h", 5400.0), (None, None)])
def test_checkpointing_interval_reads_steps_epochs_and_durations(value, expected):
    assert checkpointing_interval(value) == expected


@pytest.mark.parametrize("value", ["0", "-3", "10 minutes", "min", "soon"])
def test_checkpointing_interval_rejects_other_values(value):
    with pytest.raises(ValueError, match="--checkpointing_steps must be"):
        checkpointing_interval(value)
