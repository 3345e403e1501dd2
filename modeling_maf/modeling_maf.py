"""Masked Autoregressive Flow (MAF) and Inverse Autoregressive Flow (IAF) over images, built from MADE blocks.

Density direction (data -> noise) of every block: ``noise_i = (data_i - shift_i) * exp(-log_scale_i)``.
MAF computes ``shift, log_scale`` from the data side (density in one pass, sampling sequential); IAF computes them
from the noise side (sampling in one pass, density sequential). The sequential direction is solved exactly with
``r + 1`` MADE evaluations per block, where ``r`` is the number of distinct degrees of the last hidden layer
(see ``MADEBlock.solve_sequential`` and docs/maf.md), instead of one evaluation per dimension.

With ``config.patch_size`` the flow models the square patches of the images, log p(patch | location): every image is
cut into all patches at ``config.patch_stride`` (``torch.nn.functional.unfold``), and each MADE adds a learned
embedding of the patch's location to its first hidden layer (``condition_on_position``). How rows map to images
(patches, locations, folding per-patch values back to pixels, sample mosaics) is ``PatchLayout`` (patches_maf.py).

``MAFModel`` is the flow. Anomaly scores, thresholds and their calibration are ``MAFAnomalyScorer``
(anomaly_scorer_maf.py), which the model hands its NLL maps; sampling and refinement are ``MAFSamplingMixin``
(sampling_maf.py), the sampling direction's sequential solve is sequential_solver.py, and the MADE matmuls
without weight gradients run block-sparse (masked_matmul.py).

This file imports only torch, transformers and its sibling files (configuration, patch layout, anomaly scorer and
scores, block-sparse matmul, image processor, sampling, sequential solver and refinement, the
``anomaly-detection`` pipeline), all imported relatively, so a Hub repo made by ``save_pretrained`` (which copies
them) loads with ``trust_remote_code=True`` without this package installed, pipeline included.
"""

import contextlib
import json
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput, logging

from .anomaly_scorer_maf import AnomalyDetectionMixin, AnomalyPrediction, MAFAnomalyScorer
from .anomaly_scores import (
    DEFAULT_CALIBRATED_PATCH_SCORE,
    DEFAULT_CALIBRATED_SCORE,
    NLLMaps,
)
from .configuration_maf import IAFConfig, MAFConfig
from .flow_graphs import can_replay, replay_flow
from .image_processing_maf import IMAGE_PROCESSOR_FILE, MAFImageProcessor
from .masked_matmul import block_sparse_linear, kernel_settings
from .patches_maf import PatchLayout
from .pipeline_maf import AnomalyDetectionPipeline
from .sampling_maf import MAFSamplingMixin
from .sequential_solver import affine_density, affine_generate, density_in_one_kernel, solve_sequential


logger = logging.get_logger(__name__)


@dataclass
class MAFModelOutput(ModelOutput):
    """
    Output of [`MAFModel`] and [`IAFModel`].

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            Mean negative log-likelihood of the batch, in nats (density over [0, num_bins)^D): per image, or for a
            patch model per patch (the mean over every patch of every image), so that loss / (D ln 2) is bits/dim.
        log_prob (`torch.FloatTensor` of shape `(batch_size,)`):
            log p(x) of every image, in nats, over pixel space [0, num_bins)^D (dequantisation and logit included).
            A patch model is a density of patches, not of whole images: its log_prob is the mean over the image's
            patches of log p(patch | location).
        bits_per_dim (`torch.FloatTensor` of shape `(batch_size,)`):
            -log_prob / (D ln 2), comparable with published bits/dim (per patch dimension for a patch model).
        latents (`torch.FloatTensor` of shape `(batch_size, D)`, or `(batch_size, num_patch_locations, D)`):
            The data (every patch of it, for a patch model) mapped to the standard normal base distribution.
    """

    loss: torch.FloatTensor | None = None
    log_prob: torch.FloatTensor | None = None
    bits_per_dim: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision results (bf16 autocast) are upcast; float32 and float64 pass through unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


class _MaskGradient(torch.autograd.Function):
    """Identity on the weight whose backward zeroes the gradient of masked connections.

    Masked weights are kept at exactly zero (initialisation and loading zero them, the gradient never reaches them), so
    the forward pass is a plain dense matmul: no per-step ``weight * mask`` read and write of every weight.
    """

    @staticmethod
    def forward(ctx, weight, mask):
        ctx.save_for_backward(mask)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad_weight):
        (mask,) = ctx.saved_tensors
        return torch.where(mask, grad_weight, 0.0), None


