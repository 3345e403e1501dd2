"""Issue 14.4: scripts print a user error as one line and exit with status 1; the traceback only with --debug or
HF_DGM_DEBUG=1; a bug keeps its traceback."""

import errno
import os
import subprocess
import sys

import pytest
import torch

from hf_dgm_training import DataError, ModelLoadError, UnreadableImageError, UsageError, is_user_error, run_main
from hf_dgm_training.errors import EXIT_INTERRUPTED


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def exit_of(main, argv=(), **kwargs):
    with pytest.raises(SystemExit) as raised:
        run_main(main, list(argv), **kwargs)
    return raised.value.code


@pytest.fixture(autouse=True)
def no_debug_env(monkeypatch):
    monkeypatch.delenv("HF_DGM_DEBUG", raising=False)


@pytest.mark.parametrize(
    "error",
    [
        DataError("data\nbad"),
        UsageError("flags"),
        ModelLoadError("no model"),
        UnreadableImageError("damaged"),
        FileNotFoundError(errno.ENOENT, "No such file or directory", "x.png"),
        PermissionError(errno.EACCES, "Permission denied", "/root/out"),
        OSError(errno.ENOSPC, "No space left on device"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ..."),
    ],
)
def test_user_errors_print_one_line_and_exit_1(capsys, error):
    def main(argv):
        raise error

    assert is_user_error(error)
    assert exit_of(main) == 1
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and ": error: " in stderr and "Traceback" not in stderr
    if isinstance(error, torch.OutOfMemoryError):
        assert "lower --per_device_train_batch_size" in stderr


@pytest.mark.parametrize("error", [ValueError("shape mismatch"), KeyError("x"), RuntimeError("bug"), OSError("odd")])
def test_bugs_keep_their_traceback(error):
    def main(argv):
        raise error

    assert not is_user_error(error)
    with pytest.raises(type(error)):
        run_main(main, [])


def test_debug_flag_and_variable_show_the_traceback(monkeypatch):
    def main(argv):
        raise DataError("bad data")

    with pytest.raises(DataError):
        run_main(main, ["--debug"])
    monkeypatch.setenv("HF_DGM_DEBUG", "1")
    with pytest.raises(DataError):
        run_main(main, [])


def test_exit_status_and_interrupt(capsys):
    assert exit_of(lambda argv: {"skipped": []}) == 0
    assert exit_of(lambda argv: 5, exit_status=int) == 5

    def interrupted(argv):
        raise KeyboardInterrupt

    assert exit_of(interrupted) == EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err


def test_ranks_are_named_with_several_processes(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")

    def main(argv):
        raise DataError("bad data")

    assert exit_of(main) == 1
    assert capsys.readouterr().err.startswith("[rank 1] ")


def run_script(script, *args):
    env = {key: value for key, value in os.environ.items() if key != "HF_DGM_DEBUG"}
    env.update(TQDM_DISABLE="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_a_script_prints_one_line_and_the_traceback_only_with_debug(tmp_path):
    missing = tmp_path / "runs" / "mafx"
    result = run_script("sample_maf.py", "--model_name_or_path", missing)
    assert result.returncode == 1
    assert result.stderr == f"sample_maf.py: error: {missing} does not exist (looked in {missing}); " \
        f"{tmp_path / 'runs'} does not exist either. Check the path; a Hub id is 'name' or 'user/name' whose first " \
        "part is not a folder here.\n"
    assert not (tmp_path / "runs").exists()  # nothing created for a model that is not there

    result = run_script("sample_maf.py", "--model_name_or_path", missing, "--debug")
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "ModelLoadError" in result.stderr


@pytest.mark.parametrize(
    "script", sorted(name[:-3] for name in os.listdir(os.path.join(ROOT, "scripts")) if name.endswith(".py"))
)
def test_every_script_runs_through_run_main_and_offers_debug(script, capsys):
    import importlib

    with open(os.path.join(ROOT, "scripts", f"{script}.py"), encoding="utf-8") as f:
        assert "run_main(" in f.read(), f"{script}.py does not end in run_main(main)"
    with pytest.raises(SystemExit):
        importlib.import_module(script).parse_args(["--help"])
    assert "--debug" in capsys.readouterr().out
