"""Issue 22.1: a run never overwrites another by accident. A training script refuses an output folder holding another
run (one line naming --overwrite_output_dir and --resume_from_checkpoint, exit status 1); --overwrite_output_dir
removes every output of the old run and nothing else; resuming a checkpoint of another configuration is one line
naming the fields that differ."""

import json
import os

import pytest

from hf_dgm_training import UsageError, find_run_outputs, prepare_output_dir, run_main
from synthetic_data import make_mvtec_category


TINY = ["--image_size", "8", "--hidden_sizes", "8", "8", "--num_blocks", "1", "--num_train_epochs", "1",
        "--per_device_train_batch_size", "4", "--checkpointing_steps", "epoch"]


def fake_run(folder):
    """A folder as a finished run leaves it (model, card, copied code, checkpoint, samples, report) plus user files."""
    os.makedirs(folder / "checkpoints" / "step_3")
    (folder / "checkpoints" / "step_3" / "training_state.json").write_text("{}")
    (folder / "config.json").write_text(json.dumps({"model_type": "maf"}))
    for name in ("model.safetensors", "metrics.jsonl", "train_results.json", "nll_curve.png", "modeling_maf.py",
                 "preprocessor_config.json"):
        (folder / name).write_text("x")
    (folder / "README.md").write_text("---\ntags:\n- hf-dgm\n- maf\n---\n\n# MAF\n")
    for sub in ("samples", "anomaly"):
        os.makedirs(folder / sub)
        (folder / sub / "a.png").write_text("x")
    (folder / "notes.txt").write_text("mine")  # the user's: never removed
    (folder / "my_script.py").write_text("mine")
    return folder


def test_a_folder_holding_a_run_is_refused_in_one_line_naming_both_ways_out(tmp_path):
    run = fake_run(tmp_path / "run")
    assert find_run_outputs(str(run))[:4] == ["config.json", "model.safetensors", "metrics.jsonl", "train_results.json"]
    with pytest.raises(UsageError) as error:
        prepare_output_dir(str(run))
    message = str(error.value)
    assert "\n" not in message and "already holds another run" in message
    assert "--overwrite_output_dir" in message and "--resume_from_checkpoint latest" in message
    assert prepare_output_dir(str(run), resuming="latest") == []  # continuing it is allowed, and touches nothing
    assert (run / "samples" / "a.png").exists()


def test_overwriting_removes_the_old_runs_outputs_and_keeps_the_users_files(tmp_path):
    run = fake_run(tmp_path / "run")
    removed = prepare_output_dir(str(run), overwrite=True)
    assert "checkpoints" in removed and "samples" in removed and "modeling_maf.py" in removed
    assert sorted(os.listdir(run)) == ["my_script.py", "notes.txt"]


def test_what_is_not_ours_is_neither_a_run_nor_removed(tmp_path):
    """A user's README, a config.json of another library and the model package's own source are not run outputs."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (folder / "README.md").write_text("# my notes about hf-dgm\n")
    (folder / "modeling_maf.py").write_text("x")
    assert find_run_outputs(str(folder)) == []
    assert prepare_output_dir(str(folder)) == [] and len(os.listdir(folder)) == 3
    package = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "modeling_maf")
    assert find_run_outputs(package) == []
    assert find_run_outputs(str(tmp_path / "missing")) == []


def test_resuming_latest_without_a_checkpoint_would_mix_two_runs(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / "checkpoints" / "step_3" / "training_state.json").unlink()  # an incomplete checkpoint only
    with pytest.raises(UsageError, match="no complete checkpoint to continue from; pass --overwrite_output_dir"):
        prepare_output_dir(str(run), resuming="latest")


def test_the_main_job_names_its_own_way_out(tmp_path):
    run = fake_run(tmp_path / "run")
    with pytest.raises(UsageError, match=r"holds another run of the main job \(.*\): re-run with OVERWRITE=1\.$"):
        prepare_output_dir(str(run), what="another run of the main job", hint="re-run with OVERWRITE=1")


# ------------------------------------------------------------------------------------------- through train_maf.py


def train(argv, capsys):
    """train_maf.py's entry point in this process: (exit status, stderr)."""
    import train_maf

    with pytest.raises(SystemExit) as exit_info:
        run_main(train_maf.main, [str(arg) for arg in argv])
    return exit_info.value.code, capsys.readouterr().err


def files_of(folder):
    """{path: (inode, mtime)} of every file under `folder`."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            stat = os.stat(path)
            found[os.path.relpath(path, folder)] = (stat.st_ino, stat.st_mtime_ns)
    return found


def test_training_twice_into_one_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.delenv("HF_DGM_DEBUG", raising=False)
    data = make_mvtec_category(str(tmp_path / "capsule"), size=8, num_train=8, num_test_good=1)
    out = tmp_path / "run"
    status, _ = train(["--data_dir", data, "--output_dir", out, *TINY], capsys)
    assert status == 0 and (out / "model.safetensors").is_file() and (out / "checkpoints").is_dir()
    os.makedirs(out / "samples")
    (out / "samples" / "sample_t1_0.png").write_text("from the first model")
    (out / "notes.txt").write_text("mine")
    first = files_of(out)

    # The second run is refused before any work, in one line naming both ways out.
    status, stderr = train(["--data_dir", data, "--output_dir", out, *TINY, "--num_blocks", "2"], capsys)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 1 and len(lines) == 1, stderr
    assert lines[0].startswith("train_maf.py: error: ") or ": error: " in lines[0]
    assert "--overwrite_output_dir" in lines[0] and "--resume_from_checkpoint" in lines[0]
    assert files_of(out) == first

    # Resuming the first run's checkpoint with another configuration: one line naming the field.
    status, stderr = train(["--data_dir", data, "--output_dir", out, *TINY, "--num_blocks", "2",
                            "--resume_from_checkpoint", "latest"], capsys)
    errors = [line for line in stderr.splitlines() if ": error: " in line]
    assert status == 1 and len(errors) == 1 and "Traceback" not in stderr, stderr
    assert "another configuration" in errors[0] and "num_blocks 1 there, 2 now" in errors[0]

    # Overwriting: no file of the first run is left (removed or written anew), the user's file stays.
    status, _ = train(["--data_dir", data, "--output_dir", out, *TINY, "--num_blocks", "2", "--overwrite_output_dir",
                       "--checkpointing_steps", "no"], capsys)
    assert status == 0
    second = files_of(out)
    left_over = [path for path, identity in first.items() if second.get(path) == identity and path != "notes.txt"]
    assert left_over == [] and "notes.txt" in second
    assert not (out / "samples").exists() and not (out / "checkpoints").exists()
    assert json.loads((out / "config.json").read_text())["num_blocks"] == 2
