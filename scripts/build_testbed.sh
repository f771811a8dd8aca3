#!/usr/bin/env bash
# Rebuild the bundled miniature pair from a seed: the chart data, the tokenizer and target trained on
# it, then the MSD draft trained against that target. These are the settings the pair in
# lmms_msd/assets/miniature was built with, on one H200 (target 142 s, draft 90 s; the data takes
# about a minute on 16 cores). On a CPU, pass smaller settings through the variables below.
#
#   bash scripts/build_testbed.sh [OUT_DIR]      # writes OUT_DIR/{charts,target,draft}
#
# Variables (defaults): PYTHON (python3), SEED (0), N_TRAIN (40000 charts), N_TEST (300 charts),
# WORKERS (nproc), DEVICE (cuda), SIZE (default; "tiny" for smoke runs),
# TARGET_STEPS (3000), BATCH_SIZE (256), DRAFT_STEPS (1500), GRAD_ACCUM (4), DRAFT_LR (5e-4).
# Every stage is reproducible from SEED (up to GPU arithmetic). To ship a rebuilt pair, copy
# OUT_DIR/target and OUT_DIR/draft/{config.json,model.safetensors} over lmms_msd/assets/miniature/.
# The ChartQA parquet files need the `datasets` package; without it they are skipped (the LLaVA
# conversation files, which training reads, are always written).
set -euo pipefail

OUT=${1:-build/testbed}
PYTHON=${PYTHON:-python3}
SEED=${SEED:-0}
WORKERS=${WORKERS:-$(nproc)}

parquet=()
if ! "$PYTHON" -c "import datasets" 2>/dev/null; then
    echo "build_testbed: no 'datasets' package: skipping the ChartQA parquet files" >&2
    parquet=(--no-parquet)
fi

"$PYTHON" -m lmms_msd make-charts --out "$OUT/charts" --seed "$SEED" --workers "$WORKERS" \
    --n-train "${N_TRAIN:-40000}" --n-test "${N_TEST:-300}" "${parquet[@]}"

"$PYTHON" -m lmms_msd train-target --data "$OUT/charts" --out "$OUT/target" --seed "$SEED" \
    --workers "$WORKERS" --steps "${TARGET_STEPS:-3000}" --batch-size "${BATCH_SIZE:-256}" \
    --device "${DEVICE:-cuda}" --size "${SIZE:-default}"

"$PYTHON" -m lmms_msd train-draft --pretrained "$OUT/target" --data "$OUT/charts/llava_train.json" \
    --image_folder "$OUT/charts" --output_dir "$OUT/draft" --device "${DEVICE:-cuda}" --dtype float32 \
    --seed "$SEED" --steps "${DRAFT_STEPS:-1500}" --grad_accum "${GRAD_ACCUM:-4}" --lr "${DRAFT_LR:-5e-4}" \
    --save_every 250
