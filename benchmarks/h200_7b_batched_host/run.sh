# The runs behind this folder (one H200 each; `source scripts/gpu_setup.sh` first, from the repository root).
# r26 (main at 13458ec): lmms-eval end to end in the order plain, EAGLE-2 at 64, EAGLE-2 at 32; then bench; then the profile.
# r27 (the same code): lmms-eval again, EAGLE-2 first and each twice; then the batch-1 idle-time probe.
R=build/r26
for spec in "plain_b64|use_msd=false,max_length=1024,prefetch=64|64" \
            "eagle2_b64|tree=eagle2,max_length=1024,batched_drafting=true,batch_node_budgets=1:58;32:7;64:3,prefetch=64|64" \
            "eagle2_b32|tree=eagle2,max_length=1024,batched_drafting=true,batch_node_budgets=1:58;32:7;64:3,prefetch=32|32"; do
  IFS='|' read name args bs <<< "$spec"
  python3 -m lmms_eval --model llava_msd_calibrated --model_args "inflate=7b,$args,stats_path=$R/$name.json" \
     --tasks msd_chartqa_synth_long --include_path tasks --limit 128 --batch_size $bs --output_path $R/$name --log_samples
done
lmms-msd bench --engine static --inflate 7b --task msd_chartqa_synth_long --limit 128 --warmup 128 --repeats 1 --methods plain,eagle2 \
  --max_length 1024 --batched_drafting --torch_compile --batch 32,64 --batch_node_budgets 1:58,32:7,64:3 --no_progress --output_dir $R/b64_compile
NREQ=128 PYPROFILE=1 OUT=$R python3 scripts/profile_batched.py bench --engine static --inflate 7b --task msd_chartqa_synth_long \
  --limit 128 --warmup 128 --repeats 1 --methods eagle2 --max_length 1024 --batched_drafting --batch 64 --batch_node_budgets 1:58,32:7,64:3 \
  --no_progress --output_dir $R/b64_prof
R=build/r27  # the four lmms-eval runs: the same loop with names eagle2_b64_1, plain_b64_1, eagle2_b64_2, plain_b64_2 (in that order)
python3 benchmarks/h200_7b_batched_host/probes/gaps.py $R/gaps 3
R=build/r28  # the idle gaps charged to the host phase that launched the kernel ending each (OPT-Tree, T=0)
python3 benchmarks/h200_7b_batched_host/probes/gaps2.py $R 3 0
# r29 (main at 0ac35c3, probes/b1_parallel_decode_every_check/) and r30 (main at c1da835, b1_t0_compile/, b1_t1_compile/):
B="lmms-msd bench --engine static --inflate 7b --limit 5 --warmup 1 --repeats 2 --methods plain,opt --stop_delta 0.6 --torch_compile --no_progress"
$B --temperature 0 --output_dir build/r30/b1_t0_compile
$B --temperature 1 --output_dir build/r30/b1_t1_compile
