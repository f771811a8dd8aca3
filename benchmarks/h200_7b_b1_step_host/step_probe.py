"""Where a batch-1 OPT-Tree step's time goes, on the device timeline, unprofiled.
1. phases: events recorded (no sync) around the runtime's calls in real requests -> device-timeline ms per
   phase per step (draft, verify, accept+host, commit), host ms per phase.
2. graphs: each captured graph replayed 30x back to back, device ms per replay (plain step, verify, root,
   levels, select, advance); eager pieces (accept, keep_path, verify prep) timed the same way.
3. kernels: one replay of a level, of the verify graph and of the plain graph under the profiler: kernel
   names and device us, summed by name.
4. a level's boundary: its replay alone, with the stop rule's read, and through `GraphedFunction` with the read.
usage (from the repository root, `source scripts/gpu_setup.sh` first): python benchmarks/h200_7b_b1_step_host/step_probe.py OUTDIR [n_requests]
(r36 ran sections 1-3 at 7332f0d; r37 and r38 stopped in section 2 on a probe bug fixed since: a level's graph replayed
with a committed count past its width, then outside inference mode; sections 1's figures are whole.)"""
import collections
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
n = int(sys.argv[2]) if len(sys.argv) > 2 else 3
log = open(out / "step_probe.txt", "w")


def say(*a):
    print(*a)
    print(*a, file=log, flush=True)


import lmms_msd.speculative.decoding as D  # noqa: E402
from lmms_msd.commands.bench import requests_from_task  # noqa: E402
from lmms_msd.pipeline import (  # noqa: E402
    PairSettings,
    RuntimeSettings,
    TreeSettings,
    build_decoder,
    build_tree,
    inflation_shape,
    load_pair,
    resolve_pair,
)

cuda = torch.cuda.is_available()
paths = resolve_pair(None, None)
pair = load_pair(PairSettings(paths.pretrained, paths.msd_model_path, "cuda" if cuda else "cpu", "float16" if cuda else "float32",
                              inflate=inflation_shape("7b" if cuda else None)))
dec = build_decoder(pair, RuntimeSettings("static", 1024, compile=cuda))
tree = build_tree(TreeSettings(kind="opt", stop_delta=0.6), dec)
reqs, config = requests_from_task("msd_chartqa_synth_long", Path("tasks"), n)
prompts = [dec.target.prepare(r.context, r.images) for r in reqs]
rt = dec.runtime
sync = torch.cuda.synchronize if cuda else (lambda: None)


def run(method):
    toks = steps = 0
    for p in prompts:
        r = D.plain_generate(rt, p, config) if method == "plain" else D.speculative_generate(rt, p, config, tree.builder)
        toks += r.stats.new_tokens
        steps += r.stats.steps
    return toks, steps


for method in ("plain", "opt"):
    for _ in range(2):
        run(method)
    sync()
    s = time.perf_counter()
    toks, steps = run(method)
    sync()
    wall = time.perf_counter() - s
    say(f"{method}: {n} requests, {toks} tokens, {steps} steps, wall {wall * 1e3:.1f} ms ({wall * 1e3 / toks:.3f} ms/token)")

# ---- 1. phases on the device timeline ---------------------------------------------------------------------------
marks = []  # (name, event, host time)


def mark(name):
    e = torch.cuda.Event(enable_timing=True) if cuda else None
    if cuda:
        e.record()
    marks.append((name, e, time.perf_counter()))


def wrap(obj, attr, name):
    fn = getattr(obj, attr)

    def call(*a, **k):
        mark(name + ">")
        r = fn(*a, **k)
        mark(name + "<")
        return r

    setattr(obj, attr, call)
    return fn


