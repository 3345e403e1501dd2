"""Adam for MAF that never materialises the MADE weight gradients.

Half of every MADE weight is masked out and stays exactly zero, and the weight gradient of a batch is the low-rank
product ``grad_output.T @ inputs`` (rank = batch size). ``torch.optim.Adam`` nevertheless moves every weight through
memory several times a step: backward writes the dense gradient, the mask reads and rewrites it, Adam reads the weight,
gradient and both moments and writes three of them back.

``MaskedAdam`` is ``torch.optim.Adam`` (same hyper-parameters, same state and ``state_dict`` format, so checkpoints move
freely between the two) except for the MADE weights of a MAF. It plugs into their layers through
``MaskedLinear.linear_with_grad``, the layer's one hook: backward hands the layer's ``(inputs, grad_output)`` to the
optimizer instead of forming ``weight.grad``, and ``step`` forms the gradient tile by tile inside the Adam update, only
for tiles that hold a connection, reading and writing the weight and both moments of those tiles once. On CUDA the
update is one Triton kernel per layer; elsewhere (and for float64) it runs the same maths in plain torch, which the
tests compare with ``torch.optim.Adam``.

With several processes (DDP through accelerate) the MADE weights are left out of DDP's gradient all-reduce, and the
optimizer all-gathers the per-process ``(inputs, grad_output)`` pairs instead (batch x (in + out) numbers per layer
rather than in x out). Every process then applies the same update, the average DDP would have formed.
"""

import math
import warnings

import torch
import torch.nn.functional as F

from modeling_maf.modeling_maf import MaskedLinear


try:  # Triton ships with CUDA builds of torch; without it (CPU wheels) the torch path runs.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if triton is not None:

    @triton.jit
    def _tile_gradient(inputs_ptr, grad_output_ptr, out_degrees_ptr, in_degrees_ptr, tiles_ptr, num_rows, num_cols,
                       BATCH: tl.constexpr, STRICT: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        """This program's tile: its rows, columns, connection mask and float32 gradient (zero where unconnected)."""
        tile = tl.program_id(0)
        rows = tl.load(tiles_ptr + 2 * tile) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.load(tiles_ptr + 2 * tile + 1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        row_ok, col_ok = rows < num_rows, cols < num_cols
        out_degrees = tl.load(out_degrees_ptr + rows, mask=row_ok, other=-1)
        in_degrees = tl.load(in_degrees_ptr + cols, mask=col_ok, other=2147483647)
        if STRICT:
            connected = out_degrees[:, None] > in_degrees[None, :]
        else:
            connected = out_degrees[:, None] >= in_degrees[None, :]
        grad = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
        for sample in tl.static_range(BATCH):  # the rank of the gradient: a few samples, unrolled
            upstream = tl.load(grad_output_ptr + sample * num_rows + rows, mask=row_ok, other=0.0).to(tl.float32)
            activation = tl.load(inputs_ptr + sample * num_cols + cols, mask=col_ok, other=0.0).to(tl.float32)
            grad += upstream[:, None] * activation[None, :]
        return rows, cols, connected, tl.where(connected, grad, 0.0)

    @triton.jit
    def _masked_grad_square_sum_kernel(inputs_ptr, grad_output_ptr, out_degrees_ptr, in_degrees_ptr, tiles_ptr,
                                       partial_ptr, num_rows, num_cols, BATCH: tl.constexpr, STRICT: tl.constexpr,
                                       BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        """Sum of squares of one tile's masked gradient, one value per tile (summed in a fixed order afterwards, so
        the norm is deterministic)."""
        _, _, _, grad = _tile_gradient(inputs_ptr, grad_output_ptr, out_degrees_ptr, in_degrees_ptr, tiles_ptr,
                                       num_rows, num_cols, BATCH, STRICT, BLOCK_ROWS, BLOCK_COLS)
        tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.sum(grad * grad, axis=1), axis=0))

    @triton.jit
    def _masked_adam_kernel(param_ptr, exp_avg_ptr, exp_avg_sq_ptr, inputs_ptr, grad_output_ptr, out_degrees_ptr,
                            in_degrees_ptr, tiles_ptr, step_ptr, scale_ptr, skip_ptr, num_rows, num_cols, lr, beta1,
                            beta2, log_beta1, log_beta2, eps, BATCH: tl.constexpr, STRICT: tl.constexpr,
                            BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, HAS_SKIP: tl.constexpr):
        """One (BLOCK_ROWS, BLOCK_COLS) tile of one MADE weight: gradient from the low-rank factors (times the scale
        at ``scale_ptr``: process averaging and clipping), then Adam, on the connected entries only (masked entries
        are never read or written: they stay zero). With HAS_SKIP, a set flag at ``skip_ptr`` ends every program
        before it reads anything, so a skipped step writes nothing and a kept one runs exactly the code without it
        (one scalar load more)."""
        if HAS_SKIP:
            if tl.load(skip_ptr) != 0.0:
                return
        rows, cols, connected, grad = _tile_gradient(inputs_ptr, grad_output_ptr, out_degrees_ptr, in_degrees_ptr,
                                                     tiles_ptr, num_rows, num_cols, BATCH, STRICT, BLOCK_ROWS,
                                                     BLOCK_COLS)
        grad = grad * tl.load(scale_ptr)

        step = tl.load(step_ptr)
        bias_correction1 = 1.0 - tl.exp(step * log_beta1)
        bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp(step * log_beta2))
        offsets = rows[:, None] * num_cols + cols[None, :]
        param = tl.load(param_ptr + offsets, mask=connected, other=0.0)
        exp_avg = tl.load(exp_avg_ptr + offsets, mask=connected, other=0.0).to(tl.float32)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=connected, other=0.0).to(tl.float32)
        exp_avg = exp_avg + (1.0 - beta1) * (grad - exp_avg)
        exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad
        denom = tl.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
        updated = param.to(tl.float32) - (lr / bias_correction1) * exp_avg / denom
        tl.store(param_ptr + offsets, updated.to(param.dtype), mask=connected)
        tl.store(exp_avg_ptr + offsets, exp_avg.to(exp_avg_ptr.dtype.element_ty), mask=connected)
        tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq.to(exp_avg_sq_ptr.dtype.element_ty), mask=connected)


