# r56: the final code of issue 15 on one H200 (from the repository root; .whl carried): the CUDA tests, the batch-1
# bench at T=0 and T=1 (as ../h200_7b_step_host_path/run.sh's A), and the batched bench (as ../h200_7b_batch_default/run54.sh).
source scripts/gpu_setup.sh > /dev/null
O=$OUT/r56; mkdir -p $O
timeout 170 python3 -m pytest -q tests -k cuda > $O/cuda_tests.txt 2>&1; tail -2 $O/cuda_tests.txt
A="--engine static --inflate 7b --limit 5 --warmup 2 --repeats 3 --stop_delta 0.6 --torch_compile --no_progress --include_path $PWD/tasks"
timeout 130 lmms-msd bench $A --methods plain,opt,opt_cal --temperature 0 --output_dir $O/t0 > $O/t0.log 2>&1; tail -5 $O/t0/bench.md | cut -c1-160
timeout 100 lmms-msd bench $A --methods plain,opt,opt_cal --temperature 1 --output_dir $O/t1 > $O/t1.log 2>&1; tail -5 $O/t1/bench.md | cut -c1-160
C="--engine static --inflate 7b --task msd_chartqa_synth_long --include_path $PWD/tasks --limit 128 --warmup 128 --repeats 1 --max_length 1024 --torch_compile --no_progress"
timeout 170 lmms-msd bench $C --methods plain,eagle2 --batched_drafting --batch 64,128 --batch_node_budgets 1:58,32:7,64:3 --output_dir $O/b > $O/b.log 2>&1; tail -5 $O/b/bench_batch.md
cd $OUT && tar czf r56.tgz r56 && rm -rf r56
