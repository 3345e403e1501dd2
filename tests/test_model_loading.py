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
