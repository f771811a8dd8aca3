source scripts/gpu_setup.sh > /tmp/setup.log 2>&1 || { cat /tmp/setup.log; exit 1; }
mkdir -p build/r9
for args in "prefetch=64" "prefetch=0" "prefetch=64,engine=static"; do
  name=$(echo $args | tr ',=' '__')
  start=$(date +%s.%N)
  timeout 170 python3 -m lmms_eval --model llava_msd_calibrated --model_args "inflate=7b,use_msd=false,max_length=1024,$args,stats_path=build/r9/$name.json" \
     --tasks msd_chartqa_synth_long --include_path tasks --limit 128 --batch_size 64 --output_path build/r9/$name > build/r9/$name.log 2>&1
  rc=$?; end=$(date +%s.%N)
  python3 - "$name" "$rc" "$start" "$end" <<'PY'
import json, sys
name, rc, start, end = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
try:
    d = json.load(open(f"build/r9/{name}.json")); o = d.get("overall", {})
    print(name, "rc", rc, "process s %.1f" % (end - start), {k: o.get(k) for k in ("tokens_per_s", "samples", "new_tokens", "wall_s")}, {k: d.get(k) for k in ("generate_until_s", "documents_per_s", "prefetch", "torch_compile")})
except Exception as e:
    print(name, "rc", rc, "no stats", e)
PY
  grep -E "^\|.*msd_chartqa" build/r9/$name.log | head -2
done
tar czf $OUT/r9.tgz build/r9
