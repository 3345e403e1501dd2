"""CUDA graphs of a flow's two directions: density (data -> noise: ``log_prob``, ``encode``, the anomaly maps) and
generation (noise -> data: sampling); and of a MAF's refinement gradient (the density direction and its backward:
one step of ``sample(..., refine_steps=K)``).

Each is a long, fixed sequence of kernels: 7 spec blocks of three matmuls and their elementwise work for density
(twice that with its backward), 3,591 sequential passes for sampling. Run from Python, small batches wait on the
host's launches rather than on the GPU. ``replay_flow`` captures a direction once per key (direction, input shape and
dtype, device, whether there are patch locations, inference mode, autocast, the block-sparse matmul's switches,
parameter storage) on the second call with that key (the first runs eagerly, so a one-off call pays no capture and
warms up what a capture needs: library handles, compiled Triton kernels, the autograd engine) and replays it
afterwards.

The graph reads the parameters where they live, so in-place weight updates (training) are seen by the next replay;
a parameter moved to new storage (``.to()``, ``load_state_dict(assign=True)``) makes a new graph. Under autocast the
capture does not use autocast's cache of cast weights (a cached cast lives outside the graph's memory and is freed
when the caller's autocast ends): the casts are kernels of the graph, made from the weights at every replay.

This file imports only torch, so a Hub repo made by ``save_pretrained`` loads with ``trust_remote_code=True``.
"""

import collections
import weakref

import torch


# Graphs of one model and direction, newest last, at most this many (each holds its own memory pool).
MAX_GRAPHS_PER_MODEL = 4
_GRAPHS = weakref.WeakKeyDictionary()


def can_replay(inputs: torch.Tensor) -> bool:
    """Whether a direction may run through a CUDA graph: on CUDA, without gradients (autograd needs the eager ops)
    and not inside another capture."""
    return inputs.is_cuda and not torch.is_grad_enabled() and not torch.cuda.is_current_stream_capturing()


class _FlowGraph:
    """One captured run of ``run(inputs, locations) -> tuple of tensors`` on static input buffers."""

    def __init__(self, run, inputs, locations):
        self.inputs = inputs.clone()
        self.locations = locations.clone() if locations is not None else None
        self.graph = torch.cuda.CUDAGraph()
        autocast = torch.is_autocast_enabled("cuda")
        with torch.cuda.graph(self.graph), torch.autocast(
                "cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=autocast, cache_enabled=False):
            self.outputs = run(self.inputs, self.locations)

    def replay(self, inputs, locations):
        self.inputs.copy_(inputs)
        if locations is not None:
            self.locations.copy_(locations)
        self.graph.replay()
        return tuple(output.clone() for output in self.outputs)


def _graph_key(model, direction, inputs, locations, settings):
    storage = tuple(tensor.data_ptr() for tensor in model.parameters()) + tuple(
        tensor.data_ptr() for tensor in model.buffers())
    # Inference mode is part of the key: a graph's static inputs made under it cannot be written outside it.
    autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    return (direction, tuple(inputs.shape), inputs.dtype, inputs.device, locations is None,
            torch.is_inference_mode_enabled(), autocast, settings, storage)


def replay_flow(model, direction: str, run, inputs: torch.Tensor, locations: torch.Tensor | None = None,
                settings=(), eager_run=None):
    """``run(inputs, locations)`` (one direction of ``model``'s flow, returning a tuple of tensors) through a CUDA
    graph of ``model``: the first call for a key runs ``eager_run()`` (default: ``run`` itself) eagerly, the second
    captures the graph and replays it, later calls replay it. ``settings``: whatever else, besides the key's other
    parts, changes which kernels ``run`` launches. Returns fresh tensors."""
    cache = _GRAPHS.setdefault(model, {})
    graphs, seen = cache.setdefault(direction, (collections.OrderedDict(), set()))
    key = _graph_key(model, direction, inputs, locations, settings)
    graph = graphs.get(key)
    if graph is None:
        if key not in seen:
            if len(seen) >= 16 * MAX_GRAPHS_PER_MODEL:
                seen.clear()
            seen.add(key)
            return eager_run() if eager_run is not None else run(inputs, locations)
        graph = graphs[key] = _FlowGraph(run, inputs, locations)
        while len(graphs) > MAX_GRAPHS_PER_MODEL:
            graphs.popitem(last=False)
    graphs.move_to_end(key)
    return graph.replay(inputs, locations)


def num_graphs(model, direction: str) -> int:
    """How many graphs of ``direction`` ("density", "generation" or "refinement") ``model`` holds."""
    return len(_GRAPHS.get(model, {}).get(direction, ({}, None))[0])


def clear_graphs(model) -> None:
    """Drops every CUDA graph of ``model`` (and their memory)."""
    _GRAPHS.pop(model, None)


__all__ = ["can_replay", "clear_graphs", "num_graphs", "replay_flow"]
