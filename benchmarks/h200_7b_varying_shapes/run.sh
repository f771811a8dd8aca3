# One H200 (device tool), from the repository root, after `source scripts/gpu_setup.sh` (wheels carried in .whl).
# The rows of README.md came from three machines of the kind (r19, r20, r22): compare rows of one file only.
R=build/varying_shapes; mkdir -p $R
python3 scripts/kernel_probes.py shapes | tee $R/shapes.txt                                        # r19
python3 -m pytest -x -q tests/test_compile.py tests/test_fast_engine.py -k "cuda or graphed"       # r22: 7 passed
B="lmms-msd bench --engine static --inflate 7b --limit 5 --warmup 1 --repeats 2 --methods plain,opt --stop_delta 0.6 --torch_compile"
$B --temperature 0 --output_dir $R/b1_t0_compile                                                  # r22
$B --temperature 1 --output_dir $R/b1_t1_compile                                                  # r22
lmms-msd bench --engine static --inflate 7b --task msd_chartqa_synth_long --limit 128 --warmup 128 --repeats 1 --methods plain,eagle2 \
  --max_length 1024 --batched_drafting --torch_compile --batch 32,64 --batch_node_budgets 1:58,32:7,64:3 --output_dir $R/b64_compile  # r20
for spec in "lmms_eval_b1|engine=static|20|1" "lmms_eval_b64|use_msd=false,max_length=1024,prefetch=64|128|64"; do          # r19
  IFS='|' read name args limit bs <<< "$spec"
  python3 -m lmms_eval --model llava_msd_calibrated --model_args "inflate=7b,$args,stats_path=$R/$name.json" \
     --tasks msd_chartqa_synth_long --include_path tasks --limit $limit --batch_size $bs --output_path $R/$name --log_samples
done
