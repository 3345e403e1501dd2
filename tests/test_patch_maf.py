"""Patch MAF/IAF (MAFConfig.patch_size): config checks, log p(patch | location), per-pixel maps folded from
overlapping patches, the patch-z-top3 score, patch-mosaic samples, MaskedAdam, save/load and the scripts (CPU, tiny:
8x8 images, 4x4 patches at stride 2, 9 locations)."""

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

from hf_dgm_training.maf.masked_adam import MaskedAdam
from modeling_maf import IAFConfig, IAFModel, MAFConfig, MAFModel
from modeling_maf.anomaly_scores import ANOMALY_SCORES, PATCH_GRID, NLLMaps, compute_score
from modeling_maf.modeling_maf import MaskedLinear
from script_runner import run_in_process
from synthetic_data import make_mvtec_category
from tiny_models import randomize_flow


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOWS = [(MAFModel, MAFConfig), (IAFModel, IAFConfig)]
PATCH = dict(image_size=8, num_channels=2, hidden_sizes=[16, 16], num_blocks=2, patch_size=4, patch_stride=2)


def patch_model(model_class=MAFModel, config_class=MAFConfig, seed=0, std=0.1, **overrides):
    """A tiny patch flow with random weights on its connections and random location embeddings."""
    model = model_class(config_class(**{**PATCH, **overrides}))
    return randomize_flow(model, seed, std, other_std=1.0).eval()


def images(count, seed, size=8, channels=2):
    return torch.rand(count, channels, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- config


def test_config_defaults_validation_and_serialisation(tmp_path):
    config = MAFConfig(image_size=8, patch_size=4)
    assert (config.patch_stride, config.num_features, config.patch_grid_size, config.num_patch_locations) == \
        (2, 3 * 16, 3, 9)
    whole = MAFConfig(image_size=8)
    assert (whole.patch_size, whole.patch_stride, whole.num_features, whole.num_patch_locations) == (None, None, 192, 1)
    assert not any(isinstance(m, torch.nn.Embedding) for m in MAFModel(MAFConfig(image_size=4, num_blocks=1,
                                                                                hidden_sizes=[8])).modules())
    for fields, match in [
        (dict(patch_size=9), "exceeds `image_size` 8"),
        (dict(patch_size=0), "patch_size"),
        (dict(patch_size=4, patch_stride=0), "patch_stride"),
        (dict(patch_size=4, patch_stride=5), "exceeds `patch_size` 4"),
        (dict(patch_size=5, patch_stride=2), r"strides that fit: \[1, 3\]"),
        (dict(patch_stride=2), "needs a `patch_size`"),
        (dict(patch_size=4, condition_on_position="yes"), "condition_on_position"),
        (dict(patch_size=1, num_channels=1), "at least 2 dimensions"),
    ]:
        with pytest.raises(ValueError, match=match):
            MAFConfig(image_size=8, **fields)
    config.save_pretrained(tmp_path)
    loaded = MAFConfig.from_pretrained(tmp_path)
    assert (loaded.patch_size, loaded.patch_stride, loaded.condition_on_position) == (4, 2, True)
    # A config saved before patches existed loads as a whole-image flow.
    saved = json.loads((tmp_path / "config.json").read_text())
    for key in ("patch_size", "patch_stride", "condition_on_position"):
        saved.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert MAFConfig.from_pretrained(tmp_path).patch_size is None


# --------------------------------------------------------------------------------------------- the density


@pytest.mark.parametrize("model_class,config_class", FLOWS)
def test_made_is_autoregressive_within_a_patch_and_decode_inverts_encode(model_class, config_class):
    model = patch_model(model_class, config_class, std=0.3).double()
    locations = torch.tensor([4])
    for block in model.blocks:
        degrees = block.input_degrees
        inputs = torch.randn(1, model.config.num_features, dtype=torch.float64)
        for output_index in range(2):
            jacobian = torch.autograd.functional.jacobian(lambda v: block(v, locations)[output_index][0], inputs)[:, 0]
            forbidden = degrees[None, :] >= degrees[:, None]
            assert torch.all(jacobian[forbidden] == 0) and jacobian[~forbidden].abs().sum() > 0
    pixels = images(3, 1).double()
    latents = model.encode(pixels)
    assert latents.shape == (3, 9, 32)
    torch.testing.assert_close(model.decode(latents), pixels, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"\(batch, 9, 32\)"):
        model.decode(latents[:, 0])


def test_position_conditioning_changes_log_prob_by_location():
    model = patch_model()
    same = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(3)).repeat(1, 1, 2, 2)  # periodic: patches
    per_patch = model.nll_maps(same).patch.flatten()  # at locations (0, 0), (0, 2), (2, 0), (2, 2) are identical
    assert len({round(float(per_patch[i]), 4) for i in (0, 2, 6, 8)}) == 4
    unconditioned = patch_model(condition_on_position=False)
    assert not any(isinstance(m, torch.nn.Embedding) for m in unconditioned.modules())
    per_patch = unconditioned.nll_maps(same).patch.flatten()
    assert torch.equal(per_patch[[0, 2, 6, 8]], per_patch[[0, 0, 0, 0]])
    # Fresh models start unconditioned: the embedding is zero-initialised.
    fresh = MAFModel(MAFConfig(**PATCH))
    assert all(not m.weight.any() for m in fresh.modules() if isinstance(m, torch.nn.Embedding))


