"""Batch-1 prefill on the 7B testbed (compiled static engine): the target's prompt forward as it runs now (eager,
varying shapes) against the same forward padded to a multiple of 32 rows and replayed from a CUDA graph, and the
draft's prefill after it. Scratch probe: python prefill_probe.py"""
import time
from pathlib import Path

import sys

import torch

from lmms_msd.commands.bench import requests_from_task
from lmms_msd.pipeline import PairSettings, RuntimeSettings, build_decoder, inflation_shape, load_pair, resolve_pair
from lmms_msd.speculative.fast.graphs import GraphedFunction

CPU = len(sys.argv) > 1 and sys.argv[1] == "cpu"  # a check of the script on the miniature pair
paths = resolve_pair(None, None)
pair = load_pair(PairSettings(paths.pretrained, paths.msd_model_path, "cpu" if CPU else "cuda", "float32" if CPU else "float16",
                              inflate=None if CPU else inflation_shape("7b")))
dec = build_decoder(pair, RuntimeSettings("static", 1024, compile=not CPU))
reqs, config = requests_from_task("msd_chartqa_synth_long", Path("tasks"), 5)
prompts = [dec.target.prepare(r.context, r.images) for r in reqs]
rt = dec.runtime
st = rt.static_target


def timed(fn, n=7):
    fn()
    (None if CPU else torch.cuda.synchronize())
    ts = []
    for _ in range(n):
        s = time.perf_counter()
        fn()
        (None if CPU else torch.cuda.synchronize())
        ts.append(time.perf_counter() - s)
    return sorted(ts)[n // 2] * 1e3


def padded(embeds, step=32):
    rows = -(-embeds.shape[0] // step) * step
    x = torch.zeros(rows, embeds.shape[1], dtype=st.lm_head.dtype, device=embeds.device)
    x[: embeds.shape[0]] = embeds
    return x


from lmms_msd.speculative.fast.graphs import varying_shapes  # noqa: E402

eager_prompt = varying_shapes(st._forward_prompt)
lines = []
for p in prompts:
    e = p.inputs_embeds[0]
    L = e.shape[0]
    x = e.to(st.lm_head.dtype)
    last = torch.full((1,), L - 1, device=e.device)
    eager_ms = timed(lambda: eager_prompt(x, last)[1][-1].argmax().item())
    graph_ms = timed(lambda: st.prefill(e)[1][-1].argmax().item())
    a = eager_prompt(x, last)[1][-1].clone()
    b = st.prefill(e)[1][-1]
    same = int(a.argmax()) == int(b.argmax())
    diff = float((a - b).abs().max())

    def both():
        seq, hidden, logits = rt.prefill(p, 300)
        token = int(logits[-1].argmax())
        rt.prefill_draft(seq, p, hidden, token, False)
        rt.release(seq)

    full_ms = timed(both)
    lines.append(f"L={L}: target prefill eager {eager_ms:.2f} ms, graphed padded {graph_ms:.2f} ms; "
                 f"target + draft prefill (engine) {full_ms:.2f} ms; same argmax {same}, max |logit diff| {diff:.3g}")
    print(lines[-1], flush=True)
