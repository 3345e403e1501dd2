"""Masked Autoregressive Flow (MAF) and Inverse Autoregressive Flow (IAF) over images, built from MADE blocks.

Density direction (data -> noise) of every block: ``noise_i = (data_i - shift_i) * exp(-log_scale_i)``.
MAF computes ``shift, log_scale`` from the data side (density in one pass, sampling sequential); IAF computes them
from the noise side (sampling in one pass, density sequential). The sequential direction is solved exactly with
``r + 1`` MADE evaluations per block, where ``r`` is the number of distinct degrees of the last hidden layer
(see ``MADEBlock.solve_sequential`` and docs/maf.md), instead of one evaluation per dimension.

With ``config.patch_size`` the flow models the square patches of the images, log p(patch | location): every image is
cut into all patches at ``config.patch_stride`` (``torch.nn.functional.unfold``), and each MADE adds a learned
embedding of the patch's location to its first hidden layer (``condition_on_position``). Per-pixel maps of a patch
model average each pixel's terms over the patches that contain it (``fold``).

This file imports only torch, transformers and its sibling files (configuration, anomaly scores, block-sparse matmul,
image processor, sample refinement, the ``anomaly-detection`` pipeline), so a Hub repo made by ``save_pretrained``
loads with ``trust_remote_code=True`` without this package installed, pipeline included.
"""

import contextlib
import functools
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

from .anomaly_scores import (
    ANOMALY_SCORES,
    DEFAULT_CALIBRATED_PATCH_SCORE,
    DEFAULT_CALIBRATED_SCORE,
    NLL,
    NOT_CALIBRATED,
    PATCH_GRID,
    AnomalyStatistics,
    NLLMaps,
    ScoreParameters,
    calibrate_scores,
    check_score_name,
    compute_score,
)
from .configuration_maf import IAFConfig, MAFConfig
from .image_processing_maf import IMAGE_PROCESSOR_FILE, MAFImageProcessor
from .masked_matmul import block_sparse_linear
from .pipeline_maf import AnomalyDetectionPipeline
from .refinement_maf import annealed_langevin, check_refinement_arguments


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


