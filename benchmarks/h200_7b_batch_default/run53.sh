source scripts/gpu_setup.sh > /dev/null
O=$OUT/r53; mkdir -p $O
timeout 120 python3 -m pytest -x -q tests/test_fast_batched.py tests/test_batched_acceptance.py tests/test_batched_growth.py -k "cuda" > $O/cuda_tests.txt 2>&1; tail -2 $O/cuda_tests.txt
C="--engine static --inflate 7b --task msd_chartqa_synth_long --include_path $PWD/tasks --limit 128 --warmup 128 --repeats 1 --max_length 1024 --torch_compile --no_progress"
NREQ=128 OUT=$O timeout 130 python3 scripts/profile_batched.py bench $C --methods eagle2 --batched_drafting --batch 64 --batch_node_budgets 1:58,32:7,64:3 --output_dir $O/prof > $O/prof.log 2>&1; grep PROFILE $O/prof.log | tail -1; tail -3 $O/prof/bench_batch.md
E="--tasks msd_chartqa_synth_long --include_path tasks --limit 128 --batch_size 64 --log_samples"
for spec in "default_1|use_msd=auto" "plain_1|use_msd=false" "default_2|use_msd=auto" "plain_2|use_msd=false"; do
  IFS='|' read name args <<< "$spec"
  timeout 80 python3 -m lmms_eval --model llava_msd_calibrated --model_args "inflate=7b,max_length=1024,prefetch=64,$args,stats_path=$O/$name.json" $E --output_path $O/$name > $O/$name.log 2>&1
  python3 -c "import json;d=json.load(open('$O/$name.json'));o=d['overall'];print('$name', round(d['documents_per_s'],2), round(d['generate_until_s'],3), {k:o.get(k) for k in ('wall_s','prefill_s','steps','accepted_histogram')})" 2>&1 | tail -1
done
cd $OUT && tar czf r53.tgz r53 && rm -rf r53
