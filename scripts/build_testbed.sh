#!/usr/bin/env bash
# Build the testbed's miniature target from a seed in one command: the chart data, then the tokenizer
# and the target trained on it (lmms_msd.testbed). Meant for one GPU: about 6 minutes on an H200,
# 8 at most (see BUDGET_MINUTES). On a CPU, pass small settings through the variables below.
#
#   bash scripts/build_testbed.sh [DATA_DIR] [TARGET_DIR]
#
# Variables (defaults):
#   PYTHON (python3)  SEED (0)  N_TRAIN (40000 charts)  N_TEST (300 charts)  WORKERS (nproc)
#   STEPS (8000)  BATCH_SIZE (256)  DEVICE (cuda)  SIZE (default; "tiny" for smoke runs)
#   BUDGET_MINUTES (8): the whole command's budget. Training gets what the data left of it, less 1.5
#     minutes for loading and saving; if it runs short, the learning rate decays on the clock instead
#     of the step count and training stops in time (train_metrics.json then names the step). When the
#     steps finish first, as planned, the run is reproducible from SEED.
# The ChartQA parquet files need the `datasets` package; without it they are skipped (the LLaVA
# conversation files, which training reads, are always written).
set -euo pipefail

DATA_DIR=${1:-build/testbed/charts}
TARGET_DIR=${2:-build/testbed/target}
PYTHON=${PYTHON:-python3}
SEED=${SEED:-0}
WORKERS=${WORKERS:-$(nproc)}
BUDGET_MINUTES=${BUDGET_MINUTES:-8}

parquet=()
if ! "$PYTHON" -c "import datasets" 2>/dev/null; then
    echo "build_testbed: no 'datasets' package: skipping the ChartQA parquet files" >&2
    parquet=(--no-parquet)
fi

"$PYTHON" -m lmms_msd.testbed.charts --out "$DATA_DIR" --seed "$SEED" --workers "$WORKERS" \
    --n-train "${N_TRAIN:-40000}" --n-test "${N_TEST:-300}" "${parquet[@]}"

train_minutes=$(awk -v budget="$BUDGET_MINUTES" -v spent="$SECONDS" 'BEGIN { printf "%.2f", budget - spent / 60 - 1.5 }')
echo "build_testbed: data took ${SECONDS} s; training may take up to ${train_minutes} minutes" >&2

"$PYTHON" -m lmms_msd.testbed.target_training --data "$DATA_DIR" --out "$TARGET_DIR" --seed "$SEED" \
    --workers "$WORKERS" --steps "${STEPS:-8000}" --batch-size "${BATCH_SIZE:-256}" --device "${DEVICE:-cuda}" \
    --size "${SIZE:-default}" --time-limit-minutes "$train_minutes"
