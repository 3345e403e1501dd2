#!/usr/bin/env bash
# The default-size MAF study on MVTec AD capsule (docs/RESULTS.md#maf-quality): every configuration trained for 100
# epochs with bf16 on 3 seeds, each followed by sampling (temperature 1.0 and 0.7) and the anomaly report.
#
#   bash benchmarks/maf_capsule_study.sh runs/study            # needs a GPU (~9 GB of GPU memory per run)
#
# Runs go one after another (PARALLEL=1): 8 default-size trainings at once on one H200 were ~4x slower in aggregate
# (11.7 vs 45 steps/s). Each run takes ~1.5-2 min, so one 10-minute device command holds about 4 of them;
# ONLY="spread-none sequential-none" restricts the configurations. EXTRA adds flags to every training run
# (e.g. EXTRA="--image_size 16 --num_train_epochs 1" for a quick check). The small outputs (JSON, PNG, JSONL)
# are packed into <out>/study.tgz; model weights are deleted after each run's report.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/study}"
DATA="${DATA:-data/mvtec_capsule}"
PARALLEL="${PARALLEL:-1}"
ONLY="${ONLY:-}"
EXTRA="${EXTRA:-}"
mkdir -p "$OUT"

run_one() {  # name seed train-flags...
  local name=$1 seed=$2; shift 2
  local dir="$OUT/$name-s$seed"
  OUTPUT_DIR="$dir" SKIP_SETUP=1 bash scripts/run_maf_pipeline.sh --data_dir "$DATA" --mixed_precision bf16 \
    --checkpointing_steps no --seed "$seed" "$@" $EXTRA > "$OUT/$name-s$seed.log" 2>&1
  echo "$name seed $seed: exit $?"; rm -f "$dir"/model.safetensors
}
export -f run_one
export OUT DATA EXTRA

printf '%s\n' \
  "spread-none 0 --degree_assignment spread --normalization none" \
  "spread-none 1 --degree_assignment spread --normalization none" \
  "spread-none 2 --degree_assignment spread --normalization none" \
  "sequential-none 0 --degree_assignment sequential --normalization none" \
  "sequential-none 1 --degree_assignment sequential --normalization none" \
  "sequential-none 2 --degree_assignment sequential --normalization none" \
  "spread-batchnorm 0 --degree_assignment spread --normalization batch_norm" \
  "spread-batchnorm 1 --degree_assignment spread --normalization batch_norm" \
  "spread-batchnorm 2 --degree_assignment spread --normalization batch_norm" \
  | { if [ -n "$ONLY" ]; then grep -E "^($(echo $ONLY | tr ' ' '|')) "; else cat; fi; } \
  | xargs -P "$PARALLEL" -L 1 bash -c 'run_one "$@"' _
tar czf "$OUT.tgz" --exclude=study.tgz --exclude='*.safetensors' --exclude='checkpoints' --exclude='*.py' -C "$OUT" . && mv "$OUT.tgz" "$OUT/study.tgz"
python3 benchmarks/summarize_study.py "$OUT" || true
