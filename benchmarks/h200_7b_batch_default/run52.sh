source scripts/gpu_setup.sh > /dev/null
O=$OUT/r52; mkdir -p $O
E="--tasks msd_chartqa_synth_long --include_path tasks --limit 128 --batch_size 64 --log_samples"
# lmms-eval end to end, uncompiled, --batch_size 64: where the default's loop loses to plain's (a tree step at the tail?)
for spec in "default_1|use_msd=auto" "plain_1|use_msd=false" "budget0_1|batch_node_budgets=1:0" "default_2|use_msd=auto" "plain_2|use_msd=false"; do
  IFS='|' read name args <<< "$spec"
  timeout 85 python3 -m lmms_eval --model llava_msd_calibrated --model_args "inflate=7b,max_length=1024,prefetch=64,$args,stats_path=$O/$name.json" $E --output_path $O/$name > $O/$name.log 2>&1
  python3 -c "import json;d=json.load(open('$O/$name.json'));o=d['overall'];print('$name', round(d['documents_per_s'],2), round(d['generate_until_s'],3), {k:o.get(k) for k in ('wall_s','prefill_s','steps','accepted_histogram')})" 2>&1 | tail -1
done
C="--engine static --inflate 7b --task msd_chartqa_synth_long --include_path $PWD/tasks --limit 128 --warmup 128 --repeats 1 --max_length 1024 --torch_compile --no_progress --stop_delta 0.6"
timeout 150 lmms-msd bench $C --methods plain,opt --batch 128 --batch_node_budgets 1:0 --batch_node_budgets 1:1000,8:0 --output_dir $O/bench > $O/bench.log 2>&1; tail -4 $O/bench/bench_batch.md
cd $OUT && tar czf r52.tgz r52 && rm -rf r52