def test_forward_shapes_loss_and_log_prob_per_image():
    model = patch_model()
    pixels = images(3, 2)
    output = model(pixels)
    assert output.log_prob.shape == (3,) and output.latents.shape == (3, 9, 32)
    # By hand: every patch through the flow at its location.
    patches = F.unfold(pixels, 4, stride=2).transpose(1, 2).reshape(27, 32)
    locations = torch.arange(9).repeat(3)
    logits, log_det = model._pixels_to_logits(patches, random_dequantization=False)
    latents, flow_log_det = model._flow_density(logits, locations)
    patch_log_prob = (-0.5 * latents.square() - 0.5 * torch.log(torch.tensor(2 * torch.pi)) + flow_log_det
                      + log_det).sum(1)
    torch.testing.assert_close(output.log_prob, patch_log_prob.view(3, 9).mean(1))
    torch.testing.assert_close(output.loss, -patch_log_prob.mean())
    torch.testing.assert_close(output.bits_per_dim, -output.log_prob / (32 * torch.log(torch.tensor(2.0))))
    torch.testing.assert_close(model.nll_maps(pixels).patch, -patch_log_prob.view(3, 3, 3))


def test_pixel_maps_average_overlapping_patches_and_a_pixel_moves_only_its_patches():
    model = patch_model()
    pixels = images(2, 4)
    maps = model.nll_maps(pixels)
    assert maps.pixel.shape == (2, 8, 8) and maps.patch.shape == (2, 3, 3)
    # By hand: a corner pixel is in one patch, pixel (2, 2) in four (locations (0,0), (0,1), (1,0), (1,1)).
    per_dimension = -model._deterministic_per_dimension(pixels).view(2, 9, 2, 4, 4).sum(2)  # (B, L, 4, 4)
    torch.testing.assert_close(maps.pixel[:, 0, 0], per_dimension[:, 0, 0, 0])
    expected = (per_dimension[:, 0, 2, 2] + per_dimension[:, 1, 2, 0] + per_dimension[:, 3, 0, 2]
                + per_dimension[:, 4, 0, 0]) / 4
    torch.testing.assert_close(maps.pixel[:, 2, 2], expected)

    changed = pixels.clone()
    changed[:, :, 1, 1] = 1 - changed[:, :, 1, 1]  # pixel (1, 1) lies only in the patch at location (0, 0)
    after = model.nll_maps(changed)
    moved = (after.pixel - maps.pixel).abs().amax(0) > 0
    covering = torch.zeros(8, 8, dtype=torch.bool)
    covering[:4, :4] = True
    assert moved[1, 1] and not moved[~covering].any()
    moved_patches = (after.patch - maps.patch).abs().amax(0).flatten() > 0
    assert moved_patches.tolist() == [True] + [False] * 8


# --------------------------------------------------------------------------------------------------- samples


