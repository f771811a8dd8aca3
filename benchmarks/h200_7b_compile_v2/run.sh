source scripts/gpu_setup.sh > /tmp/setup.log 2>&1 || { cat /tmp/setup.log; exit 1; }
R=build/r16; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader | tee $R/gpu.txt
git log --oneline -1 | tee $R/commit.txt
timeout 100 python3 -m pytest -x -q tests/test_compile.py tests/test_fast_engine.py -k "cuda or graphed" 2>&1 | tail -2 | tee $R/cuda_tests.txt
timeout 60 python3 scripts/kernel_probes.py attention > $R/attention.txt 2>&1; echo "attention rc=$?"; cat $R/attention.txt | grep -v Warn
timeout 60 python3 scripts/kernel_probes.py vision > $R/vision.txt 2>&1; echo "vision rc=$?"; grep embed_inputs $R/vision.txt
B="lmms-msd bench --engine static --inflate 7b --limit 5 --warmup 1 --repeats 2 --methods plain,opt --stop_delta 0.6 --torch_compile"
timeout 130 $B --temperature 0 --output_dir $R/b1_t0_compile > $R/b1_t0.log 2>&1; echo "b1_t0 rc=$?"
grep -E "^\| (plain|opt) " $R/b1_t0_compile/bench.md
timeout 130 lmms-msd bench --engine static --inflate 7b --task msd_chartqa_synth_long --limit 64 --warmup 64 --repeats 3 --methods plain,eagle2 \
  --max_length 1024 --batched_drafting --torch_compile --batch 64 --batch_node_budgets 1:58,32:7,64:3 --output_dir $R/b64_compile > $R/b64.log 2>&1; echo "b64 rc=$?"
grep -E "^\| (plain|eagle2) " $R/b64_compile/bench_batch.md
for spec in "lmms_eval_b64|use_msd=false,max_length=1024,prefetch=64|128|64" "lmms_eval_b1|engine=static|20|1"; do
  IFS='|' read name args limit bs <<< "$spec"
  timeout 100 python3 -m lmms_eval --model llava_msd_calibrated --model_args "inflate=7b,$args,stats_path=$R/$name.json" \
     --tasks msd_chartqa_synth_long --include_path tasks --limit $limit --batch_size $bs --output_path $R/$name --log_samples > $R/$name.log 2>&1
  echo "$name rc=$?"
  python3 -c "
import json; d=json.load(open('$R/$name.json')); o=d.get('overall',{})
print({k: o.get(k) for k in ('tau','tokens_per_s','samples','new_tokens','wall_s')}, {k: d.get(k) for k in ('generate_until_s','documents_per_s','prefetch')})"
done
timeout 130 $B --temperature 1 --output_dir $R/b1_t1_compile > $R/b1_t1.log 2>&1; echo "b1_t1 rc=$?"
grep -E "^\| (plain|opt) " $R/b1_t1_compile/bench.md
tar czf $OUT/r16.tgz $R
