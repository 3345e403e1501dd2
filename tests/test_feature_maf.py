"""The feature-space MAF detector (FeatureMAFModel): config, save/load, the loopback Hub with remote code, a
transformers backbone in place of EfficientNet-Lite, training through train_maf.py and scoring through
detect_anomalies.py, and the pipeline. Tiny random backbones: no weights are needed."""

import json
import math

import pytest
import torch
from transformers import AutoModel, ResNetConfig, pipeline

from child_process import run_without_hf_dgm
from modeling_maf import EfficientNetLiteConfig, FeatureMAFConfig, FeatureMAFModel
from synthetic_data import make_mvtec_category
from tiny_models import randomize_flow


def tiny_config(**overrides):
    backbone = EfficientNetLiteConfig(width_coefficient=0.25, depth_coefficient=0.25, out_features=["stage3", "stage5"])
    fields = {**dict(backbone_config=backbone, image_size=32, hidden_sizes=[16, 16], num_blocks=2), **overrides}
    return FeatureMAFConfig(**fields)


def tiny_detector(seed=0, **overrides):
    torch.manual_seed(seed)
    # blocks away from the identity (the frozen backbone keeps its weights)
    model = randomize_flow(FeatureMAFModel(tiny_config(**overrides)), seed, std=0.05, other_std=0.05)
    # statistics away from (0, 1) and per-location Gaussians away from the identity
    model.fit_feature_statistics(random_features(model, 12, seed))
    return model.eval()


def random_features(model, count, seed=0):
    """Correlated, offset feature maps (count, D, h, w) of `model`'s shape."""
    generator = torch.Generator().manual_seed(seed)
    height, width = model.feature_grid
    mixing = torch.randn(model.num_features, model.num_features, generator=generator)
    vectors = torch.randn(count, height, width, model.num_features, generator=generator) @ mixing
    return (vectors + torch.randn(model.num_features, generator=generator)).permute(0, 3, 1, 2)


def test_shapes_and_feature_grid():
    model = tiny_detector()
    # stage3 (stride 8) and stage5 (stride 16) of 32x32 images: a 4x4 grid of concatenated vectors.
    assert model.feature_grid == (4, 4)
    assert model.num_features == sum(model.backbone.channels)
    images = torch.rand(3, 3, 32, 32)
    output = model(images)
    assert output.nll_map.shape == (3, 4, 4) and output.log_prob.shape == (3,)
    assert torch.allclose(output.loss, output.nll_map.mean())
    maps = model.nll_maps(images)
    assert maps.pixel.shape == (3, 32, 32) and maps.patch.shape == (3, 4, 4)


def test_log_prob_is_a_normalised_density_of_vectors_per_location():
    """With identity blocks, log p is the standard normal of the standardised vector (change of variables through
    the standardisation excluded, as documented), so the flow's log-det bookkeeping is checked against it."""
    model = FeatureMAFModel(tiny_config()).eval()  # fresh: every block is the identity
    vectors = torch.randn(10, model.num_features)
    locations = torch.zeros(10, dtype=torch.long)
    expected = -0.5 * vectors.square().sum(1) - 0.5 * model.num_features * math.log(2 * math.pi)
    assert torch.allclose(model.vector_log_prob(vectors, locations), expected, atol=1e-4)


def test_location_whitening_makes_the_fresh_flow_the_gaussian_of_each_location():
    """With identity blocks, log p(vector | location) is the log density of the standardised vector under the
    Gaussian fitted to that location's training vectors, with the shrunk covariance the config describes; computed
    here independently with torch.distributions."""
    model = FeatureMAFModel(tiny_config(whitening_shrinkage=0.3, whitening_ridge=0.05)).eval()
    features = random_features(model, 40)
    model.fit_feature_statistics(features)
    test = random_features(model, 3, seed=1)
    vectors, locations = model.vectors(test)
    log_prob = model.vector_log_prob(vectors, locations).view(3, -1)
    standardised = ((features.flatten(2).transpose(1, 2) - model.feature_mean) / model.feature_std).double()
    test_standardised = ((test.flatten(2).transpose(1, 2) - model.feature_mean) / model.feature_std).double()
    covariances = torch.stack([torch.cov(standardised[:, location].T) for location in range(standardised.shape[1])])
    covariances = 0.7 * covariances + 0.3 * covariances.mean(0) + 0.05 * torch.eye(model.num_features)
    for location in range(standardised.shape[1]):
        gaussian = torch.distributions.MultivariateNormal(standardised[:, location].mean(0), covariances[location])
        expected = gaussian.log_prob(test_standardised[:, location]).float()
        assert torch.allclose(log_prob[:, location], expected, rtol=1e-4, atol=1e-3), location


