"""The loopback Hub (tests/hub_server.py) driven by the real huggingface_hub, transformers and datasets clients
over HTTP, and the suite's socket guard. No client code is mocked."""

import os
import socket
import urllib.request

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from conftest import NetworkAccessBlocked, expect_network_block


# ----------------------------------------------------------------------------------------------------------
# Socket guard
# ----------------------------------------------------------------------------------------------------------


def test_socket_guard_blocks_everything_but_loopback():
    with expect_network_block():
        with pytest.raises(NetworkAccessBlocked):
            socket.create_connection(("8.8.8.8", 53), timeout=1)
        with socket.socket() as sock, pytest.raises(NetworkAccessBlocked):
            sock.connect(("8.8.8.8", 443))
        with socket.socket() as sock, pytest.raises(NetworkAccessBlocked):
            sock.connect_ex(("1.1.1.1", 80))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, pytest.raises(NetworkAccessBlocked):
            sock.sendto(b"x", ("8.8.8.8", 53))
        with pytest.raises(NetworkAccessBlocked):
            socket.getaddrinfo("huggingface.co", 443)
        with pytest.raises(NetworkAccessBlocked):
            urllib.request.urlopen("https://huggingface.co/api/models", timeout=1)
        # The real Hub through its own client: surfaces instead of being treated as "offline".
        with pytest.raises(NetworkAccessBlocked):
            HfApi(endpoint="https://huggingface.co").model_info("gpt2")

    # Loopback stays open.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=1):
            pass
    assert socket.getaddrinfo("localhost", 80)


def test_environment_points_at_the_loopback_hub(hub_server):
    from huggingface_hub import constants

    assert constants.ENDPOINT == hub_server.endpoint and hub_server.endpoint.startswith("http://127.0.0.1:")
    assert constants.HF_HUB_DISABLE_XET and not constants.HF_HUB_OFFLINE
    assert os.environ["HF_TOKEN"] == hub_server.token
    assert HfApi().whoami()["name"] == hub_server.user


# ----------------------------------------------------------------------------------------------------------
# Repositories and files
# ----------------------------------------------------------------------------------------------------------


def test_create_repo_and_exist_ok(hub_server):
    api = HfApi()
    repo_id = hub_server.repo_id("create")
    url = api.create_repo(repo_id)
    assert url == f"{hub_server.endpoint}/{repo_id}" and url.repo_id == repo_id
    assert api.create_repo(repo_id, exist_ok=True).repo_id == repo_id
    with pytest.raises(HfHubHTTPError) as error:
        api.create_repo(repo_id)
    assert error.value.response.status_code == 409
    dataset_url = api.create_repo(hub_server.repo_id("create-ds"), repo_type="dataset")
    assert dataset_url.repo_type == "dataset" and "/datasets/" in dataset_url


@pytest.mark.parametrize("mode", ["regular", "lfs"])
def test_upload_and_download_inline_and_lfs(hub_server, tmp_path, mode):
    api = HfApi()
    repo_id = hub_server.repo_id(f"upload-{mode}")
    api.create_repo(repo_id)
    weights = os.urandom(4096)
    start = len(hub_server.server.requests)
    with hub_server.server.uploads(mode):
        api.upload_file(path_or_fileobj=b"hello", path_in_repo="notes/hello.txt", repo_id=repo_id)
        api.upload_file(path_or_fileobj=weights, path_in_repo="model.safetensors", repo_id=repo_id)

    lfs_puts = [r for r in hub_server.server.requests[start:] if r[0] == "PUT" and r[1].startswith("/lfs-objects/")]
    assert len(lfs_puts) == (2 if mode == "lfs" else 0)
    assert hub_server.server.file_entry("model", repo_id, "model.safetensors").lfs == (mode == "lfs")

    assert open(hf_hub_download(repo_id, "notes/hello.txt", cache_dir=tmp_path), "rb").read() == b"hello"
    assert open(hf_hub_download(repo_id, "model.safetensors", cache_dir=tmp_path), "rb").read() == weights

    tree = {entry.path: entry for entry in api.list_repo_tree(repo_id, recursive=True)}
    assert set(tree) == {".gitattributes", "notes", "notes/hello.txt", "model.safetensors"}
    assert (tree["model.safetensors"].lfs is not None) == (mode == "lfs")
    assert tree["model.safetensors"].size == len(weights)


