#!/bin/bash
# The README's main command on CPU with use_msd=false and with the plugin's default (use_msd=auto),
# interleaved, ROUNDS rounds [5], the order swapped every round (the machine is shared: its load moves
# between runs); the first default run measures the cost model into XDG_CACHE_HOME, the later ones read
# it. summary.json holds each run's overall statistics and the use_msd=auto block from its msd_stats.json.
set -e
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 XDG_CACHE_HOME=$PWD/build/xdg_cache_auto
rm -rf build/main_cmd_auto && mkdir -p build/main_cmd_auto
for round in $(seq 1 "${ROUNDS:-5}"); do
  order="plain default"
  [ $((round % 2)) -eq 0 ] && order="default plain"
  for name in $order; do
    case $name in
      plain) model_args=(--model_args use_msd=false);;
      default) model_args=();;
    esac
    out=build/main_cmd_auto/$name-$round
    rm -rf "$out"
    python -m lmms_eval --model llava_msd_calibrated "${model_args[@]}" --tasks msd_chartqa_synth_long \
        --include_path tasks --limit 20 --output_path "$out/" > "$out.log" 2>&1
  done
done
python - <<'PY' > benchmarks/cpu_use_msd_auto/summary.json
import json, pathlib
runs = {}
for stats in sorted(pathlib.Path("build/main_cmd_auto").glob("*/msd_stats.json")):
    report = json.loads(stats.read_text())
    runs[stats.parent.name] = {"decoding": report["decoding"], "overall": report["overall"], "use_msd_auto": report.get("use_msd_auto")}
print(json.dumps(runs, indent=2))
PY
