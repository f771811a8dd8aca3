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
