source scripts/gpu_setup.sh > /dev/null
O=$OUT/r51; mkdir -p $O
ln -sfn $PWD/lmms_msd/assets .gpu_x/old/lmms_msd/assets
OLD="env PYTHONPATH=$PWD/.gpu_x/old:$PYTHONPATH"
$OLD python3 -P -c "import lmms_msd;print('old:', lmms_msd.__file__)"
C="--engine static --inflate 7b --task msd_chartqa_synth_long --include_path $PWD/tasks --limit 128 --warmup 128 --repeats 1 --max_length 1024 --torch_compile --no_progress --stop_delta 0.6"
# 1. bench: plain vs OPT-Tree under the plugin's default schedule (trees below 8 rows in flight) and below 4, new code
timeout 200 lmms-msd bench $C --methods plain,opt --batch 64,128 --batch_node_budgets 1:1000,8:0 --batch_node_budgets 1:1000,4:0 --output_dir $O/new > $O/new.log 2>&1; tail -8 $O/new/bench_batch.md
# 2. the same default schedule, the code before (every request's draft reads its prompt at join)
timeout 120 $OLD python3 -P -m lmms_msd bench $C --methods opt --batch 64,128 --batch_node_budgets 1:1000,8:0 --output_dir $O/old > $O/old.log 2>&1; tail -3 $O/old/bench_batch.md
# 3. lmms-eval end to end, uncompiled, --batch_size 64: plain, the plugin's defaults (new, old), plain again
E="--tasks msd_chartqa_synth_long --include_path tasks --limit 128 --batch_size 64 --log_samples"
for spec in "plain1|use_msd=false|" "default_new|use_msd=auto|" "default_old|use_msd=auto|$PWD/.gpu_x/old:"; do
  IFS='|' read name args pp <<< "$spec"
  timeout 85 env PYTHONPATH=$pp$PYTHONPATH python3 -P -m lmms_eval --model llava_msd_calibrated --model_args "inflate=7b,max_length=1024,prefetch=64,$args,stats_path=$O/$name.json" $E --output_path $O/$name > $O/$name.log 2>&1
  python3 -c "import json,sys;d=json.load(open('$O/$name.json'));o=d['overall'];print('$name', d['documents_per_s'], d['generate_until_s'], {k:o.get(k) for k in ('tokens_per_s','tau','wall_s','prefill_s','new_tokens')})" 2>&1 | tail -1
done
cd $OUT && tar czf r51.tgz r51 && rm -rf r51