@pytest.mark.parametrize("model_class,config_class", FLOWS)
def test_sample_mosaic_is_reproducible_and_refinement_raises_its_log_density(model_class, config_class):
    model = patch_model(model_class, config_class, std=0.2)
    draw = lambda **kw: model.sample(3, generator=torch.Generator().manual_seed(0), **kw)  # noqa: E731
    exact = draw()
    assert exact.shape == (3, 2, 8, 8) and 0 <= float(exact.min()) and float(exact.max()) <= 1
    assert torch.equal(exact, draw())
    # The mosaic's patches sit at locations (0, 0), (0, 2), (2, 0), (2, 2) of the 3x3 grid.
    mosaic_log_p = lambda x: -model.nll_maps(x).patch[:, ::2, ::2].sum(dim=(1, 2)).mean()  # noqa: E731
    refined = draw(refine_steps=40, refine_temperature=0.0,
                   refine_step_size=0.05 if model_class is MAFModel else 0.1)
    assert refined.shape == exact.shape and torch.equal(refined, draw(refine_steps=40, refine_temperature=0.0,
                                                                      refine_step_size=0.05 if model_class is MAFModel
                                                                      else 0.1))
    assert mosaic_log_p(refined) > mosaic_log_p(exact)
    with pytest.raises(ValueError, match="patch_size % patch_stride == 0"):
        patch_model(model_class, config_class, patch_size=5, patch_stride=3).sample(1)


def test_mosaic_patches_are_drawn_at_their_locations():
    model = patch_model()
    latents = torch.randn(2, 4 * 32, generator=torch.Generator().manual_seed(1))
    images_ = model.sample(2, generator=torch.Generator().manual_seed(1))
    rows = latents.view(8, 32)
    locations = torch.tensor([0, 2, 6, 8]).repeat(2)
    patches = model._logits_to_pixels(model._flow_generate(rows, locations=locations)[0]).view(2, 4, 2, 4, 4)
    torch.testing.assert_close(images_[:, :, 4:, :4], patches[:, 2])  # bottom-left tile = location (2, 0)


# ------------------------------------------------------------------------------------------ anomaly scores


def test_calibrate_and_predict_with_the_patch_score_by_hand():
    model = patch_model()
    good = images(8, 5)
    calibration = model.calibrate(good, target_fpr=0.25, method="patch-z-top3")
    assert set(calibration["thresholds"]) == set(ANOMALY_SCORES) and calibration["method"] == "patch-z-top3"
    good_patch = model.nll_maps(good).patch.double()
    torch.testing.assert_close(model.anomaly_statistics.patch_location_mean, good_patch.mean(0).float())
    test = images(4, 6)
    test[2:, :, 4:8, 4:8] = 1.0
    prediction = model.predict_anomalies(test)
    z = (model.nll_maps(test).patch - model.anomaly_statistics.patch_location_mean) / \
        model.anomaly_statistics.patch_location_std
    torch.testing.assert_close(prediction.scores, z.flatten(1).topk(3, dim=1).values.mean(1))
    assert prediction.maps.shape == (4, 8, 8) and prediction.threshold == calibration["thresholds"]["patch-z-top3"]
    torch.testing.assert_close(prediction.maps[:, 0, 0], z[:, 0, 0])  # a corner pixel: its one patch's z
    assert torch.equal(prediction.is_anomalous, prediction.scores.double() > prediction.threshold)
    for name in ANOMALY_SCORES:  # every score works on a patch model, maps at the pixel grid
        assert model.anomaly_maps(test, method=name).shape == (4, 8, 8), name
    with pytest.raises(ValueError, match="reads the per-patch NLL"):
        compute_score("patch-z-top3", model.nll_maps(test).pixel, model.anomaly_score_parameters,
                      model.anomaly_statistics.get()[PATCH_GRID])


def test_the_default_score_of_a_calibration_is_chosen_per_kind_of_flow():
    """calibrate() without a method makes patch-z-top3 the default of a patch flow and nll that of a whole-image flow
    (each chosen by measurement); a named method still wins."""
    good = images(6, 7)
    assert patch_model().default_anomaly_score == "patch-z-top3"
    assert patch_model().calibrate(good)["method"] == "patch-z-top3"
    assert patch_model(patch_size=None, patch_stride=None).calibrate(good)["method"] == "nll"
    assert patch_model().calibrate(good, method="map-max")["method"] == "map-max"


def test_whole_image_patch_score_is_the_z_score_of_the_nll():
    model = patch_model(patch_size=None, patch_stride=None)
    good = images(6, 7)
    model.calibrate(good)
    nll = model.anomaly_scores(good, "nll").double()
    test = images(3, 8)
    nll_maps = model.nll_maps(test)
    assert isinstance(nll_maps, NLLMaps) and nll_maps.patch.shape == (3, 1, 1)
    z = (model.anomaly_scores(test, "nll").double() - nll.mean()) / nll.std()
    torch.testing.assert_close(model.anomaly_scores(test, "patch-z-top3").double(), z, rtol=1e-4, atol=1e-4)


