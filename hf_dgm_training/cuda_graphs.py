# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""A whole training step replayed as one CUDA graph, and the decision of `--cuda_graphs` for every trainer."""

from __future__ import annotations

import logging

from .errors import UsageError


def use_cuda_graphs(flag: str, device, num_processes: int, fast_path: bool) -> bool:
    """Whether a trainer replays its step as CUDA graphs, from `--cuda_graphs` ('auto' / 'true' / 'false'): auto is on
    for one process on a CUDA device on the fast path; 'true' anywhere else is a `UsageError`."""
    on_cuda, single = device.type == "cuda", num_processes == 1
    if flag == "auto":
        return on_cuda and single and fast_path
    if flag == "true" and not (on_cuda and single):
        raise UsageError("--cuda_graphs true needs one process on a CUDA device; leave it on auto or pass false.")
    return flag == "true"


class CUDAGraphStep:
    """Runs ``step_fn(*inputs)`` (a whole training step: forward, backward, optimizer) and, once it has run
    ``warmup_steps`` times eagerly on a side stream (capture needs warmed-up optimizer states and libraries), captures
    it as one CUDA graph and replays that for inputs of the captured shapes and dtypes: the step then costs no host
    work beyond one copy of the inputs. Inputs of other shapes (a last partial batch) run eagerly, and so does every
    step after a failed capture (the reason is kept in ``fallbacks``; nothing runs during a capture, so no training
    step is lost). ``reset_fn`` runs before every eager step: gradients must not accumulate into the graph's own.

    A replay returns the graph's static output tensors: clone what you keep beyond the next call. The optimizer must
    be built with ``capturable=True`` and a tensor or constant learning rate.
    """

    def __init__(self, step_fn, *, enabled: bool, reset_fn=None, warmup_steps: int = 3):
        self.step_fn, self.reset_fn = step_fn, reset_fn
        self.enabled, self.warmup_steps = enabled, warmup_steps
        self.eager_steps_done, self.replays = 0, 0
        self.graph = self.static_inputs = self.static_outputs = self.static_signature = None
        self.fallbacks: list[str] = []

    @staticmethod
    def _signature(inputs):
        return tuple((tuple(tensor.shape), tensor.dtype) for tensor in inputs)

    def _eager(self, *inputs):
        if self.reset_fn is not None:
            self.reset_fn()
        self.eager_steps_done += 1
        return self.step_fn(*inputs)

    def __call__(self, *inputs):
        import torch

        if not self.enabled:
            return self._eager(*inputs)
        if self.graph is None and self.eager_steps_done < self.warmup_steps:
            side_stream = torch.cuda.Stream()
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream):
                outputs = self._eager(*inputs)
            torch.cuda.current_stream().wait_stream(side_stream)
            return outputs
        if self.graph is None:
            try:
                self._capture(inputs)
            except Exception as error:  # noqa: BLE001 - reported in fallbacks and as a warning, then eager
                reason = f"CUDA graph capture failed, running eagerly: {type(error).__name__}: {error}"
                self.fallbacks.append(reason[:500])
                logging.getLogger(__name__).warning(self.fallbacks[-1])
                self.graph, self.enabled = None, False
                torch.cuda.synchronize()
                return self._eager(*inputs)
        if self._signature(inputs) != self.static_signature:
            return self._eager(*inputs)
        for static, value in zip(self.static_inputs, inputs):
            static.copy_(value, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        return self.static_outputs

    def _capture(self, inputs):
        import torch

        if self.reset_fn is not None:
            self.reset_fn()  # the graph allocates its own gradients
        self.static_inputs = tuple(tensor.clone() for tensor in inputs)
        self.static_signature = self._signature(inputs)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_outputs = self.step_fn(*self.static_inputs)
        self.graph = graph

    def describe(self) -> dict:
        return {"cuda_graphs": self.enabled and self.graph is not None, "graph_replays": self.replays,
                "eager_steps": self.eager_steps_done, "fallbacks": self.fallbacks}

