#!/usr/bin/env bash
# Set up a fresh virtualenv (CPU torch 2.13.0 first, then this package with its dev, demo and features extras) and run
# the tests.
# This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e ".[dev,demo,features]"

# The demo's browser test (tests/test_app_browser.py) drives the system's Chromium. Install it where this machine
# allows (root with apt-get, as in CI); elsewhere, or with HF_DGM_NO_BROWSER_INSTALL=1, that test is skipped.
if ! command -v chromium >/dev/null 2>&1 && [ -z "${HF_DGM_NO_BROWSER_INSTALL:-}" ] \
        && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing Chromium (apt-get) for the browser test of the demo..."
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            chromium fonts-liberation; } >/tmp/hf-dgm-chromium-install.log 2>&1; then
        echo "Chromium could not be installed (see /tmp/hf-dgm-chromium-install.log); the browser test will be skipped."
    fi
fi
exec "$VENV/bin/python" -m pytest -q tests "$@"
