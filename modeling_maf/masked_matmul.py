"""Block-sparse ``F.linear`` for the MADE layers: the matmul reads only the weight tiles that hold connections.

A MADE weight is exactly zero outside its mask (``MaskedLinear``), and with degrees that run monotonically along the
weight's rows and columns (the input degrees in natural or reversed order, hidden degrees of the ``spread`` or
``sequential`` rule) the connections of every row tile form one contiguous range of column tiles: about half of each
matrix is zero tiles. ``block_sparse_linear`` computes ``F.linear(inputs, weight, bias)`` over those ranges only, in one
Triton kernel, so it reads about half the weight bytes and does about half the multiply-adds. Nothing is stored: the
ranges are derived from the layer's degrees on first use and cached per device (like ``MaskedLinear.mask``).

Used by ``MaskedLinear.forward`` when no weight gradient is needed (``log_prob``, anomaly scoring in eval/no-grad
mode; inputs may take gradients: the input gradient is the same kernel over the transposed tiles). It runs where
Triton is importable and the tensors are on CUDA (or on the CPU under ``TRITON_INTERPRET=1``, which is how the tests
run it). The kernel takes float32, bfloat16 and float16 (also under autocast, reading float32 weights and casting
tiles in registers); by default (``pays``) it runs where it measured faster than cuBLAS: layers whose tiles skip
enough of the matrix, for float32 products and for half-precision products of a few rows. Half-precision products of
more rows under autocast (float32 weights) stay with cuBLAS, but on a cast copy of the weight made from its connected
tiles only (``connected_weight``: half the float32 reads of autocast's cast, the same values) when captured in a CUDA
graph. Everything else takes the dense ``F.linear``.
``HF_DGM_BLOCK_SPARSE=0`` in the environment turns it off.

float32 products use Triton's ``tf32x3`` by default (three TF32 tensor-core products that carry about 21 of fp32's
24 significand bits; the sum is accumulated in float32, whose rounding over these long sums is the larger error);
``HF_DGM_BLOCK_SPARSE_FP32=ieee`` gives plain float32 multiply-adds. When torch itself allows TF32 matmuls, the
dense path is TF32 and so is this one. Half-precision inputs use the tensor cores with float32 accumulation, as
cuBLAS does.
"""

import os
import weakref

import torch
import torch.nn.functional as F


try:  # Triton ships with CUDA builds of torch; without it (CPU wheels) the dense path runs.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Environment switches, read on every call (so that a benchmark can compare both paths in one process).
DISABLE_ENV = "HF_DGM_BLOCK_SPARSE"  # "0" (or "false", "no", "off"): the dense path everywhere
FP32_PRECISION_ENV = "HF_DGM_BLOCK_SPARSE_FP32"  # "tf32x3" (default) or "ieee"
FP32_PRECISIONS = ("tf32x3", "ieee")

# A layer takes the kernel only when its tiles cover at most this fraction of the matrix: a random input permutation
# (or random hidden degrees) leaves almost no zero tile, and then cuBLAS's dense GEMM is the faster way.
MAX_COVERED_FRACTION = 0.8
# ... and, for half-precision products, only for batches of at most this many rows: chosen by measurement
# (docs/RESULTS.md, "log_prob"). A few rows are bound by reading the weights, and the kernel reads the float32 weights
# once, casting tiles in registers, where autocast's cuBLAS path first writes and reads a cast copy; for larger
# batches cuBLAS's half-precision GEMMs are the faster ones. ``force=True`` (tests, benchmarks) skips these rules.
MAX_HALF_PRECISION_ROWS = 16

