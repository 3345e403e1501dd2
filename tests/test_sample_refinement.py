"""Density-guided refinement of MAF/IAF samples (MAFModel.sample's refine_* arguments), the sample measures
(hf_dgm_training.metrics.sample_quality), sample_maf.py's refined grids and measures, and the GPU study script at smoke
size (CPU, tiny)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from hf_dgm_training.metrics.sample_quality import (
    ReferenceImages,
    mean_pairwise_distance,
    nearest_distances,
    quantize,
    reference_statistics,
    roughness,
    sample_quality,
)
from modeling_maf import IAFConfig, IAFModel, MAFConfig, MAFModel
from modeling_maf.modeling_maf import MaskedLinear
from script_runner import run_in_process
from synthetic_data import make_mvtec_category
from test_maf_model import randomize, tiny_config


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOWS = [(MAFModel, MAFConfig), (IAFModel, IAFConfig)]


def tiny_model(model_class, config_class, **overrides):
    return randomize(model_class(tiny_config(config_class, **overrides)), std=0.3).eval()


def mean_log_prob(model, images):
    with torch.no_grad():
        return float(model(images).log_prob.mean())


def fitted_model(model_class, config_class, steps=300):
    """A tiny flow fitted to images near a line (0.5 + 0.3 a * ramp + small noise): a peaked density, like a trained
    image model's, unlike a random model's nearly flat one."""
    torch.manual_seed(0)
    model = model_class(tiny_config(config_class)).train()
    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-1, 1, 18).view(1, 2, 3, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        position = torch.rand(64, 1, 1, 1, generator=generator) * 2 - 1
        noise = 0.02 * torch.randn(64, 2, 3, 3, generator=generator)
        loss = model((0.5 + 0.3 * position * ramp + noise).clamp(0, 1)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("model_class,config_class", FLOWS)
def test_refinement_raises_the_mean_log_prob_of_raw_samples(model_class, config_class):
    model = fitted_model(model_class, config_class)
    exact = model.sample(8, generator=torch.Generator().manual_seed(0))
    refined = model.sample(8, generator=torch.Generator().manual_seed(0), refine_steps=100)  # default settings
    assert refined.shape == exact.shape and float(refined.min()) >= 0 and float(refined.max()) <= 1
    gain_per_dimension = (mean_log_prob(model, refined) - mean_log_prob(model, exact)) / 18
    assert gain_per_dimension > 0.2, gain_per_dimension  # nats; the exact samples average about -3.3 per dimension
    assert mean_pairwise_distance(refined) > 0.1 * mean_pairwise_distance(exact)  # not collapsed onto one image


@pytest.mark.parametrize("model_class,config_class", FLOWS)
def test_refine_steps_zero_is_bit_identical_to_exact_sampling(model_class, config_class):
    model = tiny_model(model_class, config_class, normalization="batch_norm")
    latents = torch.randn(5, model.config.num_features, generator=torch.Generator().manual_seed(3))
    for temperature in (1.0, 0.7):
        expected = model.decode(latents * temperature)
        got = model.sample(5, generator=torch.Generator().manual_seed(3), temperature=temperature, refine_steps=0,
                           refine_step_size=0.5, refine_temperature=2.0)  # unused without steps
        assert torch.equal(got, expected)
    assert torch.equal(model.sample(5, generator=torch.Generator().manual_seed(3)), model.decode(latents))


@pytest.mark.parametrize("model_class,config_class", FLOWS)
def test_a_sequence_of_temperatures_is_one_batch_of_each_temperatures_images(model_class, config_class):
    """Each temperature's images in the batch are those of a call with that temperature alone and the same seed:
    exact draws, and refined ones where the refinement draws no noise (refine_temperature 0)."""
    model = tiny_model(model_class, config_class)
    for refine_steps in (0, 6):
        batch = model.sample(3, generator=torch.Generator().manual_seed(4), temperature=[1.0, 0.6, 0.3],
                             refine_steps=refine_steps, refine_temperature=0.0)
        assert batch.shape == (9, 2, 3, 3)
        for index, temperature in enumerate((1.0, 0.6, 0.3)):
            alone = model.sample(3, generator=torch.Generator().manual_seed(4), temperature=temperature,
                                 refine_steps=refine_steps, refine_temperature=0.0)
            torch.testing.assert_close(batch[3 * index: 3 * index + 3], alone, rtol=0, atol=1e-5)
    for bad in ([], [1.0, 0.0], -1.0):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            model.sample(2, temperature=bad)


@pytest.mark.parametrize("model_class,config_class", FLOWS)
def test_refinement_is_reproducible_with_a_generator(model_class, config_class):
    model = tiny_model(model_class, config_class)
    kwargs = dict(refine_steps=10, refine_temperature=1.0, refine_batch_size=2)
    first = model.sample(5, generator=torch.Generator().manual_seed(1), **kwargs)
    again = model.sample(5, generator=torch.Generator().manual_seed(1), **kwargs)
    other = model.sample(5, generator=torch.Generator().manual_seed(2), **kwargs)
    assert torch.equal(first, again) and not torch.equal(first, other)
    # Same starting points, different refinement noise: the noise comes from the generator too.
    torch.manual_seed(0)
    unseeded = model.sample(5, **kwargs)
    assert not torch.equal(first, unseeded)


def test_refinement_leaves_the_model_as_it_was():
    """Training mode, requires_grad, batch-norm statistics, .grad and an optimizer's gradient sink are untouched."""
    model = tiny_model(MAFModel, MAFConfig, normalization="batch_norm").train()
    model.blocks[0].made.layers[1].weight.requires_grad_(False)  # a frozen parameter stays frozen
    sink = []
    for module in model.modules():
        if isinstance(module, MaskedLinear):
            module.weight_gradient_sink = sink
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    model.sample(3, generator=torch.Generator().manual_seed(0), refine_steps=5)
    assert model.training and sink == []
    assert {name: parameter.requires_grad for name, parameter in model.named_parameters()} == flags
    assert all(parameter.grad is None for parameter in model.parameters())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_refinement_runs_under_bf16_autocast():
    model = tiny_model(MAFModel, MAFConfig)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        images = model.sample(4, generator=torch.Generator().manual_seed(0), refine_steps=5)
    assert images.dtype == torch.float32 and bool(torch.isfinite(images).all())


