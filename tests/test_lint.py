"""The repository passes its lint configuration (ruff.toml: line length 120, pycodestyle, pyflakes, import order)."""

import os
import subprocess

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_passes():
    pytest.importorskip("ruff", reason="ruff is not installed (pip install -e '.[dev]')")
    from ruff.__main__ import find_ruff_bin

    result = subprocess.run([find_ruff_bin(), "check", "--no-cache", "--output-format", "concise", ROOT], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
