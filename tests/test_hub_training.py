"""Issue 6: the training scripts' Hub paths against the loopback Hub.

`--push_to_hub --hub_model_id` uploads checkpoints in the background while training goes on, then the final
model and its model card; a Hub that is unreachable or failing only produces warnings (training completes and
the local checkpoints stay); a missing token stops the script before training starts.

The scripts run in this process (`main(argv)`), so the suite's socket guard watches them too.
"""

import importlib
import logging
import os
import socket
import threading
import time

import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from synthetic_data import make_mvtec_category, make_unpaired_folder


def closed_loopback_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def maf_argv(data_dir, output_dir):
    return [
        "--data_dir", str(data_dir), "--output_dir", str(output_dir), "--image_size", "4",
        "--hidden_sizes", "8", "8", "--num_blocks", "2", "--num_train_epochs", "2",
        "--per_device_train_batch_size", "2", "--checkpointing_steps", "epoch", "--checkpoints_total_limit", "2",
        "--learning_rate", "1e-3", "--logging_steps", "1",
    ]


def maf_model_class():
    from modeling_maf import MAFModel

    return MAFModel


def cyclegan_argv(data_dir, output_dir):
    return [
        "--data_dir", str(data_dir), "--output_dir", str(output_dir), "--image_size", "16",
        "--generator_filters", "4", "--num_residual_blocks", "1", "--discriminator_filters", "4",
        "--discriminator_layers", "2", "--num_train_epochs", "2", "--checkpointing_steps", "epoch",
        "--checkpoints_total_limit", "2", "--num_grid_images", "1", "--logging_steps", "1",
        "--fast_path", "false", "--mixed_precision", "no",
    ]


def cyclegan_model_class():
    from modeling_cyclegan import CycleGANModel

    return CycleGANModel


FOLDERS = ("trainA", "trainB", "testA", "testB")
# script module -> (tiny argv, data maker, model class, files the final upload must contain)
SCRIPTS = {
    "train_maf": (maf_argv, make_mvtec_category, maf_model_class,
                  {"config.json", "model.safetensors", "README.md", "nll_curve.png", "train_results.json"}),
    "train_cyclegan": (cyclegan_argv,
                       lambda root: make_unpaired_folder(root, counts=[(f, 3) for f in FOLDERS], size=20),
                       cyclegan_model_class,
                       {"config.json", "model.safetensors", "README.md", "preprocessor_config.json",
                        "train_results.json"}),
}


def load_script(name):
    if not os.path.exists(os.path.join(os.path.dirname(__file__), "..", "scripts", f"{name}.py")):
        pytest.fail(f"scripts/{name}.py does not exist yet")
    return importlib.import_module(name)


