"""The plugin's default (use_msd=auto) against use_msd=false in one process, request by request.

On a shared machine whole lmms-eval runs differ by a third in tokens/s from one minute to the next
(run.sh), which hides any difference between the two settings. Here the plugin instances are built as
lmms-eval builds them (`LlavaMsdCalibrated()`, `LlavaMsdCalibrated(use_msd="false")` and a second
`use_msd="false"` one, "plain again": the same setting twice, whose ratio is the noise of the method),
and each of the README main command's 20 documents is decoded by each in turn (the order rotating every
request), --repeats times; tokens/s = the summed new tokens over the summed request wall time (prefill
included, as msd_stats.json counts), per round and the median over rounds; and the same over the
process's CPU time of each `decode_requests` call (one thread: the time it computed, not the time other
jobs held the cores). Writes paired.json beside this file.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/cpu_use_msd_auto/paired.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    from lmms_msd.commands import bench
    from lmms_msd.lmms_eval.plugin import LlavaMsdCalibrated
    from lmms_msd.lmms_eval.requests import prepare_prompt
    from lmms_msd.pipeline import Request, decode_requests

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=20)
    args = parser.parse_args()
    here = Path(__file__).parent
    unused = Path(tempfile.mkdtemp())  # generate_until is not called: no statistics are written
    default = LlavaMsdCalibrated(stats_path=str(unused / "default.json"))
    plain = LlavaMsdCalibrated(use_msd="false", stats_path=str(unused / "plain.json"))
    again = LlavaMsdCalibrated(use_msd="false", stats_path=str(unused / "again.json"))
    docs, config = bench.requests_from_task(bench.DEFAULT_TASK, bench.DEFAULT_INCLUDE_PATH, args.limit)
    models = {"default": (default.decoder, default.tree), "plain": (plain.decoder, None), "plain again": (again.decoder, None)}
    rounds = []
    for repeat in range(args.repeats):
        totals = {name: {"new_tokens": 0, "wall_s": 0.0, "cpu_s": 0.0, "paths": []} for name in models}
        for i, doc in enumerate(docs):
            shift = (i + repeat) % len(models)
            order = list(models)[shift:] + list(models)[:shift]
            for name in order:
                decoder, tree = models[name]
                request = Request(f"doc {doc.doc_id}", lambda d=doc, t=decoder.target: (prepare_prompt(t, d.context, d.images), config), seed=0)
                cpu = time.process_time()
                (result,) = decode_requests(decoder, [request], tree, progress=False)
                totals[name]["cpu_s"] += time.process_time() - cpu
                totals[name]["new_tokens"] += result.stats.new_tokens
                totals[name]["wall_s"] += result.stats.wall_s
                totals[name]["paths"].append("speculative" if result.stats.speculative else "plain")
        rounds.append({name: {**t, "tokens_per_s": t["new_tokens"] / t["wall_s"], "tokens_per_cpu_s": t["new_tokens"] / t["cpu_s"]}
                       for name, t in totals.items()})  # fmt: skip
        print(f"round {repeat + 1}: " + ", ".join(f"{n} {r['tokens_per_s']:.1f} tokens/s ({r['tokens_per_cpu_s']:.1f} per CPU s)"
                                                  for n, r in rounds[-1].items()))  # fmt: skip
    summary = {}
    for measure in ("tokens_per_s", "tokens_per_cpu_s"):
        for name in models:
            summary[f"{name} {measure}"] = statistics.median(r[name][measure] for r in rounds)
        summary[f"ratio default / plain, {measure}"] = summary[f"default {measure}"] / summary[f"plain {measure}"]
        summary[f"ratio plain again / plain, {measure}"] = summary[f"plain again {measure}"] / summary[f"plain {measure}"]
    auto = default.tree.path_choice.describe()
    (here / "paired.json").write_text(json.dumps({"median_tokens_per_s": summary, "rounds": rounds, "use_msd_auto": auto}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
