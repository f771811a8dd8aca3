# r58: is a process that reads its cost model from the cache ($XDG_CACHE_HOME/lmms_msd/cost_models) slower than one
# that measures it? The plugin's default (use_msd=auto) four times, 40 documents, batch 1: a fresh cache folder A
# (measures), A again (reads), a fresh B (measures), B again (reads). From the repository root, .whl carried.
source scripts/gpu_setup.sh > /dev/null
O=$OUT/r58; mkdir -p $O
E="--tasks msd_chartqa_synth_long --include_path tasks --limit 40"
for spec in "miss_A|A" "hit_A|A" "miss_B|B" "hit_B|B"; do
  IFS='|' read name cache <<< "$spec"
  XDG_CACHE_HOME=/tmp/xdg_$cache timeout 100 python3 -m lmms_eval --model llava_msd_calibrated --model_args "inflate=7b,stats_path=$O/$name.json" $E --output_path $O/$name > $O/$name.log 2>&1
  python3 -c "import json;d=json.load(open('$O/$name.json'));o=d['overall'];print('$name', round(1e3*o['wall_s']/o['new_tokens'],3), 'ms/token, prefill', round(o['prefill_s'],3), 's, steps', o['steps'], ', generate_until', round(d['generate_until_s'],2), 's')" 2>&1 | tail -1
  grep -h "cost model" $O/$name.log | head -2 | cut -c1-200
done
rm -rf $O/*/
cd $OUT && tar czf r58.tgz r58 && rm -rf r58
