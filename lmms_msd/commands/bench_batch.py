"""`lmms-msd bench --batch 1,4,16,64`: throughput of plain and speculative decoding per batch size.

For every method (plain first, then each speculative one) and every batch size B, all requests go
through `lmms_msd.pipeline.decode_requests(max_batch=B)`: continuous batching, up to B requests in
flight, one target forward per step for all of them (`lmms_msd.speculative.batching`). Timing:

- prompts are embedded once per request, untimed (image preprocessing and the vision tower are the
  same for every method and batch size);
- before each (method, B) the first max(B, --warmup) requests run once at B, untimed (graph capture of
  that batch's shapes, allocator);
- then all requests run once at B, timed with `time.perf_counter` between device synchronisations:
  tokens/s = new tokens of all requests / that wall time; documents/s = requests / that wall time;
- prefill share: of that wall time, the prompts' prefill forwards (each request's `DecodeStats.prefill_s`,
  summed), the same work for every method; decoding tokens/s = new tokens / (wall time - prefill), the
  part a decoding method changes. With short answers the prefill bounds any speed-up: no decoding method
  can make a pass faster than wall / prefill times. The column "at most, free decoding" says how far
  a row could get with its decoding taking no time at all: plain decoding's best wall time over the
  row's prefill, against "vs plain's best", what it reached (a speculative row's prefill is the
  target's prompts alone: its draft reads a prompt only when its request first grows a tree).

At temperature 0 every (method, B) must give, per request, the token ids of the first run (plain
decoding at the smallest B when plain is among the methods): the command exits 1 otherwise. Sampling
(each request drawing from its own generator, seeded with --seed + its index) is reported, not compared.

`--batch_node_budgets B:N,...` shrinks speculative trees as the batch grows
(`lmms_msd.speculative.batching.NodeBudgets`; 0 makes plain steps). Given more than once, every
speculative method runs with each table, as rows named "METHOD @TABLE" (e.g. "eagle2 @1:60,16:7"),
so one run compares schedules. With `--engine static` one
`BatchedStaticEngine` holding max(B) rows serves every batch size; set `--max_length` to what one request
needs (prompt, max_new_tokens and a tree), as the KV cache is max(B) rows of it.

Outputs in --output_dir: bench_batch.json (settings, machine, one record per method and B),
bench_batch.md (the table, also printed) and bench_batch.png (tokens/s against B per method, with a dashed
line at the tokens/s of free decoding: the requests' new tokens over the shortest prefill) when
matplotlib is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmms_msd.commands.machine import speed_text
from lmms_msd.pipeline import Decoder, Request, TreeSetup, decode_requests
from lmms_msd.speculative.batching import TreeSchedule
from lmms_msd.speculative.decoding import _synchronize
from lmms_msd.speculative.sampling import GenerationConfig

log = logging.getLogger(__name__)

FILES = ("bench_batch.json", "bench_batch.md", "bench_batch.png")


def parse_batches(text: str) -> list[int]:
    """"1,4,16,64" -> [1, 4, 16, 64] (ascending, duplicates dropped); each a whole number >= 1."""
    try:
        sizes = sorted({int(item) for item in text.split(",") if item.strip()})
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--batch takes a comma list of batch sizes, e.g. 1,4,16,64; got {text!r}") from error
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"--batch takes batch sizes >= 1, e.g. 1,4,16,64; got {text!r}")
    return sizes


@dataclass
class BatchRun:
    """One method at one batch size over all requests."""

    method: str
    batch: int
    requests: int
    new_tokens: int
    wall_s: float
    tokens_per_s: float
    docs_per_s: float
    tau: float | None  # committed tokens per target step over all requests (plain: 1)
    identical: bool | None  # every request's token ids equal the reference's; None: not compared (sampling)
    differing_doc_ids: list[int] = field(default_factory=list)
    prefill_s: float | None = None  # of wall_s, the prompts' prefill forwards (and first tokens); None in older reports

    @property
    def decoding_tokens_per_s(self) -> float | None:
        """New tokens over the wall time outside prefill: the decoding steps' throughput, what a faster
        decoding method can change (the prefill is the same forwards for every method)."""
        if self.prefill_s is None or self.wall_s <= self.prefill_s:
            return None
        return self.new_tokens / (self.wall_s - self.prefill_s)


def throughput(
    decoder: Decoder, trees: dict[str, tuple[TreeSetup | None, TreeSchedule]], prompts: list[Any], doc_ids: list[int],
    config: GenerationConfig, batches: list[int], *, seed: int, warmup: int, progress: bool,
    on_run: Callable[[list[BatchRun], str], None] | None = None,
) -> tuple[list[BatchRun], str]:  # fmt: skip
    """Every method (name -> its tree, None for plain, and its schedule) at every batch size, as the module
    docstring says.
    prompts: the embedded prompts, one per request (doc_ids name them); on_run(runs so far, reference)
    after each run (the command writes its outputs there, so a run cut short keeps what it measured).
    Returns the runs and which run the others were compared with."""
    requests = [Request(f"doc {doc_id}", lambda p=p: (p, config), seed + i) for i, (p, doc_id) in enumerate(zip(prompts, doc_ids))]
    runs: list[BatchRun] = []
    reference: list[list[int]] | None = None
    reference_name = ""
    pairs = [(name, batch) for name in trees for batch in batches]
    for name, batch in tqdm(pairs, desc="bench --batch", disable=not progress):
        tree, schedule = trees[name]
        decode_requests(decoder, requests[: max(batch, warmup)], tree, max_batch=batch, schedule=schedule, progress=False)
        _synchronize(decoder.target.device)
        start = time.perf_counter()
        results = decode_requests(decoder, requests, tree, max_batch=batch, schedule=schedule, progress=False)
        _synchronize(decoder.target.device)
        wall = time.perf_counter() - start
        ids = [r.token_ids for r in results]
        if reference is None:
            reference, reference_name = ids, f"{name} at batch {batch}"
        differing = [doc_id for doc_id, got, want in zip(doc_ids, ids, reference) if got != want]
        tokens = sum(len(t) for t in ids)
        steps = sum(r.stats.steps for r in results)
        committed = sum(r.stats.new_tokens - 1 for r in results)  # the first token of each comes from its prefill
        runs.append(BatchRun(
            method=name, batch=batch, requests=len(requests), new_tokens=tokens, wall_s=wall, tokens_per_s=tokens / wall,
            docs_per_s=len(requests) / wall, tau=committed / steps if steps else None,
            identical=(not differing) if config.greedy else None, differing_doc_ids=differing if config.greedy else [],
            prefill_s=sum(r.stats.prefill_s for r in results),
        ))  # fmt: skip
        if on_run is not None:
            on_run(runs, reference_name)
    return runs, reference_name


def markdown_table(runs: list[BatchRun]) -> str:
    """The runs as a table; "at most, free decoding": plain's best wall time over the run's prefill time
    (module docstring). Example: plain's best pass 3.15 s, a row's prefill 1.73 s: at most 1.82x."""
    plain = [r for r in runs if r.method == "plain"]
    best_plain = max(plain, key=lambda r: r.tokens_per_s, default=None)
    lines = [
        "| method | batch | tokens/s | documents/s | vs plain's best | at most, free decoding | tau | wall s | prefill share "
        "| decoding tokens/s | new tokens | identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        versus = "–" if best_plain is None else f"{r.tokens_per_s / best_plain.tokens_per_s:.2f}x"
        ceiling = "–" if best_plain is None or not r.prefill_s else f"{best_plain.wall_s / r.prefill_s:.2f}x"
        identical = "not checked (sampling)" if r.identical is None else ("yes" if r.identical else f"**NO** (docs {r.differing_doc_ids})")
        tau = "–" if r.tau is None else f"{r.tau:.2f}"
        share = "–" if r.prefill_s is None else f"{r.prefill_s / r.wall_s:.0%}"
        decoding = "–" if r.decoding_tokens_per_s is None else f"{r.decoding_tokens_per_s:.1f}"
        lines.append(
            f"| {r.method} | {r.batch} | {r.tokens_per_s:.1f} | {r.docs_per_s:.3f} | {versus} | {ceiling} | {tau} | {r.wall_s:.2f} | {share} "
            f"| {decoding} | {r.new_tokens} | {identical} |"
        )
    return "\n".join(lines)


def free_decoding_tokens_per_s(runs: list[BatchRun]) -> float | None:
    """The most tokens/s any method could reach on these requests: their new tokens over the shortest prefill
    time measured, as if decoding took no time (the plot's dashed line). Example: 7864 tokens, prefills of
    1.75 s and 1.73 s: 7864 / 1.73 = 4545.7 tokens/s."""
    return max((r.new_tokens / r.prefill_s for r in runs if r.prefill_s), default=None)


def plot(runs: list[BatchRun], path: Path) -> bool:
    """tokens/s against batch size, a line per method, and a dashed line where free decoding would put any
    method (`free_decoding_tokens_per_s`); False when matplotlib is missing (optional)."""
    if importlib.util.find_spec("matplotlib") is None:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.4), dpi=110)
    canvas = FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, method in enumerate(dict.fromkeys(r.method for r in runs)):
        mine = [r for r in runs if r.method == method]
        ax.plot([r.batch for r in mine], [r.tokens_per_s for r in mine], marker="o", color=f"C{i}", label=method)
    ceiling = free_decoding_tokens_per_s(runs)
    if ceiling is not None:
        ax.axhline(ceiling, color="0.5", linestyle="--", linewidth=1, label="free decoding (prefill alone)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("requests in flight (batch size)")
    ax.set_ylabel("tokens/s (higher is better)")
    ax.set_title("lmms-msd bench --batch", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    canvas.print_png(str(path))
    return True


def write_outputs(report: dict[str, Any], output_dir: Path) -> str:
    output_dir.mkdir(parents=True, exist_ok=True)
    runs = [BatchRun(**r) for r in report["runs"]]
    c = report["config"]
    text = (
        f"# lmms-msd bench --batch\n\n{report['requests']} requests, engine {c['engine']}, {report['machine']['device_name']} "
        f"({report['machine']['dtype']}{speed_text(report['machine'])}), temperature {report['generation']['temperature'] if not report['greedy'] else 0}, "
        f"max_new_tokens {report['generation']['max_new_tokens']}; compared with: {report['reference']}; "
        f"node budgets per batch: {c['batch_node_budgets'] or 'the trees own'}.\n\n{markdown_table(runs)}\n"
    )
    (output_dir / "bench_batch.md").write_text(text)
    (output_dir / "bench_batch.json").write_text(json.dumps(report, indent=2) + "\n")
    if not plot(runs, output_dir / "bench_batch.png"):
        log.info("matplotlib is not installed: no bench_batch.png")
    return text


def report_of(runs: list[BatchRun], reference: str, config: GenerationConfig, base: dict[str, Any]) -> dict[str, Any]:
    """bench_batch.json: `base` (config, machine, requests, trees) with the generation settings and the runs."""
    return {**base, "generation": asdict(config), "greedy": config.greedy, "reference": reference, "runs": [asdict(r) for r in runs]}
