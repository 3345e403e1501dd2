#!/usr/bin/env bash
# The patch MAF on MVTec AD capsule (docs/maf.md#8-patch-maf-a-density-of-local-patches): 3 seeds of the default
# patch configuration, then benchmarks/maf_anomaly_study.py over them (every score, patch-z-top3 included: image
# AUROC mean ± std), then, while the time budget allows, the same for each variant.
#
#   bash benchmarks/maf_patch_study.sh runs/patch_study data/mvtec_capsule      # one GPU, ~7 minutes
#
# Default configuration (PATCH_ARGS): 128x128 images, 16x16 patches at stride 8 (225 per image), 5 MADE blocks of
# 512-512, position-conditioned, batch 8 images (1800 patches) per step, Adam lr 1e-3, EPOCHS epochs (default 250:
# 6250 steps; the main job's patch detector), bf16 autocast;
# the model kept is the epoch of best validation bits/dim (10 % of train/good held out, seeded by the seed) and it is
# calibrated on those validation images. Variants (VARIANTS, in order, each 3 seeds, each started only while
# BUDGET_S seconds (default 400) are not expected to be exceeded, judged by the time the main configuration took):
#   nopos   the same without position conditioning (--condition_on_position false): log p(patch)
#   p8-64   64x64 images, 8x8 patches at stride 4 (225 per image)
# SEEDS (default "0 1 2"), EPOCHS, EXTRA (flags added to every training run, last, so they override: e.g.
# EXTRA="--image_size 16 --patch_size 8 --patch_stride 4 --hidden_sizes 16 16 --num_blocks 2 --num_train_epochs 1"
# for a CPU smoke run) and DEVICE (for the anomaly study; default cuda when available) can be set.
# Writes, under the output folder: <config>-s<seed>/ (the training outputs, model weights deleted after the study),
# <config>-s<seed>.log, <config>-study/anomaly_study.json (+ .png), and patch_study.json (image AUROC per score and
# configuration, mean ± std over the seeds, and the seconds each part took); prints a compact summary.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/patch_study}"
DATA="${2:-${DATA:-data/mvtec_capsule}}"
SEEDS="${SEEDS:-0 1 2}"
EPOCHS="${EPOCHS:-250}"
VARIANTS="${VARIANTS-nopos p8-64}"
BUDGET_S="${BUDGET_S:-400}"
EXTRA="${EXTRA:-}"
PYTHON="${PYTHON:-python3}"
DEVICE_ARGS=()
[ -n "${DEVICE:-}" ] && DEVICE_ARGS=(--device "$DEVICE")
if [ ! -d "$DATA/train/good" ]; then
  echo "No $DATA/train/good: pass the MVTec-layout data folder as the second argument." >&2
  exit 2
fi
mkdir -p "$OUT"
PATCH_ARGS=(--image_size 128 --patch_size 16 --patch_stride 8 --num_blocks 5 --hidden_sizes 512 512
            --learning_rate 1e-3 --per_device_train_batch_size 8 --num_train_epochs "$EPOCHS")
declare -A VARIANT_ARGS=(
  [nopos]="--condition_on_position false"
  [p8-64]="--image_size 64 --patch_size 8 --patch_stride 4"
)
STARTED=$(date +%s)
TIMES="$OUT/times.txt"
: > "$TIMES"

run_config() {  # name extra-flags...
  local name=$1; shift
  local began=$(date +%s) dirs=()
  for seed in $SEEDS; do
    local dir="$OUT/$name-s$seed"
    # shellcheck disable=SC2086
    "$PYTHON" scripts/train_maf.py --data_dir "$DATA" --output_dir "$dir" --seed "$seed" --mixed_precision bf16 \
      --checkpointing_steps no "${PATCH_ARGS[@]}" "$@" $EXTRA > "$dir.log" 2>&1
    echo "$name seed $seed: train exit $? ($(( $(date +%s) - began )) s so far)"
    dirs+=("$dir")
  done
  "$PYTHON" benchmarks/maf_anomaly_study.py --model_dirs "${dirs[@]}" --data_dir "$DATA" \
    --output_dir "$OUT/$name-study" "${DEVICE_ARGS[@]}" > "$OUT/$name-study.log" 2>&1
  echo "$name: anomaly study exit $?"
  for dir in "${dirs[@]}"; do rm -f "$dir"/model.safetensors; done
  echo "$name $(( $(date +%s) - began ))" >> "$TIMES"
}

run_config patch16
MAIN_SECONDS=$(( $(date +%s) - STARTED ))
for variant in $VARIANTS; do
  elapsed=$(( $(date +%s) - STARTED ))
  if [ $(( elapsed + MAIN_SECONDS )) -gt "$BUDGET_S" ]; then
    echo "$variant: skipped (${elapsed} s used, the main configuration took ${MAIN_SECONDS} s, budget ${BUDGET_S} s)"
    continue
  fi
  # shellcheck disable=SC2086
  run_config "$variant" ${VARIANT_ARGS[$variant]}
done

"$PYTHON" - "$OUT" <<'EOF'
import json, os, sys

out = sys.argv[1]
times = dict(line.split() for line in open(os.path.join(out, "times.txt")) if line.strip())
summary = {}
for name in times:
    path = os.path.join(out, f"{name}-study", "anomaly_study.json")
    if not os.path.isfile(path):
        print(f"{name}: no anomaly_study.json (see {name}-study.log and the training logs)")
        continue
    study = json.load(open(path))
    results = [json.load(open(os.path.join(m["model_dir"], "train_results.json"))) for m in study["per_model"]
               if os.path.isfile(os.path.join(m["model_dir"], "train_results.json"))]
    summary[name] = {
        "seconds": int(times[name]),
        "train_seconds": [r["train_seconds"] for r in results],
        "best_epoch": [r["best_epoch"] for r in results],
        "test_good_bits_per_dim": [r["test_good_bits_per_dim"] for r in results],
        "config": results[0]["config"] if results else None,
        "image_auroc": {score: row["image_auroc"] for score, row in study["summary"].items()},
        "pixel_auroc": {score: row["pixel_auroc"] for score, row in study["summary"].items()},
    }
with open(os.path.join(out, "patch_study.json"), "w") as file:
    json.dump(summary, file, indent=2)
cell = lambda pair: "n/a" if pair[0] is None else f"{pair[0]:.3f} ± {pair[1]:.3f}"
for name, row in summary.items():
    print(f"\n{name}: {len(row['train_seconds'])} seeds, train s {[round(s) for s in row['train_seconds']]}, "
          f"best epoch {row['best_epoch']}, test-good bits/dim {[round(b, 3) for b in row['test_good_bits_per_dim']]}")
    for score, pair in row["image_auroc"].items():
        print(f"  {score:40s} image AUROC {cell(pair)}   pixel AUROC {cell(row['pixel_auroc'][score])}")
print(f"\nResults in {out}/patch_study.json and {out}/<config>-study/")
EOF
echo "total $(( $(date +%s) - STARTED )) s"
