"""A batched verification at 64 rows (4-token chain trees) against a plain batched step: times and kernels (scratch probe).
python verify_probe.py [eager_rows_least eager_rows_most]"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import lmms_msd.speculative.fast.static_target as st
if len(sys.argv) > 2:
    st.EAGER_ATTENTION_ROWS = (int(sys.argv[1]), int(sys.argv[2]))
print("EAGER_ATTENTION_ROWS", st.EAGER_ATTENTION_ROWS, flush=True)
from pathlib import Path

from lmms_msd.commands.bench import requests_from_task
from lmms_msd.pipeline import PairSettings, RuntimeSettings, build_decoder, inflation_shape, load_pair, resolve_pair
from lmms_msd.speculative.tree import Tree
from lmms_msd.speculative.verify import pad_trees

paths = resolve_pair(None, None)
pair = load_pair(PairSettings(paths.pretrained, paths.msd_model_path, "cuda", "float16", inflate=inflation_shape("7b")))
B = 64
dec = build_decoder(pair, RuntimeSettings("static", 1024, max_batch=B, batched_drafting=True, compile=True))
eng = dec.runtime
reqs, _ = requests_from_task("msd_chartqa_synth_long", Path("tasks"), B)
prompts = [dec.target.prepare(r.context, r.images) for r in reqs]
started = eng.prefill_batch(prompts, [300] * B)
seqs = [s for s, _, _ in started]
dev = "cuda"


def chain(n):
    tokens = torch.arange(n, device=dev) + 100
    parents = torch.arange(n, device=dev) - 1
    depths = torch.arange(n, device=dev)
    t = Tree(tokens, parents, depths, torch.zeros(n, device=dev), torch.ones(n, device=dev))
    return t, t.ancestor_mask(n)


def timeit(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    s = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - s) / n * 1000


for n in (1, 4, 8):
    trees = [chain(n) for _ in range(B)]
    padded = pad_trees([t for t, _ in trees], [a for _, a in trees])
    ms = timeit(lambda: eng.verify_trees(seqs, padded))
    print(f"verify_trees B={B} n={n}: {ms:.2f} ms", flush=True)
tok = torch.full((B,), 5, device=dev)


def plain():
    eng.forward_next_batch(seqs, tok)
    for s in seqs:
        s.committed -= 1


print(f"forward_next_batch B={B}: {timeit(plain):.2f} ms", flush=True)
trees = [chain(4) for _ in range(B)]
padded = pad_trees([t for t, _ in trees], [a for _, a in trees])
eng.static_target.cuda_graphs = False
for g in (eng.static_target._graphed_rows,):
    g.enabled = False
eng.verify_trees(seqs, padded)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    eng.verify_trees(seqs, padded)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))
