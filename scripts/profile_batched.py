"""Where a batched `lmms-msd bench --batch` run spends its time on a `BatchedStaticEngine`.

Runs `lmms-msd bench` with the arguments given, with each engine call (prefill, prefill_draft,
draft_trees, verify_batch, keep_batch, advance_batch, forward_next_batch) timed between device
synchronisations, and "other" the rest of the loop (acceptance, stop checks, bookkeeping). Only the
timed pass over all requests is profiled: NREQ (an environment variable) must be the number of
requests (--limit); bench's warm-up runs fewer and is skipped (at a batch as large as --limit it is
profiled too: the first record of that batch). One JSON record per (method, batch) is printed
("PROFILE ...") and appended to $OUT/profile.jsonl (OUT: an environment variable, a folder).
The synchronisations cost a little time themselves; the records are for shares, not for speed.
With PYPROFILE=1 the timed pass also runs under cProfile (the host's Python, function by function:
it slows the host, so again for shares only): $OUT/host_<method>_b<batch>.txt lists the functions by
their own time and by their time with what they call.

    NREQ=64 OUT=build python scripts/profile_batched.py bench --batch 16,64 --inflate 7b --engine static \\
        --max_length 1024 --methods eagle2 --limit 64 --warmup 1 --no_progress --output_dir build/b
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import sys
import time
from collections import defaultdict

import torch

from lmms_msd import pipeline
from lmms_msd.commands.cli import main
from lmms_msd.speculative import batching
from lmms_msd.speculative.fast import batched_engine

CALLS = ("prefill", "prefill_batch", "prefill_draft", "draft_trees", "verify_batch", "verify_trees", "keep_batch",
         "advance_batch", "forward_next_batch")  # fmt: skip
seconds: dict[str, float] = defaultdict(float)
counts: dict[str, int] = defaultdict(int)
enabled = [False]


depth = [0]  # engine calls made inside a timed one (verify_batch calls verify_trees) are not timed again


def timed(name: str, function):
    def call(*args, **kwargs):
        if not enabled[0] or depth[0]:
            return function(*args, **kwargs)
        torch.cuda.synchronize()
        start = time.perf_counter()
        depth[0] += 1
        try:
            out = function(*args, **kwargs)
        finally:
            depth[0] -= 1
        torch.cuda.synchronize()
        seconds[name] += time.perf_counter() - start
        counts[name] += 1
        return out

    return call


def profiled_loop(runtime, requests, max_batch, schedule=batching.same_tree):
    requests = list(requests)
    enabled[0] = len(requests) == int(os.environ["NREQ"])
    profiler = cProfile.Profile() if enabled[0] and os.environ.get("PYPROFILE") == "1" else None
    if enabled[0]:
        seconds.clear()
        counts.clear()
        torch.cuda.synchronize()
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
    yield from real_loop(runtime, requests, max_batch, schedule)
    if enabled[0]:
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        enabled[0] = False
        if profiler is not None:
            profiler.disable()
            method = "plain" if requests[0].tree is None else requests[0].tree.kind
            write_host_profile(profiler, os.path.join(os.environ["OUT"], f"host_{method}_b{max_batch}.txt"))
        record = {"batch": max_batch, "tree": repr(requests[0].tree)[:60], "wall": round(wall, 3),
                  **{k: round(v, 3) for k, v in seconds.items()}, "other": round(wall - sum(seconds.values()), 3),
                  "calls": dict(counts)}  # fmt: skip
        print("PROFILE", json.dumps(record), flush=True)
        with open(os.path.join(os.environ["OUT"], "profile.jsonl"), "a") as handle:
            handle.write(json.dumps(record) + "\n")


def write_host_profile(profiler: cProfile.Profile, path: str, lines: int = 45) -> None:
    text = io.StringIO()
    for key in ("tottime", "cumulative"):
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(lines)
    with open(path, "w") as handle:
        handle.write(text.getvalue())


if __name__ == "__main__":
    for name in CALLS:
        if hasattr(batched_engine.BatchedStaticEngine, name):
            setattr(batched_engine.BatchedStaticEngine, name, timed(name, getattr(batched_engine.BatchedStaticEngine, name)))
    real_loop = batching.generate_batched
    pipeline.generate_batched = profiled_loop  # decode_requests calls the loop by this name
    sys.exit(main(sys.argv[1:]))
