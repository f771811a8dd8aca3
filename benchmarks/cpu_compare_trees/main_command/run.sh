#!/bin/bash
# The README's main command on CPU for use_msd=false, the default and tree=opt,stop=cost, interleaved,
# three rounds (the first round measures the cost model into XDG_CACHE_HOME, the later two read it);
# main_command.json holds each run's overall statistics from its msd_stats.json.
set -e
cd "$(dirname "$0")/../../.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 XDG_CACHE_HOME=$PWD/build/xdg_cache
mkdir -p build/main_cmd
for round in 1 2 3; do
  for name in plain default opt_cost; do
    case $name in
      plain) model_args=(--model_args use_msd=false);;
      default) model_args=();;
      opt_cost) model_args=(--model_args tree=opt,stop=cost);;
    esac
    out=build/main_cmd/$name-$round
    rm -rf "$out"
    python -m lmms_eval --model llava_msd_calibrated "${model_args[@]}" --tasks msd_chartqa_synth_long \
        --include_path tasks --limit 20 --output_path "$out/" > "$out.log" 2>&1
  done
done
