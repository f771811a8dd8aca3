"""Batch-1 GPU idle time: plain and OPT-Tree requests (graphs + compile on) under the torch profiler;
the device timeline's busy union vs wall, and the idle gaps grouped by the kernels around them.
usage: python gaps.py OUTDIR [n_requests]"""
import collections
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
n = int(sys.argv[2]) if len(sys.argv) > 2 else 2

from lmms_msd.commands.bench import requests_from_task  # noqa: E402
from lmms_msd.pipeline import PairSettings, RuntimeSettings, TreeSettings, build_decoder, build_tree, inflation_shape, load_pair, resolve_pair  # noqa: E402
import lmms_msd.speculative.decoding as D  # noqa: E402

paths = resolve_pair(None, None)
pair = load_pair(PairSettings(paths.pretrained, paths.msd_model_path, "cuda", "float16", inflate=inflation_shape("7b")))
dec = build_decoder(pair, RuntimeSettings("static", 1024, compile=True))
tree = build_tree(TreeSettings(kind="opt", stop_delta=0.6), dec)
reqs, config = requests_from_task("msd_chartqa_synth_long", Path("tasks"), n)
prompts = [dec.target.prepare(r.context, r.images) for r in reqs]
rt = dec.runtime


def run(method):
    toks = steps = 0
    for p in prompts:
        if method == "plain":
            r = D.plain_generate(rt, p, config)
        else:
            r = D.speculative_generate(rt, p, config, tree.builder)
        toks += r.stats.new_tokens
        steps += r.stats.steps
    return toks, steps


def kernels(trace):
    ev = json.load(open(trace))["traceEvents"]
    ks = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in ev if e.get("cat") == "kernel")
    return ks, ev


for method in ("plain", "opt"):
    for _ in range(2):
        run(method)  # warm-up: compilations and graphs (two passes: every length seen)
    torch.cuda.synchronize()
    s = time.perf_counter()
    toks, steps = run(method)
    torch.cuda.synchronize()
    wall = time.perf_counter() - s
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(method)
        torch.cuda.synchronize()
    trace = out / f"trace_{method}.json"
    prof.export_chrome_trace(str(trace))
    ks, ev = kernels(trace)
    first, last = ks[0][0], max(k[1] for k in ks)
    busy = 0.0
    gaps = collections.Counter()
    gap_n = collections.Counter()
    hist = collections.Counter()
    end = ks[0][1]
    prev = ks[0][2]
    busy = ks[0][1] - ks[0][0]
    for a, b, name in ks[1:]:
        if a > end:
            g = a - end
            key = (prev[:60], name[:60])
            gaps[key] += g
            gap_n[key] += 1
            hist[min(int(g // 5) * 5, 100)] += g
            busy += b - a
        else:
            busy += max(0.0, b - end)
        if b > end:
            end, prev = b, name
    span = last - first
    with open(out / f"gaps_{method}.txt", "w") as f:
        print(f"{method}: {len(prompts)} requests, {toks} tokens, {steps} steps; unprofiled wall {wall * 1e3:.1f} ms "
              f"({wall / toks * 1e3:.3f} ms/token)", file=f)
        print(f"profiled device span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms, idle {(span - busy) / 1e3:.1f} ms "
              f"({(span - busy) / steps:.1f} us a step, {(span - busy) / span * 100:.1f}%), kernels {len(ks)} "
              f"({len(ks) / steps:.0f} a step)", file=f)
        print("idle by gap length (us bucket -> total ms):", {k: round(v / 1e3, 2) for k, v in sorted(hist.items())}, file=f)
        print("largest idle totals by (kernel before, kernel after):", file=f)
        for (a, b), g in gaps.most_common(30):
            print(f"  {g / 1e3:8.2f} ms  {gap_n[(a, b)]:6d}x  {a}  ->  {b}", file=f)
        by_name = collections.Counter()
        for a, b, name in ks:
            by_name[name[:90]] += b - a
        print("kernels by total time (ms):", file=f)
        for name, t in by_name.most_common(30):
            print(f"  {t / 1e3:8.2f}  {name}", file=f)
    print(open(out / f"gaps_{method}.txt").read())
    trace.unlink()
