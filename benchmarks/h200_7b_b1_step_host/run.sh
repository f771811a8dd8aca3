# The runs behind this folder (one H200 each; from the repository root, `source scripts/gpu_setup.sh` first).
A="--engine static --inflate 7b --limit 5 --warmup 2 --repeats 3 --stop_delta 0.6 --torch_compile --no_progress --include_path $PWD/tasks"
P=benchmarks/h200_7b_b1_step_host/step_probe.py
# r36 (main at 7332f0d; --warmup 1): the probe, then the draft's prompt graph (37bf693) against the previous release's prompts
python3 $P build/r36/probe 3
lmms-msd bench $A --warmup 1 --methods plain,opt --temperature 0 --output_dir build/r36/t0_new
PREV=prefill python3 benchmarks/h200_7b_b1_overheads/bench_prev.py bench $A --warmup 1 --methods plain,opt --temperature 0 --output_dir build/r36/t0_p
lmms-msd bench $A --warmup 1 --methods opt --temperature 0 --output_dir build/r36/t0_new_2
# r37 and r38 (main at 6d31bd6): this release's step; r38's rows named _b were meant as the previous release's code but ran
# this release's (see README), so they are repeats of it
lmms-msd bench $A --methods plain,opt --temperature 0 --output_dir build/r38/t0_new_1   # and so on, in the order of README's table
python3 $P build/r38/probe 3
lmms-msd bench $A --methods opt --temperature 1 --output_dir build/r38/t1_new
# r39 (main at 6d31bd6): interleaved, the previous release's code (7332f0d's lmms_msd, without assets, put first on the path)
# against this release's; -P keeps the working directory (this repository's lmms_msd) off the path
git archive 7332f0d lmms_msd | tar x -C /tmp/old --exclude lmms_msd/assets && ln -sfn $PWD/lmms_msd/assets /tmp/old/lmms_msd/assets
OLD="env PYTHONPATH=/tmp/old:$PYTHONPATH python3 -P -m lmms_msd"
$OLD bench $A --methods plain,opt --temperature 0 --output_dir build/r39/t0_old_1
lmms-msd bench $A --methods plain,opt --temperature 0 --output_dir build/r39/t0_new_1
$OLD bench $A --methods opt --temperature 0 --output_dir build/r39/t0_old_2
lmms-msd bench $A --methods opt --temperature 0 --output_dir build/r39/t0_new_2
$OLD bench $A --methods opt --temperature 0 --output_dir build/r39/t0_old_3
lmms-msd bench $A --methods opt --temperature 0 --output_dir build/r39/t0_new_3
$OLD bench $A --methods opt --temperature 1 --output_dir build/r39/t1_old
lmms-msd bench $A --methods opt --temperature 1 --output_dir build/r39/t1_new
python3 benchmarks/h200_7b_b1_step_host/plot.py   # r39_ab.png
