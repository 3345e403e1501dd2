"""The sequential direction of a MADE block (MAF sampling, IAF density), solved exactly one segment at a time.

A MADE's output i depends on inputs of degree <= m_L(k) only through last-layer hidden units k with m_L(k) < i. With
the distinct last-layer degrees s_1 < ... < s_r, the outputs of degrees (s_j, s_{j+1}] therefore depend only on the
inputs of degree <= s_j: the block is inverted exactly in r + 1 MADE passes, one per segment (docs/maf.md).

One pass here is a fixed, short sequence of kernels: the first layer's pre-activation is updated in place with the
columns of the segment just solved (each first-layer weight is read once per inversion), the middle layers run on
(batch, H), and only the segment's output rows are evaluated. On CUDA with Triton a pass is three kernels: the middle
layers (one cuBLAS call each), the segment's output rows (for a few float32 rows a Triton kernel whose programs each
hold a few rows of the output weight, where cuBLAS's batched matmul would run a handful of long tiles; else that
matmul), and one Triton kernel that adds the biases, soft-clamps the log-scales, solves the segment, writes it, and
updates the first layer's pre-activation and its activation with the solved columns. Nothing is allocated per pass
beyond the small (batch, H) and (batch, segment) results, and the solved values and log-scales are written in place
into preallocated (batch, D) buffers. When a block's ordering is the natural or the reversed one (the ``"reverse"``
permutation), every segment is a contiguous range of pixel positions, so the weights are used as views, never copied;
a random ordering gathers the weights into degree order once per call.

The same fused tail serves the parallel direction of a MAF block without gradients (``density_in_one_kernel``: the
soft clamp, the affine solve and the running log-determinant of the whole output in one kernel). Whole directions of
a flow (every block) run as CUDA graphs through ``flow_graphs.py``.

This file imports only torch, Triton where present and its sibling ``masked_matmul.py``, relatively, so a Hub repo made
by ``save_pretrained`` loads with ``trust_remote_code=True``.
"""

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .masked_matmul import triton_runs_on


try:  # Triton ships with CUDA builds of torch; without it the pass's elementwise tail runs as torch kernels
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


def affine_generate(noise, shift, log_scale):
    """MAF sampling (noise -> data): x = z * exp(a) + shift."""
    return torch.addcmul(shift, noise, torch.exp(log_scale))


def affine_density(data, shift, log_scale):
    """IAF density (data -> noise): z = (x - shift) / exp(a)."""
    return (data - shift) / torch.exp(log_scale)


# On CUDA with Triton, the elementwise tail of a pass (soft clamp and affine solve) is one kernel; False: torch kernels.
FUSE_WITH_TRITON = True
# The solves whose elementwise tail a pass can do without calling them (in place, or in one fused kernel).
_FUSED_SOLVES = {affine_generate: 0, affine_density: 1}