@pytest.mark.parametrize("radius", [1, 2])
def test_position_tolerance_scores_the_mean_density_of_the_neighbouring_locations(radius):
    """With position_tolerance r, log p(x | l) is the log of the mean over the locations l' within r rows and columns
    of l inside the grid of p(x | l'), each read with l''s whitening and position; computed here location by location
    from the tolerance-free model's vector_log_prob."""
    tolerant = tiny_detector(seed=3, position_tolerance=radius)
    plain = tiny_detector(seed=3)
    assert torch.equal(tolerant.whitening_matrix, plain.whitening_matrix)
    features = random_features(plain, 2, seed=4)
    height, width = plain.feature_grid
    standardised = plain._standardise(features)
    expected = torch.empty(2, height, width)
    for row in range(height):
        for column in range(width):
            densities = []
            for source_row in range(max(row - radius, 0), min(row + radius, height - 1) + 1):
                for source_column in range(max(column - radius, 0), min(column + radius, width - 1) + 1):
                    source = source_row * width + source_column
                    whitened = (standardised[:, row * width + column] - plain.whitening_mean[source]) \
                        @ plain.whitening_matrix[source].T
                    densities.append(plain.vector_log_prob(whitened, torch.full((2,), source)))
            expected[:, row, column] = torch.logsumexp(torch.stack(densities), 0) - math.log(len(densities))
    with torch.no_grad():
        assert torch.allclose(tolerant(features=features).nll_map, -expected, atol=1e-4)
        assert not torch.allclose(plain(features=features).nll_map, -expected, atol=1e-2)
    assert FeatureMAFConfig.from_dict(tolerant.config.to_dict()).position_tolerance == radius
    with pytest.raises(ValueError, match="position_tolerance must be >= 0, got -1"):
        tiny_config(position_tolerance=-1)


def test_the_flow_learns_from_out_of_fold_whitened_vectors():
    """out_of_fold_vectors whitens every image by the Gaussians of the other folds' images, not its own."""
    model = tiny_detector()
    features = random_features(model, 10, seed=2)
    model.fit_feature_statistics(features)
    vectors, locations = model.out_of_fold_vectors(features, num_folds=2)
    in_sample, same_locations = model.vectors(features)
    assert torch.equal(locations, same_locations) and vectors.shape == in_sample.shape
    mean, whitening = model._fit_whitening(features[1::2])  # fold 1's Gaussians whiten fold 0
    expected = model._whiten(model._standardise(features[0::2]), mean, whitening)
    per_image = vectors.view(10, -1, model.num_features)
    assert torch.allclose(per_image[0::2], expected, atol=1e-5)
    assert not torch.allclose(per_image, in_sample.view(10, -1, model.num_features), atol=1e-2)
    # unseen vectors look like out-of-fold ones, not like in-sample ones: larger than white
    assert per_image.square().mean() > in_sample.square().mean()


def test_cpu_feature_extraction_in_chunks_gives_every_image_its_own_features_in_order():
    from modeling_maf.modeling_feature_maf import CPU_BACKBONE_BATCH_SIZE

    model = tiny_detector()
    images = torch.rand(2 * CPU_BACKBONE_BATCH_SIZE + 3, 3, 32, 32)  # two full chunks and a partial one
    together = model.extract_features(images)
    one_by_one = torch.cat([model.extract_features(image[None]) for image in images])
    assert together.shape[0] == images.shape[0]
    torch.testing.assert_close(together, one_by_one, rtol=1e-5, atol=1e-5)


