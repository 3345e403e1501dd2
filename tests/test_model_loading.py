"""Issue 14.3: `--model_name_or_path` errors are one `ModelLoadError` naming the path and the fix; a path that looks
local never reaches the Hub (the socket guard in conftest.py fails any test that tries)."""

import os
import time

import pytest
import torch
from transformers import AutoModel

import modeling_maf  # noqa: F401  (registers the maf/iaf Auto classes)
from hf_dgm_training import ModelLoadError, load_pretrained, looks_local, resolve_model_path
from modeling_cyclegan import CycleGANModel
from modeling_maf import MAFConfig, MAFModel


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """A working folder holding runs/maf (a tiny saved MAF), as a training run leaves it."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    MAFModel(MAFConfig(image_size=4, num_channels=1, hidden_sizes=[8], num_blocks=1)).save_pretrained("runs/maf")
    return tmp_path / "runs"


@pytest.mark.parametrize(
    "name, local",
    [
        ("runs/mafx", True),  # first part exists here as a folder
        ("./maf", True),
        ("../maf", True),
        ("/abs/maf", True),
        ("~/maf", True),
        ("a/b/c", True),  # a Hub id has at most one "/"
        ("runs\\maf", True),
        ("bad name!", True),  # not a valid Hub id
        ("user/maf-capsule", False),
        ("gpt2", False),
    ],
)
def test_looks_local(runs, name, local):
    assert looks_local(name) is local


def test_mistyped_relative_path_fails_at_once_without_the_network(runs):
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"runs/mafx does not exist .*did you mean runs/maf\?"):
        load_pretrained(AutoModel, "runs/mafx")
    assert time.perf_counter() - started < 5  # no retries; and the socket guard saw no request
    with pytest.raises(ModelLoadError, match=r"\./elsewhere/maf does not exist .*elsewhere does not exist either"):
        load_pretrained(AutoModel, "./elsewhere/maf")


def test_folder_without_config_is_named(runs):
    with pytest.raises(ModelLoadError, match=r"runs holds no config.json.*model folders in it are runs/maf"):
        load_pretrained(AutoModel, "runs")
    (runs / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"runs/empty holds no config.json, so it is not a saved model"):
        load_pretrained(AutoModel, "runs/empty")
    (runs / "partial" / "checkpoints" / "step_5").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match=r"training there has not finished.*--resume_from_checkpoint latest"):
        load_pretrained(AutoModel, "runs/partial")
    (runs / "partial" / "checkpoints" / "step_5" / "training_state.json").write_text("{}")
    with pytest.raises(ModelLoadError,
                       match=r"is a training checkpoint .*--resume_from_checkpoint runs/partial/checkpoints/step_5"):
        load_pretrained(AutoModel, "runs/partial/checkpoints/step_5")
    with pytest.raises(ModelLoadError, match=r"runs/maf/config.json is a file; pass the folder"):
        load_pretrained(AutoModel, "runs/maf/config.json")


def test_config_without_model_type_or_weights(runs):
    (runs / "no_type").mkdir()
    (runs / "no_type" / "config.json").write_text('{"image_size": 4}')
    with pytest.raises(ModelLoadError, match=r"runs/no_type/config.json has no model_type"):
        load_pretrained(AutoModel, "runs/no_type")
    (runs / "no_weights").mkdir()
    (runs / "no_weights" / "config.json").write_bytes((runs / "maf" / "config.json").read_bytes())
    with pytest.raises(ModelLoadError, match=r"runs/no_weights has config.json but no weights"):
        load_pretrained(AutoModel, "runs/no_weights")


def test_truncated_safetensors_is_named(runs):
    weights = runs / "maf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    with pytest.raises(ModelLoadError, match=r"runs/maf/model.safetensors is damaged or truncated"):
        load_pretrained(AutoModel, "runs/maf")


def test_model_of_another_type_is_refused(runs):
    with pytest.raises(ModelLoadError, match=r"runs/maf is a 'maf' model; this script needs 'cyclegan'"):
        load_pretrained(CycleGANModel, "runs/maf", model_types=("cyclegan",))


def test_good_local_folder_loads_and_home_is_expanded(runs, monkeypatch):
    model = load_pretrained(AutoModel, "runs/maf", model_types=("maf", "iaf"))
    assert model.config.model_type == "maf"
    monkeypatch.setenv("HOME", str(runs))
    assert resolve_model_path("~/maf") == os.path.join(str(runs), "maf")


def test_hub_ids_load_and_a_missing_repo_is_one_error(hub_server, runs):
    repo_id = hub_server.repo_id("maf-loading")
    AutoModel.from_pretrained("runs/maf").push_to_hub(repo_id)
    model = load_pretrained(AutoModel, repo_id, model_types=("maf",))
    assert model.config.model_type == "maf"
    with pytest.raises(ModelLoadError, match=rf"Hub repo {repo_id} is a 'maf' model; this script needs 'cyclegan'"):
        load_pretrained(CycleGANModel, repo_id, model_types=("cyclegan",))
    missing = hub_server.repo_id("missing")
    with pytest.raises(ModelLoadError, match=rf"{missing} is not a folder here, and loading it as a Hub id failed"):
        load_pretrained(AutoModel, missing)


# ------------------------------------------------------------------------- issue 22.3: typos and an unreachable Hub

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_sample_maf(name, cwd, **env):
    """scripts/sample_maf.py --model_name_or_path <name> in a child process: (exit status, stderr, seconds)."""
    import subprocess
    import sys

    environment = {key: value for key, value in os.environ.items() if key != "HF_DGM_DEBUG"}
    environment.update(PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "scripts")]), **env)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sample_maf.py"), "--model_name_or_path",
                             name], capture_output=True, text=True, cwd=cwd, env=environment, timeout=120)
    return result.returncode, result.stderr, time.perf_counter() - started


@pytest.mark.parametrize("typo", ["rnus/maf", "runs_maf", "runs/mfa"])
def test_a_hub_looking_typo_of_a_local_model_folder_is_suggested_before_any_hub_call(runs, typo):
    with pytest.raises(ModelLoadError, match=rf"{typo} (is not a folder here|does not exist).*did you mean runs/maf\?"):
        resolve_model_path(typo)


def test_names_far_from_every_local_folder_are_still_hub_ids(runs):
    from hf_dgm_training.model_loading import local_near_match

    assert local_near_match("user/maf-capsule") is None and local_near_match("gpt2") is None
    assert local_near_match("runs_maf") == os.path.join("runs", "maf")


def test_sample_maf_suggests_the_local_folder_within_seconds(runs):
    """The issue's case: `sample_maf.py --model_name_or_path rnus/maf` with runs/maf present (no Hub retries)."""
    status, stderr, seconds = run_sample_maf("rnus/maf", cwd=runs.parent)
    lines = stderr.strip().splitlines()
    assert status == 1 and len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("sample_maf.py: error: rnus/maf is not a folder here; did you mean runs/maf?")
    assert seconds < 5


def test_an_unreachable_hub_is_one_line_within_seconds(tmp_path):
    """HF_ENDPOINT at a closed loopback port (set before the child imports huggingface_hub): one connection attempt,
    no retries."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    status, stderr, seconds = run_sample_maf("someone/maf-capsule", cwd=tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{port}",
                                             HF_HOME=str(tmp_path / "hf"))
    lines = stderr.strip().splitlines()
    assert status == 1 and len(lines) == 1, stderr[-3000:]
    assert "someone/maf-capsule is not a folder here, and the Hub cannot be reached" in lines[0]
    assert f"127.0.0.1:{port}" in lines[0] and "Connection refused" in lines[0]
    assert seconds < 5
