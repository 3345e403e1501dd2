#!/usr/bin/env bash
# Set up a fresh virtualenv (CPU torch 2.13.0 first, then this package with its dev extras) and run the tests.
# This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e ".[dev]"
exec "$VENV/bin/python" -m pytest -q tests "$@"