grower0 = next(iter(rt._growers.values()))
levels_run = [0]
real_levels = list(grower0._levels)
grower0._levels = [(lambda g: (lambda *a: (levels_run.__setitem__(0, levels_run[0] + 1), g(*a))[1]))(g) for g in real_levels]
# verify_greedy: the verification with its greedy acceptance (since 776df40; the phase "verify" before it)
orig = {a: wrap(rt, a, a) for a in ("draft_tree", "verify", "commit", "prefill", "prefill_draft") + (("verify_greedy",) if hasattr(rt, "verify_greedy") else ())}
orig_accept = wrap(D, "accept", "accept")
sync()
run("opt")
sync()
for a, f in orig.items():
    setattr(rt, a, f)
D.accept = orig_accept
dev = collections.defaultdict(float)
host = collections.defaultdict(float)
count = collections.Counter()
for (n0, e0, h0), (n1, e1, h1) in zip(marks, marks[1:]):
    key = f"{n0} .. {n1}"
    if cuda:
        dev[key] += e0.elapsed_time(e1)
    host[key] += (h1 - h0) * 1e3
    count[key] += 1
grower0._levels = real_levels
steps = count["draft_tree> .. draft_tree<"]
say(f"level replays per tree: {levels_run[0] / steps:.2f}")
say(f"\nphases of one opt pass ({steps} steps): device-timeline ms and host ms per step (per occurrence for prefill)")
for key in sorted(dev if cuda else host, key=lambda k: -(dev[k] if cuda else host[k])):
    per = steps if "prefill" not in key else count[key]
    say(f"  {key:40s} x{count[key]:4d}  device {dev[key] / per:8.3f}  host {host[key] / per:8.3f}")

if not cuda:
    sys.exit(0)


# ---- 2. graphs replayed back to back ------------------------------------------------------------------------------
def device_ms(fn, reps=30):
    fn()
    sync()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    h = time.perf_counter()
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    h = time.perf_counter() - h
    b.synchronize()
    return a.elapsed_time(b) / reps, h * 1e3 / reps


def graphs(gf):
    return {k: c for k, c in gf._graphs.items()}


st = rt.static_target
drafter = next(iter(rt._drafters.values()))
grower = next(iter(rt._growers.values()))
with torch.inference_mode():  # the grower's tensors are inference tensors
    grower.prefix.fill_(300)  # the levels' graphs read it in place: a count that fits every captured width
say("\ngraph replays (device ms, host ms per replay):")
items = [("plain step", st._graphed_next), ("verify", st._graphed)] + ([("verify greedy", st._graphed_greedy)] if hasattr(st, "_graphed_greedy") else []) + [("target prompt", st._graphed_prompt), ("draft advance", drafter._advancing),
         ("draft prompt", drafter._prompt_graphed), ("draft head", drafter._graphed), ("root", grower._root)]
items += [(f"level {d}", g) for d, g in enumerate(grower._levels)] + [(f"select {d}", g) for d, g in enumerate(grower._select)]
replays = {}
for name, gf in items:
    for key, cap in graphs(gf).items():
        d, h = device_ms(cap.graph.replay, 10 if "prompt" in name else 30)
        shapes = [k[0] for k in key]
        say(f"  {name:14s} {str(shapes)[:70]:70s} device {d:8.3f}  host {h:7.3f}")
        replays[(name, tuple(shapes))] = cap

# eager pieces on a real tree
p = prompts[0]
seq, hidden, logits = rt.prefill(p, config.max_new_tokens + tree.builder.slots)
tok = int(logits[-1].argmax())
root = rt.prefill_draft(seq, p, hidden, tok, False)
drafted, anc = rt.draft_tree(seq, tree.builder, tok, root)
say(f"\neager pieces on a tree of {len(drafted)} nodes (device ms, host ms per call):")
say("  draft_tree   %8.3f %7.3f" % device_ms(lambda: rt.draft_tree(seq, tree.builder, tok, root), 20))
th, lg = rt.verify(seq, drafted, anc)
say("  verify       %8.3f %7.3f" % device_ms(lambda: rt.verify(seq, drafted, anc), 20))
res = D.accept(drafted, lg, anc, config, None)
say("  accept       %8.3f %7.3f" % device_ms(lambda: D.accept(drafted, lg, anc, config, None), 30))
if hasattr(rt, "verify_greedy"):
    say("  verify_greedy %7.3f %7.3f" % device_ms(lambda: rt.verify_greedy(seq, drafted, anc), 20))
