#!/usr/bin/env bash
# The main job: set up, then train a MAF on an MVTec AD category, sample 5 images (exact and refined), and write the
# anomaly report; with the spec preset (train_maf.py's defaults), also train the patch MAF anomaly detector and write its report.
#
#   bash scripts/run_maf_pipeline.sh --data_dir data/mvtec_capsule                 # default configuration (GPU): 128x128, 100 epochs
#   bash scripts/run_maf_pipeline.sh --data_dir data/mvtec_capsule --preset cpu    # 64x64 preset: a minute or two on 2 CPU cores
#   bash scripts/run_maf_pipeline.sh --data_dir data/mvtec --download              # fetch MVTec's capsule archive first
#
# Runs from any folder: relative paths (--data_dir, OUTPUT_DIR) are read from the folder it is started in.
# Extra flags go to train_maf.py (e.g. --seed 1 --degree_assignment sequential; --patch_size 16 --patch_stride 8
# [--condition_on_position false] for a patch MAF, whose samples are patch mosaics: they need patch_size divisible by
# patch_stride and image_size by patch_size). OUTPUT_DIR (default runs/maf) chooses where everything goes.
#
# The patch detector (--patch_detector on|off; on for --preset spec, off for --preset cpu): a patch MAF (16x16
# patches at stride 8 of the 128x128 images, given their location; 5 blocks of 512-512, lr 1e-3, 250 epochs, bf16),
# scored by patch-z-top3. It detects defects far better than the whole-image model (docs/RESULTS.md#patch-detector)
# in about a minute on a GPU; on a few CPU cores it would take hours, so the CPU preset leaves it out.
# It goes to OUTPUT_DIR/patch_detector, its report to OUTPUT_DIR/patch_detector/anomaly. Of the extra flags only
# --seed reaches its training (the others, --push_to_hub included, are the whole-image model's); PATCH_EXTRA adds
# flags to its training, last, so they win (e.g. PATCH_EXTRA="--num_train_epochs 100").
#
# Setup (scripts/setup_env.sh, shared with the test command): the first of the two to run creates a virtualenv (VENV,
# default .venv in the repository) with torch 2.13.0 and this package (editable) and writes the setup stamp; later
# runs of either skip pip while the stamp still matches setup.py and the package is importable from this repository;
# a changed setup.py installs again. SKIP_SETUP=1 skips setup and runs with PYTHON (default python3), which must
# already have the package.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTPUT_DIR="${OUTPUT_DIR:-runs/maf}"
PRESET=spec
PATCH_DETECTOR=
TRAIN_ARGS=()
SEED_ARGS=()
DATA_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET="$2"; shift 2 ;;
    --patch_detector) PATCH_DETECTOR="$2"; shift 2 ;;
    --data_dir|--dataset_name|--category) DATA_ARGS+=("$1" "$2"); shift 2 ;;
    --download) DATA_ARGS+=("$1"); shift ;;
    --seed) TRAIN_ARGS+=("$1" "$2"); SEED_ARGS=("$1" "$2"); shift 2 ;;
    *) TRAIN_ARGS+=("$1"); shift ;;
  esac
done
case "$PRESET" in
  spec) PRESET_ARGS=() ;;  # train_maf.py's defaults: 128x128x3, MADE 49152->512->512->2*49152, 7 blocks, batch 8, 100 epochs, lr 1e-4
  # 64x64 images, smaller MADEs, fewer blocks and epochs: a minute or two on 2 CPU cores
  # (docs/RESULTS.md#start-up-and-end-to-end-times).
  cpu) PRESET_ARGS=(--image_size 64 --hidden_sizes 256 256 --num_blocks 3 --num_train_epochs 8) ;;
  *) echo "unknown --preset $PRESET (spec or cpu)" >&2; exit 2 ;;
esac
case "${PATCH_DETECTOR:-default}" in
  on|off) ;;
  default) if [ "$PRESET" = spec ]; then PATCH_DETECTOR=on; else PATCH_DETECTOR=off; fi ;;
  *) echo "unknown --patch_detector $PATCH_DETECTOR (on or off)" >&2; exit 2 ;;
esac
# The patch detector's configuration (docs/maf.md#8-patch-maf-a-density-of-local-patches), measured in
# docs/RESULTS.md#patch-detector.
PATCH_ARGS=(--image_size 128 --patch_size 16 --patch_stride 8 --num_blocks 5 --hidden_sizes 512 512
            --learning_rate 1e-3 --num_train_epochs 250 --mixed_precision bf16)

# Setup (shared with scripts/run_tests.sh: one virtualenv, one stamp); sets PYTHON.
# shellcheck source=setup_env.sh
source "$REPO/scripts/setup_env.sh"
hf_dgm_setup "$REPO"

"$PYTHON" "$REPO/scripts/train_maf.py" "${DATA_ARGS[@]}" --output_dir "$OUTPUT_DIR" "${PRESET_ARGS[@]}" "${TRAIN_ARGS[@]}"
DATA_ONLY=()  # the data flags without --download, which only training acts on
for ((i = 0; i < ${#DATA_ARGS[@]}; i++)); do
  [ "${DATA_ARGS[$i]}" = --download ] || DATA_ONLY+=("${DATA_ARGS[$i]}")
done
# Exact and refined (density-guided) samples side by side, with their measures against the training data.
"$PYTHON" "$REPO/scripts/sample_maf.py" --model_name_or_path "$OUTPUT_DIR" --num_samples 5 --temperature 1.0 0.7 \
  "${DATA_ONLY[@]}"
"$PYTHON" "$REPO/scripts/detect_anomalies.py" --model_name_or_path "$OUTPUT_DIR" "${DATA_ONLY[@]}"
if [ "$PATCH_DETECTOR" = on ]; then
  echo
  echo "The patch detector: a patch MAF for anomaly detection (--patch_detector off skips it)"
  "$PYTHON" "$REPO/scripts/train_maf.py" "${DATA_ARGS[@]}" --output_dir "$OUTPUT_DIR/patch_detector" "${SEED_ARGS[@]}" \
    "${PATCH_ARGS[@]}" ${PATCH_EXTRA:-}
  "$PYTHON" "$REPO/scripts/detect_anomalies.py" --model_name_or_path "$OUTPUT_DIR/patch_detector" "${DATA_ONLY[@]}"
fi
echo
echo "Done. Model: $OUTPUT_DIR; samples: $OUTPUT_DIR/samples; anomaly report and figures: $OUTPUT_DIR/anomaly"
if [ "$PATCH_DETECTOR" = on ]; then
  echo "Patch detector: $OUTPUT_DIR/patch_detector; its anomaly report and figures: $OUTPUT_DIR/patch_detector/anomaly"
fi
