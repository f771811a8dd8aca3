source scripts/gpu_setup.sh > /dev/null
O=$OUT/r54; mkdir -p $O
C="--engine static --inflate 7b --task msd_chartqa_synth_long --include_path $PWD/tasks --limit 128 --warmup 128 --repeats 1 --max_length 1024 --torch_compile --no_progress"
timeout 210 lmms-msd bench $C --methods plain,eagle2 --batched_drafting --batch 64,128 --batch_node_budgets 1:58,32:7,64:3 --output_dir $O/b > $O/b.log 2>&1; tail -5 $O/b/bench_batch.md; tail -3 $O/b.log
cd $OUT && tar czf r54.tgz r54 && rm -rf r54
