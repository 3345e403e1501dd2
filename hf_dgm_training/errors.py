# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""Errors a user can fix, and how the scripts report them: one line, exit status 1.

The project raises `HfDgmError` subclasses for bad input: data that is missing or damaged, a model path that is
not a model, flags that do not fit together. Their messages name the file or value and the fix. `run_main`, the
entry point of every script, prints such an error as one line and exits with status 1; every other exception is a
bug (or something the project did not foresee) and keeps its full traceback. `--debug` on the command line or
`HF_DGM_DEBUG=1` in the environment shows the traceback of user errors too.

Besides `HfDgmError`, these count as user errors, because their message already names what to fix and the cause
lies outside the code: file-system errors that name a path (a file or folder that is missing, a permission, a file
where a folder was expected, a full disk) and running out of device memory. An interrupt (Ctrl-C) prints one line
and exits with status 130, as shells expect.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn


DEBUG_ENV = "HF_DGM_DEBUG"
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class HfDgmError(Exception):
    """Bad input the user can fix; the message names the file or value and the fix."""


class DataError(HfDgmError, ValueError):
    """Data that is missing, empty, inconsistent or in the wrong layout."""


class UnreadableImageError(HfDgmError, OSError):
    """An image file (or the image bytes of a dataset row) that cannot be decoded: damaged, truncated or not an
    image. An `OSError`, as PIL's own errors for such files are, so code that treats a missing split as optional
    (`except (FileNotFoundError, ValueError)`) does not mistake a damaged file for an absent one."""


class ModelLoadError(HfDgmError, OSError):
    """A model path or Hub id that does not give a model (an `OSError`, like transformers' own loading errors)."""


class UsageError(HfDgmError, ValueError):
    """Flags that are each valid but do not fit together, or do not fit the model or the machine."""


# File-system errors whose message names the path: the cause is outside the code.
_FILE_SYSTEM_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)


def is_user_error(error: BaseException) -> bool:
    """Whether `error` is reported as one line (see the module docstring) rather than with its traceback."""
    if isinstance(error, HfDgmError):
        return True
    if isinstance(error, _FILE_SYSTEM_ERRORS):
        return True
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return True
    torch = sys.modules.get("torch")
    out_of_memory = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return out_of_memory is not None and isinstance(error, out_of_memory)


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (whitespace collapsed), with its fix for device memory."""
    message = " ".join(str(error).split()) or type(error).__name__
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, getattr(torch, "OutOfMemoryError", ())):
        first = message.split(". ")[0]
        message = (f"{first}. The model and batch do not fit in device memory: lower --per_device_train_batch_size "
                   "(or --batch_size) or --image_size, or use --mixed_precision bf16.")
    return message


def environment_switch(name: str, default: bool) -> bool:
    """The on/off variable `name` of the environment: 1, true, yes or on turn it on; 0, false, no or off turn it off
    (any case); unset or anything else leaves `default`."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return default


def debug_requested(argv: list[str] | None = None) -> bool:
    """`--debug` among the arguments (default: the command line) or HF_DGM_DEBUG set to a true value."""
    if environment_switch(DEBUG_ENV, default=False):
        return True
    arguments = sys.argv[1:] if argv is None else argv
    return "--debug" in arguments


def add_debug_arg(parser: argparse.ArgumentParser) -> None:
    """Adds `--debug` (read by `run_main` before parsing, declared here so that parsing accepts it)."""
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"Show the full traceback of errors in the input (also: {DEBUG_ENV}=1). Without it a damaged file, a "
        "wrong path or flags that do not fit print one line and exit with status 1.",
    )


def _prefix() -> str:
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "hf-dgm"
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = f"[rank {os.environ.get('RANK', '?')}] " if world_size > 1 else ""  # several processes (accelerate launch)
    return f"{rank}{program}"


def run_main(main: Callable[[list[str] | None], Any], argv: list[str] | None = None, *,
             exit_status: Callable[[Any], int] | None = None) -> NoReturn:
    """Runs a script's `main(argv)` and exits: with `exit_status(result)` (default 0) when it returns, with status 1
    and one line on stderr for a user error (`is_user_error`), with 130 on Ctrl-C. Other exceptions propagate with
    their traceback (Python exits with status 1). `--debug` / HF_DGM_DEBUG=1 lets every exception propagate.

    Every process of `accelerate launch` runs it; with several processes each line names its rank. Before `main` it
    lets the C allocator keep freed memory for reuse (`host_memory.keep_freed_memory`), which spares CPU jobs most of
    their page faults.
    """
    from .host_memory import keep_freed_memory

    keep_freed_memory()
    debug = debug_requested(argv)
    try:
        result = main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{_prefix()}: interrupted", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as error:
        if debug or not is_user_error(error):
            raise
        sys.stdout.flush()
        print(f"{_prefix()}: error: {one_line(error)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_ERROR)
    sys.exit(exit_status(result) if exit_status is not None else 0)