def test_backbone_padding_reads_the_reflected_image_and_crops_to_the_image_own_locations():
    """With backbone_padding p the features are those of the image reflected by p pixels on every side, read by the
    same backbone at S + 2p, cropped back to the image's own grid; p that is not a whole number of grid cells is
    refused in one line."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    padded = FeatureMAFModel(tiny_config(backbone_padding=16)).eval()
    plain = FeatureMAFModel(tiny_config(image_size=64)).eval()  # the same backbone at the padded size
    plain.backbone.load_state_dict(padded.backbone.state_dict())
    assert padded.feature_grid == FeatureMAFModel(tiny_config()).feature_grid == (4, 4)
    images = torch.rand(2, 3, 32, 32)
    expected = plain.extract_features(F.pad(images, (16,) * 4, mode="reflect"))[..., 2:-2, 2:-2]  # 16 px: 2 cells of 8
    torch.testing.assert_close(padded.extract_features(images), expected)
    unpadded = FeatureMAFModel(tiny_config()).eval()
    unpadded.backbone.load_state_dict(padded.backbone.state_dict())
    assert not torch.allclose(unpadded.extract_features(images), expected)  # the border's context changed
    with pytest.raises(ValueError, match=r"backbone_padding=4 is not a whole number of feature grid cells \(8 pixels "
                                         r"each\): set it to a multiple of the grid.s stride \(e.g. 8\), or 0"):
        FeatureMAFModel(tiny_config(backbone_padding=4))


def test_image_statistics_make_the_features_blind_to_a_global_lighting_change(tmp_path):
    """Fitted reference channel statistics: a brighter/darker image or a colour cast gives the same features; without
    them the features move. The references travel in config.json."""
    model = tiny_detector()
    images = torch.rand(6, 3, 32, 32) * 0.6 + 0.2
    relit = images * 0.8
    relit[:, 2] += 0.05  # a colour cast on one channel
    assert model.config.image_reference_mean is None
    assert not torch.allclose(model.extract_features(images), model.extract_features(relit), atol=1e-3)
    model.fit_image_statistics(images)
    expected_mean = images.mean(dim=(2, 3)).mean(dim=0)
    assert torch.allclose(torch.tensor(model.config.image_reference_mean), expected_mean, atol=1e-6)
    torch.testing.assert_close(model.extract_features(relit), model.extract_features(images), rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path)
    loaded = FeatureMAFModel.from_pretrained(tmp_path).eval()
    assert loaded.config.image_reference_std == model.config.image_reference_std
    torch.testing.assert_close(loaded.extract_features(relit), model.extract_features(images), rtol=1e-4, atol=1e-4)
    off = FeatureMAFModel(tiny_config(normalize_image_statistics=False))
    off.fit_image_statistics(images)
    assert off.config.image_reference_mean is None


def test_a_whitening_too_large_to_store_is_refused(monkeypatch):
    import modeling_maf.modeling_feature_maf as module

    monkeypatch.setattr(module, "MAX_WHITENING_NUMBERS", 100)
    with pytest.raises(ValueError, match="location_whitening=False"):
        FeatureMAFModel(tiny_config())
    FeatureMAFModel(tiny_config(location_whitening=False))  # the flow alone


def test_save_load_round_trip_with_calibration(tmp_path):
    model = tiny_detector()
    images = torch.rand(8, 3, 32, 32)
    calibration = model.calibrate(images[:5])
    assert calibration["method"] == "map-max"
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "feature_maf" and config["backbone_config"]["model_type"] == "efficientnet_lite"
    assert (tmp_path / "modeling_feature_maf.py").exists() and (tmp_path / "modeling_efficientnet_lite.py").exists()
    loaded = FeatureMAFModel.from_pretrained(tmp_path)
    assert loaded.config.backbone_config.out_features == ["stage3", "stage5"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    expected, actual = model.predict_anomalies(images), loaded.predict_anomalies(images)
    assert torch.allclose(expected.scores, actual.scores) and expected.threshold == actual.threshold
    assert torch.equal(expected.is_anomalous, actual.is_anomalous)


def test_a_transformers_backbone_works_and_round_trips(tmp_path):
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                            out_features=["stage1", "stage2"])
    model = FeatureMAFModel(FeatureMAFConfig(backbone_config=backbone, image_size=32, hidden_sizes=[16, 16],
                                             num_blocks=2)).eval()
    assert model.num_features == 8 + 16 and model.feature_grid == (8, 8)  # stage1 at stride 4, stage2 at 8
    images = torch.rand(2, 3, 32, 32)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, FeatureMAFModel)
    assert torch.allclose(model(images).nll_map, loaded(images).nll_map)


def test_out_indices_choose_the_stages_and_a_timm_backbone_config_needs_no_download():
    assert FeatureMAFConfig(out_indices=[3, 5]).backbone_config.out_features == ["stage3", "stage5"]
    with pytest.raises(ValueError, match="out_features or out_indices, not both"):
        FeatureMAFConfig(out_features=["stage3"], out_indices=[3])
    # A Hub backbone's config is fetched by train_maf.py; until then the stages wait in backbone_kwargs.
    pending = FeatureMAFConfig(backbone="microsoft/resnet-18", out_features=["stage2", "stage3"])
    assert pending.backbone_config is None and pending.backbone_kwargs == {"out_features": ["stage2", "stage3"]}
    timm = FeatureMAFConfig(backbone="resnet18", use_timm_backbone=True, out_indices=[1, 2], image_size=64)
    assert timm.backbone_config.model_type == "timm_backbone" and timm.backbone_config.backbone == "resnet18"
    reloaded = FeatureMAFConfig.from_dict(json.loads(timm.to_json_string()))
    assert reloaded.backbone_config.model_type == "timm_backbone" and reloaded.backbone_config.out_indices == [1, 2]
    assert reloaded.use_timm_backbone
    with pytest.raises(ValueError, match="use_timm_backbone needs backbone"):
        FeatureMAFConfig(use_timm_backbone=True)


def test_train_maf_reads_a_hub_backbone_with_the_stages_asked_for(hub_server, tmp_path):
    """--backbone <Hub id> --out_features ...: the config and the pretrained weights come from the (loopback) Hub,
    and the saved detector holds those weights."""
    from transformers import ResNetBackbone

    import train_maf

    torch.manual_seed(0)
    backbone = ResNetBackbone(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1]))
    repo_id = hub_server.repo_id("resnet-backbone")
    backbone.push_to_hub(repo_id)
    data = make_mvtec_category(tmp_path / "capsule", size=32, num_train=10, num_test_good=2, defects=(("crack", 2),))
    output = tmp_path / "detector"
    train_maf.main(["--flow_type", "feature_maf", "--data_dir", str(data), "--output_dir", str(output),
                    "--backbone", repo_id, "--out_features", "stage1", "stage2", "--image_size", "32",
                    "--backbone_padding", "0",
                    "--hidden_sizes", "16", "16", "--num_blocks", "2", "--num_train_epochs", "1",
                    "--validation_split_percentage", "30"])
    detector = FeatureMAFModel.from_pretrained(output)
    assert detector.config.backbone == repo_id and detector.config.backbone_config.out_features == ["stage1", "stage2"]
    assert detector.num_features == 8 + 16
    pushed = backbone.state_dict()
    for name, tensor in detector.backbone.state_dict().items():
        assert torch.equal(tensor, pushed[name]), name


def test_train_maf_reads_a_timm_backbone_and_its_pretrained_weights(hub_server, tmp_path):
    """--use_timm_backbone --backbone resnet18: transformers' TimmBackbone, with timm's pretrained weights fetched
    from timm's Hub repo (here the loopback Hub's copy); the saved detector reloads without fetching them."""
    timm = pytest.importorskip("timm", reason="timm (and torchvision) not installed")
    from huggingface_hub import HfApi
    from safetensors.torch import save_file

    import train_maf

    torch.manual_seed(0)
    reference = timm.create_model("resnet18", pretrained=False)
    weights_repo = reference.pretrained_cfg["hf_hub_id"]  # timm/resnet18.<tag>
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    api.create_repo(weights_repo, exist_ok=True)
    save_file(reference.state_dict(), tmp_path / "model.safetensors")
    api.upload_file(path_or_fileobj=tmp_path / "model.safetensors", path_in_repo="model.safetensors",
                    repo_id=weights_repo)
    data = make_mvtec_category(tmp_path / "capsule", size=64, num_train=10, num_test_good=2, defects=(("crack", 2),))
    output = tmp_path / "detector"
    train_maf.main(["--flow_type", "feature_maf", "--data_dir", str(data), "--output_dir", str(output),
                    "--backbone", "resnet18", "--use_timm_backbone", "--out_indices", "2", "3", "--image_size", "64",
                    "--hidden_sizes", "16", "16", "--num_blocks", "2", "--num_train_epochs", "1",
                    "--validation_split_percentage", "30"])
    detector = FeatureMAFModel.from_pretrained(output)
    assert detector.config.backbone_config.model_type == "timm_backbone"
    assert detector.num_features == 128 + 256 and detector.feature_grid == (8, 8)  # layer2 at 1/8, layer3 at 1/16
    expected = reference.state_dict()
    for key, tensor in detector.backbone.state_dict().items():
        assert torch.equal(tensor, expected[key.removeprefix("_backbone.")]), key
    images = torch.rand(2, 3, 64, 64)
    assert torch.isfinite(detector.anomaly_scores(images)).all()


def test_train_maf_says_in_one_line_that_a_timm_backbone_needs_timm(tmp_path):
    import importlib.util

    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed here")
    import train_maf
    from hf_dgm_training.errors import UsageError

    data = make_mvtec_category(tmp_path / "capsule", size=32, num_train=6, num_test_good=1, defects=(("crack", 1),))
    with pytest.raises(UsageError, match=r"--use_timm_backbone: .*'resnet18'.*pip install timm"):
        train_maf.main(["--flow_type", "feature_maf", "--data_dir", str(data), "--output_dir", str(tmp_path / "out"),
                        "--backbone", "resnet18", "--use_timm_backbone", "--out_indices", "2", "3",
                        "--image_size", "32", "--backbone_padding", "0"])


def test_backbone_is_frozen_and_stays_in_eval_mode():
    model = tiny_detector().train()
    assert not model.backbone.training
    assert not any(parameter.requires_grad for parameter in model.backbone.parameters())
    assert all(parameter.requires_grad for name, parameter in model.named_parameters()
               if name.startswith("blocks."))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="feature_pooling_size"):
        tiny_config(feature_pooling_size=2)
    with pytest.raises(ValueError, match="anomaly_score"):
        tiny_config(anomaly_score="accuracy")
    with pytest.raises(ValueError, match="image_reference_mean"):
        tiny_config(image_reference_mean=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="whitening_shrinkage"):
        tiny_config(whitening_shrinkage=1.5)
    with pytest.raises(ValueError, match="backbone_padding"):
        tiny_config(backbone_padding=32)  # not smaller than the 32-pixel image


def test_hub_round_trip_and_remote_code_pipeline(hub_server, tmp_path):
    """push_to_hub -> a fresh interpreter without this package builds the pipeline from the repo id."""
    model = tiny_detector()
    images = torch.rand(6, 3, 32, 32)
    model.calibrate(images[:4])
    repo_id = hub_server.repo_id("feature-detector")
    model.push_to_hub(repo_id)
    from modeling_maf import MAFImageProcessor

    MAFImageProcessor(size=32, num_channels=3).push_to_hub(repo_id)
    reloaded = FeatureMAFModel.from_pretrained(repo_id)
    assert torch.allclose(reloaded.anomaly_scores(images), model.anomaly_scores(images))
    from PIL import Image

    image_path = tmp_path / "image.png"
    Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(image_path)
    expected = pipeline("anomaly-detection", model=model, image_processor=MAFImageProcessor(size=32))(str(image_path))
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps({"repo_id": repo_id, "image": str(image_path)}))
    child = """
