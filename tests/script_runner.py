"""The scripts run in the test process: their entry point as `python scripts/<name>.py` runs it (`run_main`: exit
status, one-line errors), without a child process that would import torch and transformers again (seconds each).
What the scripts do outside `main` (argument parsing, the error line, the exit status) is the same; the few tests that
need a real process (start-up, setup, the socket of a loopback Hub set before import) keep `subprocess`."""

import contextlib
import importlib
import io
import os
import subprocess
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_in_process(script, *args, cwd=ROOT, expect_ok=True):
    """Runs scripts/<script> (e.g. "train_maf.py") with `args` as its command line, in the folder `cwd`; returns a
    `subprocess.CompletedProcess` with the exit status and what it printed. With `expect_ok`, a failure fails the
    test with that output."""
    from hf_dgm_training import run_main

    name = os.path.splitext(os.path.basename(str(script)))[0]
    module = importlib.import_module(name)
    argv = [str(arg) for arg in args]
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        patch.setenv("TQDM_DISABLE", "1")
        patch.delenv("HF_DGM_DEBUG", raising=False)
        patch.setattr(sys, "argv", [os.path.join(ROOT, "scripts", f"{name}.py"), *argv])  # the program's name
        patch.chdir(cwd)
        try:
            run_main(module.main, argv, exit_status=getattr(module, "exit_status", None))
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    result = subprocess.CompletedProcess([name, *argv], code, stdout.getvalue(), stderr.getvalue())
    if expect_ok and code != 0:
        raise AssertionError(f"{script} failed ({code}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result
