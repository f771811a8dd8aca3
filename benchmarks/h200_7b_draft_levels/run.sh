# The runs behind this folder (one H200 each; `source scripts/gpu_setup.sh` first, from the repository root).
# Two attempts at the batch-1 draft levels, each measured against the code without it on the same machine; neither
# paid, and both are reverted on main. To rerun one, check out its commit (the wrappers here patch that commit's code).
A="--engine static --inflate 7b --limit 5 --warmup 1 --stop_delta 0.6 --torch_compile --no_progress"
# r31, main at ff7ea15 (9ffd632 + ff7ea15: the grower's root, levels and selections through torch.compile; reverted in
# d7075a0 and d349325). The T=0 run with them timed out at 150 s (cold compilations); T=1 ran after it, on warm caches.
R=build/r31
lmms-msd bench $A --repeats 3 --methods plain,opt --temperature 0 --output_dir $R/b1_t0_compile      # timed out
python3 benchmarks/h200_7b_draft_levels/bench_nogrowcompile.py bench $A --repeats 3 --methods opt --temperature 0 \
  --output_dir $R/b1_t0_growth_uncompiled
lmms-msd bench $A --repeats 3 --methods plain,opt --temperature 1 --output_dir $R/b1_t1_compile
python3 benchmarks/h200_7b_batched_host/probes/gaps.py $R/gaps 3   # gaps_opt.txt, gaps_plain.txt
# r32, main at fb1b08a (GraphedTreeGrower run one level ahead on CUDA; reverted in f8a3f8e), in this order:
R=build/r32
lmms-msd bench $A --repeats 3 --methods plain,opt --temperature 0 --output_dir $R/t0_ahead
python3 benchmarks/h200_7b_draft_levels/bench_noahead.py bench $A --repeats 3 --methods opt --temperature 0 --output_dir $R/t0_noahead
python3 benchmarks/h200_7b_draft_levels/bench_noahead.py bench $A --repeats 3 --methods opt --temperature 1 --output_dir $R/t1_noahead
lmms-msd bench $A --repeats 3 --methods plain,opt --temperature 1 --output_dir $R/t1_ahead
lmms-msd bench $A --repeats 3 --methods opt --temperature 0 --output_dir $R/t0_ahead_2
