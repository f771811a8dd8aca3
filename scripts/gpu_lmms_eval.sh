#!/usr/bin/env bash
# lmms-eval with the plugin on 1 GPU and on NUM_PROCESSES GPUs (data parallel, `accelerate launch
# --multi_gpu`) on the lent GPU machine: `lmms-msd compare-runs` checks the answers doc_id by doc_id and
# reports score, wall seconds, documents/s, generated tokens/s and tau of each run. Run it from the
# repository root with the ignored folder `.whl` carried (see scripts/gpu_setup.sh):
#
#   bash scripts/gpu_lmms_eval.sh OUTDIR        # e.g. $OUT
#
# Variables (defaults): TASK (msd_chartqa_synth_long), LIMIT (64 documents), NUM_PROCESSES (2),
# MODEL_ARGS (inflate=7b,engine=static,tree=opt), GEN_KWARGS (none: the task's).
# OUTDIR gets compare.json, compare.md, gpu_lmms_eval.log (setup and comparison, as they ran) and
# runs.tar.gz (each run's lmms-eval results, samples, statistics and log): four files, since the GPU
# machine sends back at most eight. The exit status is compare-runs's: 1 when the answers differ.
set -uo pipefail

out=${1:?usage: bash scripts/gpu_lmms_eval.sh OUTDIR}
mkdir -p "$out"
# Required on that machine: NVLink multicast off in NCCL, PyTorch and NVSHMEM (gpu_setup.sh sets them too).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1

compare() {
    source scripts/gpu_setup.sh || return 1
    nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv 2>/dev/null
    local extra=()
    if [ -n "${GEN_KWARGS:-}" ]; then extra=(--gen_kwargs "$GEN_KWARGS"); fi
    python3 -m lmms_msd compare-runs --task "${TASK:-msd_chartqa_synth_long}" --include_path tasks \
        --limit "${LIMIT:-64}" --num_processes "${NUM_PROCESSES:-2}" \
        --model_args "${MODEL_ARGS-inflate=7b,engine=static,tree=opt}" "${extra[@]}" --output_dir "$out"
}

compare 2>&1 | tee "$out/gpu_lmms_eval.log"
status=${PIPESTATUS[0]}
if [ -d "$out/runs" ]; then
    tar -czf "$out/runs.tar.gz" -C "$out" runs && rm -rf "$out/runs"
fi
echo "gpu_lmms_eval: exit status $status; files in $out: $(ls "$out" | tr '\n' ' ')"
exit "$status"