if triton is not None:

    @triton.jit
    def _block_sparse_linear_kernel(inputs_ptr, weight_ptr, bias_ptr, out_ptr, items_ptr, num_rows, num_outputs,
                                    num_inputs, num_row_tiles, stride_im, stride_ik, stride_wn, stride_wk, stride_om,
                                    stride_on, stride_os, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                                    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                                    PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One (BLOCK_M, BLOCK_N) output tile of ``inputs @ weight.T`` over the column range of one work item.

        Work item ``(n_tile, k_begin, k_end, slot)`` (int32, k in elements, multiples of BLOCK_K): output columns
        ``n_tile * BLOCK_N + [0, BLOCK_N)`` summed over inputs ``[k_begin, k_end)``. Programs run row tiles fastest,
        so the row tiles of one item read its weight tiles at about the same time (once from memory, then from L2).
        Without SPLIT the item covers all connections of its columns: bias added, stored in the output's dtype. With
        SPLIT it is one of several slices of them: its float32 partial sum goes to plane ``slot`` of ``out_ptr``.
        UPCAST_DOT (Triton's interpreter, whose half-precision dot is wrong): the operands are rounded to
        COMPUTE_DTYPE and multiplied in float32, which is the same maths (products of half-precision values are exact
        in float32).
        """
        pid = tl.program_id(0)
        item = pid // num_row_tiles
        rows = (pid % num_row_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        n_tile = tl.load(items_ptr + 4 * item)
        k_begin = tl.load(items_ptr + 4 * item + 1)
        k_end = tl.load(items_ptr + 4 * item + 2)
        cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < num_rows, cols < num_outputs
        offsets_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_begin, k_end, BLOCK_K):
            ks = k + offsets_k
            input_ptrs = inputs_ptr + rows[:, None] * stride_im + ks[None, :] * stride_ik
            weight_ptrs = weight_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn
            if EVEN_K:
                a = tl.load(input_ptrs, mask=row_ok[:, None], other=0.0)
                if EVEN_N:
                    b = tl.load(weight_ptrs)
                else:
                    b = tl.load(weight_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = ks < num_inputs
                a = tl.load(input_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(weight_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            a, b = a.to(COMPUTE_DTYPE), b.to(COMPUTE_DTYPE)
            if UPCAST_DOT:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if SPLIT:
            slot = tl.load(items_ptr + 4 * item + 3)
            out_ptrs = out_ptr + slot * stride_os + rows[:, None] * stride_om + cols[None, :] * stride_on
            tl.store(out_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _connected_tiles_cast_kernel(weight_ptr, out_ptr, ranges_ptr, num_rows, num_cols, stride_wn, stride_wk,
                                     stride_on, stride_ok, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One (BLOCK_N, BLOCK_K) tile of ``out = weight.to(out's dtype)``: the weight tile read and cast where it
        holds connections (its column tile inside its row tile's range ``ranges[row_tile]``), zeros written
        elsewhere without reading (the weight is zero there)."""
        row_tile, col_tile = tl.program_id(0), tl.program_id(1)
        rows = row_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = col_tile * BLOCK_K + tl.arange(0, BLOCK_K)
        inside = (rows[:, None] < num_rows) & (cols[None, :] < num_cols)
        first = tl.load(ranges_ptr + 2 * row_tile)
        end = tl.load(ranges_ptr + 2 * row_tile + 1)
        values = tl.zeros((BLOCK_N, BLOCK_K), dtype=out_ptr.dtype.element_ty)
        if (col_tile >= first) & (col_tile < end):
            values = tl.load(weight_ptr + rows[:, None] * stride_wn + cols[None, :] * stride_wk, mask=inside,
                             other=0.0).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * stride_on + cols[None, :] * stride_ok, values, mask=inside)

    _TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def tile_ranges(out_degrees: torch.Tensor, in_degrees: torch.Tensor, strict: bool, block_rows: int,
                block_cols: int) -> torch.Tensor:
    """(num_row_tiles, 2) int64 ``[first, last + 1)`` column tiles of each row tile's connections, where output k
    connects to input j iff ``out_degrees[k] > in_degrees[j]`` (``strict``) or ``>=``. A row tile without connections
    gets an empty range. Everything between first and last counts, so the ranges are exact only where the degrees are
    monotonic along the columns."""
    num_row_tiles, num_col_tiles = -(-len(out_degrees) // block_rows), -(-len(in_degrees) // block_cols)
    out_max = torch.full((num_row_tiles * block_rows,), torch.iinfo(torch.int64).min, dtype=torch.int64)
    out_max[: len(out_degrees)] = out_degrees
    in_min = torch.full((num_col_tiles * block_cols,), torch.iinfo(torch.int64).max, dtype=torch.int64)
    in_min[: len(in_degrees)] = in_degrees
    out_max, in_min = out_max.view(-1, block_rows).amax(1), in_min.view(-1, block_cols).amin(1)
    connected = out_max[:, None] > in_min[None, :] if strict else out_max[:, None] >= in_min[None, :]
    columns = torch.arange(num_col_tiles)
    first = torch.where(connected, columns, num_col_tiles).amin(1)
    last = torch.where(connected, columns, -1).amax(1) + 1
    return torch.stack([first, torch.maximum(first, last)], dim=1)


def _covered_fraction(ranges, block_rows, block_cols, num_rows, num_cols) -> float:
    return float((ranges[:, 1] - ranges[:, 0]).sum()) * block_rows * block_cols / max(1, num_rows * num_cols)


def _degrees(layer, transposed: bool):
    """(row degrees, column degrees) of ``layer.weight`` (transposed: of ``weight.T``, the input gradient's matrix,
    with degrees mirrored so that the same ``>``/``>=`` rule reads its connections)."""
    out_degrees, in_degrees = layer.out_degrees.cpu(), layer.in_degrees.cpu()
    if not transposed:
        return out_degrees, in_degrees
    top = int(max(out_degrees.max(), in_degrees.max())) + 1
    return top - in_degrees, top - out_degrees


class _Plan:
    """Work items of one layer (or its transpose) for one tile shape and split count, on one device."""

    def __init__(self, layer, transposed: bool, block_n: int, block_k: int, device):
        row_degrees, col_degrees = _degrees(layer, transposed)
        self.ranges = tile_ranges(row_degrees, col_degrees, layer.strict, block_n, block_k)
        self.lengths = self.ranges[:, 1] - self.ranges[:, 0]  # column tiles per row tile
        self.num_row_tiles, self.longest = len(self.lengths), int(self.lengths.max())
        self.covered_fraction = _covered_fraction(self.ranges, block_n, block_k, len(row_degrees), len(col_degrees))
        self.block_n, self.block_k, self.device = block_n, block_k, device
        self.items = {}  # splits -> (int32 work items on the device, number of items)
        self._device_ranges = None

    def device_ranges(self) -> torch.Tensor:
        """The ranges as an int32 (num_row_tiles, 2) tensor on the device."""
        if self._device_ranges is None:
            _refuse_during_capture(self.device)
            self._device_ranges = self.ranges.to(torch.int32).to(self.device)
        return self._device_ranges

    def work_items(self, splits: int):
        """Every row tile's range cut into ``splits`` near-equal slices (some may be empty: their programs write
        zeros, or the bias), as (n_tile, k_begin, k_end, slot) rows in elements."""
        if splits not in self.items:
            _refuse_during_capture(self.device)
            first, lengths = self.ranges[:, 0], self.lengths
            slot = torch.arange(splits)
            begin = first[:, None] + lengths[:, None] * slot[None, :] // splits
            end = first[:, None] + lengths[:, None] * (slot[None, :] + 1) // splits
            n_tile = torch.arange(len(first))[:, None].expand_as(begin)
            items = torch.stack([n_tile, begin * self.block_k, end * self.block_k, slot.expand_as(begin)], dim=-1)
            items = items.reshape(-1, 4).to(torch.int32)
            self.items[splits] = (items.to(self.device), len(items))
        return self.items[splits]


# layer -> {(device, transposed, block_n, block_k): _Plan}; weak, so that a deleted model frees its plans.
_PLANS = weakref.WeakKeyDictionary()


class _NotPlanned(RuntimeError):
    """A plan is missing during a CUDA graph capture, which forbids the host-to-device copy that makes it."""


def _refuse_during_capture(device):
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise _NotPlanned


def _plan(layer, transposed: bool, block_n: int, block_k: int, device) -> _Plan:
    plans = _PLANS.setdefault(layer, {})
    key = (device, transposed, block_n, block_k)
    if key not in plans:
        _refuse_during_capture(device)
        plans[key] = _Plan(layer, transposed, block_n, block_k, device)
    return plans[key]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(tensor: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on ``tensor``: Triton importable and the tensor on CUDA, or on the CPU under
    ``TRITON_INTERPRET=1`` (Triton's interpreter, which is how the tests run the kernels)."""
    return triton is not None and (tensor.is_cuda or (_interpreting() and tensor.device.type == "cpu"))


def block_sparse_enabled() -> bool:
    """Whether this process may use the kernel at all (Triton importable, not switched off by the environment)."""
    return triton is not None and os.environ.get(DISABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def kernel_settings() -> tuple:
    """The switches that decide which kernels a call launches (part of a CUDA graph's key: a graph captured with one
    setting must not serve another)."""
    return (block_sparse_enabled(), os.environ.get(FP32_PRECISION_ENV), torch.backends.cuda.matmul.allow_tf32,
            MAX_HALF_PRECISION_ROWS, MAX_COVERED_FRACTION)


def _fp32_precision() -> str:
    if torch.backends.cuda.matmul.allow_tf32:  # the dense path is TF32 then: so is this one
        return "tf32"
    precision = os.environ.get(FP32_PRECISION_ENV, "tf32x3").strip().lower()
    if precision not in FP32_PRECISIONS:
        raise ValueError(f"{FP32_PRECISION_ENV}={precision!r} is not a float32 precision of the block-sparse matmul; "
                         f"use one of {', '.join(FP32_PRECISIONS)}.")
    return precision


def _compute_dtype(inputs: torch.Tensor, weight: torch.Tensor):
    """The dtype ``F.linear`` would multiply in here (autocast's, else the tensors' own), or None where the dense
    path must decide (mixed dtypes without autocast, float64, ...)."""
    device_type = inputs.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return dtype if dtype in (torch.bfloat16, torch.float16) and weight.dtype in _SUPPORTED else None
    return inputs.dtype if inputs.dtype == weight.dtype and inputs.dtype in _SUPPORTED else None


_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def _num_programs_wanted(device) -> int:
    """Programs that keep the device busy: a few waves over its multiprocessors."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def default_config(num_rows: int, compute_dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """``(block_m, block_n, block_k, num_warps, num_stages)`` for ``num_rows`` input rows: a row tile of 16 for up to
    16 rows, else of 32 or 64, whichever pads the rows less (the row tiles of one item share its weight tiles through
    L2; fewer, larger ones use the tensor cores better); 64 output columns; a reduction step of 64 values (32 for
    float32 products of at most 16 rows). Chosen by a sweep of tile shapes (docs/RESULTS.md, "log_prob")."""
    block_m = 16 if num_rows <= 16 else min((64, 32), key=lambda size: -(-num_rows // size) * size)
    block_k = 32 if compute_dtype == torch.float32 and num_rows <= 16 else 64
    return block_m, 64, block_k, 4, 3


def _launch(layer, inputs, weight, bias, compute_dtype, transposed: bool, config=None):
    """``inputs @ weight.T (+ bias)`` over the layer's connected tiles (transposed: ``inputs @ weight``, the input
    gradient, where ``weight`` is the layer's weight and no bias is added). Returns a tensor of ``compute_dtype``.
    ``config``: ``(block_m, block_n, block_k, num_warps, num_stages)``, default ``default_config``."""
    num_rows = inputs.shape[0]
    if transposed:
        num_outputs, num_inputs = weight.shape[1], weight.shape[0]
        stride_wn, stride_wk = weight.stride(1), weight.stride(0)
    else:
        num_outputs, num_inputs = weight.shape
        stride_wn, stride_wk = weight.stride(0), weight.stride(1)
    block_m, block_n, block_k, num_warps, num_stages = config or default_config(num_rows, compute_dtype)
    plan = _plan(layer, transposed, block_n, block_k, inputs.device)
    num_row_tiles = -(-num_rows // block_m)
    # Too few (row tile, column tile) programs to fill the device (a wide first layer: 8 column tiles): every
    # range is cut into slices whose float32 partial sums are added afterwards.
    unsplit = num_row_tiles * plan.num_row_tiles
    splits = max(1, min(-(-_num_programs_wanted(inputs.device) // unsplit), plan.longest,
                        (2**31 - 1) // (num_rows * num_outputs)))
    items, num_items = plan.work_items(splits)
    out = torch.empty(num_rows, num_outputs, device=inputs.device, dtype=compute_dtype)
    target = out if splits == 1 else torch.empty(splits, num_rows, num_outputs, device=inputs.device,
                                                 dtype=torch.float32)
    precision = "tf32" if compute_dtype != torch.float32 else _fp32_precision()  # ignored for half operands
    _block_sparse_linear_kernel[(num_items * num_row_tiles,)](
        inputs, weight, bias if bias is not None else out, target, items, num_rows, num_outputs, num_inputs,
        num_row_tiles, inputs.stride(0), inputs.stride(1), stride_wn, stride_wk, target.stride(-2),
        target.stride(-1), target.stride(0) if splits > 1 else 0,
        HAS_BIAS=bias is not None, SPLIT=splits > 1, EVEN_N=num_outputs % block_n == 0,
        EVEN_K=num_inputs % block_k == 0, COMPUTE_DTYPE=_TRITON_DTYPES[compute_dtype], PRECISION=precision,
        UPCAST_DOT=_interpreting() and compute_dtype != torch.float32, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    if splits > 1:  # the slices' partial sums, in a fixed order: the result does not change from call to call
        summed = target.sum(0)
        if bias is not None:
            torch.add(summed, bias, out=out)
        else:
            out.copy_(summed)
    return out


class _BlockSparseLinear(torch.autograd.Function):
    """``F.linear`` over the connected tiles, with the input (and bias) gradient; never a weight gradient (the dense
    path runs whenever the weight takes one)."""

    @staticmethod
    def forward(ctx, inputs, weight, bias, layer, compute_dtype, config):
        ctx.layer, ctx.compute_dtype, ctx.input_dtype, ctx.config = layer, compute_dtype, inputs.dtype, config
        ctx.save_for_backward(weight)
        return _launch(layer, inputs, weight, bias, compute_dtype, transposed=False, config=config)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        grad_inputs = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_inputs = _launch(ctx.layer, grad_output, weight, None, ctx.compute_dtype, transposed=True,
                                  config=ctx.config)
            grad_inputs = grad_inputs.to(ctx.input_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum(0)
        return grad_inputs, None, grad_bias, None, None, None


def block_sparse_linear(layer, inputs: torch.Tensor, force: bool = False, config=None) -> torch.Tensor | None:
    """``F.linear(inputs, layer.weight, layer.bias)`` over the connected tiles of the MADE layer ``layer`` (a
    ``MaskedLinear``), or None where the dense path should run instead: no Triton, switched off, not on CUDA (CPU only
    under the Triton interpreter), a dtype it does not take, a weight that needs a gradient, a CUDA graph capture
    before an eager call of the same shape, or (unless ``force``) tiles that skip too little of the matrix to pay.
    Where the kernel does not pay for half-precision products under autocast (many rows), a CUDA graph capture gets
    cuBLAS's ``F.linear`` on ``connected_weight``, which equals the dense path's.
    ``config`` (benchmarks): the kernel's ``(block_m, block_n, block_k, num_warps, num_stages)``, default
    ``default_config``."""
    weight, bias = layer.weight, layer.bias
    if not block_sparse_enabled() or inputs.ndim != 2 or inputs.shape[1] != weight.shape[1] or not len(inputs):
        return None
    if not triton_runs_on(inputs) or weight.device != inputs.device:
        return None
    if torch.is_grad_enabled() and weight.requires_grad:
        return None
    compute_dtype = _compute_dtype(inputs, weight)
    if compute_dtype is None or max(inputs.numel(), weight.numel(), inputs.shape[0] * weight.shape[0]) >= 2**31:
        return None  # the kernel's offsets are int32
    try:
        if not force and not pays(layer, inputs.shape[0], compute_dtype, inputs.device, config):
            return _cublas_on_connected_cast(layer, inputs, compute_dtype)
        if torch.is_grad_enabled() and (inputs.requires_grad or (bias is not None and bias.requires_grad)):
            return _BlockSparseLinear.apply(inputs, weight, bias, layer, compute_dtype, config)
        return _launch(layer, inputs, weight, bias, compute_dtype, transposed=False, config=config)
    except _NotPlanned:  # a capture before the first eager call of this shape: the dense GEMM is captured instead
        return None


def pays(layer, num_rows: int, compute_dtype: torch.dtype, device, config=None) -> bool:
    """Whether ``block_sparse_linear`` runs the kernel (rather than cuBLAS) for ``num_rows`` rows of products in
    ``compute_dtype`` through ``layer``: float32 products, or half-precision ones for at most MAX_HALF_PRECISION_ROWS
    rows, through tiles that cover at most MAX_COVERED_FRACTION of the matrix."""
    if compute_dtype != torch.float32 and num_rows > MAX_HALF_PRECISION_ROWS:
        return False
    _, block_n, block_k, _, _ = config or default_config(num_rows, compute_dtype)
    return _plan(layer, False, block_n, block_k, torch.device(device)).covered_fraction <= MAX_COVERED_FRACTION


# The tile shape of ``connected_weight``'s cast.
CAST_BLOCK = 64


def _cublas_on_connected_cast(layer, inputs, compute_dtype):
    """Where the kernel does not pay: for half-precision products under autocast (float32 weights) through a layer
    whose tiles skip enough, cuBLAS's ``F.linear`` on ``connected_weight`` where the host's launch is paid once (a
    CUDA graph capture; and the interpreter, where the tests run it); else None (the dense path). Launched from
    Python in every call, the Triton cast costs more host time than it saves GPU time (docs/RESULTS.md, "log_prob"),
    so eager calls only make the plan that a later capture needs."""
    if compute_dtype == torch.float32 or layer.weight.dtype != torch.float32:
        return None
    plan = _plan(layer, False, CAST_BLOCK, CAST_BLOCK, inputs.device)
    if plan.covered_fraction > MAX_COVERED_FRACTION:
        return None
    plan.device_ranges()
    if not (_interpreting() or torch.cuda.is_current_stream_capturing()):
        return None
    return F.linear(inputs, connected_weight(layer, compute_dtype), layer.bias)


def connected_weight(layer, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``layer.weight.to(dtype)`` made from the weight tiles that hold connections, in one Triton kernel: the
    other tiles are written as zeros without being read (the weight is zero there), so a cast reads about half the
    float32 weight. It is what autocast's cuBLAS path needs for half-precision products of many rows, where a full
    cast of every weight in every call is a large part of the time. ``out``: the tensor to write (default: new).
    CUDA, or the CPU under Triton's interpreter (whose float32 -> bfloat16 conversion truncates, where a GPU
    rounds to nearest as ``Tensor.to`` does)."""
    weight = layer.weight
    plan = _plan(layer, False, CAST_BLOCK, CAST_BLOCK, weight.device)
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device) if out is None else out
    if out.shape != weight.shape or out.dtype != dtype or out.device != weight.device:
        raise ValueError(f"out must be a {dtype} tensor of shape {tuple(weight.shape)} on {weight.device}")
    grid = (plan.num_row_tiles, -(-weight.shape[1] // CAST_BLOCK))
    _connected_tiles_cast_kernel[grid](weight, out, plan.device_ranges(), weight.shape[0], weight.shape[1],
                                       weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
                                       BLOCK_N=CAST_BLOCK, BLOCK_K=CAST_BLOCK)
    return out


def covered_fraction(layer, block_n: int = 64, block_k: int = 32) -> float:
    """The fraction of ``layer.weight`` that the kernel reads (its tiles' ranges), from the degrees alone."""
    row_degrees, col_degrees = _degrees(layer, transposed=False)
    ranges = tile_ranges(row_degrees, col_degrees, layer.strict, block_n, block_k)
    return _covered_fraction(ranges, block_n, block_k, len(row_degrees), len(col_degrees))


__all__ = ["block_sparse_linear", "block_sparse_enabled", "connected_weight", "covered_fraction", "default_config",
           "kernel_settings", "pays", "tile_ranges", "triton_runs_on"]
