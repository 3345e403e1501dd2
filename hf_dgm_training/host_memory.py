# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""Freed host memory kept for reuse, so that CPU jobs do not spend their time in the kernel.

glibc's malloc serves every allocation above its mmap threshold (adaptive, 32 MiB at most by default) with a fresh
`mmap` and unmaps it on free. Every such tensor is then zero-filled by the kernel, one page fault per 4 KiB, on first
touch. A CPU job that makes and drops large tensors batch after batch (a CNN's feature maps over 384x384 images, a
MAF's 12288-wide activations and gradients) spends a large share of its time doing that instead of arithmetic.
`keep_freed_memory` raises the mmap threshold and the trim threshold, so large blocks come from the heap and freed
ones stay there for the next batch. The price is memory: what is freed is not given back to the system, and the
heap can fragment, so resident memory can grow past the peak of what is in use (docs/RESULTS.md has the CPU main
job's).

It changes only how the C allocator reuses memory, never a result. It does nothing where there is no glibc
(macOS, Windows, musl), and nothing when the environment already tunes malloc (`MALLOC_MMAP_THRESHOLD_`,
`MALLOC_TRIM_THRESHOLD_`, `GLIBC_TUNABLES`) or sets HF_DGM_KEEP_FREED_MEMORY=0. `run_main`, the entry point of every
script, calls it. PyTorch's CPU performance guide recommends jemalloc or tcmalloc for the same reason; this needs no
preloaded library.
"""

from __future__ import annotations

import ctypes
import os

from .errors import environment_switch


OPT_OUT_ENV = "HF_DGM_KEEP_FREED_MEMORY"
_MALLOC_THRESHOLD_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
# Variables through which the environment tunes glibc's malloc itself (GLIBC_TUNABLES when it names glibc.malloc).
MALLOC_ENVIRONMENT = (*_MALLOC_THRESHOLD_VARIABLES, "GLIBC_TUNABLES")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
# Blocks below this come from the heap; larger ones (rare) keep their own mapping.
MMAP_THRESHOLD = 1 << 30
# Free memory at the top of the heap is returned to the system only beyond this (the largest value an int holds).
TRIM_THRESHOLD = (1 << 31) - 1
# glibc releases that cap the mmap threshold accept at most this.
_CAPPED_MMAP_THRESHOLD = 32 << 20


def _environment_tunes_malloc() -> bool:
    return any(name in os.environ for name in _MALLOC_THRESHOLD_VARIABLES) or (
        "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""))


def _is_glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not a POSIX system, or not a GNU C library
        return False


def keep_freed_memory() -> bool:
    """Sets glibc's mmap and trim thresholds as the module docstring says; returns whether it did. Call it early:
    blocks mapped before keep their mapping."""
    if not environment_switch(OPT_OUT_ENV, default=True) or _environment_tunes_malloc():
        return False
    if not _is_glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) or mallopt(_M_MMAP_THRESHOLD, _CAPPED_MMAP_THRESHOLD)):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