@pytest.mark.parametrize("kwargs,name", [
    (dict(refine_steps=-1), "refine_steps"), (dict(refine_steps=2.5), "refine_steps"),
    (dict(refine_steps=True), "refine_steps"),
    (dict(refine_steps=3, refine_step_size=0.0), "refine_step_size"),
    (dict(refine_steps=3, refine_step_size=float("nan")), "refine_step_size"),
    (dict(refine_steps=3, refine_step_size=float("inf")), "refine_step_size"),
    (dict(refine_steps=3, refine_temperature=-0.1), "refine_temperature"),
    (dict(refine_steps=3, refine_temperature=float("nan")), "refine_temperature"),
    (dict(refine_steps=3, refine_batch_size=0), "refine_batch_size"),
])
def test_bad_refinement_arguments_are_rejected_by_name(kwargs, name):
    model = tiny_model(MAFModel, MAFConfig)
    with pytest.raises(ValueError, match=name):
        model.sample(2, **kwargs)


# ------------------------------------------------------------------------------------------------- measures


def test_measures_of_known_images():
    flat = torch.full((2, 3, 6, 6), 0.5)
    checker = ((torch.arange(6)[:, None] + torch.arange(6)[None, :]) % 2).float().expand(1, 3, 6, 6)
    assert torch.equal(roughness(flat), torch.zeros(2))
    torch.testing.assert_close(roughness(checker), torch.tensor([4 * 255.0]))  # |4 * 1 - 0| or |0 - 4 * 1|
    pair = torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2)])
    assert mean_pairwise_distance(pair) == pytest.approx(math.sqrt(12))
    distances = nearest_distances(torch.cat([pair[:1], pair[:1] + 0.5]), pair)
    torch.testing.assert_close(distances, torch.tensor([0.0, 0.5 * math.sqrt(12)], dtype=torch.float64))
    assert torch.equal(quantize(torch.tensor([0.6 / 255, 1.2, -0.1])), torch.tensor([1 / 255, 1.0, 0.0]))


def test_sample_quality_flags_copies_of_training_images():
    model = tiny_model(MAFModel, MAFConfig)
    generator = torch.Generator().manual_seed(0)
    reference = ReferenceImages(train=quantize(torch.rand(6, 2, 3, 3, generator=generator)),
                                test_good=quantize(torch.rand(2, 2, 3, 3, generator=generator)))
    statistics = reference_statistics(model, reference)
    copies = sample_quality(model, reference.train[:3], reference, statistics)
    assert copies["nearest_train_distance"]["max"] == 0 and copies["min_nearest_train_distance_vs_test_good_min"] == 0
    expected_bits = -mean_log_prob(model, reference.train[:3]) / (18 * math.log(2))
    assert copies["bits_per_dim"]["mean"] == pytest.approx(expected_bits)
    alone = sample_quality(model, reference.train[:3])
    assert "roughness_vs_train" not in alone and "nearest_train_distance" not in alone and "roughness" in alone


# ----------------------------------------------------------------------------------------- scripts, study


