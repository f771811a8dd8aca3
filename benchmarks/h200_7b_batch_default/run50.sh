source scripts/gpu_setup.sh > /dev/null
O=$OUT/r50; mkdir -p $O
C="--engine static --inflate 7b --task msd_chartqa_synth_long --include_path $PWD/tasks --limit 128 --warmup 128 --repeats 1 --max_length 1024 --torch_compile --no_progress"
# 1. where a compiled batched EAGLE-2 step goes (each engine call between synchronisations), B=64 and 32
NREQ=128 OUT=$O timeout 200 python3 scripts/profile_batched.py bench $C --methods eagle2 --batched_drafting --batch 32,64 --batch_node_budgets 1:58,32:7,64:3 --output_dir $O/prof > $O/prof.log 2>&1; grep PROFILE $O/prof.log
# 2. the host's Python in that pass (cProfile; slows the host)
NREQ=128 OUT=$O PYPROFILE=1 timeout 150 python3 scripts/profile_batched.py bench $C --methods eagle2 --batched_drafting --batch 64 --batch_node_budgets 1:58,32:7,64:3 --output_dir $O/prof_host > $O/prof_host.log 2>&1; grep PROFILE $O/prof_host.log
# 3. plain decoding's best batch: 64 or 128
timeout 180 lmms-msd bench $C --methods plain --batch 64,128 --output_dir $O/plain > $O/plain.log 2>&1; cat $O/plain/bench_batch.md
cd $OUT && tar czf r50.tgz r50 && rm -rf r50
