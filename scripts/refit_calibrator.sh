#!/usr/bin/env bash
# Refit the bundled pair's calibrator on the data and settings it is fitted with (README, "The calibrator"):
# 240 long-answer requests of `make-data` seed 1 (30 images per family; none of them the tasks'), decoded
# by the pair in use with OPT-Tree on the raw draft confidence at temperature 0, fitted on half the
# requests and scored on the other half; depth buckets, attention bins and the label as `lmms-msd
# calibrate`'s defaults say. Run it from the repository root after retraining the pair:
#
#   bash scripts/refit_calibrator.sh                 # writes calibrators/miniature.json
#
# Variables (defaults): PYTHON (python3), OUT (calibrators/miniature.json), WORK (build/refit_calibrator:
# the data, the observations, the report), DEVICE (cpu), OBSERVATIONS (none: decode; a .npz written
# by an earlier run refits from it in seconds, e.g. to try other settings), EXTRA (more `calibrate` flags,
# e.g. "--depth_edges none" for format 1's pooled fit).
# Time on the 2-core CPU, one thread: 5 min 17 s in all (data 5 s, decoding 5 min, fit 4 s; load average 1.5); 26 min
# when the CPU was shared with other jobs.
set -euo pipefail

PYTHON=${PYTHON:-python3}
OUT=${OUT:-calibrators/miniature.json}
WORK=${WORK:-build/refit_calibrator}
DEVICE=${DEVICE:-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [[ -z "${OBSERVATIONS:-}" ]]; then
    "$PYTHON" -m lmms_msd make-data --family all --out "$WORK/calib_data" --n 30 --n-test 0 --seed 1 --no-parquet
    source=(--data_dir "$WORK/calib_data" --split train --style long --limit 300 --max_new_tokens 128 --device "$DEVICE"
            --save_observations "$WORK/observations.npz" --no_progress)
else
    source=(--observations "$OBSERVATIONS")
fi
# shellcheck disable=SC2086  # EXTRA is a list of flags
"$PYTHON" -m lmms_msd calibrate "${source[@]}" --output "$OUT" --report_dir "$WORK/report" ${EXTRA:-}