def run(args):
    if str(args[0]).startswith("scripts/"):  # in this process (tests/script_runner.py); a benchmark: its own
        return run_in_process(os.path.basename(args[0]), *args[1:])
    # The child sees this checkout first, and whatever else the parent's PYTHONPATH holds (packages installed there).
    env = dict(os.environ, TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MAF trained for one epoch on a synthetic MVTec category: (model folder, data folder)."""
    root = tmp_path_factory.mktemp("refine")
    category = make_mvtec_category(str(root / "capsule"), size=8, num_train=8, num_test_good=3)
    model_dir = root / "maf"
    run(["scripts/train_maf.py", "--data_dir", category, "--output_dir", model_dir, "--num_train_epochs", 1,
         "--image_size", 8, "--hidden_sizes", 16, 16, "--num_blocks", 2, "--per_device_train_batch_size", 4])
    return model_dir, category


def test_sample_maf_writes_exact_and_refined_grids_and_measures(trained, tmp_path):
    model_dir, category = trained
    out = tmp_path / "with_data"
    run(["scripts/sample_maf.py", "--model_name_or_path", model_dir, "--output_dir", out, "--num_samples", 3,
         "--refine_steps", 4, "--data_dir", category])
    report = json.loads((out / "samples.json").read_text())
    assert report["reference"]["num_train_images"] == 8 and report["reference"]["num_test_good_images"] == 3
    assert report["refinement"] == {"refine_steps": 4}
    (entry,) = report["runs"]
    for measures in (entry["measures"], entry["refined"]["measures"]):
        for key in ("roughness_vs_train", "diversity_vs_train", "nearest_train_distance_vs_test_good"):
            assert math.isfinite(measures[key]) and measures[key] >= 0, key
        assert len(measures["bits_per_dim_per_sample"]) == 3
    assert entry["refined"]["seconds_total"] > 0
    for name in ("samples_t1.png", "refined_t1.png", "exact_vs_refined_t1.png", "refined_t1_2.png", "sample_t1_0.png"):
        assert (out / name).stat().st_size > 100, name

    out = tmp_path / "without_data"
    run(["scripts/sample_maf.py", "--model_name_or_path", model_dir, "--output_dir", out, "--num_samples", 2,
         "--refine_steps", 0])
    report = json.loads((out / "samples.json").read_text())
    assert "omitted" in report["reference"] and "refined" not in report["runs"][0]
    assert report["temperatures_in_one_batch"] is False
    assert "roughness_vs_train" not in report["runs"][0]["measures"] and not (out / "refined_t1.png").exists()


def test_sample_study_smoke(trained, tmp_path):
    model_dir, category = trained
    result = run(["benchmarks/maf_sample_study.py", "--model_dirs", model_dir, "--data_dir", category,
                  "--output_dir", tmp_path, "--num_samples", 3, "--steps", 2, 4, "--step_sizes", 0.05,
                  "--refine_temperatures", 0, 0.5, "--device", "cpu"])
    study = json.loads((tmp_path / "study.json").read_text())
    runs = study["models"]["maf"]["runs"]
    assert [run["label"] for run in runs] == ["exact", "K=2 eps=0.05 tau=0", "K=2 eps=0.05 tau=0.5",
                                              "K=4 eps=0.05 tau=0", "K=4 eps=0.05 tau=0.5"]
    for entry in runs:
        assert set(entry["criteria"]) == {"roughness", "diversity", "not_copies", "bits_per_dim", "seconds"}
        assert entry["passes"] == all(entry["criteria"].values())
    assert study["per_setting"]["exact"]["models"] == 1
    assert (tmp_path / "maf.png").stat().st_size > 1000 and (tmp_path / "maf.json").is_file()
    assert "K=4 eps=0.05 tau=0.5" in result.stdout


def test_compare_batched_refinement_smoke(trained, tmp_path):
    model_dir, _ = trained
    run(["benchmarks/compare_batched_refinement.py", "--model_name_or_path", model_dir, "--output_dir", tmp_path,
         "--num_samples", 2, "--steps", 0, 3, "--device", "cpu"])
    report = json.loads((tmp_path / "compare_batched_refinement.json").read_text())
    exact, refined, without_graphs = report["results"]
    assert (exact["steps"], refined["steps"], without_graphs["steps"]) == (0, 3, 3)
    assert without_graphs["cuda_graphs"] is False
    assert max(exact["max_pixel_difference"]) < 1e-5 and len(exact["bits_per_dim_batch"]) == 2
    assert exact["bits_per_dim_batch"] == pytest.approx(exact["bits_per_dim_separate"], abs=1e-4)


def test_labelled_grids_go_side_by_side(tmp_path):
    from PIL import Image

    from hf_dgm_training import save_labelled_grids

    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "pair.png"
    save_labelled_grids([("exact", images), ("refined", images.flip(0))], str(path), nrow=5)
    width, height = Image.open(path).size
    assert width > 2 * height  # two one-row grids next to each other, titles above
    save_labelled_grids([("a", images), ("b", images), ("c", images)], str(path), nrow=5, panels_per_row=1)
    width, height = Image.open(path).size
    assert height > width / 3
    with pytest.raises(ValueError, match="no panels"):
        save_labelled_grids([], str(path), nrow=5)
