#!/usr/bin/env bash
# The main job: set up, then train a MAF on an MVTec AD category, sample 5 images, and write the anomaly report.
#
#   bash scripts/run_maf_pipeline.sh --data_dir data/mvtec_capsule                 # seed spec (GPU): 128x128, 100 epochs
#   bash scripts/run_maf_pipeline.sh --data_dir data/mvtec_capsule --preset cpu    # 64x64 preset for a 2-core CPU
#   bash scripts/run_maf_pipeline.sh --data_dir data/mvtec --download              # fetch MVTec's capsule archive first
#
# Extra flags go to train_maf.py (e.g. --seed 1 --degree_assignment sequential). OUTPUT_DIR (default runs/maf)
# chooses where everything goes; SKIP_SETUP=1 uses the current python3 instead of creating .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT_DIR="${OUTPUT_DIR:-runs/maf}"
PRESET=spec
TRAIN_ARGS=()
DATA_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET="$2"; shift 2 ;;
    --data_dir|--dataset_name|--category) DATA_ARGS+=("$1" "$2"); shift 2 ;;
    --download) DATA_ARGS+=("$1"); shift ;;
    *) TRAIN_ARGS+=("$1"); shift ;;
  esac
done
if [ "${SKIP_SETUP:-0}" = 1 ]; then
  PYTHON=python3
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e .
  PYTHON=.venv/bin/python
fi
case "$PRESET" in
  spec) PRESET_ARGS=() ;;  # the seed spec: 128x128x3, 512-512, 7 blocks, batch 8, 100 epochs, lr 1e-4
  # About 15 minutes on 2 CPU cores: 64x64 images, smaller MADEs, fewer blocks and epochs.
  cpu) PRESET_ARGS=(--image_size 64 --hidden_sizes 256 256 --num_blocks 3 --num_train_epochs 8) ;;
  *) echo "unknown --preset $PRESET (spec or cpu)" >&2; exit 2 ;;
esac
"$PYTHON" scripts/train_maf.py "${DATA_ARGS[@]}" --output_dir "$OUTPUT_DIR" "${PRESET_ARGS[@]}" "${TRAIN_ARGS[@]}"
"$PYTHON" scripts/sample_maf.py --model_name_or_path "$OUTPUT_DIR" --num_samples 5 --temperature 1.0 0.7
DETECT_DATA=()
for ((i = 0; i < ${#DATA_ARGS[@]}; i++)); do
  [ "${DATA_ARGS[$i]}" = --download ] || DETECT_DATA+=("${DATA_ARGS[$i]}")
done
"$PYTHON" scripts/detect_anomalies.py --model_name_or_path "$OUTPUT_DIR" "${DETECT_DATA[@]}"
echo
echo "Done. Model: $OUTPUT_DIR; samples: $OUTPUT_DIR/samples; anomaly report and figures: $OUTPUT_DIR/anomaly"