def _as_compute(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision results are upcast to float32; float32 and float64 pass through (as the MADE's forward does)."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


# Per block: the segment ranges (plain ints) and, per device, the index tensors of a random ordering. Kept off the
# module so that nothing here is saved, copied or moved with it; built on first use, outside any CUDA graph capture.
_LAYOUTS = weakref.WeakKeyDictionary()


def segment_ranges(block, device) -> tuple[list[tuple[int, int]], torch.Tensor | None, torch.Tensor | None]:
    """Where each segment of ``block`` lies in the space the solver works in: ``(ranges, order, at_position)``.

    ``order`` is None when the block's ordering is the natural or the reversed one: the solver works at pixel
    positions and segment (lo, hi] of degrees is the contiguous range of positions [lo, hi) or [D - hi, D - lo).
    Otherwise ``order`` (D,) lists the positions by degree (the solver works in degree order on gathered weights),
    ``at_position`` (D,) takes the results back to pixel positions, and the ranges are [lo, hi).
    """
    layout = _LAYOUTS.get(block)
    if layout is None:
        degrees = block.input_degrees
        num_features = len(degrees)
        natural = torch.arange(1, num_features + 1, dtype=degrees.dtype, device=degrees.device)
        if torch.equal(degrees, natural):
            ranges, permuted = [(low, high) for low, high in block.segments], False
        elif torch.equal(degrees, natural.flip(0)):
            ranges, permuted = [(num_features - high, num_features - low) for low, high in block.segments], False
        else:
            ranges, permuted = [(low, high) for low, high in block.segments], True
        layout = _LAYOUTS[block] = {"ranges": ranges, "permuted": permuted}
    if not layout["permuted"]:
        return layout["ranges"], None, None
    device = torch.device(device)
    if device not in layout:
        degrees = block.input_degrees
        layout[device] = (torch.argsort(degrees).to(device), (degrees - 1).to(device))
    return layout["ranges"], *layout[device]


def solve_sequential(block, known: torch.Tensor, solve_segment, locations: torch.Tensor | None = None):
    """``MADEBlock.solve_sequential``: returns ``(w, log_scale)``, both (batch, D) at pixel positions, with
    ``w_i = solve_segment(known_i, shift_i(w_<i), log_scale_i(w_<i))`` for every i.

    Without gradients (``torch.no_grad``, or nothing that requires grad) the passes write into preallocated buffers;
    with them, the same passes build the result out of place so that autograd sees every step.
    """
    made = block.made
    first, *middle, last = made.layers
    num_features = made.num_features
    ranges, order, at_position = segment_ranges(block, known.device)
    batch_size = known.shape[0]
    differentiable = torch.is_grad_enabled() and (
        known.requires_grad or any(parameter.requires_grad for parameter in made.parameters()))

    # Absent connections are zero, so the weights serve as they are; with gradients, through the mask (as in
    # MaskedLinear), so that no gradient reaches an absent connection.
    weights = [layer.masked_weight() if differentiable else layer.weight for layer in made.layers]
    first_weight = weights[0]  # (H, D): columns of one segment are a view
    output_weight = weights[-1].view(2, num_features, -1)  # (shifts | log-scales, D, H): rows of a segment, views
    output_bias = last.bias.view(2, num_features)
    if order is not None:
        first_weight, known = first_weight[:, order], known[:, order]
        output_weight, output_bias = output_weight[:, order], output_bias[:, order]
    middle_layers = [(weight, layer.bias) for weight, layer in zip(weights[1:-1], middle)]
    relu = isinstance(made.activation, nn.ReLU)
    clamp = made.log_scale_clamp
    fused = _FUSED_SOLVES.get(solve_segment) if not differentiable else None
    fused_kernel = fused is not None and FUSE_WITH_TRITON and triton is not None and known.is_cuda

    pre_activation = first.bias.expand(batch_size, -1)
    offset = made.position_offset(locations, pre_activation)
    pre_activation = pre_activation + offset if offset is not None else pre_activation.clone()
    # The fused kernel also updates the first layer (float32, ReLU, a small batch): it keeps relu(pre-activation) in
    # `first_hidden`, so that a pass needs no separate activation kernel.
    update_in_tail = (fused_kernel and relu and batch_size <= _UPDATE_MAX_ROWS
                      and pre_activation.dtype == first_weight.dtype == torch.float32 and first_weight.stride(1) == 1)
    first_hidden = made.activation(pre_activation) if update_in_tail else None
    rows_in_triton = (update_in_tail and output_weight.dtype == torch.float32 and output_weight.stride(-1) == 1
                      and output_weight.shape[-1] <= _SEGMENT_ROWS_MAX_HIDDEN and output_weight.numel() < 2**31)
    compute_dtype = torch.promote_types(known.dtype, torch.promote_types(pre_activation.dtype, torch.float32))
    if not differentiable:
        solved = torch.empty(batch_size, num_features, dtype=compute_dtype, device=known.device)
        log_scales = torch.empty_like(solved)
    solved_list, log_scale_list = [], []
    for low, high in ranges:
        hidden = first_hidden if update_in_tail else made.activation(pre_activation)
        for weight, bias in middle_layers:
            if relu and not differentiable:
                hidden = torch._addmm_activation(bias, hidden, weight.t())
            else:
                hidden = made.activation(F.linear(hidden, weight, bias))
        known_segment = known[:, low:high]
        if fused_kernel:
            # Shifts and raw log-scales of the segment in one kernel (a few float32 rows: `_segment_rows`; else a
            # batched matmul); the bias, soft clamp and solve in one kernel that writes the output buffers.
            segment, log_scale = solved[:, low:high], log_scales[:, low:high]
            if rows_in_triton:
                products = _segment_rows(hidden, output_weight[:, low:high])
            else:
                products = torch.bmm(hidden.expand(2, -1, -1), output_weight[:, low:high].transpose(1, 2))
            if update_in_tail and high - low <= _UPDATE_MAX_WIDTH:
                _affine_tail(products, output_bias[:, low:high], known_segment, segment, log_scale, clamp, fused,
                             update=(first_weight[:, low:high], pre_activation, first_hidden))
                continue
            _affine_tail(products, output_bias[:, low:high], known_segment, segment, log_scale, clamp, fused)
            pre_activation.addmm_(segment.to(first_weight.dtype), first_weight[:, low:high].t())
            if update_in_tail:
                torch.relu(pre_activation, out=first_hidden)
            continue
        shift = F.linear(hidden, output_weight[0, low:high], output_bias[0, low:high])
        raw_log_scale = F.linear(hidden, output_weight[1, low:high], output_bias[1, low:high])
        if differentiable:
            log_scale = made.soft_clamp(_as_compute(raw_log_scale))
            segment = solve_segment(known_segment, _as_compute(shift), log_scale)
            solved_list.append((low, segment))
            log_scale_list.append((low, log_scale))
            pre_activation = torch.addmm(pre_activation, segment.to(first_weight.dtype), first_weight[:, low:high].t())
            continue
        segment, log_scale = solved[:, low:high], log_scales[:, low:high]
        if fused is not None:
            # made.soft_clamp and the solve, in place into the output buffers.
            torch.div(_as_compute(raw_log_scale), clamp, out=log_scale).tanh_().mul_(clamp)
            scale = torch.exp(log_scale)
            if fused == 0:
                torch.addcmul(_as_compute(shift), known_segment, scale, out=segment)
            else:
                torch.div(torch.sub(known_segment, _as_compute(shift)), scale, out=segment)
        else:
            log_scale.copy_(made.soft_clamp(_as_compute(raw_log_scale)))
            segment.copy_(solve_segment(known_segment, _as_compute(shift), log_scale))
        pre_activation.addmm_(segment.to(first_weight.dtype), first_weight[:, low:high].t())
    if differentiable:
        # In the space's order (a reversed ordering solves its positions from the last range to the first).
        solved = torch.cat([piece for _, piece in sorted(solved_list, key=lambda item: item[0])], dim=1)
        log_scales = torch.cat([piece for _, piece in sorted(log_scale_list, key=lambda item: item[0])], dim=1)
    if order is None:
        return solved, log_scales
    return solved[:, at_position], log_scales[:, at_position]


# ------------------------------------------------------------------------------------- fused elementwise tail
if triton is not None:

    @triton.jit
    def _solve_segment(products_ptr, bias_ptr, known_ptr, row, column, inside, products_half, products_stride,
                       bias_half, known_stride, clamp, INVERT: tl.constexpr, HAS_BIAS: tl.constexpr):
        """(solved, log_scale) at (row, column) of a segment: shift = products[0] + bias[0], raw = products[1] +
        bias[1] (no bias without HAS_BIAS); log_scale = clamp * tanh(raw / clamp); solved = known * exp(log_scale) +
        shift (INVERT=0) or (known - shift) / exp(log_scale) (INVERT=1). Every operand is addressed by its strides."""
        at = products_ptr + row * products_stride + column
        shift = tl.load(at, mask=inside, other=0.0).to(tl.float32)
        raw = tl.load(at + products_half, mask=inside, other=0.0).to(tl.float32)
        if HAS_BIAS:
            shift += tl.load(bias_ptr + column, mask=inside, other=0.0).to(tl.float32)
            raw += tl.load(bias_ptr + bias_half + column, mask=inside, other=0.0).to(tl.float32)
        known = tl.load(known_ptr + row * known_stride + column, mask=inside, other=0.0).to(tl.float32)
        scaled = raw / clamp
        # tanh(y) = sign(y) * (1 - e) / (1 + e) with e = exp(-2|y|): no overflow for any y.
        decay = tl.exp(-2.0 * tl.abs(scaled))
        magnitude = (1.0 - decay) / (1.0 + decay)
        log_scale = clamp * tl.where(scaled < 0, -magnitude, magnitude)
        scale = tl.exp(log_scale)
        if INVERT:
            solved = (known - shift) / scale
        else:
            solved = known * scale + shift
        return solved, log_scale

    @triton.jit
    def _affine_tail_kernel(products_ptr, bias_ptr, known_ptr, solved_ptr, log_scale_ptr, width, total,
                            products_half, products_stride, bias_half, known_stride, solved_stride, log_scale_stride,
                            clamp, INVERT: tl.constexpr, HAS_BIAS: tl.constexpr, SUBTRACT: tl.constexpr,
                            BLOCK: tl.constexpr):
        """`_solve_segment` over a (rows, width) segment, BLOCK elements a program; writes solved and log_scale
        (SUBTRACT: subtracts log_scale from what log_scale_ptr holds, a running log-determinant)."""
        index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = index < total
        row, column = index // width, index % width
        solved, log_scale = _solve_segment(products_ptr, bias_ptr, known_ptr, row, column, inside, products_half,
                                           products_stride, bias_half, known_stride, clamp, INVERT, HAS_BIAS)
        log_scale_at = log_scale_ptr + row * log_scale_stride + column
        if SUBTRACT:
            log_scale = tl.load(log_scale_at, mask=inside, other=0.0) - log_scale
        tl.store(log_scale_at, log_scale, mask=inside)
        tl.store(solved_ptr + row * solved_stride + column, solved, mask=inside)

    @triton.jit
    def _affine_tail_update_kernel(products_ptr, bias_ptr, known_ptr, solved_ptr, log_scale_ptr, weight_ptr,
                                   pre_ptr, hidden_ptr, rows, width, units, products_half, products_stride, bias_half,
                                   known_stride, solved_stride, log_scale_stride, weight_stride, pre_stride,
                                   hidden_stride, clamp, INVERT: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                                   BLOCK_WIDTH: tl.constexpr, BLOCK_UNITS: tl.constexpr):
        """`_solve_segment` over the whole (rows, width) segment in every program, then the first-layer update of
        this program's BLOCK_UNITS hidden units: pre += solved @ weight.T and hidden = relu(pre), where weight is the
        (units, width) block of first-layer columns of the segment. Program 0 writes the segment."""
        row = tl.arange(0, BLOCK_ROWS)[:, None]
        column = tl.arange(0, BLOCK_WIDTH)[None, :]
        inside = (row < rows) & (column < width)
        solved, log_scale = _solve_segment(products_ptr, bias_ptr, known_ptr, row, column, inside, products_half,
                                           products_stride, bias_half, known_stride, clamp, INVERT, True)
        solved = tl.where(inside, solved, 0.0)
        if tl.program_id(0) == 0:
            tl.store(log_scale_ptr + row * log_scale_stride + column, log_scale, mask=inside)
            tl.store(solved_ptr + row * solved_stride + column, solved, mask=inside)
        unit = tl.program_id(0) * BLOCK_UNITS + tl.arange(0, BLOCK_UNITS)[None, :]
        segment_column = tl.arange(0, BLOCK_WIDTH)[:, None]
        weight = tl.load(weight_ptr + unit * weight_stride + segment_column,
                         mask=(segment_column < width) & (unit < units), other=0.0).to(tl.float32)
        update = tl.dot(solved, weight, input_precision="ieee")
        on_units = (row < rows) & (unit < units)
        pre = tl.load(pre_ptr + row * pre_stride + unit, mask=on_units, other=0.0) + update
        tl.store(pre_ptr + row * pre_stride + unit, pre, mask=on_units)
        tl.store(hidden_ptr + row * hidden_stride + unit, tl.maximum(pre, 0.0), mask=on_units)


    @triton.jit
    def _segment_rows_kernel(hidden_ptr, weight_ptr, out_ptr, rows, width, hidden_size, hidden_stride, weight_half,
                             weight_stride, out_half, out_stride, BLOCK_OUT: tl.constexpr, BLOCK_HIDDEN: tl.constexpr):
        """out[half, r, j] = sum_k hidden[r, k] * weight[half, j, k] for BLOCK_OUT columns j of one half a program:
        the program keeps its (BLOCK_OUT, hidden_size) weight tile in registers and reduces it against each row."""
        half = tl.program_id(0)
        column = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
        unit = tl.arange(0, BLOCK_HIDDEN)
        weight = tl.load(weight_ptr + half * weight_half + column[:, None] * weight_stride + unit[None, :],
                         mask=(column[:, None] < width) & (unit[None, :] < hidden_size), other=0.0)
        row = 0
        while row < rows:  # (not `for row in range(rows)`: Triton 3.6's interpreter cannot range over an argument)
            hidden = tl.load(hidden_ptr + row * hidden_stride + unit, mask=unit < hidden_size, other=0.0)
            total = tl.sum(weight * hidden[None, :], axis=1)
            tl.store(out_ptr + half * out_half + row * out_stride + column, total, mask=column < width)
            row += 1


# `_segment_rows`: columns a program, warps a program, and the largest last hidden layer it takes (its weight tile
# lives in registers).
_SEGMENT_ROWS_BLOCK_OUT = 4
_SEGMENT_ROWS_WARPS = 4
_SEGMENT_ROWS_MAX_HIDDEN = 1024


def _segment_rows(hidden, weight):
    """``torch.bmm(hidden.expand(2, -1, -1), weight.transpose(1, 2))`` for a few float32 rows in one Triton kernel:
    ``hidden`` (rows, H) with contiguous rows, ``weight`` (2, width, H), the output layer's rows of one segment
    (shifts, raw log-scales), with a contiguous last dimension. Returns (2, rows, width)."""
    rows, hidden_size = hidden.shape
    width = weight.shape[1]
    out = torch.empty(2, rows, width, dtype=torch.float32, device=hidden.device)
    _segment_rows_kernel[(2, triton.cdiv(width, _SEGMENT_ROWS_BLOCK_OUT))](
        hidden, weight, out, rows, width, hidden_size, hidden.stride(0), weight.stride(0), weight.stride(1),
        out.stride(0), out.stride(1), BLOCK_OUT=_SEGMENT_ROWS_BLOCK_OUT,
        BLOCK_HIDDEN=triton.next_power_of_2(hidden_size), num_warps=_SEGMENT_ROWS_WARPS)
    return out


# The first-layer update joins the tail kernel for batches and segments up to these sizes (its registers hold the
# whole segment); larger ones use a cuBLAS update.
_UPDATE_MAX_ROWS = 32
_UPDATE_MAX_WIDTH = 256
_UPDATE_BLOCK_UNITS = 32


def _affine_tail(products, bias, known, solved, log_scale, clamp, invert, update=None, subtract=False):
    """One kernel for the bias, the soft clamp and the affine solve of one segment: ``products`` (2, rows, width)
    are the segment's shifts and raw log-scales before their ``bias`` (2, width; None: already added); writes
    ``solved`` and ``log_scale`` (rows, width views of the output buffers; ``subtract``: ``log_scale`` holds a running
    log-determinant, from which the segment's log-scales are subtracted in place). Every operand's last dimension must
    be contiguous.

    ``update=(weight, pre_activation, hidden)``: the same kernel then also adds ``solved @ weight.T`` to
    ``pre_activation`` (rows, H) in place and writes its ReLU into ``hidden`` (rows, H); ``weight`` (H, width) are
    the first layer's columns of the segment; all float32, at most _UPDATE_MAX_ROWS rows and _UPDATE_MAX_WIDTH
    columns."""
    rows, width = solved.shape
    operands = (products, known, solved, log_scale) + ((bias,) if bias is not None else ())
    if min(tensor.stride(-1) for tensor in operands) != 1 or width == 0:
        raise ValueError("the fused tail needs operands whose last dimension is contiguous")
    if update is None:
        total = rows * width
        block = 256
        _affine_tail_kernel[(triton.cdiv(total, block),)](
            products, bias if bias is not None else products, known, solved, log_scale, width, total,
            products.stride(0), products.stride(1), bias.stride(0) if bias is not None else 0, known.stride(0),
            solved.stride(0), log_scale.stride(0), float(clamp), INVERT=invert, HAS_BIAS=bias is not None,
            SUBTRACT=subtract, BLOCK=block)
        return
    if subtract:
        raise ValueError("the fused first-layer update writes log-scales; it does not subtract them")
    weight, pre_activation, hidden = update
    units = weight.shape[0]
    if (rows > _UPDATE_MAX_ROWS or width > _UPDATE_MAX_WIDTH or weight.shape[1] != width
            or min(tensor.stride(-1) for tensor in update) != 1
            or any(tensor.dtype != torch.float32 for tensor in update)
            or pre_activation.shape != (rows, units) or hidden.shape != (rows, units)):
        raise ValueError("the fused first-layer update needs float32 operands with a contiguous last dimension, "
                         f"at most {_UPDATE_MAX_ROWS} rows and {_UPDATE_MAX_WIDTH} columns")
    _affine_tail_update_kernel[(triton.cdiv(units, _UPDATE_BLOCK_UNITS),)](
        products, bias, known, solved, log_scale, weight, pre_activation, hidden, rows, width, units,
        products.stride(0), products.stride(1), bias.stride(0), known.stride(0), solved.stride(0),
        log_scale.stride(0), weight.stride(0), pre_activation.stride(0), hidden.stride(0), float(clamp),
        INVERT=invert, BLOCK_ROWS=max(16, triton.next_power_of_2(rows)),
        BLOCK_WIDTH=max(16, triton.next_power_of_2(width)), BLOCK_UNITS=_UPDATE_BLOCK_UNITS)


def density_in_one_kernel(made, inputs: torch.Tensor, log_det: torch.Tensor, locations: torch.Tensor | None = None):
    """The parallel direction of a MAF block without gradients on CUDA: ``(noise, log_det)``, noise = (inputs -
    shift) / exp(log_scale), from one MADE evaluation whose output is read once by the fused tail (the soft clamp, the
    affine solve, and the block's log-determinant -log_scale added to ``log_det``, the flow's running per-dimension
    log-determinant, in place), instead of the elementwise torch kernels of ``MADE.forward``, the solve and the sum,
    each of which reads and writes (batch, D) in memory. None where it does not apply (no Triton, not on CUDA, with
    gradients, ``FUSE_WITH_TRITON`` off, ``inputs`` or ``log_det`` not contiguous float32 of one shape, offsets beyond
    int32; on the CPU only under Triton's interpreter, which is how the tests run it): the caller runs the torch
    path."""
    num_features = made.num_features
    if (not FUSE_WITH_TRITON or not triton_runs_on(inputs) or torch.is_grad_enabled()
            or inputs.dtype != torch.float32 or not inputs.is_contiguous() or inputs.ndim != 2
            or inputs.shape[0] * 2 * num_features >= 2**31 or not inputs.shape[0]):
        return None
    if log_det.shape != inputs.shape or log_det.dtype != torch.float32 or not log_det.is_contiguous():
        return None
    output = made.layers[-1](made.last_hidden(inputs, locations))  # (rows, 2D): shifts, then raw log-scales
    if output.stride(-1) != 1 or output.stride(0) != 2 * num_features:
        return None
    noise = torch.empty_like(inputs)
    products = output.view(-1, 2, num_features).transpose(0, 1)  # (2, rows, D) views, biases included
    _affine_tail(products, None, inputs, noise, log_det, made.log_scale_clamp, _FUSED_SOLVES[affine_density],
                 subtract=True)
    return noise, log_det
