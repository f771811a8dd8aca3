# r57: the plugin's CUDA default (tree=auto: OPT-Tree on the raw draft confidence, stop_delta 0.6) against the same
# tree scored by the bundled calibrator (tree=opt,stop_delta=0.6: a named OPT-Tree takes the bundled pair's calibrator),
# through lmms-eval at batch 1 (40 long-answer documents, uncompiled as the default is, the two alternating, twice),
# then `lmms-msd bench` uncompiled (5 requests, median of 3). From the repository root, .whl carried.
source scripts/gpu_setup.sh > /dev/null
O=$OUT/r57; mkdir -p $O
E="--tasks msd_chartqa_synth_long --include_path tasks --limit 40 --log_samples"
for spec in "raw_1|" "cal_1|tree=opt,stop_delta=0.6," "raw_2|" "cal_2|tree=opt,stop_delta=0.6,"; do
  IFS='|' read name args <<< "$spec"
  timeout 100 python3 -m lmms_eval --model llava_msd_calibrated --model_args "inflate=7b,${args}stats_path=$O/$name.json" $E --output_path $O/$name > $O/$name.log 2>&1
  python3 -c "import json;d=json.load(open('$O/$name.json'));o=d['overall'];print('$name', d['tree'], round(1e3*o['wall_s']/o['new_tokens'],3), 'ms/token', round(o['tokens_per_s'],1), 'tok/s tau', round(o['tau'],3), o['new_tokens'], 'tokens')" 2>&1 | tail -1
done
A="--engine static --inflate 7b --limit 5 --warmup 2 --repeats 3 --stop_delta 0.6 --no_progress --include_path $PWD/tasks"
timeout 150 lmms-msd bench $A --methods plain,opt,opt_cal --temperature 0 --output_dir $O/t0_eager > $O/t0_eager.log 2>&1; grep "^| plain\|^| opt" $O/t0_eager/bench.md | cut -c1-120
rm -rf $O/*/*/*.log
cd $OUT && tar czf r57.tgz r57 && rm -rf r57
