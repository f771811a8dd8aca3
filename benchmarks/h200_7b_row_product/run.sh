# The runs behind this folder (one H200 each; from the repository root, `source scripts/gpu_setup.sh` first).
A="--engine static --inflate 7b --limit 5 --warmup 2 --repeats 3 --stop_delta 0.6 --torch_compile --no_progress --include_path $PWD/tasks"
P=benchmarks/h200_7b_b1_step_host/step_probe.py
# r40 (main at d2d0b35): the step probe and the bench before the kernel
python3 $P build/r40/probe 3
lmms-msd bench $A --methods plain,opt --temperature 0 --output_dir build/r40/t0
# r41: the sweep (blocks of the GEMV, inductor's reduction, split-K; a split-KV decode attention)
python3 benchmarks/h200_7b_row_product/sweep.py attention > r41_attention_sweep.txt
for s in o down qkv gate_up; do python3 benchmarks/h200_7b_row_product/sweep.py $s; done > r41_sweep.txt
# r42 (abfd706): cuBLAS against the kernel as the engine calls it, then the bench and the step probe
python3 scripts/kernel_probes.py decode > build/r42/decode.txt
lmms-msd bench $A --methods plain,opt --temperature 0 --output_dir build/r42/t0
python3 $P build/r42/probe 3
# r43 (32c4d09): interleaved against the previous release's code (d2d0b35's lmms_msd, without assets, first on the path;
# -P keeps the working directory's lmms_msd off it), then T=1, then the few-row sweep
git archive d2d0b35 lmms_msd | tar x -C /tmp/old --exclude lmms_msd/assets && ln -sfn $PWD/lmms_msd/assets /tmp/old/lmms_msd/assets
env PYTHONPATH=/tmp/old:$PYTHONPATH python3 -P -m lmms_msd bench $A --methods plain,opt --temperature 0 --output_dir build/r43/t0_old
lmms-msd bench $A --methods plain,opt --temperature 0 --output_dir build/r43/t0_new
lmms-msd bench $A --methods plain,opt --temperature 1 --output_dir build/r43/t1_new
python3 benchmarks/h200_7b_row_product/sweep.py rows 64 qkv o gate_up down > build/r43/rows64.txt
python3 benchmarks/h200_7b_row_product/sweep.py rows 10 gate_up down > build/r43/rows10.txt
