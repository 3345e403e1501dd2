"""Issue 6: the project's models and data through the (loopback) Hub, with the real clients over HTTP.

- MAFModel / IAFModel / CycleGANModel: push_to_hub -> from_pretrained(repo_id) gives identical weights and
  outputs; a pinned revision (commit or branch) loads that revision.
- A fresh interpreter that cannot import this project loads every model with
  AutoModel.from_pretrained(repo_id, trust_remote_code=True) (the code travels in the repo through `auto_map`)
  and the MAF and CycleGAN image processors with AutoImageProcessor, and reproduces the outputs saved here.
- The MVTec DatasetDict pushed with scripts/push_mvtec_dataset.py loads back with load_dataset(repo_id).
"""

import json
import textwrap

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi
from PIL import Image

from child_process import WITHOUT_HF_DGM, run_without_hf_dgm
from modeling_cyclegan import CycleGANConfig, CycleGANImageProcessor, CycleGANModel
from modeling_maf import IAFConfig, IAFModel, MAFConfig, MAFImageProcessor, MAFModel
from modeling_maf.modeling_maf import MaskedLinear
from synthetic_data import make_mvtec_category
from tiny_models import randomize_flow


def randomize(model, seed=0, std=0.1):
    return randomize_flow(model, seed, std, other_std=std)


def tiny_maf(model_class, config_class, seed=0):
    config = config_class(image_size=4, num_channels=1, hidden_sizes=[8, 8], num_blocks=2)
    return randomize(model_class(config), seed).eval()


def tiny_cyclegan(seed=0):
    config = CycleGANConfig(
        image_size=16, generator_filters=4, num_residual_blocks=1, discriminator_filters=4, discriminator_layers=2
    )
    torch.manual_seed(seed)
    return CycleGANModel(config).eval()


def flow_outputs(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values).log_prob


def cyclegan_outputs(model, pixel_values):
    with torch.no_grad():
        return model.generator_a_to_b(pixel_values)


def assert_same_weights(expected, actual):
    expected_state, actual_state = expected.state_dict(), actual.state_dict()
    assert expected_state.keys() == actual_state.keys()
    for name, tensor in expected_state.items():
        assert torch.equal(tensor, actual_state[name]), name


MODELS = {
    "maf": (lambda seed=0: tiny_maf(MAFModel, MAFConfig, seed), MAFModel, flow_outputs, (3, 1, 4, 4)),
    "iaf": (lambda seed=0: tiny_maf(IAFModel, IAFConfig, seed), IAFModel, flow_outputs, (3, 1, 4, 4)),
    "cyclegan": (tiny_cyclegan, CycleGANModel, cyclegan_outputs, (2, 3, 16, 16)),
}


def model_inputs(name):
    shape = MODELS[name][3]
    values = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    return values if name != "cyclegan" else values * 2 - 1


@pytest.mark.parametrize("name", list(MODELS))
def test_push_to_hub_then_from_pretrained_gives_identical_model(hub_server, tmp_path, name):
    build, model_class, outputs, _ = MODELS[name]
    model = build()
    repo_id = hub_server.repo_id(name)
    commit = model.push_to_hub(repo_id, commit_message=f"Upload tiny {name}")

    files = HfApi().list_repo_files(repo_id)
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert hub_server.server.file_entry("model", repo_id, "model.safetensors").lfs  # weights went through LFS
    config = json.loads(open(HfApi().hf_hub_download(repo_id, "config.json", cache_dir=tmp_path)).read())
    assert "AutoModel" in config["auto_map"] and f"modeling_{'maf' if name != 'cyclegan' else name}.py" in {
        f for f in files if f.endswith(".py")
    }

    loaded = model_class.from_pretrained(repo_id, cache_dir=tmp_path).eval()
    assert type(loaded) is model_class
    assert_same_weights(model, loaded)
    inputs = model_inputs(name)
    assert torch.equal(outputs(model, inputs), outputs(loaded, inputs))
    assert HfApi().model_info(repo_id).sha == commit.oid


@pytest.mark.parametrize("name", ["maf", "cyclegan"])
def test_pinned_revision_loads_that_revision(hub_server, tmp_path, name):
    build, model_class, outputs, _ = MODELS[name]
    first, second, on_branch = build(seed=0), build(seed=1), build(seed=2)
    repo_id = hub_server.repo_id(f"{name}-revisions")
    first_commit = first.push_to_hub(repo_id, commit_message="v1").oid
    second.push_to_hub(repo_id, commit_message="v2")
    on_branch.push_to_hub(repo_id, revision="experiment", commit_message="experiment")
    inputs = model_inputs(name)

    for revision, expected in ((first_commit, first), (None, second), ("main", second), ("experiment", on_branch)):
        loaded = model_class.from_pretrained(repo_id, revision=revision, cache_dir=tmp_path).eval()
        assert_same_weights(expected, loaded)
        assert torch.equal(outputs(expected, inputs), outputs(loaded, inputs)), revision