path, ids = D.path_on_device(res, st.device)
say("  path_on_dev  %8.3f %7.3f" % device_ms(lambda: D.path_on_device(res, st.device), 30))
say("  keep_path    %8.3f %7.3f" % device_ms(lambda: st.keep_path(seq.committed, path), 30))
say("  hidden[path] %8.3f %7.3f" % device_ms(lambda: th[path], 30))
say("  advance      %8.3f %7.3f" % device_ms(lambda: (drafter.advance(ids, th[path]), setattr(drafter, "committed", drafter.committed - ids.shape[0])), 30))
rt.release(seq)


# ---- 3. kernels of single replays -------------------------------------------------------------------------------
def kernels(name, cap):
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            cap.graph.replay()
        sync()
    trace = out / "k.json"
    prof.export_chrome_trace(str(trace))
    ev = [e for e in json.load(open(trace))["traceEvents"] if e.get("cat") == "kernel"]
    trace.unlink()
    ev.sort(key=lambda e: e["ts"])
    per = len(ev) // 3
    ev = ev[-per:]
    span = ev[-1]["ts"] + ev[-1]["dur"] - ev[0]["ts"]
    busy = sum(e["dur"] for e in ev)
    tot = collections.Counter()
    num = collections.Counter()
    for e in ev:
        tot[e["name"][:90]] += e["dur"]
        num[e["name"][:90]] += 1
    say(f"\nkernels of one replay of {name}: {per} kernels, span {span:.1f} us, busy {busy:.1f} us")
    for k, v in tot.most_common(25):
        say(f"  {v:9.1f} us  {num[k]:4d}x  {k}")


for (name, shapes), cap in replays.items():
    if name in ("plain step", "verify", "verify greedy", "draft advance") or name in ("level 3", "root", "select 8"):
        kernels(f"{name} {shapes}", cap)


# ---- 4. a level's boundary: replay alone, replay + the stop rule's read, the GraphedFunction call + read ------------
def per_iter(fn, reps=40):
    fn()
    sync()
    h = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - h) * 1e3 / reps


with torch.inference_mode():
    grower.prefix.fill_(300)
lv = grower._levels[3]
key = next(iter(lv._graphs))
cap = lv._graphs[key]
width = key[1][0][0]
say(f"\nlevel 3 boundary (width {width}), wall ms per iteration:")
say(f"  replay                       {per_iter(cap.graph.replay):.4f}")
say(f"  replay + float(expected[4])  {per_iter(lambda: (cap.graph.replay(), float(grower.expected[4]))):.4f}")
say(f"  call + float(expected[4])    {per_iter(lambda: (lv(grower.prefix, grower.window[:width]), float(grower.expected[4]))):.4f}")
rv = grower._root
rkey = next(iter(rv._graphs))
rcap = rv._graphs[rkey]
say(f"  root replay                  {per_iter(rcap.graph.replay):.4f}")
say(f"  root replay + float          {per_iter(lambda: (rcap.graph.replay(), float(grower.expected[1]))):.4f}")
seq, hidden, logits = rt.prefill(p, config.max_new_tokens + tree.builder.slots)
root = rt.prefill_draft(seq, p, hidden, tok, False)
t = rt.draft_tree(seq, tree.builder, tok, root)[0]
say(f"  draft_tree of {len(t)} nodes, depth {int(t.depths.max())}: {per_iter(lambda: rt.draft_tree(seq, tree.builder, tok, root), 20):.4f}")
rt.release(seq)