def local_checkpoints(output_dir):
    folder = os.path.join(output_dir, "checkpoints")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_push_to_hub_uploads_checkpoints_in_the_background_then_model_and_card(hub_server, tmp_path, script):
    make_argv, make_data, get_model_class, final_files = SCRIPTS[script]
    module = load_script(script)
    data_dir, output_dir = make_data(tmp_path / "data"), tmp_path / "run"
    repo_id = hub_server.repo_id(script.replace("_", "-"))
    argv = make_argv(data_dir, output_dir) + ["--push_to_hub", "--hub_model_id", repo_id]

    # A slow Hub: every commit waits until we release it. Training must reach its end (the final model saved
    # locally) while not a single checkpoint upload has landed, i.e. it never waited for the Hub.
    errors = []

    def train():
        try:
            module.main(argv)
        except BaseException as error:  # noqa: BLE001 - re-raised in the test thread below
            errors.append(error)

    with hub_server.server.holding_commits():
        trainer = threading.Thread(target=train)
        trainer.start()
        deadline = time.monotonic() + 60
        while not (output_dir / "model.safetensors").exists() and trainer.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not errors, errors
        assert (output_dir / "model.safetensors").exists(), "training did not finish while the Hub was slow"
        commits_while_training = [c.title for c in HfApi().list_repo_commits(repo_id)]
        assert commits_while_training == ["initial commit"]
    trainer.join(timeout=120)
    assert not trainer.is_alive() and not errors, errors

    api = HfApi()
    files = set(api.list_repo_files(repo_id))
    assert final_files <= files, final_files - files
    local = local_checkpoints(output_dir)
    assert local, "no local checkpoint was written"
    for checkpoint in local:  # every checkpoint that was saved is on the Hub, with its training state
        assert f"checkpoints/{checkpoint}/training_state.json" in files
    assert not any(f.startswith("logs/") or ".hub-upload-" in f or ".tmp-" in f for f in files)
    # The final model is the last commit, after every checkpoint upload.
    commits = api.list_repo_commits(repo_id)
    newest_files = {f.path for f in api.list_repo_tree(repo_id, revision=commits[1].commit_id, recursive=True)}
    assert "model.safetensors" not in newest_files and len(commits) >= 2 + len(local)

    # The final model on the Hub is the one saved locally; its card carries metadata the Hub validated.
    model_class = get_model_class()
    local_model = model_class.from_pretrained(output_dir)
    hub_model = model_class.from_pretrained(repo_id, cache_dir=tmp_path / "cache")
    for name, tensor in local_model.state_dict().items():
        assert torch.equal(tensor, hub_model.state_dict()[name]), name
    card = ModelCard.load(repo_id)
    api._validate_yaml(card.content)  # the server's validate-yaml accepts the card the script wrote
    assert card.data.library_name == "transformers" and card.data.license and card.data.tags
    assert card.data.eval_results, "the card's model-index must carry the run's metrics"
    assert "```python" in card.text and repo_id in card.text  # a usage snippet that loads this repo


@pytest.mark.parametrize("script", list(SCRIPTS))
@pytest.mark.parametrize("hub_failure", ["unreachable", "failing"])
def test_broken_hub_warns_and_training_completes_with_local_checkpoints(
    hub_server, tmp_path, monkeypatch, caplog, script, hub_failure
):
    make_argv, make_data, _, _ = SCRIPTS[script]
    module = load_script(script)
    data_dir, output_dir = make_data(tmp_path / "data"), tmp_path / "run"
    repo_id = hub_server.repo_id(f"{script.replace('_', '-')}-{hub_failure}")
    argv = make_argv(data_dir, output_dir) + ["--push_to_hub", "--hub_model_id", repo_id]

    with caplog.at_level(logging.WARNING, logger="hf_dgm_training.hub"):
        if hub_failure == "unreachable":
            from huggingface_hub import constants

            monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_loopback_port()}")
            module.main(argv)
            assert "Pushing to the Hub is disabled" in caplog.text
        else:
            with hub_server.server.failing(r"/commit/", status=503):
                module.main(argv)
            assert "failed" in caplog.text and "Training continues; the local copy is kept" in caplog.text
            assert not any(f.startswith("checkpoints/") for f in HfApi().list_repo_files(repo_id))

    assert (output_dir / "model.safetensors").exists() and (output_dir / "README.md").exists()
    checkpoints = local_checkpoints(output_dir)
    assert checkpoints and all(
        os.path.exists(output_dir / "checkpoints" / c / "training_state.json") for c in checkpoints
    )
    assert not [name for name in os.listdir(output_dir / "checkpoints") if name.startswith(".")]


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_missing_token_is_a_clear_error_before_training(hub_server, tmp_path, monkeypatch, script):
    from huggingface_hub import constants

    make_argv, make_data, _, _ = SCRIPTS[script]
    module = load_script(script)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    data_dir, output_dir = make_data(tmp_path / "data"), tmp_path / "run"
    argv = make_argv(data_dir, output_dir) + ["--push_to_hub", "--hub_model_id", hub_server.repo_id("no-token")]

    with pytest.raises(ValueError, match="--hub_token"):
        module.main(argv)
    # Nothing was trained: no checkpoint, no model.
    assert not (output_dir / "checkpoints").exists() and not (output_dir / "model.safetensors").exists()
