#!/usr/bin/env bash
# Build the testbed's miniature target from a seed in one command: the chart data, then the tokenizer
# and the target trained on it (lmms_msd.testbed). Meant for one GPU (about 6-7 minutes on an H200);
# on a CPU, pass smaller settings through the variables below.
#
#   bash scripts/build_testbed.sh [DATA_DIR] [TARGET_DIR]
#
# Variables (defaults): PYTHON (python3), SEED (0), N_TRAIN (40000 charts), N_TEST (300), STEPS (5000),
# BATCH_SIZE (256), DEVICE (cuda), SIZE (default; "tiny" for smoke runs), WORKERS (nproc),
# TIME_LIMIT_MINUTES (6: training stops early and
# still saves past it, so the command ends inside a 10-minute window).
# The ChartQA parquet files need the `datasets` package; without it they are skipped (the LLaVA
# conversation files, which training reads, are always written).
set -euo pipefail

DATA_DIR=${1:-build/testbed/charts}
TARGET_DIR=${2:-build/testbed/target}
PYTHON=${PYTHON:-python3}
SEED=${SEED:-0}
WORKERS=${WORKERS:-$(nproc)}

parquet=()
if ! "$PYTHON" -c "import datasets" 2>/dev/null; then
    echo "build_testbed: no 'datasets' package: skipping the ChartQA parquet files" >&2
    parquet=(--no-parquet)
fi

"$PYTHON" -m lmms_msd.testbed.charts --out "$DATA_DIR" --seed "$SEED" --workers "$WORKERS" \
    --n-train "${N_TRAIN:-40000}" --n-test "${N_TEST:-300}" "${parquet[@]}"

"$PYTHON" -m lmms_msd.testbed.target_training --data "$DATA_DIR" --out "$TARGET_DIR" --seed "$SEED" \
    --workers "$WORKERS" --steps "${STEPS:-5000}" --batch-size "${BATCH_SIZE:-256}" --device "${DEVICE:-cuda}" \
    --size "${SIZE:-default}" --time-limit-minutes "${TIME_LIMIT_MINUTES:-6}"