# The child process: no hf-dgm importable. `-I` drops the working directory, PYTHONPATH and user site; the
# editable install's finder is removed by the script itself.
CHILD_SCRIPT = WITHOUT_HF_DGM + textwrap.dedent(
    """
    import json, sys, warnings

    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    jobs = json.load(open(JOBS))
    results, mask_warnings = {}, {}
    for job in jobs:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = AutoModel.from_pretrained(job["repo_id"], trust_remote_code=True).eval()
        mask_warnings[job["repo_id"]] = [str(w.message) for w in caught if "nonzero weight" in str(w.message)]
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        inputs = torch.load(job["inputs"])
        with torch.no_grad():
            if job["kind"] == "flow":
                output = model(inputs).log_prob
                processor = AutoImageProcessor.from_pretrained(job["repo_id"], trust_remote_code=True)
                assert type(processor).__name__ == "MAFImageProcessor", type(processor)
                assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
                torch.save(processor(Image.open(job["image"]))["pixel_values"], job["pixel_values_out"])
            else:
                processor = AutoImageProcessor.from_pretrained(job["repo_id"], trust_remote_code=True)
                assert type(processor).__name__ == "CycleGANImageProcessor", type(processor)
                assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
                pixel_values = processor(Image.open(job["image"]))["pixel_values"]
                torch.save(pixel_values, job["pixel_values_out"])
                output = model.generator_a_to_b(inputs)
        torch.save(output, job["output"])
        results[job["repo_id"]] = type(model).__name__
    print(json.dumps({"classes": results, "mask_warnings": mask_warnings}))
    """
)


def test_fresh_process_without_the_package_loads_with_trust_remote_code(hub_server, tmp_path):
    jobs, expected = [], {}
    image_path = tmp_path / "horse.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(image_path)
    for name in [*MODELS, "maf-perturbed"]:
        build, _, outputs, _ = MODELS[name.removesuffix("-perturbed")]
        model = build()
        repo_id = hub_server.repo_id(f"{name}-remote-code")
        if name == "maf-perturbed":  # nonzero weights on masked connections: the remote code must zero them on load
            perturbed = build()
            with torch.no_grad():
                for module in perturbed.modules():
                    if isinstance(module, MaskedLinear):
                        module.weight.add_(~module.mask() * 0.5)
            perturbed.push_to_hub(repo_id)
            perturbed_repo, perturbed_count = repo_id, sum(int((~m.mask()).sum()) for m in perturbed.modules()
                                                          if isinstance(m, MaskedLinear))
        else:
            model.push_to_hub(repo_id)
        inputs = model_inputs(name.removesuffix("-perturbed"))
        torch.save(inputs, tmp_path / f"{name}-inputs.pt")
        job = {
            "repo_id": repo_id,
            "kind": "flow" if name != "cyclegan" else "cyclegan",
            "inputs": str(tmp_path / f"{name}-inputs.pt"),
            "output": str(tmp_path / f"{name}-output.pt"),
        }
        expected[name] = outputs(model, inputs)
        if name == "cyclegan":
            processor = CycleGANImageProcessor(size=16)
            processor.push_to_hub(repo_id)
        else:  # the flows' processor was pushed with the model (MAFPreTrainedModel.save_pretrained)
            processor = MAFImageProcessor.from_model_config(model.config)
        job.update(image=str(image_path), pixel_values_out=str(tmp_path / f"{name}-pixel_values.pt"))
        expected[f"{name}-pixel_values"] = processor(Image.open(image_path))["pixel_values"]
        jobs.append(job)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))

    child_home = tmp_path / "child-hf-home"  # empty cache: everything comes from the Hub repo
    reported = run_without_hf_dgm(CHILD_SCRIPT, tmp_path / "jobs.json", hub_server, child_home)
    assert sorted(reported["classes"].values()) == ["CycleGANModel", "IAFModel", "MAFModel", "MAFModel"]
    assert [len(found) for found in reported["mask_warnings"].values()] == [0, 0, 0, 1]
    assert f"had {perturbed_count} nonzero weight(s)" in reported["mask_warnings"][perturbed_repo][0]
    assert (child_home / "modules" / "transformers_modules").is_dir()  # the code came from the repos

    for name in [*MODELS, "maf-perturbed"]:  # the perturbed MAF gives the unperturbed one's log_prob
        assert torch.equal(torch.load(tmp_path / f"{name}-output.pt"), expected[name]), name
        assert torch.equal(torch.load(tmp_path / f"{name}-pixel_values.pt"), expected[f"{name}-pixel_values"]), name


# ----------------------------------------------------------------------------------------------------------
# MVTec DatasetDict through scripts/push_mvtec_dataset.py
# ----------------------------------------------------------------------------------------------------------


def rows_as_arrays(split):
    """Decoded rows, in order, with images as arrays (pixels compared, not file encodings)."""
    return [
        {key: np.asarray(value) if isinstance(value, Image.Image) else value for key, value in row.items()}
        for row in split
    ]


def test_mvtec_dataset_push_and_load_dataset_round_trip(hub_server, tmp_path):
    import datasets

    push_mvtec_dataset = pytest.importorskip("push_mvtec_dataset")
    from hf_dgm_training.data.anomaly import load_anomaly_dataset

    category = make_mvtec_category(tmp_path / "capsule")
    repo_id = hub_server.repo_id("mvtec-capsule")
    assert push_mvtec_dataset.main(["--data_dir", str(category), "--hub_dataset_id", repo_id]) == 0

    local = load_anomaly_dataset(str(category), cache_dir=str(tmp_path / "cache-local"))
    loaded = datasets.load_dataset(repo_id, cache_dir=str(tmp_path / "cache-hub"))
    assert set(loaded) == set(local) == {"train", "test"}
    for split in local:
        assert loaded[split].features == local[split].features
        assert loaded[split].column_names == local[split].column_names
        assert len(loaded[split]) == len(local[split])
        for pushed, original in zip(rows_as_arrays(loaded[split]), rows_as_arrays(local[split])):
            assert pushed.keys() == original.keys()
            for key in original:
                assert np.array_equal(pushed[key], original[key]), (split, key)
    # The scripts' own Hub path reads it back too.
    assert load_anomaly_dataset(dataset_name=repo_id, cache_dir=str(tmp_path / "cache-hub"))["test"].num_rows == 3
