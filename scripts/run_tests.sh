#!/usr/bin/env bash
# Set up the virtualenv (scripts/setup_env.sh, shared with the main job: torch 2.13.0 first, then this package, with
# the dev, demo and features extras the tests need on top of the main job's) and run the tests. This is the README's
# test command; .ci/run calls it. A second run, or a run after the main job set up, skips pip while the setup stamp
# matches.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
# shellcheck source=setup_env.sh
source "$REPO/scripts/setup_env.sh"
hf_dgm_setup "$REPO" dev,demo,features

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
exec "$PYTHON" -m pytest -q tests "$@"
