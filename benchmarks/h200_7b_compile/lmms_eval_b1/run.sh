source scripts/gpu_setup.sh > /tmp/setup.log 2>&1 || { cat /tmp/setup.log; exit 1; }
mkdir -p build/r12
for args in "torch_compile=false" "torch_compile=true"; do
  name=$(echo $args | tr ',=' '__')
  timeout 200 python3 -m lmms_eval --model llava_msd_calibrated --model_args "inflate=7b,engine=static,$args,stats_path=build/r12/$name.json" \
     --tasks msd_chartqa_synth_long --include_path tasks --limit 20 --output_path build/r12/$name --log_samples > build/r12/$name.log 2>&1
  echo "$name rc=$?"
  python3 - "$name" <<'PY'
import json, sys
d = json.load(open(f"build/r12/{sys.argv[1]}.json")); o = d["overall"]
print(sys.argv[1], {k: round(o[k], 3) for k in ("tau", "tokens_per_s", "wall_s")}, {k: d.get(k) for k in ("generate_until_s", "documents_per_s", "torch_compile")})
PY
done
python3 - <<'PY'
import glob, json
def answers(name):
    f = glob.glob(f"build/r12/{name}/**/*samples*.jsonl", recursive=True)[0]
    return {json.loads(l)["doc_id"]: json.loads(l)["resps"] for l in open(f)}
a, b = answers("torch_compile_false"), answers("torch_compile_true")
print("identical answers:", sum(a[k] == b[k] for k in a), "of", len(a))
PY
tar czf $OUT/r12.tgz build/r12