def test_save_load_round_trip_gives_identical_log_prob_and_scores(tmp_path):
    model = patch_model()
    model.calibrate(images(6, 9), target_fpr=0.2, method="patch-z-top3")
    model.save_pretrained(tmp_path)
    loaded = MAFModel.from_pretrained(tmp_path).eval()
    assert loaded.config.patch_size == 4 and loaded.is_patch_model
    test = images(3, 10)
    assert torch.equal(loaded(test).log_prob, model(test).log_prob)
    for name in ANOMALY_SCORES:
        expected, actual = model.predict_anomalies(test, name), loaded.predict_anomalies(test, name)
        assert torch.equal(expected.scores, actual.scores) and torch.equal(expected.maps, actual.maps), name
        assert torch.equal(expected.is_anomalous, actual.is_anomalous), name


def test_a_calibration_made_before_the_patch_score_asks_for_a_new_one():
    model = patch_model(patch_size=None, patch_stride=None)
    model.calibrate(images(6, 7))
    del model.config.anomaly_calibration["thresholds"]["patch-z-top3"]
    assert "patch-z-top3" not in model.available_anomaly_scores
    with pytest.raises(ValueError, match="calibrate"):
        model.anomaly_scores(images(2, 1), "patch-z-top3")


# --------------------------------------------------------------------------------------------------- training


def test_masked_adam_trains_a_patch_model_like_torch_adam():
    reference = patch_model(std=0.05)
    model = copy.deepcopy(reference)
    adam = torch.optim.Adam(reference.parameters(), lr=1e-2)
    masked = MaskedAdam(model, lr=1e-2, backend="torch")
    embedding = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
    initial_embedding = embedding.weight.detach().clone()
    data = [images(2, seed) for seed in range(4)]
    losses = {}
    for name, net, optimizer in (("adam", reference, adam), ("masked", model, masked)):
        net.train()
        torch.manual_seed(5)  # the same dequantisation noise
        losses[name] = []
        for batch in data:
            loss = net(batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    assert losses["masked"] == pytest.approx(losses["adam"], rel=1e-5)
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert not torch.equal(embedding.weight, initial_embedding)  # an ordinary parameter, updated by plain Adam
    for layer in (m for m in model.modules() if isinstance(m, MaskedLinear)):
        assert layer.weight.grad is None and not layer.weight[~layer.mask()].any()
    assert model.zero_absent_connections() == 0


def run(script, *args):
    return run_in_process(script, *args)


def test_train_sample_detect_a_patch_model_through_the_scripts(tmp_path):
    data = make_mvtec_category(str(tmp_path / "capsule"), size=8, num_train=12, num_test_good=3,
                               defects=(("crack", 3),))
    out = tmp_path / "patch"
    run("train_maf.py", "--data_dir", data, "--output_dir", out, "--num_train_epochs", 2, "--image_size", 8,
        "--hidden_sizes", 16, 16, "--num_blocks", 2, "--per_device_train_batch_size", 4, "--patch_size", 4,
        "--patch_stride", 2, "--validation_split_percentage", 30)
    results = json.loads((out / "train_results.json").read_text())
    assert results["patch_model"]["patch_size"] == 4 and results["patch_model"]["patches_per_image"] == 9
    assert results["config"]["patch_size"] == 4 and 0 < results["final_train_bits_per_dim"] < 20
    assert "patch-z-top3" in results["anomaly_calibration"]["thresholds"]
    assert results["anomaly_calibration"]["method"] == "patch-z-top3"  # a patch model's default score
    assert "a density of patches, not of whole images" in (out / "README.md").read_text()
    run("sample_maf.py", "--model_name_or_path", out, "--num_samples", 2, "--refine_steps", 3)
    assert json.loads((out / "samples" / "samples.json").read_text())["patch_mosaic"] is True
    run("detect_anomalies.py", "--model_name_or_path", out, "--data_dir", data)
    report = json.loads((out / "anomaly" / "anomaly_report.json").read_text())
    assert report["score"] == "patch-z-top3" and 0 <= report["image_auroc"] <= 1
    assert "patch-z-top3" in report["per_image"][0]

    unconditioned = tmp_path / "unconditioned"
    run("train_maf.py", "--data_dir", data, "--output_dir", unconditioned, "--num_train_epochs", 1, "--image_size", 8,
        "--hidden_sizes", 16, 16, "--num_blocks", 2, "--patch_size", 4, "--condition_on_position", "false")
    assert json.loads((unconditioned / "config.json").read_text())["condition_on_position"] is False