def test_upload_folder_uses_lfs_for_weights_by_default(hub_server, tmp_path):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "model.safetensors").write_bytes(b"\0" * 100)
    (folder / "sub" / "extra.txt").write_text("extra")
    api = HfApi()
    repo_id = hub_server.repo_id("folder")
    api.create_repo(repo_id)
    commit = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="Add model")

    info = api.model_info(repo_id)
    assert info.sha == commit.oid and len(commit.oid) == 40
    assert sorted(s.rfilename for s in info.siblings) == [
        ".gitattributes", "config.json", "model.safetensors", "sub/extra.txt"
    ]
    assert info.config == {"a": 1}
    assert sorted(api.list_repo_files(repo_id)) == sorted(s.rfilename for s in info.siblings)
    assert hub_server.server.file_entry("model", repo_id, "model.safetensors").lfs  # the Hub's .gitattributes rule
    assert not hub_server.server.file_entry("model", repo_id, "config.json").lfs
    assert api.list_repo_commits(repo_id)[0].title == "Add model"

    # Re-uploading unchanged files makes no commit; deleting makes one.
    assert api.upload_folder(folder_path=folder, repo_id=repo_id).oid == commit.oid
    api.delete_file("sub/extra.txt", repo_id=repo_id)
    assert "sub/extra.txt" not in api.list_repo_files(repo_id)


def test_revision_pinning_by_commit_branch_and_tag(hub_server, tmp_path):
    api = HfApi()
    repo_id = hub_server.repo_id("revisions")
    api.create_repo(repo_id)
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="value.txt", repo_id=repo_id).oid
    api.create_branch(repo_id, branch="release", revision=first)
    api.create_tag(repo_id, tag="v1.0", revision=first)
    second = api.upload_file(path_or_fileobj=b"v2", path_in_repo="value.txt", repo_id=repo_id).oid
    on_branch = api.upload_file(
        path_or_fileobj=b"hotfix", path_in_repo="fix.txt", repo_id=repo_id, revision="release"
    ).oid
    assert len({first, second, on_branch}) == 3

    def read(revision, filename="value.txt"):
        return open(hf_hub_download(repo_id, filename, revision=revision, cache_dir=tmp_path), "rb").read()

    assert read(None) == b"v2" and read("main") == b"v2" and read(second) == b"v2"
    assert read(first) == b"v1" and read("v1.0") == b"v1" and read("release") == b"v1"
    assert read("release", "fix.txt") == b"hotfix"
    with pytest.raises(EntryNotFoundError):
        read("main", "fix.txt")

    assert api.model_info(repo_id, revision=first).sha == first
    assert api.model_info(repo_id, revision="release").sha == on_branch
    refs = api.list_repo_refs(repo_id)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": second, "release": on_branch}
    assert [t.name for t in refs.tags] == ["v1.0"]


def test_errors_map_to_the_client_exceptions(hub_server, tmp_path):
    api = HfApi()
    repo_id = hub_server.repo_id("errors")
    api.create_repo(repo_id)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.bin", cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{hub_server.user}/does-not-exist", "config.json", cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{hub_server.user}/does-not-exist")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", revision="no-such-branch", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="0" * 40)
    # Private repositories are invisible without the token; a wrong token is refused.
    private_id = hub_server.repo_id("private")
    api.create_repo(private_id, private=True)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info(private_id)
    assert HfApi().model_info(private_id).private
    with pytest.raises(HfHubHTTPError) as error:
        HfApi(token="hf_wrong").model_info(repo_id)
    assert error.value.response.status_code == 401


