"""One plugin configuration under callgrind (`callgrind.sh`): counted instructions and simulated cache
misses of decoding the README main command's first documents, which no other job on the machine changes.

The plugin instance is built as lmms-eval builds it (`LlavaMsdCalibrated()`: the default, use_msd=auto;
`use_msd="false"` for a name starting with "plain"); the prompts are prepared and one request decoded
before counting starts, so the count holds only `decode_requests` over the next N requests. It writes
/tmp/cg-NAME.ready (its pid) when ready, waits for /tmp/cg-NAME.go, decodes, writes /tmp/cg-NAME.done and
waits for /tmp/cg-NAME.stop (callgrind.sh switches the counting on and off in between).

    python benchmarks/cpu_use_msd_auto/callgrind_probe.py NAME N
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def wait_for(path: Path) -> None:
    while not path.exists():
        time.sleep(0.5)


def main() -> None:
    from lmms_msd.commands import bench
    from lmms_msd.lmms_eval.plugin import LlavaMsdCalibrated
    from lmms_msd.lmms_eval.requests import prepare_prompt
    from lmms_msd.pipeline import Request, decode_requests

    name, n = sys.argv[1], int(sys.argv[2])
    flag = Path(f"/tmp/cg-{name}")
    settings = {"use_msd": "false"} if name.startswith("plain") else {}
    model = LlavaMsdCalibrated(stats_path=f"/tmp/cg-{name}.json", **settings)
    decoder, tree = model.decoder, model.tree
    print(f"{name}: draft held: {decoder.draft is not None}", flush=True)
    docs, config = bench.requests_from_task(bench.DEFAULT_TASK, bench.DEFAULT_INCLUDE_PATH, n + 1)
    prompts = [prepare_prompt(decoder.target, doc.context, doc.images) for doc in docs]  # not counted
    requests = [Request(f"doc {doc.doc_id}", lambda p=p: (p, config), seed=0) for doc, p in zip(docs, prompts)]
    decode_requests(decoder, requests[:1], tree, progress=False)  # warm-up, not counted
    flag.with_suffix(".ready").write_text(str(os.getpid()))
    wait_for(flag.with_suffix(".go"))
    results = decode_requests(decoder, requests[1:], tree, progress=False)
    print(f"{name}: {sum(r.stats.new_tokens for r in results)} tokens", flush=True)
    flag.with_suffix(".done").write_text("1")
    wait_for(flag.with_suffix(".stop"))


if __name__ == "__main__":
    main()
