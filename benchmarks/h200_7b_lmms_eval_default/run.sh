# The plugin end to end on the H200 7B-shaped testbed with the default model_args (tree=auto): lmms-eval twice
# (speculative default, use_msd=false) on 20 documents, then the answers compared doc_id by doc_id.
# Run from the repository root with .whl carried (scripts/gpu_setup.sh); outputs in build/r7.
source scripts/gpu_setup.sh > build_setup.log 2>&1 || { cat build_setup.log; exit 1; }
mkdir -p build/r7
for args in "inflate=7b" "inflate=7b,use_msd=false"; do
  name=$(echo $args | tr ',=' '__')
  timeout 200 python -m lmms_eval --model llava_msd_calibrated --model_args "$args,stats_path=build/r7/$name.json" --tasks msd_chartqa_synth_long \
     --include_path tasks --limit 20 --output_path build/r7/$name --log_samples > build/r7/$name.log 2>&1
  echo "$args rc=$?"
  python3 - "$name" <<'PY'
import json, sys
d = json.load(open(f"build/r7/{sys.argv[1]}.json"))
run = d.get("run", d)
t = run.get("tree") or {}
print(run.get("decoding"), {k: t.get(k) for k in ("kind", "stop", "stop_delta", "node_budget", "calibrator")})
print({k: d.get("overall", {}).get(k) for k in ("tau", "tokens_per_s", "samples", "new_tokens")})
PY
  grep -E "^\|.*msd_chartqa" build/r7/$name.log | head -3
done
python3 - <<'PY'
import glob, json
def answers(name):
    f = glob.glob(f"build/r7/{name}/**/*samples*.jsonl", recursive=True)[0]
    return {json.loads(l)["doc_id"]: json.loads(l)["filtered_resps"] for l in open(f)}
a, b = answers("inflate_7b"), answers("inflate_7b_use_msd_false")
print("docs", len(a), "identical answers:", sum(a[k] == b[k] for k in a), "of", len(a))
PY
tar czf $OUT/r7.tgz build/r7