def test_validate_yaml_accepts_model_cards_and_rejects_bad_metadata(hub_server, tmp_path):
    from hf_dgm_training import write_model_card

    api = HfApi()
    path = write_model_card(
        str(tmp_path),
        model_name="maf-test",
        metadata={
            "library_name": "transformers",
            "license": "apache-2.0",
            "pipeline_tag": "unconditional-image-generation",
            "tags": ["normalizing-flow"],
            "datasets": ["mvtec-ad"],
            "eval_results": [
                {"task_type": "anomaly-detection", "dataset_type": "mvtec-ad", "dataset_name": "capsule",
                 "metric_type": "roc_auc", "metric_value": 0.71}
            ],
        },
        body="# MAF\n",
    )
    content = open(path).read()
    api._validate_yaml(content)  # raises ValueError on rejection

    card = ModelCard.from_template(ModelCardData(license="mit", tags=["test"], library_name="transformers"))
    api._validate_yaml(str(card))

    with pytest.raises(ValueError, match="tags"):
        api._validate_yaml("---\ntags: 5\n---\n# card\n")
    with pytest.raises(ValueError, match="metrics"):
        api._validate_yaml("---\nmodel-index:\n- name: m\n  results:\n  - task: {type: t}\n"
                           "    dataset: {type: d, name: n}\n---\n")
    with pytest.warns(UserWarning, match="empty or missing yaml metadata"):
        api._validate_yaml("# no metadata\n")

    # The card lands in a repo, and the model info exposes its metadata.
    repo_id = hub_server.repo_id("card")
    api.create_repo(repo_id)
    api.upload_file(path_or_fileobj=path, path_in_repo="README.md", repo_id=repo_id)
    loaded = ModelCard.load(repo_id)
    assert loaded.data.eval_results[0].metric_value == 0.71
    assert api.model_info(repo_id).card_data.pipeline_tag == "unconditional-image-generation"


def test_injected_failures_and_held_commits(hub_server):
    import threading

    api = HfApi()
    repo_id = hub_server.repo_id("faults")
    api.create_repo(repo_id)
    with hub_server.server.failing(r"/commit/", status=503):
        with pytest.raises(HfHubHTTPError) as error:
            api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert error.value.response.status_code == 503
    # The same client keeps working after the failure.
    api.upload_file(path_or_fileobj=b"y", path_in_repo="y.txt", repo_id=repo_id)

    with hub_server.server.holding_commits():
        worker = threading.Thread(
            target=api.upload_file, kwargs=dict(path_or_fileobj=b"z", path_in_repo="z.txt", repo_id=repo_id)
        )
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive()  # the commit waits ...
        assert "z.txt" not in api.list_repo_files(repo_id)  # ... while other requests are served
    worker.join(timeout=30)
    assert not worker.is_alive() and "z.txt" in api.list_repo_files(repo_id)


# ----------------------------------------------------------------------------------------------------------
# transformers and datasets end to end
# ----------------------------------------------------------------------------------------------------------


def test_transformers_push_to_hub_and_from_pretrained_round_trip(hub_server, tmp_path):
    from transformers import AutoModel, BertConfig, BertModel

    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    model = BertModel(config).eval()
    repo_id = hub_server.repo_id("bert")
    model.push_to_hub(repo_id)
    loaded = AutoModel.from_pretrained(repo_id, cache_dir=tmp_path).eval()

    assert type(loaded) is BertModel
    for (name, expected), actual in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(expected, actual), name
    input_ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        assert torch.equal(model(input_ids).last_hidden_state, loaded(input_ids).last_hidden_state)
    assert hub_server.server.file_entry("model", repo_id, "model.safetensors").lfs


def test_datasets_push_to_hub_and_load_dataset_round_trip(hub_server, tmp_path):
    import datasets

    original = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"value": [1, 2, 3], "name": ["a", "b", "c"]}),
            "test": datasets.Dataset.from_dict({"value": [4], "name": ["d"]}),
        }
    )
    repo_id = hub_server.repo_id("dataset")
    original.push_to_hub(repo_id)
    files = HfApi().list_repo_files(repo_id, repo_type="dataset")
    assert any(f.startswith("data/train-") and f.endswith(".parquet") for f in files)

    loaded = datasets.load_dataset(repo_id, cache_dir=str(tmp_path))
    assert set(loaded) == {"train", "test"}
    for split in original:
        assert loaded[split].column_names == original[split].column_names
        assert loaded[split].to_dict() == original[split].to_dict()