class MaskedLinear(nn.Linear):
    """A linear layer of a MADE. Connection k <- j exists iff ``out_degrees[k] >= in_degrees[j]`` (hidden layers)
    or ``out_degrees[k] > in_degrees[j]`` (output layer). Degrees are plain CPU tensors derived from the config, and the
    boolean mask is rebuilt from them on each device on first use: nothing mask-like is stored in the checkpoint.
    Weights of absent connections are exactly zero: initialisation and every load zero them
    (``zero_absent_connections``), and their gradient is zero.

    ``linear_with_grad`` is the layer's one extension point: ``None`` (autograd forms ``weight.grad``, masked) or a
    callable ``(inputs, weight, bias) -> outputs`` used instead of ``F.linear`` while the weight takes gradients
    (``weight.requires_grad`` and grad mode on). It must compute ``F.linear(inputs, weight, bias)`` and give the inputs
    and the bias their gradients; what happens to the weight gradient is its business. An optimizer that forms the
    masked weight gradient itself installs one (``hf_dgm_training.maf.masked_adam.MaskedAdam``). Copies (deepcopy,
    pickle) start without it.
    """

    # Entries per chunk where a layer's connections are worked through without its whole mask.
    chunk_entries = 1 << 24

    def __init__(self, in_degrees: torch.Tensor, out_degrees: torch.Tensor, strict: bool):
        super().__init__(len(in_degrees), len(out_degrees))
        self.in_degrees = in_degrees
        self.out_degrees = out_degrees
        self.strict = strict
        self._masks = {}
        self.linear_with_grad = None

    def __getstate__(self):
        # A copy (deepcopy, pickle) is a fresh layer: not tied to the original's optimizer, masks rebuilt on use.
        state = self.__dict__.copy()
        state["linear_with_grad"], state["_masks"] = None, {}
        return state

    def _connections(self, out_degrees: torch.Tensor, in_degrees: torch.Tensor) -> torch.Tensor:
        if self.strict:
            return out_degrees[:, None] > in_degrees[None, :]
        return out_degrees[:, None] >= in_degrees[None, :]

    def mask(self, device=None) -> torch.Tensor:
        device = torch.device(device) if device is not None else self.weight.device
        if device not in self._masks:
            self._masks[device] = self._connections(self.out_degrees.to(device), self.in_degrees.to(device))
        return self._masks[device]

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.mask()

    def fan_in(self) -> torch.Tensor:
        """Connections of every output unit (int64, CPU), counted from the degrees without building the mask."""
        sorted_in_degrees = torch.sort(self.in_degrees).values
        return torch.searchsorted(sorted_in_degrees, self.out_degrees, right=not self.strict)

    def _connection_chunks(self, device):
        """(rows, their connections as a bool (rows, in_features) tensor on ``device``) over the weight's rows,
        ``chunk_entries`` at a time: no mask of the whole layer is built (or cached)."""
        out_degrees, in_degrees = self.out_degrees.to(device), self.in_degrees.to(device)
        rows_per_chunk = max(1, self.chunk_entries // max(1, self.in_features))
        for start in range(0, self.out_features, rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            yield rows, self._connections(out_degrees[rows], in_degrees)

    @torch.no_grad()
    def reset_masked_uniform_(self) -> None:
        """The MADE initialisation of a hidden layer: uniform in +-1/sqrt(fan-in), with the fan-in each unit really
        has after masking (at least 1), and exactly zero on absent connections."""
        weight = self.weight
        scale = self.fan_in().clamp(min=1).to(weight.device, weight.dtype).rsqrt()
        weight.uniform_(-1.0, 1.0)
        for rows, connected in self._connection_chunks(weight.device):
            # One pass: u * 1/sqrt(fan_in) where connected, u * 0 (a zero of u's sign) where not, which is bit for bit
            # u * 1/sqrt(fan_in) * mask.
            weight[rows].mul_(torch.where(connected, scale[rows, None], 0.0))

    @torch.no_grad()
    def zero_absent_connections(self) -> torch.Tensor:
        """Sets the weights of absent connections to zero. Returns how many of them were not zero (a device scalar).

        Works through the rows in chunks, so no mask of the whole layer is built (or cached) on the weight's device.
        """
        weight = self.weight
        if weight.is_meta:
            return torch.zeros((), dtype=torch.int64)
        stray = torch.zeros((), dtype=torch.int64, device=weight.device)
        for rows, connected in self._connection_chunks(weight.device):
            chunk = weight[rows]
            stray += torch.count_nonzero(chunk)  # NaN counts as nonzero
            chunk.masked_fill_(~connected, 0)
            stray -= torch.count_nonzero(chunk)
        return stray

    def forward(self, hidden_states):
        weight = self.weight
        if weight.requires_grad and torch.is_grad_enabled():
            if self.linear_with_grad is not None:
                return self.linear_with_grad(hidden_states, weight, self.bias)
            weight = _MaskGradient.apply(weight, self.mask())
        else:  # no weight gradient: the matmul can skip the zero tiles (None where the dense GEMM runs instead)
            outputs = block_sparse_linear(self, hidden_states)
            if outputs is not None:
                return outputs
        return F.linear(hidden_states, weight, self.bias)


# ------------------------------------------------------------------------------------------ MADE degree rules
# A degree rule gives the hidden units of one MADE layer their degrees. Contract: called as
# ``rule(num_features, width, lowest, generator)``, it returns ``width`` integer degrees in [lowest, num_features - 1]
# (an int64 CPU tensor), where ``lowest`` is the smallest degree of the layer below, so that every unit has at least
# one incoming connection; ``generator`` (a seeded CPU generator) is its only source of randomness. The config
# names the rule (``MAFConfig.degree_assignment``); ``hidden_degrees`` calls it and enforces the contract.


def _spread_degrees(num_features: int, width: int, lowest: int, generator: torch.Generator) -> torch.Tensor:
    """Evenly over [lowest, D-1]: every output depends on all its predecessors through the hidden layer."""
    return torch.linspace(lowest, num_features - 1, width, device="cpu", dtype=torch.float64).round().long()


def _random_degrees(num_features: int, width: int, lowest: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform draws from [lowest, D-1] (MADE paper)."""
    return torch.randint(lowest, num_features, (width,), generator=generator, device="cpu")


def _sequential_degrees(num_features: int, width: int, lowest: int, generator: torch.Generator) -> torch.Tensor:
    """``k mod (D-1) + 1``, the rule of the original MAF code, nflows and zuko: with D >> H the units reach only the
    first H degrees. Its lowest degree is 1, which is the lowest of the layer below when that one follows this rule
    too (or is the input layer)."""
    return torch.arange(width, device="cpu") % (num_features - 1) + 1


DEGREE_RULES = {"spread": _spread_degrees, "random": _random_degrees, "sequential": _sequential_degrees}


def hidden_degrees(rule: str, num_features: int, width: int, lowest: int, generator: torch.Generator) -> torch.Tensor:
    """Degrees of one hidden layer's units by the rule named ``rule`` (see the contract above)."""
    if rule not in DEGREE_RULES:
        raise ValueError(f"Unknown degree rule {rule!r}; registered rules: {sorted(DEGREE_RULES)}.")
    degrees = DEGREE_RULES[rule](num_features, width, lowest, generator)
    if degrees.shape != (width,) or degrees.dtype != torch.int64:
        raise ValueError(f"Degree rule {rule!r} returned {degrees.dtype} {tuple(degrees.shape)}; it must return "
                         f"{width} int64 degrees.")
    if width and (int(degrees.min()) < lowest or int(degrees.max()) > num_features - 1):
        raise ValueError(f"Degree rule {rule!r} returned degrees in [{int(degrees.min())}, {int(degrees.max())}]; "
                         f"they must lie in [{lowest}, {num_features - 1}] (at least the lowest degree of the layer "
                         "below, so that every unit has an input, and below D so that every unit has an output).")
    return degrees


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation with an affine head: returns (shift, log_scale), each of
    shape (batch, D), where output i depends only on inputs of smaller degree."""

    def __init__(self, config: MAFConfig, input_degrees: torch.Tensor, generator: torch.Generator):
        super().__init__()
        num_features = config.num_features
        self.num_features = num_features
        self.log_scale_clamp = float(config.log_scale_clamp)
        self.activation = ACT2FN[config.hidden_act]

        layers, previous = [], input_degrees
        lowest = 1
        for width in config.hidden_sizes:
            degrees = hidden_degrees(config.degree_assignment, num_features, width, lowest, generator)
            layers.append(MaskedLinear(previous, degrees, strict=False))
            previous, lowest = degrees, int(degrees.min())
        # Output rows [0, D) are the shifts and [D, 2D) the log-scales of positions 0..D-1.
        layers.append(MaskedLinear(previous, torch.cat([input_degrees, input_degrees]), strict=True))
        self.layers = nn.ModuleList(layers)
        # log p(patch | location): a learned offset of the first hidden pre-activation per patch location. It reaches
        # every output alike, so the masks (and the autoregressive property within a patch) are untouched.
        num_locations = config.num_patch_locations if config.patch_size is not None else 1
        self.position_embedding = (nn.Embedding(num_locations, config.hidden_sizes[0])
                                   if config.condition_on_position and num_locations > 1 else None)

    def position_offset(self, locations: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        """The first hidden layer's offset for `locations` (N,) in `like`'s dtype; None without position
        conditioning."""
        if self.position_embedding is None:
            return None
        if locations is None:
            raise ValueError("This MADE is conditioned on the patch location: pass `locations` (patch indices).")
        return self.position_embedding(locations).to(like.dtype)

    def soft_clamp(self, raw_log_scale: torch.Tensor) -> torch.Tensor:
        return self.log_scale_clamp * torch.tanh(raw_log_scale / self.log_scale_clamp)

    def last_hidden(self, inputs: torch.Tensor, locations: torch.Tensor | None = None) -> torch.Tensor:
        """The activations of the last hidden layer, (batch, hidden_sizes[-1])."""
        hidden = self.layers[0](inputs)
        offset = self.position_offset(locations, hidden)
        hidden = self.activation(hidden if offset is None else hidden + offset)
        for layer in self.layers[1:-1]:
            hidden = self.activation(layer(hidden))
        return hidden

    def forward(self, inputs: torch.Tensor, locations: torch.Tensor | None = None):
        # Affine parameters (and everything downstream) in float32, also under bf16 autocast.
        output = _at_least_float32(self.layers[-1](self.last_hidden(inputs, locations)))
        shift, raw_log_scale = output.split(self.num_features, dim=1)
        return shift, self.soft_clamp(raw_log_scale)


class MADEBlock(nn.Module):
    """One affine autoregressive transform. ``input_degrees[p]`` is the 1-based rank of position p in this block's
    ordering; the data are never physically permuted, so every per-dimension term stays at its pixel position."""

    def __init__(self, config: MAFConfig, input_degrees: torch.Tensor, generator: torch.Generator):
        super().__init__()
        self.input_degrees = input_degrees
        self.made = MADE(config, input_degrees, generator)
        last_hidden_degrees = self.made.layers[-1].in_degrees
        breakpoints = torch.unique(last_hidden_degrees).tolist()  # sorted, distinct, in [1, D-1]
        bounds = [0] + breakpoints + [config.num_features]
        # Degrees (lo, hi] of one segment depend only on degrees <= lo: one MADE evaluation solves the segment.
        self.segments = list(zip(bounds[:-1], bounds[1:]))

    @property
    def num_sequential_passes(self) -> int:
        return len(self.segments)

    def forward(self, conditioner_inputs: torch.Tensor, locations: torch.Tensor | None = None):
        return self.made(conditioner_inputs, locations)

    def solve_sequential(self, known: torch.Tensor, solve_segment, locations: torch.Tensor | None = None):
        """Exact inverse of the autoregressive direction in ``len(self.segments)`` MADE evaluations.

        Finds w such that ``w_i = solve_segment(known_i, shift_i(w_<i), log_scale_i(w_<i))`` for every i, where
        ``shift, log_scale = MADE(w)``. The first layer's pre-activation is updated incrementally (each first-layer
        weight is read once), and only the output rows of the segment being solved are evaluated
        (``sequential_solver.py``).
        ``locations`` (batch,): the patch locations of a position-conditioned MADE.
        Returns ``(w, log_scale)``, both (batch, D) at pixel positions.
        """
        return solve_sequential(self, known, solve_segment, locations)


class FlowBatchNorm(nn.Module):
    """Batch normalisation as a flow layer (MAF paper): batch statistics in training, running statistics otherwise.
    Its per-dimension log-determinant is log_gamma - 0.5 log(var + eps)."""

    def __init__(self, num_features: int, momentum: float, eps: float = 1e-5):
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.log_gamma = nn.Parameter(torch.zeros(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, inputs: torch.Tensor):
        if self.training and inputs.shape[0] > 1:
            mean, var = inputs.mean(0), inputs.var(0, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        outputs = (inputs - mean) * torch.rsqrt(var + self.eps) * self.log_gamma.exp() + self.beta
        log_det = (self.log_gamma - 0.5 * torch.log(var + self.eps)).expand_as(inputs)
        return outputs, log_det

    def running_log_det(self) -> torch.Tensor:
        """Per-dimension log-determinant of the map with running statistics (eval mode), shape (D,)."""
        return self.log_gamma - 0.5 * torch.log(self.running_var + self.eps)

    def inverse(self, outputs: torch.Tensor):
        var = self.running_var + self.eps
        return (outputs - self.beta) * torch.exp(-self.log_gamma) * var.sqrt() + self.running_mean


def _check_pixel_layout(pixel_values, config: MAFConfig) -> None:
    expected = (config.num_channels, config.image_size, config.image_size)
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor of shape (batch, {', '.join(map(str, expected))}), "
                        f"got {type(pixel_values).__name__}.")
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be a float tensor with values in [0, 1], got dtype {pixel_values.dtype}; "
                        "preprocess images with MAFImageProcessor (8-bit levels divided by 255).")
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise ValueError(f"pixel_values must have shape (batch, {', '.join(map(str, expected))}) for this model "
                         f"(num_channels={config.num_channels}, image_size={config.image_size}), got "
                         f"{tuple(pixel_values.shape)}. Preprocess the images with MAFImageProcessor.from_model_config"
                         "(model.config), or build a config that matches them.")


def _check_pixel_range(low: float, high: float) -> None:
    if low < -1e-6 or high > 1 + 1e-6:
        raise ValueError(f"pixel_values must lie in [0, 1], got values in [{low:.3g}, {high:.3g}]; preprocess images "
                         "with MAFImageProcessor (8-bit levels divided by 255; not normalised to [-1, 1]).")


def check_pixel_values(pixel_values, config: MAFConfig) -> None:
    """Raise a TypeError/ValueError naming the problem and the fix unless `pixel_values` is a float tensor
    (batch, C, H, W) of this config's shape with values in [0, 1]."""
    with checked_pixel_values(pixel_values, config):
        pass


@contextlib.contextmanager
def checked_pixel_values(pixel_values, config: MAFConfig):
    """`check_pixel_values` around the work a model launches on `pixel_values`. The type and shape are checked on
    entry. On CUDA the [0, 1] range is read on the host when the block ends, from a copy of the minimum and maximum
    queued before the block's kernels: the host then launches the block's work without first waiting for the GPU to
    finish everything queued before it (a blocking read on entry would leave the GPU idle while the host launches).
    Out-of-range values then raise after the work was launched; its results are never returned. Elsewhere, and
    during a CUDA graph capture (which forbids reading values on the host: nothing is checked), the range is checked
    on entry."""
    _check_pixel_layout(pixel_values, config)
    if pixel_values.is_cuda and torch.cuda.is_current_stream_capturing():
        yield
        return
    low_high = torch.stack(torch.aminmax(pixel_values.detach())).float()
    if not pixel_values.is_cuda:
        _check_pixel_range(*low_high.tolist())
        yield
        return
    on_host = torch.empty(2, pin_memory=True)
    on_host.copy_(low_high, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    yield
    copied.synchronize()
    _check_pixel_range(*on_host.tolist())


def build_blocks(config, spec) -> tuple[nn.ModuleList, nn.ModuleList | None]:
    """The MADE blocks of a flow and its normalisation layers (None without): `config.num_blocks` blocks whose
    orderings follow `config.permutation` (seeded by `config.degree_seed`), each a `MADEBlock(spec, ...)`, where `spec`
    says what a MADE reads (`num_features`, `hidden_sizes`, ..., the locations it is conditioned on)."""
    num_features = spec.num_features
    generator = torch.Generator(device="cpu").manual_seed(config.degree_seed)
    natural = torch.arange(1, num_features + 1, device="cpu")
    blocks, norms = [], []
    for index in range(config.num_blocks):
        if config.permutation == "reverse" and index % 2 == 1:
            degrees = natural.flip(0)
        elif config.permutation == "random" and index > 0:
            degrees = torch.randperm(num_features, generator=generator, device="cpu") + 1
        else:
            degrees = natural
        blocks.append(MADEBlock(spec, degrees, generator))
        if config.normalization == "batch_norm":
            norms.append(FlowBatchNorm(num_features, config.batch_norm_momentum))
    return nn.ModuleList(blocks), (nn.ModuleList(norms) if norms else None)


def _zero_absent_connections_after_load(model, incompatible_keys):
    """``load_state_dict`` post-hook of every MAF/IAF model (also when it is reached through a DDP or accelerate
    wrapper, as ``accelerator.load_state`` does)."""
    model.zero_absent_connections("The loaded state dict")


def name_custom_pipelines(config, pipelines) -> None:
    """Names each of `pipelines` (task -> `Pipeline` subclass) in `config.custom_pipelines`, as transformers'
    `Pipeline.save_pretrained` names them, so `pipeline(task, model=<folder or repo>, trust_remote_code=True)` finds
    it in the file that `save_pretrained` copies next to the model (the pipeline's module is a relative import of the
    modeling file)."""
    custom_pipelines = dict(getattr(config, "custom_pipelines", None) or {})
    for task, pipeline_class in pipelines.items():
        module = pipeline_class.__module__.rsplit(".", 1)[-1]
        custom_pipelines[task] = {"impl": f"{module}.{pipeline_class.__name__}", "pt": ["AutoModel"], "type": "image"}
    config.custom_pipelines = custom_pipelines


class MAFPreTrainedModel(PreTrainedModel):
    """Weights, initialisation and loading of MAF and IAF models.

    The MADE masks belong to the model, not to the checkpoint: whatever a checkpoint holds, every load path
    (``load_state_dict``, ``from_pretrained`` by path or Hub id, ``accelerator.load_state``) ends with the weights of
    absent connections at zero, with a warning that counts those that were not, so a loaded model is always
    autoregressive (and its ``log_prob`` a normalised density).
    """

    config_class = MAFConfig
    base_model_prefix = "flow"
    main_input_name = "pixel_values"
    _no_split_modules = ["MADEBlock"]
    # Checkpoints saved before anomaly calibration existed load as uncalibrated models.
    _keys_to_ignore_on_load_missing = [r"anomaly_statistics\."]
    # The transformers pipelines that travel with the model (see `save_pretrained`).
    pipelines = {"anomaly-detection": AnomalyDetectionPipeline}

    def __init__(self, config: MAFConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        self.register_load_state_dict_post_hook(_zero_absent_connections_after_load)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        # transformers assigns the checkpoint's tensors without calling load_state_dict: the masks are applied here.
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives (model, info)
        model.zero_absent_connections(f"The checkpoint {pretrained_model_name_or_path}")
        return loaded

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        """`PreTrainedModel.save_pretrained` (and so `push_to_hub`), with
        - the model's `MAFImageProcessor` next to it (its config's size and channels) unless the folder already holds
          one that fits the model, so `AutoImageProcessor` works on every saved or pushed model (models of other than
          1 or 3 channels have no image processor);
        - the pipelines of `pipelines` named in config.json under `custom_pipelines`, as transformers'
          `Pipeline.save_pretrained` names them; their file is a relative import of this one, so it is copied with
          it, and `pipeline(task, model=<folder or repo>, trust_remote_code=True)` builds them without this package.
        """
        name_custom_pipelines(self.config, self.pipelines)
        if is_main_process and self.config.num_channels in (1, 3):
            path = os.path.join(save_directory, IMAGE_PROCESSOR_FILE)
            wanted = MAFImageProcessor.from_model_config(self.config)
            existing = {}
            try:
                with open(path) as file:
                    existing = json.load(file)
            except (OSError, ValueError):  # none there, or unreadable: write ours
                pass
            if not isinstance(existing, dict) or \
                    (existing.get("size"), existing.get("num_channels")) != (wanted.size, wanted.num_channels):
                os.makedirs(save_directory, exist_ok=True)
                wanted.save_pretrained(save_directory)
        return super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)

    @torch.no_grad()
    def zero_absent_connections(self, source: str = "The model") -> int:
        """Sets every MADE weight of an absent connection to zero; warns with their count when some were not zero
        (``source`` names where the weights came from). Returns that count."""
        counts = [module.zero_absent_connections() for module in self.modules() if isinstance(module, MaskedLinear)]
        stray = int(sum(count.cpu() for count in counts)) if counts else 0
        if stray:
            warnings.warn(f"{source} had {stray} nonzero weight(s) on connections that the MADE masks exclude (from "
                          "another library, merged or edited weights); they are set to zero, so the model stays "
                          "autoregressive.", UserWarning, stacklevel=3)
        return stray

    def _init_weights(self, module):
        """Hidden layers: uniform with the fan-in each unit really has after masking. Output layer: zero, so every
        block starts as the identity. Masked weights are set to exactly zero and stay there (see _MaskGradient).
        Tensors already loaded from a checkpoint carry `_is_hf_initialized` and are left untouched."""
        if isinstance(module, MaskedLinear):
            if not getattr(module.weight, "_is_hf_initialized", False):
                if module.strict:  # the output layer
                    module.weight.data.zero_()
                else:
                    module.reset_masked_uniform_()
            if not getattr(module.bias, "_is_hf_initialized", False):
                module.bias.data.zero_()
        elif isinstance(module, FlowBatchNorm):
            for tensor, value in ((module.log_gamma, 0.0), (module.beta, 0.0), (module.running_mean, 0.0),
                                  (module.running_var, 1.0)):
                if not getattr(tensor, "_is_hf_initialized", False):
                    tensor.data.fill_(value)
        elif isinstance(module, nn.Embedding):  # patch-location embeddings: zero, so training starts unconditioned
            if not getattr(module.weight, "_is_hf_initialized", False):
                module.weight.data.zero_()
        elif isinstance(module, MAFAnomalyScorer):
            module.reset_parameters(skip_loaded=True)


class MAFModel(MAFSamplingMixin, AnomalyDetectionMixin, MAFPreTrainedModel):
    r"""
    Masked Autoregressive Flow over images ``pixel_values`` of shape (batch, C, H, W) with values in [0, 1].

    The flow is here; how its rows map to images is `patch_layout` (a `PatchLayout`: every patch of a patch flow, the
    whole image otherwise), and anomaly scoring and its calibration are `anomaly_statistics` (a `MAFAnomalyScorer`
    that owns the per-location statistics and thresholds; its attribute name is the prefix of its tensors in
    model.safetensors). The anomaly methods below hand the flow's NLL maps to it. `sample` comes from
    `MAFSamplingMixin`.

    Example:
    ```python
    >>> from modeling_maf import MAFConfig, MAFModel
    >>> model = MAFModel(MAFConfig(image_size=8, hidden_sizes=[64, 64], num_blocks=2))
    >>> out = model(torch.rand(4, 3, 8, 8))
    >>> out.loss, out.log_prob, out.bits_per_dim
    >>> images = model.sample(5)
    ```
    """

    # True for IAF: the MADE reads the noise side, so density is the sequential direction.
    conditioner_on_noise = False
    # Sampling on CUDA replays a CUDA graph of the whole sampling direction (captured per batch shape); False: eager.
    sampling_cuda_graphs = True
    # Density on CUDA in eval mode without gradients (log_prob, encode, the anomaly maps) replays a CUDA graph of
    # every block (captured per batch shape, from the second call on); False: eager.
    density_cuda_graphs = True

    def __init__(self, config: MAFConfig):
        super().__init__(config)
        self.blocks, self.norms = build_blocks(config, config)
        self.patch_layout = PatchLayout(config)
        # The default score of a calibration, chosen by measurement: the image NLL for a whole-image flow
        # (docs/RESULTS.md#whole-image-detector), patch-z-top3 for a patch flow (docs/RESULTS.md#patch-detector).
        default_method = DEFAULT_CALIBRATED_PATCH_SCORE if self.is_patch_model else DEFAULT_CALIBRATED_SCORE
        self.anomaly_statistics = MAFAnomalyScorer(config, config.image_size, config.patch_grid_size, default_method,
                                                   self.patch_layout.grid_to_pixels)
        self.post_init()

    @property
    def is_patch_model(self) -> bool:
        """Whether the flow models patches (`config.patch_size`) rather than whole images."""
        return self.config.patch_size is not None

    @property
    def _compute_dtype(self) -> torch.dtype:
        """Densities are accumulated in float32 at least (float64 when the weights are float64)."""
        return torch.promote_types(self.dtype, torch.float32)

    # ------------------------------------------------------------------------------------ pixels <-> logit
    def _pixels_to_logits(self, pixel_values, random_dequantization: bool):
        """Dequantise on the data's grid, map to logit space; returns (v, per-dimension log|dv/dx|) for a density
        over [0, num_bins)^D."""
        bins, alpha = self.config.num_bins, self.config.logit_alpha
        levels = pixel_values.to(self._compute_dtype).flatten(1) * (bins - 1)
        noise = torch.rand_like(levels) if random_dequantization else torch.full_like(levels, 0.5)
        squashed = alpha + (1 - 2 * alpha) * (levels + noise) / bins
        logits = torch.log(squashed) - torch.log1p(-squashed)
        log_det = math.log(1 - 2 * alpha) - torch.log(squashed) - torch.log1p(-squashed) - math.log(bins)
        return logits, log_det

    def _logits_to_pixels(self, logits):
        """Logits (rows, D) -> pixels (rows, C, P, P) in [0, 1] (P: the patch side, or the image side)."""
        config, bins, alpha = self.config, self.config.num_bins, self.config.logit_alpha
        unit = (torch.sigmoid(_at_least_float32(logits)) - alpha) / (1 - 2 * alpha)
        pixels = (unit * bins - 0.5) / (bins - 1)
        return pixels.clamp(0.0, 1.0).view(-1, config.num_channels, config.flow_size, config.flow_size)

    # ------------------------------------------------------------------------------------------ the flow
    def _block_density(self, block, data_side, log_det, locations=None):
        """One block, data side -> noise side. Returns (noise, ``log_det`` plus the block's per-dimension log-det);
        on the fused path (CUDA, no gradients) ``log_det`` is updated in place."""
        if not self.conditioner_on_noise:
            fused = density_in_one_kernel(block.made, data_side, log_det, locations)
            if fused is not None:  # None: not on CUDA, or with gradients
                return fused
            shift, log_scale = block(data_side, locations)
            return (data_side - shift) * torch.exp(-log_scale), log_det - log_scale
        noise, log_scale = block.solve_sequential(data_side, affine_density, locations)
        return noise, log_det - log_scale

    def _block_generate(self, block, noise_side, locations=None):
        """One block, noise side -> data side. Returns (data, per-dimension log|d data / d noise|)."""
        if self.conditioner_on_noise:
            shift, log_scale = block(noise_side, locations)
            return noise_side * torch.exp(log_scale) + shift, log_scale
        return block.solve_sequential(noise_side, affine_generate, locations)

    def _flow_density(self, logits, locations=None):
        """logits (rows, D) -> (latents, per-dimension sum of log-dets), everything float32. `locations` (rows,):
        the patch locations of a patch model. On CUDA in eval mode without gradients it replays a CUDA graph of every
        block from the second call at the same shape on (``flow_graphs.py``) unless ``density_cuda_graphs`` is False."""
        if self.density_cuda_graphs and not self.training and can_replay(logits):
            return replay_flow(self, "density", self._flow_density_eagerly, logits, locations,
                               settings=kernel_settings())
        return self._flow_density_eagerly(logits, locations)

    def _flow_density_eagerly(self, logits, locations=None):
        hidden, log_det = logits, torch.zeros_like(logits)
        for index, block in enumerate(self.blocks):
            hidden, log_det = self._block_density(block, hidden, log_det, locations)
            if self.norms is not None:
                hidden, norm_log_det = self.norms[index](hidden)
                log_det = log_det + norm_log_det
        return hidden, log_det

    def _flow_generate(self, latents, show_progress=False, locations=None):
        """latents (rows, D) -> (logits, per-dimension log|d logits / d latents|), everything float32. On CUDA without
        gradients it replays a CUDA graph of every block from the second call at the same shape on
        (``flow_graphs.py``) unless ``sampling_cuda_graphs`` is False; the progress bar is of eager runs."""
        if self.sampling_cuda_graphs and can_replay(latents):
            return replay_flow(self, "generation", self._flow_generate_eagerly, latents, locations,
                               settings=kernel_settings(),
                               eager_run=lambda: self._flow_generate_eagerly(latents, locations, show_progress))
        return self._flow_generate_eagerly(latents, locations, show_progress)

    def _flow_generate_eagerly(self, latents, locations=None, show_progress=False):
        hidden = latents.to(self._compute_dtype)
        log_det = torch.zeros_like(hidden)
        indices = range(len(self.blocks) - 1, -1, -1)
        if show_progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, total=len(self.blocks), desc="decoding blocks", unit="block")
        for index in indices:
            if self.norms is not None:
                hidden = self.norms[index].inverse(hidden)
                log_det = log_det - self.norms[index].running_log_det()
            hidden, block_log_det = self._block_generate(self.blocks[index], hidden, locations)
            log_det = log_det + block_log_det
        return hidden, log_det

    def _per_dimension_log_prob(self, pixel_values, random_dequantization):
        """Per-dimension log-density terms and latents of the flow's rows, (batch * L, D) each (L = 1 for a
        whole-image flow)."""
        with checked_pixel_values(pixel_values, self.config):
            rows, locations = self.patch_layout.cut(pixel_values)
            logits, log_det = self._pixels_to_logits(rows, random_dequantization)
            latents, flow_log_det = self._flow_density(logits, locations)
            base = -0.5 * latents.square() - 0.5 * math.log(2 * math.pi)
            return base + flow_log_det + log_det, latents

    @torch.no_grad()
    def _deterministic_per_dimension(self, pixel_values):
        was_training = self.training
        self.eval()
        try:
            return self._per_dimension_log_prob(pixel_values, random_dequantization=False)[0]
        finally:
            self.train(was_training)

    def forward(self, pixel_values: torch.Tensor, return_dict: bool | None = None, **kwargs) -> MAFModelOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, image_size, image_size)`):
            Images with values in [0, 1], as [`MAFImageProcessor`] makes them. In training mode they are dequantised
            with uniform noise; in eval mode with the bin centre, so the output is deterministic. A patch model cuts
            every image into its `num_patch_locations` patches (a batch of B images is B * L examples of the flow);
            the loss is the mean over all patches, log_prob the mean over each image's patches.
        """
        per_dimension, latents = self._per_dimension_log_prob(pixel_values, random_dequantization=self.training)
        num_images = pixel_values.shape[0]
        log_prob = self.patch_layout.mean_per_image(per_dimension.sum(dim=1), num_images)
        bits_per_dim = -log_prob / (self.config.num_features * math.log(2))
        output = MAFModelOutput(loss=-log_prob.mean(), log_prob=log_prob, bits_per_dim=bits_per_dim,
                                latents=self.patch_layout.per_image(latents, num_images))
        return output if return_dict is not False else output.to_tuple()

    # ------------------------------------------------------------------------------------------ public API
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> latents (batch, D), with deterministic (bin-centre) dequantisation; a patch model:
        the latents of every patch, (batch, num_patch_locations, D)."""
        with checked_pixel_values(pixel_values, self.config):
            rows, locations = self.patch_layout.cut(pixel_values)
            latents = self._flow_density(self._pixels_to_logits(rows, random_dequantization=False)[0], locations)[0]
            return self.patch_layout.per_image(latents, pixel_values.shape[0])

    def decode(self, latents: torch.Tensor, show_progress: bool = False) -> torch.Tensor:
        """Latents (batch, D) -> images (batch, C, H, W) in [0, 1]; the exact inverse of `encode`. A patch model
        takes the latents of every patch, (batch, num_patch_locations, D), and averages overlapping patches."""
        rows, locations = self.patch_layout.latent_rows(latents)
        patches = self._logits_to_pixels(self._flow_generate(rows, show_progress, locations)[0])
        return self.patch_layout.assemble(patches, latents.shape[0])

    def num_sequential_passes(self) -> list[int]:
        """MADE evaluations per block in the sequential direction (MAF sampling, IAF density)."""
        return [block.num_sequential_passes for block in self.blocks]

    # ------------------------------------------------------------------------------------ anomaly detection
    @torch.no_grad()
    def nll_maps(self, pixel_values: torch.Tensor) -> NLLMaps:
        """The NLL at both grids the anomaly scores read, from one deterministic pass of the flow: `pixel`
        (batch, H, W), the per-dimension NLL summed over channels (a whole-image flow: each map sums to the image's
        NLL; a patch model: each pixel's NLL averaged over the patches that contain it), and `patch` (batch, Lh, Lw),
        the NLL of every patch at its location ((batch, 1, 1), the image's NLL, for a whole-image flow)."""
        per_dimension = -self._deterministic_per_dimension(pixel_values)
        return NLLMaps(*self.patch_layout.nll_maps(per_dimension, pixel_values.shape[0]))

    def patch_maps_to_pixels(self, maps: torch.Tensor) -> torch.Tensor:
        """Maps at the patch grid (B, Lh, Lw) -> pixel maps (B, H, W) (`PatchLayout.grid_to_pixels`)."""
        return self.patch_layout.grid_to_pixels(maps)

class IAFModel(MAFModel):
    r"""
    Inverse Autoregressive Flow: the MADE blocks read the noise side. Sampling takes one pass per block; the density
    of data uses the exact segment-parallel inverse. Same API as [`MAFModel`].
    """

    config_class = IAFConfig
    conditioner_on_noise = True
    # Refinement moves the latents, whose scale is 1 by construction: larger steps than in logit units.
    default_refine_step_size = 0.05
    default_refine_temperature = 1.0


__all__ = ["AnomalyPrediction", "MAFModelOutput", "MAFPreTrainedModel", "MAFModel", "IAFModel", "MADE", "MADEBlock",
           "MaskedLinear",
           "FlowBatchNorm"]
