# The one setup of the repository's virtualenv, sourced by scripts/run_tests.sh and scripts/run_maf_pipeline.sh:
#
#   source "$REPO/scripts/setup_env.sh" && hf_dgm_setup "$REPO" [EXTRAS]     # e.g. EXTRAS=dev,demo; sets PYTHON
#
# The first command to run creates the virtualenv (VENV, default <repo>/.venv) with torch 2.13.0 (CPU wheels where
# there is no GPU, as pip picks them) and this package, editable, with EXTRAS; it writes the setup stamp
# <venv>/.hf-dgm-setup: the hash of setup.py, the torch pin and the extras installed. Later runs, of either command,
# skip pip while the stamp matches setup.py, holds the extras asked for, and the package is importable from this
# repository; a command that needs more extras (the tests: dev, demo) installs only those on top, a changed setup.py
# installs again. SKIP_SETUP=1 skips all of it and uses PYTHON (default python3), which must already have the package.

HF_DGM_TORCH_PIN=torch==2.13.0

hf_dgm_setup() {
  local repo="$1" extras="${2:-}"
  if [ "${SKIP_SETUP:-0}" = 1 ]; then
    PYTHON="${PYTHON:-python3}"
    return 0
  fi
  local venv="${VENV:-$repo/.venv}"
  PYTHON="$venv/bin/python"
  local stamp="$venv/.hf-dgm-setup"
  [ -x "$PYTHON" ] || python3 -m venv "$venv"
  # What the installation depends on: setup.py and the torch pin; then the extras installed.
  local wanted
  wanted="$("$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' \
    "$repo/setup.py") $HF_DGM_TORCH_PIN"
  # The editable install must point at this repository (a virtualenv can be shared or copied).
  local installed_here='import importlib.util, os, sys
specs = [importlib.util.find_spec(name) for name in ("torch", "modeling_maf", "hf_dgm_training")]
ok = all(specs) and all(os.path.realpath(s.origin).startswith(os.path.realpath(sys.argv[1]) + os.sep) for s in specs[1:])
sys.exit(0 if ok else 1)'
  local current have=() missing=() extra
  current="$(cat "$stamp" 2>/dev/null || true)"
  if [ "${current%% extras=*}" = "$wanted" ] && "$PYTHON" -c "$installed_here" "$repo"; then
    case "$current" in *" extras="*) IFS=, read -r -a have <<< "${current##* extras=}" ;; esac
    if [ -n "$extras" ]; then
      local wanted_extras
      IFS=, read -r -a wanted_extras <<< "$extras"
      for extra in "${wanted_extras[@]}"; do
        [[ " ${have[*]} " == *" $extra "* ]] || missing+=("$extra")
      done
    fi
    if [ ${#missing[@]} -eq 0 ]; then
      echo "Setup: $venv is up to date (delete $stamp to reinstall)."
      return 0
    fi
    echo "Setup: adding the extras ${missing[*]} to $venv."
    "$PYTHON" -m pip install -q -e "$repo[$(IFS=,; echo "${missing[*]}")]"
    have+=("${missing[@]}")
  else
    "$PYTHON" -m pip install -q --upgrade pip
    "$PYTHON" -m pip install -q "$HF_DGM_TORCH_PIN"
    if [ -n "$extras" ]; then
      "$PYTHON" -m pip install -q -e "$repo[$extras]"
      IFS=, read -r -a have <<< "$extras"
    else
      "$PYTHON" -m pip install -q -e "$repo"
    fi
  fi
  if [ ${#have[@]} -gt 0 ]; then
    echo "$wanted extras=$(IFS=,; echo "${have[*]}")" > "$stamp"
  else
    echo "$wanted" > "$stamp"
  fi
}
