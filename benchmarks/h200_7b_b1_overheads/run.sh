# The runs behind this folder (one H200 each; `source scripts/gpu_setup.sh` first, from the repository root).
# Three batch-1 changes, each measured against the code without it on the same machine, in one process per row:
#   loop:    plain decoding runs one forward ahead of its reads (`plain_generate`, `PendingRead`)
#   layers:  the residual adds stay out of the matrix products (`static_target.product`: no addmm)
#   prefill: the prompt padded to a multiple of 32 positions and replayed from a graph, the head at its last position
# `bench_prev.py` is `lmms-msd bench` with the previous release's code for the parts named in PREV put back.
A="--engine static --inflate 7b --limit 5 --warmup 1 --repeats 3 --stop_delta 0.6 --torch_compile --no_progress"
# r33 (main at 499346e: the draft's prompt not graphed yet), in this order. Its wrapper put the loop back in every
# PREV row (a bug, fixed before r34): these are the PREV values that give r33's rows with today's wrapper.
R=build/r33
lmms-msd bench $A --methods plain,opt --temperature 0 --output_dir $R/t0_new
PREV=loop,layers,prefill python3 benchmarks/h200_7b_b1_overheads/bench_prev.py bench $A --methods plain,opt --temperature 0 --output_dir $R/t0_prev
PREV=loop,prefill python3 benchmarks/h200_7b_b1_overheads/bench_prev.py bench $A --methods plain,opt --temperature 0 --output_dir $R/t0_noprefill
lmms-msd bench $A --methods plain,opt --temperature 1 --output_dir $R/t1_new
PREV=loop,layers,prefill python3 benchmarks/h200_7b_b1_overheads/bench_prev.py bench $A --methods plain,opt --temperature 1 --output_dir $R/t1_prev
PREV=loop,layers,prefill python3 benchmarks/h200_7b_b1_overheads/bench_prev.py bench $A --methods plain --temperature 0 --output_dir $R/t0_oldlayers
python3 benchmarks/h200_7b_b1_overheads/prefill_probe.py > $R/prefill.log
# r34 (main at 3558578: the draft's prompt graphed too, with its compiled head), in this order
R=build/r34
P=benchmarks/h200_7b_b1_overheads/bench_prev.py
python3 benchmarks/h200_7b_b1_overheads/addmm_probe.py > $R/addmm.txt
lmms-msd bench $A --methods plain,opt --temperature 0 --output_dir $R/t0_new_1
PREV=loop,layers,prefill python3 $P bench $A --methods plain,opt --temperature 0 --output_dir $R/t0_rel_1
PREV=prefill python3 $P bench $A --methods plain,opt --temperature 0 --output_dir $R/t0_p_1
PREV=layers,prefill python3 $P bench $A --methods plain,opt --temperature 0 --output_dir $R/t0_lp_1
lmms-msd bench $A --methods plain,opt --temperature 0 --output_dir $R/t0_new_2
PREV=loop,layers,prefill python3 $P bench $A --methods plain,opt --temperature 0 --output_dir $R/t0_rel_2
PREV=prefill python3 $P bench $A --methods plain,opt --temperature 0 --output_dir $R/t0_p_2