@dataclass
class AnomalyPrediction(ModelOutput):
    """
    Output of [`MAFModel.predict_anomalies`].

    Args:
        scores (`torch.FloatTensor` of shape `(batch_size,)`):
            Anomaly score of every image under `method` (higher = more anomalous).
        maps (`torch.FloatTensor` of shape `(batch_size, height, width)`):
            The map the score reduces (per-pixel NLL, smoothed NLL or per-location z-scores, by `method`).
        is_anomalous (`torch.BoolTensor` of shape `(batch_size,)`, *optional*):
            `scores > threshold`; None when the model is not calibrated.
        threshold (`float`, *optional*):
            The decision threshold of `method` from `MAFModel.calibrate`; None when the model is not calibrated.
        method (`str`):
            The score's name (see `modeling_maf.anomaly_scores.ANOMALY_SCORES`).
    """

    scores: torch.FloatTensor | None = None
    maps: torch.FloatTensor | None = None
    is_anomalous: torch.BoolTensor | None = None
    threshold: float | None = None
    method: str | None = None


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
    masked weight gradient itself installs one (``modeling_maf.optimization_maf.MaskedAdam``). Copies (deepcopy,
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
        return out_degrees[:, None] > in_degrees[None, :] if self.strict else out_degrees[:, None] >= in_degrees[None, :]

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
        raise ValueError(f"Degree rule {rule!r} returned degrees in [{int(degrees.min())}, {int(degrees.max())}]; they "
                         f"must lie in [{lowest}, {num_features - 1}] (at least the lowest degree of the layer below, so "
                         "that every unit has an input, and below D so that every unit has an output).")
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

    def forward(self, inputs: torch.Tensor, locations: torch.Tensor | None = None):
        hidden = self.layers[0](inputs)
        offset = self.position_offset(locations, hidden)
        hidden = self.activation(hidden if offset is None else hidden + offset)
        for layer in self.layers[1:-1]:
            hidden = self.activation(layer(hidden))
        # Affine parameters (and everything downstream) in float32, also under bf16 autocast.
        output = _at_least_float32(self.layers[-1](hidden))
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
        weight is read once), and only the output rows of the segment being solved are evaluated.
        ``locations`` (batch,): the patch locations of a position-conditioned MADE.
        Returns ``(w, log_scale)``, both (batch, D) at pixel positions.
        """
        made = self.made
        first, *middle, last = made.layers
        degrees = self.input_degrees.to(known.device)
        by_degree = torch.argsort(degrees)  # by_degree[d - 1] = position of degree d
        num_features = made.num_features
        sizes = [high - low for low, high in self.segments]
        pair_sizes = [2 * size for size in sizes]

        # Everything a pass needs is cut into per-segment views once, so a pass is a handful of kernels:
        # first-layer columns as contiguous rows (pre_activation += segment @ rows), and the output rows of
        # (shift, log_scale) interleaved per position, so that one matmul yields both for a segment.
        first_rows = first.masked_weight()[:, by_degree].t().contiguous().split(sizes)
        middle_layers = [(layer.masked_weight(), layer.bias) for layer in middle]
        output_weight = last.masked_weight()
        output_rows = torch.stack([output_weight[by_degree], output_weight[num_features + by_degree]], dim=1)
        output_rows = output_rows.flatten(0, 1).split(pair_sizes)
        output_bias = torch.stack([last.bias[by_degree], last.bias[num_features + by_degree]], dim=1)
        output_bias = output_bias.flatten().split(pair_sizes)
        known_segments = known[:, by_degree].split(sizes, dim=1)

        batch_size = known.shape[0]
        pre_activation = first.bias.expand(batch_size, -1)
        offset = made.position_offset(locations, pre_activation)
        if offset is not None:
            pre_activation = pre_activation + offset
        solved, log_scales = [], []
        for rows_in, rows_out, bias_out, known_segment in zip(first_rows, output_rows, output_bias, known_segments):
            hidden = made.activation(pre_activation)
            for weight, bias in middle_layers:
                hidden = made.activation(F.linear(hidden, weight, bias))
            shift, raw_log_scale = F.linear(hidden, rows_out, bias_out).view(batch_size, -1, 2).unbind(-1)
            log_scale = made.soft_clamp(_at_least_float32(raw_log_scale))
            segment = solve_segment(known_segment, _at_least_float32(shift), log_scale)
            pre_activation = torch.addmm(pre_activation, segment.to(rows_in.dtype), rows_in)
            solved.append(segment)
            log_scales.append(log_scale)
        at_position = degrees - 1
        return torch.cat(solved, dim=1)[:, at_position], torch.cat(log_scales, dim=1)[:, at_position]


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


def _zero_absent_connections_after_load(model, incompatible_keys):
    """``load_state_dict`` post-hook of every MAF/IAF model (also when it is reached through a DDP or accelerate
    wrapper, as ``accelerator.load_state`` does)."""
    model.zero_absent_connections("The loaded state dict")


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
        custom_pipelines = dict(getattr(self.config, "custom_pipelines", None) or {})
        for task, pipeline_class in self.pipelines.items():
            module = pipeline_class.__module__.rsplit(".", 1)[-1]
            custom_pipelines[task] = {"impl": f"{module}.{pipeline_class.__name__}", "pt": ["AutoModel"], "type": "image"}
        self.config.custom_pipelines = custom_pipelines
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
        elif isinstance(module, AnomalyStatistics):
            module.reset_parameters(skip_loaded=True)


class MAFModel(MAFPreTrainedModel):
    r"""
    Masked Autoregressive Flow over images ``pixel_values`` of shape (batch, C, H, W) with values in [0, 1].

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
    # Refinement step (`sample(..., refine_steps=K)`): logit units, about 0.6 of an 8-bit level near mid-grey.
    default_refine_step_size = 0.01
    # Refinement's first noise temperature: 0 (preconditioned ascent from each sample's own draw) left the MAF's
    # samples data-like and apart where 1 left them noisy (docs/RESULTS.md §6).
    default_refine_temperature = 0.0
    # Refinement pays 0.5 nats for every value that strays this far (logits) outside the logits of [0, 1] pixels.
    refine_wall_width = 0.01

    def __init__(self, config: MAFConfig):
        super().__init__(config)
        num_features = config.num_features
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
            blocks.append(MADEBlock(config, degrees, generator))
            if config.normalization == "batch_norm":
                norms.append(FlowBatchNorm(num_features, config.batch_norm_momentum))
        self.blocks = nn.ModuleList(blocks)
        self.norms = nn.ModuleList(norms) if norms else None
        # Per-location NLL statistics of good images, set by `calibrate` (the rest of the calibration is in the config).
        self.anomaly_statistics = AnomalyStatistics(config.image_size, config.image_size, config.patch_grid_size,
                                                    config.patch_grid_size)
        self.post_init()

    @property
    def is_patch_model(self) -> bool:
        """Whether the flow models patches (`config.patch_size`) rather than whole images."""
        return self.config.patch_size is not None

    @property
    def default_anomaly_score(self) -> str:
        """The score `calibrate` makes the default when none is named, chosen by measurement: the image NLL for a
        whole-image flow, `patch-z-top3` for a patch flow (docs/RESULTS.md §7.2, §10)."""
        return DEFAULT_CALIBRATED_PATCH_SCORE if self.is_patch_model else DEFAULT_CALIBRATED_SCORE

    @property
    def _compute_dtype(self) -> torch.dtype:
        """Densities are accumulated in float32 at least (float64 when the weights are float64)."""
        return torch.promote_types(self.dtype, torch.float32)

    # ----------------------------------------------------------------------------------------------- checks
    def _check_pixel_values(self, pixel_values):
        config = self.config
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
        if pixel_values.is_cuda and torch.cuda.is_current_stream_capturing():
            return  # the range check reads values on the host, which a CUDA graph capture forbids
        low, high = torch.aminmax(pixel_values.detach())
        if bool(low < -1e-6) or bool(high > 1 + 1e-6):
            raise ValueError(f"pixel_values must lie in [0, 1], got values in [{float(low):.3g}, {float(high):.3g}]; "
                             "preprocess images with MAFImageProcessor (8-bit levels divided by 255; not normalised to "
                             "[-1, 1]).")

    # ------------------------------------------------------------------------------------------- patches
    def _patches(self, pixel_values):
        """Images (B, C, H, W) -> every patch at the patch stride (B * L, C * P * P), channel-major like a flattened
        image, and the patch locations (B * L,), row-major over the patch grid. A whole-image flow: the images
        flattened, no locations."""
        if not self.is_patch_model:
            return pixel_values.flatten(1), None
        config = self.config
        columns = F.unfold(pixel_values, config.patch_size, stride=config.patch_stride)  # (B, C*P*P, L)
        patches = columns.transpose(1, 2).reshape(-1, config.num_features)
        return patches, self._patch_locations(pixel_values.shape[0], pixel_values.device)

    def _patch_locations(self, num_images: int, device) -> torch.Tensor:
        """The location of every patch of `num_images` images (num_images * L,), row-major over the patch grid."""
        return torch.arange(self.config.num_patch_locations, device=device).repeat(num_images)

    def _fold_mean(self, values):
        """Per-patch values (B, L, K * P * P), K maps of P x P each (channel-major, as `unfold` cuts them) -> per-pixel
        maps (B, K, H, W): each pixel the mean over the patches that contain it."""
        config = self.config
        columns = values.transpose(1, 2)
        fold = functools.partial(F.fold, output_size=(config.image_size, config.image_size),
                                 kernel_size=config.patch_size, stride=config.patch_stride)
        counts = fold(torch.ones_like(columns[:1, : config.patch_size**2]))
        return fold(columns) / counts

    def patch_maps_to_pixels(self, maps: torch.Tensor) -> torch.Tensor:
        """Maps at the patch grid (B, Lh, Lw) -> pixel maps (B, H, W): each pixel the mean over the patches that
        contain it (a whole-image flow's one value fills its map)."""
        config = self.config
        if not self.is_patch_model:
            return maps.reshape(-1, 1, 1).expand(-1, config.image_size, config.image_size)
        values = maps.reshape(maps.shape[0], -1, 1).expand(-1, -1, config.patch_size**2)
        return self._fold_mean(values)[:, 0]

    # ------------------------------------------------------------------------------------ pixels <-> logit
    def _pixels_to_logits(self, pixel_values, random_dequantization: bool):
        """Dequantise on the data's grid, map to logit space; returns (v, per-dimension log|dv/dx|) for a density
        over [0, num_bins)^D."""
        bins, alpha = self.config.num_bins, self.config.logit_alpha
        levels = pixel_values.to(self._compute_dtype).flatten(1) * (bins - 1)
        if random_dequantization:
            noise = torch.rand_like(levels)
        else:
            noise = torch.full_like(levels, 0.5)
        unit = (levels + noise) / bins
        squashed = alpha + (1 - 2 * alpha) * unit
        logits = torch.log(squashed) - torch.log1p(-squashed)
        log_det = math.log(1 - 2 * alpha) - torch.log(squashed) - torch.log1p(-squashed) - math.log(bins)
        return logits, log_det

    def _logits_to_pixels(self, logits):
        bins, alpha = self.config.num_bins, self.config.logit_alpha
        unit = (torch.sigmoid(_at_least_float32(logits)) - alpha) / (1 - 2 * alpha)
        pixels = (unit * bins - 0.5) / (bins - 1)
        config = self.config
        return pixels.clamp(0.0, 1.0).view(-1, config.num_channels, config.flow_size, config.flow_size)

    # ------------------------------------------------------------------------------------------ the flow
    def _block_density(self, block, data_side, locations=None):
        """One block, data side -> noise side. Returns (noise, per-dimension log-det)."""
        if not self.conditioner_on_noise:
            shift, log_scale = block(data_side, locations)
            return (data_side - shift) * torch.exp(-log_scale), -log_scale
        noise, log_scale = block.solve_sequential(data_side, lambda x, shift, a: (x - shift) / torch.exp(a), locations)
        return noise, -log_scale

    def _block_generate(self, block, noise_side, locations=None):
        """One block, noise side -> data side. Returns (data, per-dimension log|d data / d noise|)."""
        if self.conditioner_on_noise:
            shift, log_scale = block(noise_side, locations)
            return noise_side * torch.exp(log_scale) + shift, log_scale
        return block.solve_sequential(noise_side, lambda z, shift, a: torch.addcmul(shift, z, torch.exp(a)), locations)

    def _flow_density(self, logits, locations=None):
        """logits (batch, D) -> (latents, per-dimension sum of log-dets), everything float32. `locations` (batch,):
        the patch locations of a patch model."""
        hidden, log_det = logits, torch.zeros_like(logits)
        for index, block in enumerate(self.blocks):
            hidden, block_log_det = self._block_density(block, hidden, locations)
            log_det = log_det + block_log_det
            if self.norms is not None:
                hidden, norm_log_det = self.norms[index](hidden)
                log_det = log_det + norm_log_det
        return hidden, log_det

    def _per_dimension_log_prob(self, pixel_values, random_dequantization):
        """Per-dimension log-density terms and latents, (batch, D) each; (batch * L, D) of every patch for a patch
        model."""
        self._check_pixel_values(pixel_values)
        values, locations = self._patches(pixel_values)
        logits, log_det = self._pixels_to_logits(values, random_dequantization)
        latents, flow_log_det = self._flow_density(logits, locations)
        base = -0.5 * latents.square() - 0.5 * math.log(2 * math.pi)
        return base + flow_log_det + log_det, latents

    def forward(self, pixel_values: torch.Tensor, return_dict: bool | None = None, **kwargs) -> MAFModelOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, image_size, image_size)`):
            Images with values in [0, 1], as [`MAFImageProcessor`] makes them. In training mode they are dequantised with
            uniform noise; in eval mode with the bin centre, so the output is deterministic. A patch model cuts every
            image into its `num_patch_locations` patches (a batch of B images is B * L examples of the flow).
        """
        per_dimension, latents = self._per_dimension_log_prob(pixel_values, random_dequantization=self.training)
        log_prob = per_dimension.sum(dim=1)
        if self.is_patch_model:  # the mean over each image's patches; the loss is the mean over all patches
            num_locations = self.config.num_patch_locations
            log_prob = log_prob.view(-1, num_locations).mean(dim=1)
            latents = latents.view(-1, num_locations, self.config.num_features)
        bits_per_dim = -log_prob / (self.config.num_features * math.log(2))
        output = MAFModelOutput(loss=-log_prob.mean(), log_prob=log_prob, bits_per_dim=bits_per_dim, latents=latents)
        return output if return_dict is not False else output.to_tuple()

    # ------------------------------------------------------------------------------------------ public API
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> latents (batch, D), with deterministic (bin-centre) dequantisation; a patch model:
        the latents of every patch, (batch, num_patch_locations, D)."""
        self._check_pixel_values(pixel_values)
        values, locations = self._patches(pixel_values)
        logits, _ = self._pixels_to_logits(values, random_dequantization=False)
        latents = self._flow_density(logits, locations)[0]
        if self.is_patch_model:
            return latents.view(pixel_values.shape[0], self.config.num_patch_locations, -1)
        return latents

    def decode(self, latents: torch.Tensor, show_progress: bool = False) -> torch.Tensor:
        """Latents (batch, D) -> images (batch, C, H, W) in [0, 1]; the exact inverse of `encode`. A patch model
        takes the latents of every patch, (batch, num_patch_locations, D), and averages overlapping patches."""
        config = self.config
        if self.is_patch_model:
            expected = (config.num_patch_locations, config.num_features)
            if latents.ndim != 3 or tuple(latents.shape[1:]) != expected:
                raise ValueError(f"latents must have shape (batch, {expected[0]}, {expected[1]}) for this patch model "
                                 f"(one row per patch location), got {tuple(latents.shape)}.")
            locations = self._patch_locations(latents.shape[0], latents.device)
            patches = self._logits_to_pixels(self._flow_generate(latents.flatten(0, 1), show_progress, locations)[0])
            return self._fold_mean(patches.view(latents.shape[0], expected[0], -1))
        if latents.ndim != 2 or latents.shape[1] != config.num_features:
            raise ValueError(f"latents must have shape (batch, {config.num_features}), got {tuple(latents.shape)}.")
        return self._logits_to_pixels(self._flow_generate(latents, show_progress)[0])

    def _flow_generate(self, latents, show_progress=False, locations=None):
        """latents (batch, D) -> (logits, per-dimension log|d logits / d latents|), everything float32."""
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

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None, temperature: float = 1.0,
               show_progress: bool = False, refine_steps: int = 0, refine_step_size: float | None = None,
               refine_temperature: float | None = None, refine_batch_size: int = 16) -> torch.Tensor:
        """Draw `num_samples` images (num_samples, C, H, W) in [0, 1]; latents ~ N(0, temperature^2 I).
        `generator` may live on the CPU or on the model's device. A patch model draws a mosaic of independent,
        non-overlapping patches on a patch_size grid, each from log p(patch | its location): not a draw of a whole
        image (needs patch_size % patch_stride == 0 and image_size % patch_size == 0).

        With `refine_steps=0` (the default) the images are exact draws from the model. With `refine_steps > 0` each
        draw is then moved towards higher density by annealed Langevin dynamics (see `refinement_maf.py` and
        docs/maf.md): the results look more like the data but are **density-guided, not draws from the model**.
        Each step costs one forward and backward pass of the one-pass direction: MAF refines the logit image (its
        density direction), IAF its latents (its sampling direction; its density is the sequential one). Each value
        moves by about `refine_step_size` per step, in logit units for MAF and latent units for IAF (default: the
        class's `default_refine_step_size`). The noise temperature falls linearly from `refine_temperature` (1: the
        model's own density) to 0 at the last step; 0 throughout is preconditioned gradient ascent, which keeps the
        samples apart for a few hundred steps because each starts from its own draw, and collapses them onto a mode
        if run long (default: the class's `default_refine_temperature`). Samples are refined `refine_batch_size` at a time, which bounds memory; the generator also draws the
        refinement noise, so a seeded generator reproduces the result for the same `refine_batch_size` (and the same
        seed with `refine_steps=0` gives the starting points).
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if refine_step_size is None:
            refine_step_size = self.default_refine_step_size
        if refine_temperature is None:
            refine_temperature = self.default_refine_temperature
        check_refinement_arguments(refine_steps, refine_step_size, refine_temperature, refine_batch_size)
        device = self.device
        noise_device = generator.device if generator is not None else device
        patches_per_image = (self.config.image_size // self.config.patch_size) ** 2 if self.is_patch_model else 1
        latents = torch.randn(num_samples, patches_per_image * self.config.num_features, generator=generator,
                              device=noise_device)
        latents = latents.to(device) * temperature
        if not self.is_patch_model and refine_steps == 0:
            return self.decode(latents, show_progress=show_progress)
        locations = self._mosaic_locations(num_samples, device)
        # MAF refines the logit image (its density direction is one pass), IAF its latents (its sampling direction).
        if self.conditioner_on_noise:
            start = latents.to(self._compute_dtype)
        else:
            start = self._flow_generate(latents.view(-1, self.config.num_features), show_progress, locations)[0]
            start = start.view(num_samples, -1)
        if refine_steps > 0:
            # The logits of pixel values 0 and 1, as Python numbers: nothing crosses to the host inside the loop.
            pixel_range = self._pixels_to_logits(torch.tensor([[0.0, 1.0]]), random_dequantization=False)[0]
            log_density = functools.partial(self._refinement_log_density, pixel_range=pixel_range.flatten().tolist())
            with self._frozen():
                start = annealed_langevin(start, log_density, steps=refine_steps, step_size=refine_step_size,
                                          temperature=refine_temperature, batch_size=refine_batch_size,
                                          generator=generator, show_progress=show_progress)
        rows = start.view(-1, self.config.num_features)
        logits = self._flow_generate(rows, locations=locations)[0] if self.conditioner_on_noise else rows
        return self._mosaic(self._logits_to_pixels(logits), num_samples)

    def _mosaic_locations(self, num_samples: int, device) -> torch.Tensor | None:
        """The patch locations of `num_samples` patch mosaics (num_samples * M,): the non-overlapping patches on a
        patch_size grid, row-major; None for a whole-image flow."""
        config = self.config
        if not self.is_patch_model:
            return None
        size, patch, stride = config.image_size, config.patch_size, config.patch_stride
        if patch % stride or size % patch:
            raise ValueError(f"A patch model samples a mosaic of non-overlapping patches, which needs patch_size % "
                             f"patch_stride == 0 and image_size % patch_size == 0; this model has image_size {size}, "
                             f"patch_size {patch}, patch_stride {stride}.")
        grid = torch.arange(size // patch, device=device) * (patch // stride)
        per_image = (grid[:, None] * config.patch_grid_size + grid[None, :]).flatten()
        return per_image.repeat(num_samples)

    def _mosaic(self, patches: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Patches (num_samples * M, C, P, P) of `_mosaic_locations` -> images (num_samples, C, H, W)."""
        if not self.is_patch_model:
            return patches
        config = self.config
        per_side = config.image_size // config.patch_size
        tiles = patches.view(num_samples, per_side, per_side, config.num_channels, config.patch_size, config.patch_size)
        return tiles.permute(0, 3, 1, 4, 2, 5).reshape(num_samples, config.num_channels, config.image_size,
                                                       config.image_size)

    @contextlib.contextmanager
    def _frozen(self):
        """Eval mode (running statistics) and parameters without requires_grad, so that a gradient with respect to
        the inputs forms nothing else (no weight gradients, nothing handed to an optimizer's gradient sink); the
        model is left as it was."""
        parameters = [parameter for parameter in self.parameters() if parameter.requires_grad]
        was_training = self.training
        self.eval()
        try:
            for parameter in parameters:
                parameter.requires_grad_(False)
            yield
        finally:
            for parameter in parameters:
                parameter.requires_grad_(True)
            self.train(was_training)

    def _refinement_log_density(self, variable, temperature, pixel_range):
        """What `annealed_langevin` ascends, per row. MAF: variable = logits v, log p(v) (constants dropped).
        IAF: variable = latents z, log p(v(z)) + temperature * log|dv/dz|: the log-density of p(v)^(1 / temperature)
        carried to z, times temperature (the time unit of a Langevin step); at temperature 1 it is N(0, I).
        Both minus a quadratic wall that keeps v within `pixel_range` (the logits of pixel values 0 and 1): outside,
        the flow's density was never trained and can grow without bound (towards saturated images).
        A patch model's row is a mosaic (its patches side by side): the sum of its patches' log p(patch | location)."""
        num_rows = variable.shape[0]
        rows = variable.view(-1, self.config.num_features)
        locations = self._mosaic_locations(num_rows, variable.device)
        if self.conditioner_on_noise:
            logits, log_det = self._flow_generate(rows, locations=locations)
            log_density = -0.5 * rows.square().sum(dim=1) - (1 - temperature) * log_det.sum(dim=1)
        else:
            logits = rows
            latents, log_det = self._flow_density(logits, locations)
            log_density = (log_det - 0.5 * latents.square()).sum(dim=1)
        low, high = pixel_range
        outside = F.relu(low - logits) + F.relu(logits - high)
        log_density = log_density - 0.5 * (outside / self.refine_wall_width).square().sum(dim=1)
        return log_density.view(num_rows, -1).sum(dim=1)

    def num_sequential_passes(self) -> list[int]:
        """MADE evaluations per block in the sequential direction (MAF sampling, IAF density)."""
        return [block.num_sequential_passes for block in self.blocks]

    @torch.no_grad()
    def _deterministic_per_dimension(self, pixel_values):
        was_training = self.training
        self.eval()
        try:
            return self._per_dimension_log_prob(pixel_values, random_dequantization=False)[0]
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------------------------ anomaly detection
    @torch.no_grad()
    def nll_maps(self, pixel_values: torch.Tensor) -> NLLMaps:
        """The NLL at both grids the anomaly scores read, from one deterministic pass of the flow:
        `pixel` (batch, H, W), the per-dimension NLL summed over channels (a whole-image flow: each map sums to the
        image's NLL; a patch model: each pixel's NLL averaged over the patches that contain it), and `patch`
        (batch, Lh, Lw), the NLL of every patch at its location ((batch, 1, 1), the image's NLL, for a whole-image
        flow)."""
        config = self.config
        per_dimension = -self._deterministic_per_dimension(pixel_values)
        batch_size, grid = pixel_values.shape[0], config.patch_grid_size
        per_patch = per_dimension.sum(dim=1).view(batch_size, grid, grid)
        per_pixel = per_dimension.view(batch_size, -1, config.num_channels, config.flow_size**2).sum(dim=2)
        if not self.is_patch_model:
            return NLLMaps(per_pixel.view(batch_size, config.image_size, config.image_size), per_patch)
        return NLLMaps(self._fold_mean(per_pixel)[:, 0], per_patch)

    @property
    def is_calibrated(self) -> bool:
        """Whether `calibrate` has set the anomaly threshold and per-location statistics."""
        return self.config.anomaly_calibration is not None

    @property
    def anomaly_score_parameters(self) -> ScoreParameters:
        """The sizes the scores use: the calibrated ones, else the defaults for this image size."""
        calibration = self.config.anomaly_calibration
        if calibration is None:
            return ScoreParameters.for_image_size(self.config.image_size)
        return ScoreParameters(**{key: calibration[key] for key in ScoreParameters.__dataclass_fields__})

    def resolve_anomaly_method(self, method: str | None = None) -> str:
        """The score name `method` stands for: itself (checked), or for None the calibrated default, else "nll"."""
        if method is None:
            calibration = self.config.anomaly_calibration
            return calibration["method"] if calibration is not None else NLL
        return check_score_name(method).name

    @property
    def available_anomaly_scores(self) -> list[str]:
        """The scores this model can compute now: those without statistics, and with a calibration those it has
        thresholds (and statistics) for."""
        calibration = self.config.anomaly_calibration
        calibrated = calibration["thresholds"] if calibration is not None else {}
        return [name for name, score in ANOMALY_SCORES.items()
                if not score.needs_statistics or name in calibrated]

    def score_nll_maps(self, nll_maps: NLLMaps | torch.Tensor, method: str | None = None) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
        """`(maps (batch, H, W), scores)` of `method` from the NLL maps of `nll_maps(x)` (per-pixel maps alone do for
        the pixel-grid scores), with this model's calibration: scores many ways from one pass of the flow. The map
        of a patch-grid score is brought to pixels by `patch_maps_to_pixels`."""
        method = self.resolve_anomaly_method(method)
        score = check_score_name(method)
        statistics = None
        if self.is_calibrated and score.needs_statistics:
            if method not in self.config.anomaly_calibration["thresholds"]:
                raise ValueError(f"This model was calibrated before the score {method!r} existed: call "
                                 "model.calibrate(good_pixel_values) again to add it.")
            statistics = self.anomaly_statistics.get()
        maps, scores = compute_score(method, nll_maps, self.anomaly_score_parameters, statistics)
        if score.grid == PATCH_GRID:
            maps = self.patch_maps_to_pixels(maps)
        return maps, scores

    def anomaly_scores(self, pixel_values: torch.Tensor, method: str | None = None) -> torch.Tensor:
        """Per-image anomaly score (batch,), deterministic; higher = more anomalous. `method` is a name of
        `modeling_maf.anomaly_scores.ANOMALY_SCORES`; None = the calibrated default, or "nll" (the image's negative
        log-likelihood in nats; for a patch model the sum of its per-pixel map) for a model that is not
        calibrated."""
        return self.score_nll_maps(self.nll_maps(pixel_values), method)[1]

    def anomaly_maps(self, pixel_values: torch.Tensor, method: str | None = None) -> torch.Tensor:
        """The map (batch, H, W) that `method`'s score reduces. For "nll" (the default of a model that is not
        calibrated): the per-pixel NLL, summed over channels, so that each map sums to the image's NLL (a patch
        model: each pixel's NLL averaged over the patches that contain it)."""
        return self.score_nll_maps(self.nll_maps(pixel_values), method)[0]

    def anomaly_threshold(self, method: str | None = None) -> float:
        """The decision threshold of `method` ("anomalous when score > threshold"); raises when not calibrated."""
        if not self.is_calibrated:
            raise ValueError(NOT_CALIBRATED)
        return float(self.config.anomaly_calibration["thresholds"][self.resolve_anomaly_method(method)])

    def predict_anomalies(self, pixel_values: torch.Tensor, method: str | None = None) -> AnomalyPrediction:
        """Scores, maps and decisions (`scores > threshold`) of `method` (None = the calibrated default). A model
        that is not calibrated returns scores and maps with `is_anomalous` and `threshold` None, and says how to
        calibrate it."""
        method = self.resolve_anomaly_method(method)
        maps, scores = self.score_nll_maps(self.nll_maps(pixel_values), method)
        if not self.is_calibrated:
            logger.warning_once(NOT_CALIBRATED)
            return AnomalyPrediction(scores=scores, maps=maps, method=method)
        threshold = self.anomaly_threshold(method)
        return AnomalyPrediction(scores=scores, maps=maps, is_anomalous=scores.double() > threshold,
                                 threshold=threshold, method=method)

    @torch.no_grad()
    def calibrate(self, good_pixel_values: torch.Tensor, target_fpr: float = 0.05, method: str | None = None,
                  batch_size: int = 16, parameters: ScoreParameters | None = None) -> dict:
        """Calibrate the anomaly scores on held-out good images (never trained on), float (N, C, H, W) in [0, 1].

        Stores the per-location NLL statistics (for the standardised scores) in `anomaly_statistics` and, in
        `config.anomaly_calibration`, the decision threshold of every score at `target_fpr` on these images
        ("anomalous when score > threshold"), `method` as the default score (None = `default_anomaly_score`) and the
        score sizes (`parameters`, default: `ScoreParameters.for_image_size`). `save_pretrained` then saves all of
        it. Returns `config.anomaly_calibration`.
        """
        method = check_score_name(method or self.default_anomaly_score).name
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        parameters = parameters or ScoreParameters.for_image_size(self.config.image_size)
        maps = NLLMaps.cat(self.nll_maps(chunk.to(self.device)) for chunk in good_pixel_values.split(batch_size))
        statistics, thresholds, fprs = calibrate_scores(maps, parameters, target_fpr)
        self.anomaly_statistics.store(statistics)
        self.config.anomaly_calibration = {
            "method": method,
            "target_fpr": float(target_fpr),
            "thresholds": thresholds,
            "calibration_fpr": fprs,
            "num_images": int(maps.pixel.shape[0]),
            **parameters.to_dict(),
        }
        return self.config.anomaly_calibration


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