# The kernel unrolls its loop over the gradient's rank (samples since the last step, over all processes); larger
# ranks (big batches, long accumulation) take the torch path, where the dense gradient costs little next to the batch.
_MAX_UNROLLED_RANK = 64

# Tile shapes tried per layer; the one covering the connections with the fewest entries wins (a wide first layer
# and a tall output layer want opposite shapes).
_TILE_SHAPES = ((32, 128), (128, 32), (64, 64))


def flag_non_finite_(found_inf: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sets the float32 scalar ``found_inf`` to 1 when any of ``tensors`` holds a NaN or an infinity (it is never
    reset here). On a GPU without a host sync, so it runs inside CUDA graphs; any floating dtype.

    On the CPU, where a host check costs nothing and an infinity norm is a slow pass (an order of magnitude slower
    than a sum), the tensors' sums screen them first: finite sums prove every value finite, and only a group with a sum
    that is not (a NaN, an infinity, or finite values that overflow when added) gets the exact check."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        if group[0].device.type == "cpu" and bool(torch.stack([tensor.sum() for tensor in group]).isfinite().all()):
            continue
        largest = torch.stack(torch._foreach_norm(group, float("inf")))  # NaN or inf iff a value is
        found_inf.copy_(torch.maximum(found_inf, largest.isfinite().logical_not().any().to(found_inf.dtype)))
    return found_inf


class _LinearWithDeferredWeightGradient(torch.autograd.Function):
    """``F.linear`` whose backward appends ``(inputs, grad_output)`` to ``pairs`` instead of forming the weight
    gradient.

    The weight gradient of a batch is the low-rank product ``grad_output.T @ inputs``; ``MaskedAdam`` forms it tile by
    tile inside its update, for connected tiles only, so the dense (out, in) gradient is never written, masked or read
    back.
    """

    @staticmethod
    def forward(ctx, inputs, weight, bias, pairs):
        ctx.save_for_backward(inputs, weight)
        ctx.pairs = pairs
        return F.linear(inputs, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        inputs, weight = ctx.saved_tensors
        ctx.pairs.append((inputs, grad_output))
        grad_inputs = grad_output @ weight if ctx.needs_input_grad[0] else None
        grad_bias = grad_output.sum(0) if ctx.needs_input_grad[2] else None
        return grad_inputs, None, grad_bias, None


class _FactorSink:
    """What ``MaskedAdam`` installs as a layer's ``MaskedLinear.linear_with_grad``: ``F.linear`` whose backward
    collects the weight gradient's factors in ``pairs`` (one ``(inputs, grad_output)`` per backward since the last
    step). Under autocast the operands are cast once here, so that backward reuses the cast weight."""

    def __init__(self):
        self.pairs = []

    def __call__(self, inputs, weight, bias):
        device_type = inputs.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else inputs.dtype
        with torch.autocast(device_type, enabled=False):
            return _LinearWithDeferredWeightGradient.apply(inputs.to(dtype), weight.to(dtype), bias.to(dtype),
                                                           self.pairs)


def connected_tiles(out_degrees: torch.Tensor, in_degrees: torch.Tensor, strict: bool, block_rows: int,
                    block_cols: int) -> torch.Tensor:
    """(num_tiles, 2) int32 tile coordinates of the (block_rows, block_cols) tiles holding at least one connection."""
    big = torch.iinfo(torch.int64).max
    rows_padded = -(-len(out_degrees) // block_rows) * block_rows
    cols_padded = -(-len(in_degrees) // block_cols) * block_cols
    out_max = torch.full((rows_padded,), -1, dtype=torch.int64)
    out_max[: len(out_degrees)] = out_degrees
    in_min = torch.full((cols_padded,), big, dtype=torch.int64)
    in_min[: len(in_degrees)] = in_degrees
    out_max = out_max.view(-1, block_rows).amax(1)
    in_min = in_min.view(-1, block_cols).amin(1)
    connected = out_max[:, None] > in_min[None, :] if strict else out_max[:, None] >= in_min[None, :]
    return connected.nonzero().to(torch.int32).contiguous()  # nonzero() returns a transposed layout


def _layer_tiles(layer: MaskedLinear):
    """The tile shape of ``_TILE_SHAPES`` whose connected tiles cover the fewest entries, with those tiles."""
    best = None
    for block_rows, block_cols in _TILE_SHAPES:
        tiles = connected_tiles(layer.out_degrees, layer.in_degrees, layer.strict, block_rows, block_cols)
        if best is None or len(tiles) * block_rows * block_cols < len(best[2]) * best[0] * best[1]:
            best = (block_rows, block_cols, tiles)
    return best


def _ignore_in_ddp(model: torch.nn.Module, names: list[str], ignore: bool):
    """Add ``names`` to (or remove them from) the parameters a later DDP wrapper leaves out of its all-reduce: the
    ``_ddp_params_and_buffers_to_ignore`` list DDP reads at construction, and the ``_ddp_ignored`` flag it reads after
    (what ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`` sets, under a name that changed
    across torch versions)."""
    ignored = [name for name in getattr(model, "_ddp_params_and_buffers_to_ignore", []) if name not in names]
    model._ddp_params_and_buffers_to_ignore = ignored + list(names) if ignore else ignored
    selected = set(names)
    for name, parameter in model.named_parameters():
        if name in selected:
            parameter._ddp_ignored = ignore


class MaskedAdam(torch.optim.Adam):
    """``torch.optim.Adam`` over ``model.parameters()`` whose MADE weight updates form their own gradients.

    Build it from the model before ``accelerator.prepare`` (it tells DDP to leave the MADE weights out of its
    all-reduce). Other parameters (biases, batch norm) take the ordinary Adam path with the ``fused``/``foreach``/
    ``capturable`` options given. IAF trains through its sequential direction, whose weight gradients autograd forms;
    for an IAF model (and for any weight that received a ``.grad``) this is exactly ``torch.optim.Adam``.

    Gradient clipping is built in (``max_grad_norm``, the maths of ``torch.nn.utils.clip_grad_norm_`` over all
    parameters): a clipping call on ``model.parameters()`` from outside would miss the MADE weights, whose gradients
    exist only here. Not supported: weight decay, AMSGrad, ``maximize`` (the MAF recipe uses none of them).

    Steps with non-finite gradients can be skipped on the device, as with fused ``torch.optim.Adam``: set the
    attribute ``found_inf`` to a float32 scalar tensor; ``step`` adds the MADE gradient factors' check to it, and
    skips the whole update (weights, moments and step counts unchanged) when it is non-zero. CUDA-graph safe; the
    ordinary parameters then need ``fused=True``.

    Args:
        model: a ``MAFModel`` or ``IAFModel`` (not yet wrapped by DDP).
        lr, betas, eps: as ``torch.optim.Adam``.
        backend: ``"auto"`` (Triton on CUDA when importable, else torch), ``"triton"`` or ``"torch"``.
        max_grad_norm: clip the global gradient norm to this value before each update (None: no clipping).
        **adam_kwargs: ``fused``, ``foreach``, ``capturable`` for the ordinary parameters.
    """

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 backend: str = "auto", max_grad_norm: float | None = None, **adam_kwargs):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise ValueError("MaskedAdam needs the unwrapped model: build it before accelerator.prepare / DDP, which "
                             "must leave the MADE weights out of their gradient all-reduce.")
        for unsupported in ("weight_decay", "amsgrad", "maximize", "differentiable"):
            if adam_kwargs.get(unsupported):
                raise ValueError(f"MaskedAdam does not support {unsupported}={adam_kwargs[unsupported]!r}; use "
                                 "torch.optim.Adam for it.")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (or None for no clipping), got {max_grad_norm!r}.")
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}.")
        if backend == "triton" and triton is None:
            raise ValueError("backend='triton' needs the triton package (it ships with CUDA builds of torch).")
        super().__init__(model.parameters(), lr=lr, betas=betas, eps=eps, **adam_kwargs)
        self.backend = backend
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm = None  # with clipping: the total gradient norm of the last step, before clipping
        self.triton_error = None  # why the Triton path was given up, if it was (backend="auto")
        # IAF's training direction never calls MaskedLinear.forward, so only a MAF defers its weight gradients.
        deferred = [] if getattr(model, "conditioner_on_noise", False) else \
            [module for module in model.modules() if isinstance(module, MaskedLinear)]
        self._deferred = {}  # parameter -> (layer, its factor sink, tile plans per device)
        for layer in deferred:
            layer.linear_with_grad = _FactorSink()
            self._deferred[layer.weight] = (layer, layer.linear_with_grad, {})
        self._model = model
        self._ignored_by_ddp = [name for name, parameter in model.named_parameters() if parameter in self._deferred]
        if self._ignored_by_ddp:
            _ignore_in_ddp(model, self._ignored_by_ddp, ignore=True)

    # ------------------------------------------------------------------------------------------------ API
    def release(self):
        """Hand the MADE weight gradients back to autograd (for another optimizer on the same model): the layers
        fill ``weight.grad`` again and DDP stops ignoring them. This optimizer then updates them as plain Adam."""
        for layer, _, _ in self._deferred.values():
            layer.linear_with_grad = None
        _ignore_in_ddp(self._model, self._ignored_by_ddp, ignore=False)
        self._deferred, self._ignored_by_ddp = {}, []

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none=set_to_none)
        for _, sink, _ in self._deferred.values():
            sink.pairs.clear()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # first, so that its backward fills the factors read below
            with torch.enable_grad():
                loss = closure()
        pending = [(parameter, layer, sink, plans) for parameter, (layer, sink, plans) in self._deferred.items()
                   if sink.pairs]
        for parameter, *_ in pending:
            if parameter.grad is not None:
                raise RuntimeError("A MADE weight received a dense gradient besides MaskedAdam's factors (a DDP "
                                   "wrapper built before MaskedAdam all-reduces it): build MaskedAdam before "
                                   "accelerator.prepare / DistributedDataParallel.")
        factors, grad_scale = [], 1.0
        if pending:
            factors, grad_scale = self._gather_across_processes([self._factors(layer, sink)
                                                                 for _, layer, sink, _ in pending])
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and factors:
            flag_non_finite_(found_inf, [tensor for pair in factors for tensor in pair])
        scale = self._clip(pending, factors, grad_scale) if self.max_grad_norm is not None else None
        super().step()  # every parameter that has a .grad (clipped above); reads found_inf like fused Adam
        if not pending:
            return loss
        if scale is None:
            scale = torch.full((), grad_scale, dtype=torch.float32, device=pending[0][0].device)
        skip = found_inf  # None: never skip
        group_of = {parameter: group for group in self.param_groups for parameter in group["params"]}
        for (parameter, layer, sink, plans), (inputs, grad_output) in zip(pending, factors):
            group = group_of[parameter]
            state = self._state_for(parameter)
            state["step"] += 1
            if self._uses_triton(parameter, inputs):
                self._triton_update(parameter, layer, plans, state, inputs, grad_output, scale, skip, group)
            else:
                self._torch_update(parameter, layer, state, inputs, grad_output, scale, skip, group)
            if skip is not None:
                state["step"] -= skip.to(state["step"].device)
            sink.pairs.clear()
        return loss

    def _clip(self, pending, factors, grad_scale):
        """``torch.nn.utils.clip_grad_norm_`` over every gradient, the MADE weights' included (their squared norms
        formed from the factors, tile by tile): scales the dense gradients in place, keeps the total norm before
        clipping in ``last_grad_norm`` (a device tensor) and returns the MADE weights' gradient scale."""
        dense = [parameter.grad for group in self.param_groups for parameter in group["params"]
                 if parameter.grad is not None]
        squares = [grad.detach().float().square().sum() for grad in dense]
        for (parameter, layer, _, plans), (inputs, grad_output) in zip(pending, factors):
            squares.append(self._masked_square_sum(parameter, layer, plans, inputs, grad_output) * grad_scale**2)
        if not squares:
            return None
        device = squares[0].device
        total_norm = torch.stack([square.to(device) for square in squares]).sum().sqrt()
        self.last_grad_norm = total_norm
        clip = (self.max_grad_norm / (total_norm + 1e-6)).clamp(max=1.0)
        for grad in dense:
            grad.mul_(clip.to(grad.device, grad.dtype))
        return clip * grad_scale

    # ------------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _factors(layer, sink):
        """The layer's (inputs, grad_output) of every backward since the last step, stacked along the batch."""
        pairs = [(inputs.reshape(-1, layer.in_features), grad.reshape(-1, layer.out_features))
                 for inputs, grad in sink.pairs]
        if len(pairs) == 1:  # the usual case: one backward per step, used in place (no copy on the hot path)
            inputs, grad_output = pairs[0]
        else:
            inputs, grad_output = torch.cat([i for i, _ in pairs]), torch.cat([g for _, g in pairs])
        return inputs.contiguous(), grad_output.contiguous()

    @staticmethod
    def _gather_across_processes(factors):
        """All-gather every process's factors (one collective) and average like DDP; one process: unchanged."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        world_size = torch.distributed.get_world_size() if distributed else 1
        if world_size == 1:
            return factors, 1.0
        flat = [tensor.reshape(-1).float() for pair in factors for tensor in pair]
        local = torch.cat(flat)
        gathered = local.new_empty(world_size * local.numel())
        # all_gather_single is all_gather_into_tensor's newer name (the old one warns from torch 2.13 on).
        all_gather = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
        all_gather(gathered, local)
        gathered = gathered.view(world_size, -1)
        pieces = gathered.split([tensor.numel() for tensor in flat], dim=1)
        tensors = [piece.reshape(world_size * pair_tensor.shape[0], pair_tensor.shape[1])
                   for piece, pair_tensor in zip(pieces, [t for pair in factors for t in pair])]
        return list(zip(tensors[0::2], tensors[1::2])), 1.0 / world_size

    def _state_for(self, parameter):
        """Adam's own state layout (step, exp_avg, exp_avg_sq), so state_dicts match torch.optim.Adam's."""
        state = self.state[parameter]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=parameter.device)
            state["exp_avg"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
        elif state["step"].device != parameter.device:  # loaded from a non-capturable Adam's CPU step counter
            state["step"] = state["step"].to(parameter.device, torch.float32)
        return state

    @staticmethod
    def _scalar(value):
        return value.item() if isinstance(value, torch.Tensor) else float(value)

    def _uses_triton(self, parameter, inputs):
        return self.backend == "triton" or (
            self.backend == "auto" and triton is not None and self.triton_error is None and parameter.is_cuda
            and parameter.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and inputs.shape[0] <= _MAX_UNROLLED_RANK)

    @staticmethod
    def _dense_masked_gradient(parameter, layer, inputs, grad_output):
        compute_dtype = torch.promote_types(parameter.dtype, torch.float32)
        grad = grad_output.to(compute_dtype).t() @ inputs.to(compute_dtype)
        return torch.where(layer.mask(parameter.device), grad, 0.0)

    def _masked_square_sum(self, parameter, layer, plans, inputs, grad_output):
        """Squared Frobenius norm of the layer's masked gradient (before any scale), as a float32 device scalar."""
        if not self._uses_triton(parameter, inputs):
            return self._dense_masked_gradient(parameter, layer, inputs, grad_output).float().square().sum()
        block_rows, block_cols, tiles, out_degrees, in_degrees = self._plan(layer, plans, parameter.device)
        partial = torch.empty(len(tiles), dtype=torch.float32, device=parameter.device)
        if not self._launch(_masked_grad_square_sum_kernel, len(tiles), inputs, grad_output, out_degrees, in_degrees,
                            tiles, partial, layer.out_features, layer.in_features, BATCH=inputs.shape[0],
                            STRICT=layer.strict, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols):
            return self._masked_square_sum(parameter, layer, plans, inputs, grad_output)
        return partial.sum()

    def _launch(self, kernel, num_programs, *args, **meta):
        """Runs a Triton kernel. With backend='auto', a kernel that fails (it compiles on its first launch, in an
        eager step) switches this optimizer to the torch path for good, with a warning: same maths, slower."""
        try:
            kernel[(num_programs,)](*args, **meta)
        except Exception as error:  # noqa: BLE001 - reported, then the torch path runs
            if self.backend == "triton" or isinstance(error, torch.cuda.OutOfMemoryError):
                raise
            self.triton_error = f"{type(error).__name__}: {error}"[:1000]
            warnings.warn(f"MaskedAdam's Triton kernel failed, using the torch path from now on (same maths, "
                          f"slower): {self.triton_error}", RuntimeWarning, stacklevel=3)
            return False
        return True

    def _torch_update(self, parameter, layer, state, inputs, grad_output, scale, skip, group):
        """The reference maths: the dense masked gradient, then Adam as torch.optim.Adam writes it (nothing changes
        when ``skip`` is non-zero)."""
        beta1, beta2 = group["betas"]
        lr, eps = self._scalar(group["lr"]), group["eps"]
        compute_dtype = torch.promote_types(parameter.dtype, torch.float32)
        grad = self._dense_masked_gradient(parameter, layer, inputs, grad_output)
        grad = (grad * scale.to(compute_dtype)).to(parameter.dtype)
        step = state["step"].to(compute_dtype)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = (1 - beta2 ** step).sqrt()
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if skip is not None:  # updated out of place, then kept or dropped on the device
            old = (exp_avg, exp_avg_sq, parameter)
            exp_avg, exp_avg_sq, parameter = exp_avg.clone(), exp_avg_sq.clone(), parameter.detach().clone()
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        parameter.sub_((lr / bias_correction1) * exp_avg / denom)
        if skip is not None:
            keep = skip.to(parameter.device) != 0
            for tensor, new in zip(old, (exp_avg, exp_avg_sq, parameter)):
                tensor.copy_(torch.where(keep, tensor, new))

    @staticmethod
    def _plan(layer, plans, device):
        """(block_rows, block_cols, tiles, out_degrees, in_degrees) of the layer on ``device``, made once."""
        if device not in plans:
            block_rows, block_cols, tiles = _layer_tiles(layer)
            plans[device] = (block_rows, block_cols, tiles.to(device), layer.out_degrees.to(device, torch.int32),
                             layer.in_degrees.to(device, torch.int32))
        return plans[device]

    def _triton_update(self, parameter, layer, plans, state, inputs, grad_output, scale, skip, group):
        if parameter.numel() >= 2**31 or not (parameter.is_contiguous() and state["exp_avg"].is_contiguous()
                                               and state["exp_avg_sq"].is_contiguous()):
            raise ValueError(f"MaskedAdam's Triton path needs a contiguous weight of < 2**31 entries, got "
                             f"{tuple(parameter.shape)} with contiguous Adam state; pass backend='torch'.")
        block_rows, block_cols, tiles, out_degrees, in_degrees = self._plan(layer, plans, parameter.device)
        beta1, beta2 = group["betas"]
        if not self._launch(_masked_adam_kernel, len(tiles), parameter, state["exp_avg"], state["exp_avg_sq"], inputs,
                            grad_output, out_degrees, in_degrees, tiles, state["step"], scale,
                            skip if skip is not None else scale, layer.out_features,
                            layer.in_features, self._scalar(group["lr"]), float(beta1), float(beta2), math.log(beta1),
                            math.log(beta2), float(group["eps"]), BATCH=inputs.shape[0], STRICT=layer.strict,
                            BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, HAS_SKIP=skip is not None):
            self._torch_update(parameter, layer, state, inputs, grad_output, scale, skip, group)


def connected_fraction(model: torch.nn.Module) -> dict:
    """Entries of the MADE weights: connected, and covered by MaskedAdam's tiles (what its update reads), as
    fractions."""
    total = connected = covered = 0
    for layer in (module for module in model.modules() if isinstance(module, MaskedLinear)):
        total += layer.weight.numel()
        connected += int(layer.fan_in().sum())  # counted from the degrees, without building the mask
        block_rows, block_cols, tiles = _layer_tiles(layer)
        covered += len(tiles) * block_rows * block_cols
    return {"connected": connected / total, "tiles": covered / total}


__all__ = ["MaskedAdam", "connected_tiles", "connected_fraction", "flag_non_finite_"]
