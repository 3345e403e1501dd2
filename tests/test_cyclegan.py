"""CycleGAN model tests: architecture as the reference, losses, image pool, saving/loading, image processor."""

import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel

import modeling_cyclegan.configuration_cyclegan as configuration_cyclegan
from hf_dgm_training.cyclegan import ImagePool
from modeling_cyclegan import (
    CycleGANConfig,
    CycleGANDiscriminator,
    CycleGANGenerator,
    CycleGANImageProcessor,
    CycleGANModel,
    CycleGANOutput,
    gan_loss,
)
from modeling_cyclegan.image_processing_cyclegan import (
    levels_to_pixel_values,
    pixel_values_to_levels,
    pixel_values_to_unit_interval,
)
from modeling_cyclegan.modeling_cyclegan import DISCRIMINATOR_CLASSES, GENERATOR_CLASSES


def tiny_config(**overrides):
    values = dict(image_size=16, generator_filters=4, num_residual_blocks=1, discriminator_filters=4,
                  discriminator_layers=2)
    values.update(overrides)
    return CycleGANConfig(**values)


def num_parameters(module):
    return sum(parameter.numel() for parameter in module.parameters())


def random_images(n=2, size=16, seed=0, height=None):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, height or size, size, generator=generator) * 2 - 1


# ---------------------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------------------


def test_parameter_counts_equal_the_reference():
    config = CycleGANConfig(image_size=256)
    assert config.num_residual_blocks == 9
    assert num_parameters(CycleGANGenerator(config)) == 11_378_179
    assert num_parameters(CycleGANDiscriminator(config)) == 2_764_737
    # resize-conv has the same weight shapes as the transposed convolution
    assert num_parameters(CycleGANGenerator(CycleGANConfig(image_size=256, upsample_mode="resize_conv"))) == 11_378_179


def test_architectures_are_chosen_by_config_and_the_defaults_are_the_papers():
    assert tuple(GENERATOR_CLASSES) == configuration_cyclegan.GENERATOR_TYPES
    assert tuple(DISCRIMINATOR_CLASSES) == configuration_cyclegan.DISCRIMINATOR_TYPES
    config = CycleGANConfig(image_size=256)
    assert (config.generator_type, config.discriminator_type) == ("resnet", "patchgan")
    with torch.device("meta"):
        model = CycleGANModel(config)
    assert type(model.generator_a_to_b) is CycleGANGenerator and type(model.discriminator_b) is CycleGANDiscriminator
    assert model.num_parameters() == 2 * 11_378_179 + 2 * 2_764_737


def test_a_registered_generator_is_built_and_its_input_size_rule_applies(monkeypatch):
    class PixelGenerator(nn.Module):  # a 1x1-convolution generator: any size is fine except odd ones, by decree
        input_size_multiple = 2
        input_size_rule = "a test rule"

        def __init__(self, config):
            super().__init__()
            self.layers = nn.Sequential(nn.Conv2d(config.num_channels, config.num_channels, 1), nn.Tanh())

        def forward(self, pixel_values):
            return self.layers(pixel_values)

    monkeypatch.setitem(GENERATOR_CLASSES, "pixel", PixelGenerator)
    monkeypatch.setattr(configuration_cyclegan, "GENERATOR_TYPES", (*configuration_cyclegan.GENERATOR_TYPES, "pixel"))
    model = CycleGANModel(tiny_config(image_size=18, generator_type="pixel"))
    assert type(model.generator_b_to_a) is PixelGenerator
    assert model(random_images(1, 18), random_images(1, 18)).fake_b.shape == (1, 3, 18, 18)
    with pytest.raises(ValueError, match="divisible by 2 for PixelGenerator \\(a test rule\\)"):
        model.translate(random_images(1, 17))
    with pytest.raises(ValueError, match="CycleGANConfig.image_size.*divisible by 2"):
        CycleGANModel(tiny_config(image_size=19, generator_type="pixel"))


