#!/usr/bin/env bash
# Rebuild the bundled miniature pair from a seed: the task data, the tokenizer and target trained on it,
# then the MSD draft trained against that target, at LLaVA-1.5's shapes (336-pixel images: 576 image
# positions, a 32000-entry vocabulary; lmms_msd.testbed.target_training.TargetSizes). Meant for one H200;
# on a CPU, pass smaller settings through the variables below (SIZE=tiny and small counts for a smoke run).
#
#   bash scripts/build_testbed.sh [OUT_DIR]      # writes OUT_DIR/{data,target,draft}
#
# Variables (defaults): PYTHON (python3), SEED (0), STAGES ("data target draft": run only some, e.g. one
# per command on a machine that limits a command's time), WORKERS (nproc), DEVICE (cuda),
# N_TRAIN, N_TEST (make-data's --n and --n-test: per family), SIZE (default; "tiny" for smoke runs), TARGET_STEPS (5200),
# BATCH_SIZE (256), SAMPLES (12 greedy test answers logged by train-target), TARGET_MINUTES (none: a time limit for train-target, which then still anneals and
# saves), DRAFT_STEPS (3125), GRAD_ACCUM (4), DRAFT_BATCH (8: samples per micro-batch; a draft optimizer step
# averages DRAFT_BATCH * GRAD_ACCUM samples), DRAFT_LR (1e-3), DRAFT_MINUTES (none: train-draft's time limit, as TARGET_MINUTES), DRAFT_WORKERS (4: processes preparing train-draft's
# coming samples; the result does not depend on it), MAX_SHARD_SIZE (15MB: every weight file at most
# 15 * 10**6 bytes).
#
# The defaults are the bundled pair's recipe. It was built on one H200 with N_TRAIN=12000 N_TEST=300
# WORKERS=16, TARGET_MINUTES=6.0 and DRAFT_MINUTES=4.5 (one stage per command), which stopped the two
# schedules at steps 4,573 and 3,031 (README, "The miniature testbed").
#
# The data: `lmms-msd make-data --family all` (the five task families and their mix). The benchmark-schema parquet files need the `datasets`
# package; without it they are skipped (the LLaVA conversation files, which training reads, are always
# written). Every stage is reproducible from SEED (up to GPU arithmetic).
#
# The result, in float16 with the default sizes: OUT_DIR/target about 21.6 MB (two weight shards of 8.2 and
# 12.4 MB, the 0.9 MB tokenizer.json, small JSON files), OUT_DIR/draft/model.safetensors 8.8 MB; about 30 MB
# to bundle. To ship it, replace lmms_msd/assets/miniature/target by OUT_DIR/target and copy
# OUT_DIR/draft/{config.json,model*.safetensors,model.safetensors.index.json if any} over
# lmms_msd/assets/miniature/draft/ (not OUT_DIR/draft/checkpoint: the float32 resume state, about 20 MB).
set -euo pipefail

OUT=${1:-build/testbed}
PYTHON=${PYTHON:-python3}
SEED=${SEED:-0}
STAGES=${STAGES:-data target draft}
WORKERS=${WORKERS:-$(nproc)}
DEVICE=${DEVICE:-cuda}
MAX_SHARD_SIZE=${MAX_SHARD_SIZE:-15MB}

stage() { [[ " $STAGES " == *" $1 "* ]]; }

if stage data; then
    counts=()
    [[ -n "${N_TRAIN:-}" ]] && counts+=(--n "$N_TRAIN")
    [[ -n "${N_TEST:-}" ]] && counts+=(--n-test "$N_TEST")
    parquet=()
    if ! "$PYTHON" -c "import datasets" 2>/dev/null; then
        echo "build_testbed: no 'datasets' package: skipping the parquet files" >&2
        parquet=(--no-parquet)
    fi
    "$PYTHON" -m lmms_msd make-data --family all --out "$OUT/data" --seed "$SEED" --workers "$WORKERS" \
        "${counts[@]}" "${parquet[@]}"
fi

if stage target; then
    limit=()
    [[ -n "${TARGET_MINUTES:-}" ]] && limit=(--time-limit-minutes "$TARGET_MINUTES")
    "$PYTHON" -m lmms_msd train-target --data "$OUT/data" --out "$OUT/target" --seed "$SEED" \
        --workers "$WORKERS" --steps "${TARGET_STEPS:-5200}" --batch-size "${BATCH_SIZE:-256}" \
        --device "$DEVICE" --size "${SIZE:-default}" --max-shard-size "$MAX_SHARD_SIZE" --samples "${SAMPLES:-12}" \
        "${limit[@]}"
fi

if stage draft; then
    draft_limit=()
    [[ -n "${DRAFT_MINUTES:-}" ]] && draft_limit=(--time_limit_minutes "$DRAFT_MINUTES")
    "$PYTHON" -m lmms_msd train-draft --pretrained "$OUT/target" --data "$OUT/data/llava_train.json" \
        --image_folder "$OUT/data" --output_dir "$OUT/draft" --device "$DEVICE" --dtype float32 \
        --seed "$SEED" --steps "${DRAFT_STEPS:-3125}" --grad_accum "${GRAD_ACCUM:-4}" --batch_size "${DRAFT_BATCH:-8}" \
        --lr "${DRAFT_LR:-1e-3}" --workers "${DRAFT_WORKERS:-4}" --save_every 250 --save_dtype float16 --max_shard_size "$MAX_SHARD_SIZE" \
        "${draft_limit[@]}"
fi

for folder in "$OUT/target" "$OUT/draft"; do
    [[ -d "$folder" ]] && find "$folder" -maxdepth 1 -type f -printf "%10s  %p\n" | sort -k2
done
exit 0
