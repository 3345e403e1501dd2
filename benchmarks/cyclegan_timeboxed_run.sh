#!/usr/bin/env bash
# One GPU command for a CycleGAN run that must finish inside a time box (the device tool's 10 minutes):
# a 400-step probe measures the steady it/s of the fast path (falling back to the plain path if the probe fails),
# then the run trains min(EPOCHS, what fits in BUDGET_S) epochs with the paper's schedule over those epochs.
#
#   BUDGET_S=480 EPOCHS=20 bash benchmarks/cyclegan_timeboxed_run.sh data/horse2zebra runs/h2z [extra train flags]
set -uo pipefail
cd "$(dirname "$0")/.."
DATA="$1"; OUTDIR="$2"; shift 2
BUDGET_S="${BUDGET_S:-480}"; EPOCHS="${EPOCHS:-20}"
mkdir -p "$(dirname "$OUTDIR")"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the repo need not be pip-installed
start=$(date +%s)
FAST=()
if ! python3 scripts/train_cyclegan.py --data_dir "$DATA" --output_dir "$OUTDIR-probe" --image_size 128 \
    --mixed_precision bf16 --max_train_steps 400 --num_train_epochs "$EPOCHS" "$@" > "$OUTDIR-probe.log" 2>&1; then
  echo "fast-path probe failed (tail below); falling back to --fast_path false"; tail -5 "$OUTDIR-probe.log"
  FAST=(--fast_path false)
  python3 scripts/train_cyclegan.py --data_dir "$DATA" --output_dir "$OUTDIR-probe" --image_size 128 \
    --max_train_steps 200 --num_train_epochs "$EPOCHS" "${FAST[@]}" "$@" > "$OUTDIR-probe.log" 2>&1
fi
rate=$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(r.get('steady_steps_per_second') or r['steps_per_second'])" "$OUTDIR-probe/train_results.json")
steps_per_epoch=$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(r['steps_per_epoch'])" "$OUTDIR-probe/train_results.json" 2>/dev/null || echo 1334)
left=$(( BUDGET_S - ($(date +%s) - start) - 45 ))
fit=$(python3 -c "print(max(1, min($EPOCHS, int($left * $rate / $steps_per_epoch))))")
echo "probe: $rate it/s, $steps_per_epoch steps/epoch, ${left}s left -> $fit epochs"
python3 scripts/train_cyclegan.py --data_dir "$DATA" --output_dir "$OUTDIR" --image_size 128 --mixed_precision bf16 \
  --num_train_epochs "$fit" "${FAST[@]}" "$@" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -n 5