def test_config_serialises_and_old_config_files_load(tmp_path):
    config = tiny_config()
    assert json.loads(config.to_json_string())["generator_type"] == "resnet"
    assert CycleGANConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    old = config.to_dict()  # a config.json written before generator_type / discriminator_type existed
    del old["generator_type"], old["discriminator_type"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = CycleGANConfig.from_pretrained(tmp_path)
    assert (loaded.generator_type, loaded.discriminator_type) == ("resnet", "patchgan")
    assert loaded.image_size == 16


def test_image_size_follows_the_generators_input_size_rule():
    with pytest.raises(ValueError, match=r"CycleGANConfig.image_size has size 30x30; .*divisible by 4 .*e.g. 32"):
        CycleGANModel(tiny_config(image_size=30))


def test_the_minus_one_to_one_rule_and_its_inverses():
    levels = torch.arange(256, dtype=torch.uint8)
    pixel_values = levels_to_pixel_values(levels)
    assert pixel_values[0] == -1 and pixel_values[-1] == 1 and pixel_values.dtype == torch.float32
    assert torch.equal(pixel_values_to_levels(pixel_values), levels)
    torch.testing.assert_close(pixel_values_to_unit_interval(pixel_values), levels.float() / 255, rtol=0, atol=1e-6)
    buffer = levels.float()
    assert levels_to_pixel_values(buffer, inplace=True) is buffer and torch.equal(buffer, pixel_values)


def test_default_residual_blocks_follow_image_size():
    assert CycleGANConfig(image_size=128).num_residual_blocks == 6
    assert CycleGANConfig(image_size=256).num_residual_blocks == 9
    assert CycleGANConfig(image_size=128, num_residual_blocks=2).num_residual_blocks == 2


@pytest.mark.parametrize("height,width,blocks", [(128, 128, 6), (256, 256, 9), (48, 96, 2)])
def test_generator_preserves_shape(height, width, blocks):
    config = CycleGANConfig(image_size=128, num_residual_blocks=blocks, generator_filters=8)
    generator = CycleGANGenerator(config)
    with torch.no_grad():
        out = generator(torch.rand(1, 3, height, width) * 2 - 1)
    assert out.shape == (1, 3, height, width)
    assert out.abs().max() <= 1  # tanh output


@pytest.mark.parametrize("upsample_mode", ["transposed", "resize_conv"])
def test_upsample_modes_and_batch_norm_preserve_shape(upsample_mode):
    model = CycleGANModel(tiny_config(upsample_mode=upsample_mode, norm_type="batch"))
    # batch norm: convolutions before a norm have no bias (BatchNorm has its own shift)
    assert model.generator_a_to_b.layers[1].bias is None
    out = model(random_images(2), random_images(2, seed=1))
    assert out.fake_b.shape == out.reconstructed_b.shape == (2, 3, 16, 16)


def test_patchgan_output_size_and_70x70_receptive_field():
    config = CycleGANConfig(image_size=256)
    discriminator = CycleGANDiscriminator(config)
    with torch.no_grad():
        assert discriminator(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
        assert discriminator(torch.zeros(1, 3, 128, 128)).shape == (1, 1, 14, 14)

    # InstanceNorm couples every position of a feature map, so the receptive field is a property of the
    # convolutions only: take it with the norms replaced by identity.
    layers = discriminator.layers
    for index, layer in enumerate(layers):
        if isinstance(layer, nn.InstanceNorm2d):
            layers[index] = nn.Identity()
    pixels = torch.randn(1, 3, 256, 256, requires_grad=True)
    discriminator(pixels)[0, 0, 15, 15].backward()
    touched = pixels.grad.abs().sum(dim=(0, 1)) > 0
    rows = torch.nonzero(touched.any(dim=1)).flatten()
    cols = torch.nonzero(touched.any(dim=0)).flatten()
    assert rows.max() - rows.min() + 1 == 70 and cols.max() - cols.min() + 1 == 70
    assert touched.sum() == 70 * 70  # the whole window, nothing outside it
    # overall stride 8; each layer's padding of 1 shifts the window by its input stride: 1 + 2 + 4 + 8 + 8
    assert rows.min() == cols.min() == 15 * 8 - 23


def test_weights_are_normal_002_with_zero_bias():
    model = CycleGANModel(CycleGANConfig(image_size=128, generator_filters=32))
    weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
    biases = torch.cat([m.bias for m in model.modules() if isinstance(m, nn.Conv2d) and m.bias is not None])
    assert abs(weights.std().item() - 0.02) < 0.001 and abs(weights.mean().item()) < 0.001
    assert torch.count_nonzero(biases) == 0
    norms = [m for m in model.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert norms and all(not m.affine and not m.track_running_stats for m in norms)


@pytest.mark.parametrize(
    "field,value",
    [
        ("generator_type", "unet"),
        ("discriminator_type", "pixelgan"),
        ("image_size", 0),
        ("num_channels", 0),
        ("num_residual_blocks", -1),
        ("norm_type", "group"),
        ("upsample_mode", "bilinear"),
        ("gan_mode", "wgan"),
        ("lambda_cycle", -1.0),
        ("lambda_identity", -0.5),
        ("pool_size", -1),
        ("pool_size", 2.5),
        ("init_gain", 0.0),
    ],
)
def test_config_rejects_invalid_values(field, value):
    with pytest.raises(ValueError, match=field):
        CycleGANConfig(**{field: value})


# ---------------------------------------------------------------------------------------------------------
# Forward and losses
# ---------------------------------------------------------------------------------------------------------


def test_forward_outputs_and_batched_passes_match_sequential():
    torch.manual_seed(0)
    model = CycleGANModel(tiny_config())
    a, b = random_images(2, seed=1), random_images(2, seed=2)
    batched = model(a, b, batch_passes=True)
    sequential = model(a, b, batch_passes=False)
    assert isinstance(batched, CycleGANOutput)
    for name in ("fake_b", "fake_a", "reconstructed_a", "reconstructed_b", "identity_a", "identity_b"):
        torch.testing.assert_close(getattr(batched, name), getattr(sequential, name), atol=1e-5, rtol=1e-5)
    g = model.generator_a_to_b, model.generator_b_to_a
    torch.testing.assert_close(sequential.fake_b, g[0](a))
    torch.testing.assert_close(sequential.reconstructed_a, g[1](g[0](a)))
    torch.testing.assert_close(sequential.identity_a, g[1](a))
    torch.testing.assert_close(sequential.identity_b, g[0](b))
    # identity is skipped when its weight is 0; one domain alone works
    no_identity = CycleGANModel(tiny_config(lambda_identity=0.0))(a, b)
    assert no_identity.identity_a is None and no_identity.identity_b is None
    only_a = model(pixel_values_a=a)
    assert only_a.fake_a is None and only_a.fake_b.shape == a.shape
    assert len(model(a, b, return_dict=False)) == 6


def test_gan_loss_hand_computed():
    prediction = torch.tensor([[0.5, 2.0]])
    assert gan_loss(prediction, True).item() == pytest.approx((0.25 + 1.0) / 2)
    assert gan_loss(prediction, False).item() == pytest.approx((0.25 + 4.0) / 2)
    sigmoid = torch.sigmoid(prediction)
    assert gan_loss(prediction, True, "vanilla").item() == pytest.approx(-torch.log(sigmoid).mean().item(), rel=1e-5)
    expected = -torch.log(1 - sigmoid).mean().item()
    assert gan_loss(prediction, False, "vanilla").item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="gan_mode"):
        gan_loss(prediction, True, "hinge")


class ConstantDiscriminator(nn.Module):
    """Scores real images (all +1 pixels) with `real_score` and everything else with `fake_score`."""

    def __init__(self, real_score, fake_score):
        super().__init__()
        self.real_score, self.fake_score = real_score, fake_score

    def forward(self, x):
        is_real = (x == 1).flatten(1).all(dim=1).view(-1, 1, 1, 1).float()
        return (is_real * self.real_score + (1 - is_real) * self.fake_score).expand(-1, 1, 2, 2)


def test_losses_equal_hand_computed_values():
    model = CycleGANModel(tiny_config(lambda_cycle=10.0, lambda_identity=0.5))
    model.discriminator_a = ConstantDiscriminator(real_score=0.75, fake_score=0.5)
    model.discriminator_b = ConstantDiscriminator(real_score=1.5, fake_score=0.25)
    a, b = torch.ones(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    outputs = CycleGANOutput(
        fake_b=torch.zeros(1, 3, 4, 4),
        fake_a=torch.zeros(1, 3, 4, 4),
        reconstructed_a=torch.full((1, 3, 4, 4), 0.5),  # |0.5 - 1| = 0.5
        reconstructed_b=torch.full((1, 3, 4, 4), 0.75),  # 0.25
        identity_a=torch.full((1, 3, 4, 4), 0.9),  # 0.1
        identity_b=torch.full((1, 3, 4, 4), 0.8),  # 0.2
    )
    losses = model.generator_loss(outputs, a, b)
    expected = {
        "G_A": (0.25 - 1) ** 2,  # discriminator_b (reference D_A) on fake B, target real
        "G_B": (0.5 - 1) ** 2,
        "cycle_A": 10 * 0.5,
        "cycle_B": 10 * 0.25,
        "idt_A": 10 * 0.5 * 0.2,  # |G_A(b) - b|
        "idt_B": 10 * 0.5 * 0.1,  # |G_B(a) - a|
    }
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value), name
    assert losses["total"].item() == pytest.approx(sum(expected.values()))

    d_losses = model.discriminator_loss(a, b, outputs.fake_a, outputs.fake_b)
    assert d_losses["D_A"].item() == pytest.approx(0.5 * ((1.5 - 1) ** 2 + 0.25**2))
    assert d_losses["D_B"].item() == pytest.approx(0.5 * ((0.75 - 1) ** 2 + 0.5**2))
    unbatched = model.discriminator_loss(a, b, outputs.fake_a, outputs.fake_b, batch_passes=False)
    assert unbatched["total"].item() == pytest.approx(d_losses["total"].item())

    no_identity = CycleGANModel(tiny_config(lambda_identity=0.0))
    no_identity.discriminator_a, no_identity.discriminator_b = model.discriminator_a, model.discriminator_b
    losses = no_identity.generator_loss(outputs, a, b)
    assert losses["idt_A"].item() == losses["idt_B"].item() == 0.0


def test_discriminator_loss_detaches_fakes_and_generator_loss_reaches_generators():
    model = CycleGANModel(tiny_config())
    a, b = random_images(1, seed=3), random_images(1, seed=4)
    outputs = model(a, b)
    model.discriminator_loss(a, b, outputs.fake_a, outputs.fake_b)["total"].backward()
    assert all(p.grad is None for p in model.generator_a_to_b.parameters())
    assert all(p.grad is not None for p in model.discriminator_b.parameters())
    model.zero_grad(set_to_none=True)
    model.generator_loss(outputs, a, b)["total"].backward()
    assert all(p.grad is not None for p in model.generator_a_to_b.parameters())


def test_bf16_autocast_forward_and_losses():
    torch.manual_seed(0)
    model = CycleGANModel(tiny_config())
    a, b = random_images(1, seed=5), random_images(1, seed=6)
    reference = model.generator_loss(model(a, b), a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(a, b)
        losses = model.generator_loss(outputs, a, b)
        d_losses = model.discriminator_loss(a, b, outputs.fake_a, outputs.fake_b)
    assert outputs.fake_b.dtype == torch.bfloat16
    assert losses["total"].dtype == torch.float32 and torch.isfinite(d_losses["total"])
    losses["total"].backward()
    for name in ("G_A", "cycle_A", "idt_A", "total"):
        assert losses[name].item() == pytest.approx(reference[name].item(), rel=0.05), name


# ---------------------------------------------------------------------------------------------------------
# Image pool
# ---------------------------------------------------------------------------------------------------------


def reference_pool_query(pool_images, pool_size, images):
    """The reference implementation's ImagePool.query (list based), for comparison."""
    returned = []
    for image in images:
        image = image.unsqueeze(0)
        if len(pool_images) < pool_size:
            pool_images.append(image)
            returned.append(image)
        elif random.uniform(0, 1) > 0.5:
            slot = random.randint(0, pool_size - 1)
            returned.append(pool_images[slot].clone())
            pool_images[slot] = image
        else:
            returned.append(image)
    return torch.cat(returned)


def test_image_pool_size_zero_is_passthrough():
    images = torch.randn(3, 3, 4, 4)
    assert ImagePool(0).query(images) is images
    with pytest.raises(ValueError, match="pool_size"):
        ImagePool(-1)


def test_image_pool_fills_then_swaps_with_probability_half_like_the_reference():
    pool = ImagePool(50)
    images = [torch.full((1, 3, 2, 2), float(i)) for i in range(400)]
    for i in range(50):  # filling: every image is stored and returned as is
        assert torch.equal(pool.query(images[i]), images[i])
    assert pool.num_images == 50
    random.seed(0)
    returned_stored = sum(not torch.equal(pool.query(image), image) for image in images[50:])
    assert 0.4 < returned_stored / 350 < 0.6

    # exact agreement with the reference's list-based pool under the same seed, batches of 1 and 3
    for batch in (1, 3):
        pool, reference = ImagePool(5), []
        random.seed(123)
        ours = [pool.query(torch.cat(images[i : i + batch])) for i in range(0, 120, batch)]
        random.seed(123)
        theirs = [reference_pool_query(reference, 5, torch.cat(images[i : i + batch])) for i in range(0, 120, batch)]
        assert all(torch.equal(x, y) for x, y in zip(ours, theirs))


def test_image_pools_never_mix_domains_and_restore_from_state():
    pool_a, pool_b = ImagePool(4), ImagePool(4)
    random.seed(1)
    for step in range(50):
        out_a = pool_a.query(torch.full((2, 3, 2, 2), 1.0 + step))  # domain A: positive values
        out_b = pool_b.query(torch.full((2, 3, 2, 2), -1.0 - step))  # domain B: negative values
        assert (out_a > 0).all() and (out_b < 0).all()
    restored = ImagePool(4)
    restored.load_state_dict(pool_a.state_dict())
    random.seed(7)
    expected = pool_a.query(torch.full((2, 3, 2, 2), 99.0))
    random.seed(7)
    assert torch.equal(restored.query(torch.full((2, 3, 2, 2), 99.0)), expected)


# ---------------------------------------------------------------------------------------------------------
# Saving, loading, inference
# ---------------------------------------------------------------------------------------------------------


def test_save_load_round_trip_and_auto_classes(tmp_path):
    torch.manual_seed(0)
    model = CycleGANModel(tiny_config()).eval()
    processor = CycleGANImageProcessor(size=16)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "cyclegan" and config["auto_map"]["AutoModel"] == "modeling_cyclegan.CycleGANModel"
    assert (tmp_path / "modeling_cyclegan.py").exists() and (tmp_path / "image_processing_cyclegan.py").exists()

    images = random_images(2)
    expected = model.translate(images, "a_to_b")
    loaded = CycleGANModel.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.translate(images, "a_to_b"), expected)
    assert torch.equal(loaded.translate(images, "b_to_a"), model.translate(images, "b_to_a"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    assert isinstance(AutoConfig.from_pretrained(tmp_path), CycleGANConfig)
    auto_model = AutoModel.from_pretrained(tmp_path)
    assert isinstance(auto_model, CycleGANModel) and torch.equal(auto_model.translate(images), expected)
    auto_processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(auto_processor, CycleGANImageProcessor) and auto_processor.size == {"height": 16, "width": 16}


def test_generators_only_loading_and_two_line_translation(tmp_path):
    torch.manual_seed(0)
    model = CycleGANModel(tiny_config())
    model.save_pretrained(tmp_path)
    CycleGANImageProcessor(size=16).save_pretrained(tmp_path)

    generators, info = CycleGANModel.from_pretrained(tmp_path, with_discriminators=False, output_loading_info=True)
    # the discriminator weights are skipped on purpose: no "unexpected keys" report, nothing missing
    assert not info["unexpected_keys"] and not info["missing_keys"]
    assert generators.discriminator_a is None and generators.discriminator_b is None
    assert num_parameters(generators) == 2 * num_parameters(model.generator_a_to_b)
    images = random_images(2)
    assert torch.equal(generators.translate(images), model.translate(images))
    with pytest.raises(ValueError, match="with_discriminators=False"):
        generators.discriminator_loss(images, images, images, images)

    # Translate a batch of PIL images in two lines.
    horses = [Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)) for i in range(3)]
    model = CycleGANModel.from_pretrained(tmp_path, with_discriminators=False)
    zebras = model.translate(horses, direction="a_to_b")
    assert len(zebras) == 3 and all(isinstance(z, Image.Image) and z.size == (16, 16) for z in zebras)

    # An inference-only save holds the generators only.
    generators.save_pretrained(tmp_path / "inference")
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "inference" / "model.safetensors").keys()
    assert keys and not any(key.startswith("discriminator") for key in keys)


def test_hub_layout_loads_with_trust_remote_code_without_the_package(tmp_path):
    model = CycleGANModel(tiny_config())
    model.save_pretrained(tmp_path / "repo")
    CycleGANImageProcessor(size=16).save_pretrained(tmp_path / "repo")
    torch.save(model.translate(random_images(1)), tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        class Block:  # make the installed package unimportable: only the copied files may be used
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "modeling_cyclegan":
                    raise ImportError("blocked")
        sys.meta_path.insert(0, Block())
        from transformers import AutoImageProcessor, AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / 'repo')!r}, trust_remote_code=True)
        processor = AutoImageProcessor.from_pretrained({str(tmp_path / 'repo')!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        g = torch.Generator().manual_seed(0)
        images = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
        assert torch.equal(model.translate(images), torch.load({str(tmp_path / 'expected.pt')!r}))
        print(type(processor).__name__)
        """
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CycleGANImageProcessor" in result.stdout


def test_model_rejects_bad_input():
    model = CycleGANModel(tiny_config())
    with pytest.raises(ValueError, match="channels"):
        model(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="divisible by 4"):
        model.translate(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model.translate(torch.full((1, 3, 16, 16), 255.0))
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="direction"):
        model.translate(torch.zeros(1, 3, 16, 16), direction="sideways")
    with pytest.raises(ValueError, match="pixel_values_a, pixel_values_b"):
        model()


# ---------------------------------------------------------------------------------------------------------
# Image processor
# ---------------------------------------------------------------------------------------------------------


def test_image_processor_round_trip_and_conversions(tmp_path):
    processor = CycleGANImageProcessor(size={"height": 8, "width": 12})
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(8, 12, 3), dtype=np.uint8)
    pixels = processor(Image.fromarray(array), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 8, 12) and pixels.min() >= -1 and pixels.max() <= 1
    assert np.array_equal(processor.postprocess(pixels, output_type="np")[0], array)  # exact inverse at equal size
    assert np.array_equal(np.asarray(processor.postprocess(pixels)[0]), array)

    gray = Image.fromarray(array[..., 0], mode="L")
    rgba = Image.fromarray(np.dstack([array, np.full((8, 12), 255, np.uint8)]), mode="RGBA")
    batch = processor([gray, rgba, array, array.astype(np.float32) / 255.0], return_tensors="pt")["pixel_values"]
    assert batch.shape == (4, 3, 8, 12)
    assert torch.equal(batch[1], pixels[0]) and torch.equal(batch[2], pixels[0])
    assert torch.allclose(batch[3], pixels[0], atol=1e-6)
    assert torch.equal(batch[0][0], batch[0][1])  # grayscale became RGB

    resized = CycleGANImageProcessor(size=16)(Image.fromarray(array))["pixel_values"]
    assert resized.shape == (1, 3, 16, 16)

    processor.save_pretrained(tmp_path)
    assert CycleGANImageProcessor.from_pretrained(tmp_path).size == {"height": 8, "width": 12}


def test_image_processor_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 4"):
        CycleGANImageProcessor(size=30)
    processor = CycleGANImageProcessor(size=8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        processor(np.full((8, 8, 3), 200.0, np.float32))
    with pytest.raises(ValueError, match="shape"):
        processor(np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(ValueError, match="multiple of 4"):
        processor(np.zeros((10, 10, 3), np.uint8), do_resize=False)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        processor.postprocess(torch.full((1, 3, 8, 8), 3.0))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        processor.postprocess(torch.zeros(3, 8, 8))