import json
from transformers import pipeline
job = json.load(open(JOBS))
result = pipeline("anomaly-detection", model=job["repo_id"], trust_remote_code=True)(job["image"])
print(json.dumps({"score": result["score"], "is_anomalous": result["is_anomalous"], "method": result["method"]}))
"""
    reported = run_without_hf_dgm(child, jobs, hub_server, tmp_path / "child_home")
    assert reported["method"] == "map-max" and reported["is_anomalous"] == expected["is_anomalous"]
    assert reported["score"] == pytest.approx(expected["score"], rel=1e-5)


def test_train_maf_trains_the_detector_and_detect_anomalies_reports_it(tmp_path, monkeypatch):
    import detect_anomalies
    import train_maf

    monkeypatch.setattr(FeatureMAFModel, "load_pretrained_backbone", lambda self, *a, **k: None)  # no weights here
    data = make_mvtec_category(tmp_path / "capsule", size=32, num_train=12, num_test_good=2, defects=(("crack", 2),))
    output = tmp_path / "detector"
    train_maf.main(["--flow_type", "feature_maf", "--data_dir", str(data), "--output_dir", str(output),
                    "--image_size", "32", "--backbone_padding", "0",
                    "--hidden_sizes", "16", "16", "--num_blocks", "2", "--num_train_epochs", "2",
                    "--validation_split_percentage", "30"])
    results = json.loads((output / "train_results.json").read_text())
    assert results["flow_type"] == "feature_maf" and results["best_validation_nll"] is not None
    assert results["anomaly_calibration"]["method"] == "map-max"
    assert FeatureMAFModel.from_pretrained(output).config.image_size == 32
    detect_anomalies.main(["--model_name_or_path", str(output), "--data_dir", str(data)])
    report = json.loads((output / "anomaly" / "anomaly_report.json").read_text())
    assert report["score"] == "map-max" and report["image_auroc"] is not None
    assert report["test_good_bits_per_dim"] is None  # no bits/dim for feature vectors


def test_calibration_folds_score_every_training_image_with_a_detector_that_did_not_train_on_it(tmp_path,
                                                                                              monkeypatch):
    import detect_anomalies
    import train_maf

    monkeypatch.setattr(FeatureMAFModel, "load_pretrained_backbone", lambda self, *a, **k: None)
    tasks = []  # (training images, validation images) of every detector the run trains
    original_init = train_maf.FeatureTask.__init__

    def recording_init(self, args, accelerator, model, train_pixels, validation, test_good):
        tasks.append((train_pixels.clone(), validation.clone()))
        original_init(self, args, accelerator, model, train_pixels, validation, test_good)

    monkeypatch.setattr(train_maf.FeatureTask, "__init__", recording_init)
    data = make_mvtec_category(tmp_path / "capsule", size=32, num_train=12, num_test_good=2, defects=(("crack", 2),))
    output = tmp_path / "detector"
    train_maf.main(["--flow_type", "feature_maf", "--data_dir", str(data), "--output_dir", str(output),
                    "--image_size", "32", "--backbone_padding", "0",
                    "--hidden_sizes", "16", "16", "--num_blocks", "2", "--num_train_epochs", "2",
                    "--validation_split_percentage", "30", "--calibration_folds", "2"])
    (main_train, main_validation), folds = tasks[0], tasks[1:]
    assert len(folds) == 2 and len(main_validation) == 4 and len(main_train) == 8
    rows = lambda images: {tuple(image.flatten()[:64].tolist()) for image in images}  # noqa: E731
    scored = [rows(validation) for _, validation in folds]
    assert scored[0].isdisjoint(scored[1]) and scored[0] | scored[1] == rows(main_train)  # each image scored once
    for (train_pixels, validation), held_out in zip(folds, scored):
        assert rows(train_pixels).isdisjoint(held_out) and rows(train_pixels) | held_out == rows(main_train)
    calibration = FeatureMAFModel.from_pretrained(output).config.anomaly_calibration
    assert calibration["num_images"] == 12 and calibration["out_of_fold_images"] == 8
    assert calibration["calibration_folds"] == 2
    assert all((output / "calibration_folds" / f"fold_{k}" / "metrics.jsonl").exists() for k in range(2))
    assert "8 training images scored out of fold" in (output / "README.md").read_text()
    detect_anomalies.main(["--model_name_or_path", str(output), "--data_dir", str(data)])
    assert json.loads((output / "anomaly" / "anomaly_report.json").read_text())["decision_threshold"] is not None


def test_a_grayscale_category_without_masks_is_read_as_rgb(tmp_path, monkeypatch):
    """One-channel categories (MVTec's grid, screw, zipper) train and score: the pretrained backbone reads RGB, so
    the detector's image processor converts gray images at training and at inference alike."""
    import detect_anomalies
    import train_maf

    monkeypatch.setattr(FeatureMAFModel, "load_pretrained_backbone", lambda self, *a, **k: None)
    data = make_mvtec_category(tmp_path / "grid", size=64, num_train=10, num_test_good=2, defects=(("bent", 2),),
                               masks="none", grayscale=True)
    output = tmp_path / "detector"
    train_maf.main(["--flow_type", "feature_maf", "--data_dir", str(data), "--output_dir", str(output),
                    "--image_size", "64", "--hidden_sizes", "16", "16", "--num_blocks", "1", "--num_train_epochs", "1",
                    "--validation_split_percentage", "30"])  # the default backbone_padding: gray images reflected too
    assert json.loads((output / "config.json").read_text())["backbone_padding"] == 32
    assert json.loads((output / "preprocessor_config.json").read_text())["num_channels"] == 3
    detect_anomalies.main(["--model_name_or_path", str(output), "--data_dir", str(data)])
    report = json.loads((output / "anomaly" / "anomaly_report.json").read_text())
    assert report["image_auroc"] is not None and report["pixel_auroc"] is None  # no masks: no pixel AUROC


def test_train_maf_names_its_own_default_padding_apart_from_the_flags_given(tmp_path):
    """Images too small for train_maf.py's default padding of 32: the one-line error names --backbone_padding 32 as
    the script's default, not as a flag the user gave, and the flags the user did give as theirs."""
    from script_runner import run_in_process

    data = make_mvtec_category(tmp_path / "capsule", size=32, num_train=4, num_test_good=1, defects=(("crack", 1),))
    result = run_in_process("train_maf.py", "--flow_type", "feature_maf", "--data_dir", data, "--output_dir",
                            tmp_path / "detector", "--image_size", 32, expect_ok=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith("train_maf.py: error: backbone_padding must be >= 0 and smaller than image_size (32)")
    assert "(from the flags --image_size 32 and this script's defaults --backbone_padding 32 (give a flag to change " \
           "one); see --help)." in lines[-1], lines[-1]


def test_train_maf_refuses_a_whitening_too_large_in_one_line(tmp_path, monkeypatch):
    """Flags that are each valid but build no detector end in one line that names the field and the fix."""
    import modeling_maf.modeling_feature_maf as module
    from script_runner import run_in_process

    monkeypatch.setattr(module, "MAX_WHITENING_NUMBERS", 100)
    data = make_mvtec_category(tmp_path / "capsule", size=32, num_train=4, num_test_good=1, defects=(("crack", 1),))
    result = run_in_process("train_maf.py", "--flow_type", "feature_maf", "--data_dir", data, "--output_dir",
                            tmp_path / "detector", "--image_size", 32, "--backbone_padding", 0,
                            "--use_pretrained_backbone", "false",
                            expect_ok=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith("train_maf.py: error: location_whitening needs") and "--help" in lines[-1], lines
