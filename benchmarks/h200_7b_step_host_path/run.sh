# The runs behind this folder (one H200 each; from the repository root, `source scripts/gpu_setup.sh` first).
# Older releases run from `git archive REV lmms_msd` (assets linked from the working tree), first on the path; -P keeps
# the working directory's lmms_msd off it (the import path is printed to check).
A="--engine static --inflate 7b --limit 5 --warmup 2 --repeats 3 --stop_delta 0.6 --torch_compile --no_progress --include_path $PWD/tasks"
P=benchmarks/h200_7b_b1_step_host/step_probe.py
old() {  # old REV DIR: that release's lmms_msd under DIR
  mkdir -p $2 && git archive $1 lmms_msd | tar x -C $2 --exclude lmms_msd/assets && ln -sfn $PWD/lmms_msd/assets $2/lmms_msd/assets
}
# r44 (dcedde1: the fused vocabulary top-k) against 21da4a4 (before it), then T=1 and the step probe
old 21da4a4 /tmp/old
python3 scripts/kernel_probes.py topk > r44/topk.txt
env PYTHONPATH=/tmp/old:$PYTHONPATH python3 -P -m lmms_msd bench $A --methods plain,opt,opt_cal --temperature 0 --output_dir build/r44/t0_old
lmms-msd bench $A --methods plain,opt,opt_cal --temperature 0 --output_dir build/r44/t0_new
lmms-msd bench $A --methods opt,opt_cal --temperature 1 --output_dir build/r44/t1_new
python3 $P build/r44/probe 3
# r45 (776df40: greedy acceptance in the verification's graph, leaner graph calls) against dcedde1 and 21da4a4, one machine
old dcedde1 /tmp/old1
python3 scripts/kernel_probes.py topk > r45/topk.txt
lmms-msd bench $A --methods plain,opt,opt_cal --temperature 0 --output_dir build/r45/t0_new
env PYTHONPATH=/tmp/old1:$PYTHONPATH python3 -P -m lmms_msd bench $A --methods plain,opt,opt_cal --temperature 0 --output_dir build/r45/t0_old1
env PYTHONPATH=/tmp/old:$PYTHONPATH python3 -P -m lmms_msd bench $A --methods plain,opt,opt_cal --temperature 0 --output_dir build/r45/t0_old
lmms-msd bench $A --methods opt,opt_cal --temperature 1 --output_dir build/r45/t1_new
python3 $P build/r45/probe 3
# r46 (e5c3f85, the code of r45 less the GraphedFunction change it measured no gain from) against 21da4a4 on a third
# machine, then without --torch_compile (the plugin's default on CUDA)
A0="--engine static --inflate 7b --limit 5 --warmup 2 --repeats 3 --stop_delta 0.6 --no_progress --include_path $PWD/tasks"
lmms-msd bench $A0 --torch_compile --methods plain,opt,opt_cal --temperature 0 --output_dir build/r46/t0_new
env PYTHONPATH=/tmp/old:$PYTHONPATH python3 -P -m lmms_msd bench $A0 --torch_compile --methods plain,opt,opt_cal --temperature 0 --output_dir build/r46/t0_old
lmms-msd bench $A0 --methods plain,opt,opt_cal --temperature 0 --output_dir build/r46/t0_new_eager
# r47 (2a1ef72): the plugin end to end through lmms-eval with its default model_args, speculative and use_msd=false, on
# 20 documents, the answers compared doc_id by doc_id: ../h200_7b_lmms_eval_default/run.sh with its outputs in r47/
# launch_ahead.py (CPU): the gains per level on 97 trees, and what each margin would queue ahead and waste
python benchmarks/h200_7b_step_host_path/launch_ahead.py 10 > launch_ahead.txt
# r48 (840fdbb: a level queued ahead of its read when the last gain exceeds stop_delta by 0.3) against 2b754e3
old 2b754e3 /tmp/old2
lmms-msd bench $A --methods plain,opt,opt_cal --temperature 0 --output_dir build/r48/t0_new
env PYTHONPATH=/tmp/old2:$PYTHONPATH python3 -P -m lmms_msd bench $A --methods plain,opt,opt_cal --temperature 0 --output_dir build/r48/t0_old2
lmms-msd bench $A --methods opt,opt_cal --temperature 1 --output_dir build/r48/t1_new
python3 $P build/r48/probe 3
# r49: the same two codes interleaved twice, opt and opt_cal at T=0
for i in 1 2; do
  lmms-msd bench $A --methods opt,opt_cal --temperature 0 --output_dir build/r49/new$i
  env PYTHONPATH=/tmp/old2:$PYTHONPATH python3 -P -m lmms_msd bench $A --methods opt,opt_cal --temperature 0 --output_dir build/r49/old$i
done
