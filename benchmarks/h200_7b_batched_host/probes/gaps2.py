"""Batch-1 OPT-Tree: the device's idle gaps attributed to what the host was doing (scratch probe).
Each loop phase runs inside a record_function range; a gap before kernel K is charged to the innermost
range around the host call that launched K (matched by the trace's correlation ids).
usage: python gaps2.py OUTDIR [n_requests] [temperature]"""
import collections
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
n = int(sys.argv[2]) if len(sys.argv) > 2 else 3
temperature = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0

import lmms_msd.speculative.decoding as D  # noqa: E402
from lmms_msd.commands.bench import requests_from_task  # noqa: E402
from lmms_msd.pipeline import PairSettings, RuntimeSettings, TreeSettings, build_decoder, build_tree, inflation_shape, load_pair, resolve_pair  # noqa: E402
from lmms_msd.speculative.fast import tree_growth as TG  # noqa: E402
from lmms_msd.speculative.fast.graphs import GraphedFunction  # noqa: E402

paths = resolve_pair(None, None)
pair = load_pair(PairSettings(paths.pretrained, paths.msd_model_path, "cuda", "float16", inflate=inflation_shape("7b")))
dec = build_decoder(pair, RuntimeSettings("static", 1024, compile=True))
tree = build_tree(TreeSettings(kind="opt", stop_delta=0.6), dec)
reqs, config = requests_from_task("msd_chartqa_synth_long", Path("tasks"), n)
import dataclasses  # noqa: E402
config = dataclasses.replace(config, do_sample=True, temperature=temperature) if temperature else config
prompts = [dec.target.prepare(r.context, r.images) for r in reqs]
rt = dec.runtime


def ranged(name, fn):
    def call(*a, **k):
        with record_function("phase::" + name):
            return fn(*a, **k)
    return call


for name in ("accept", "record_step", "path_on_device"):
    setattr(D, name, ranged(name, getattr(D, name)))
for name in ("draft_tree", "verify", "commit", "prefill", "prefill_draft"):
    setattr(rt, name, ranged(name, getattr(rt, name)))
GraphedFunction.__call__ = ranged("graph_call", GraphedFunction.__call__)
orig_build = TG.GraphedTreeGrower.build


def run():
    toks = steps = 0
    for i, p in enumerate(prompts):
        g = torch.Generator(device="cuda").manual_seed(i) if temperature else None
        r = D.speculative_generate(rt, p, config, tree.builder, g)
        toks += r.stats.new_tokens; steps += r.stats.steps
    return toks, steps


for _ in range(2):
    run()
torch.cuda.synchronize()
s = time.perf_counter(); toks, steps = run(); torch.cuda.synchronize(); wall = time.perf_counter() - s
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    run(); torch.cuda.synchronize()
trace = out / "trace.json"
prof.export_chrome_trace(str(trace))
ev = json.load(open(trace))["traceEvents"]
kernels = sorted((e["ts"], e["ts"] + e["dur"], e["name"], e.get("args", {}).get("correlation")) for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
launch_ts = {e["args"]["correlation"]: e["ts"] for e in ev if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
ranges = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in ev if e.get("cat") == "user_annotation" and e["name"].startswith("phase::"))
starts = [r[0] for r in ranges]


def phase_at(t):
    """The phases whose host ranges contain host time t, outermost first."""
    chain = sorted((a, name) for a, b, name in ranges if a <= t <= b)
    return " > ".join(name.removeprefix("phase::") for _, name in chain) or "(no phase: the loop itself)"


by = collections.Counter(); cnt = collections.Counter()
end = kernels[0][1]; busy = kernels[0][1] - kernels[0][0]
for a, b, name, corr in kernels[1:]:
    if a > end:
        g = a - end
        key = phase_at(launch_ts.get(corr, a)) if corr is not None else "(no correlation)"
        by[key] += g; cnt[key] += 1
        busy += b - a
    else:
        busy += max(0.0, b - end)
    end = max(end, b)
span = kernels[-1][1] - kernels[0][0]
with open(out / f"gaps2_t{temperature:g}.txt", "w") as f:
    print(f"opt T={temperature:g}: {len(prompts)} requests, {toks} tokens, {steps} steps; unprofiled {wall * 1e3:.1f} ms ({wall / toks * 1e3:.3f} ms/token)", file=f)
    print(f"profiled span {span / 1e3:.1f} ms, kernels busy {busy / 1e3:.1f} ms, idle {(span - busy) / 1e3:.1f} ms", file=f)
    print("idle (profiled) by the phase that launched the kernel ending the gap: total ms, gaps, per step us", file=f)
    for k, g in by.most_common(20):
        print(f"  {g / 1e3:8.2f} ms {cnt[k]:6d}  {g / steps:8.1f} us/step  {k}", file=f)
print(open(out / f"gaps2_t{temperature:g}.txt").read())
trace.unlink()
