"""Speculative-decoding statistics of an evaluation run: per-sample records, per-task summaries, the
JSON report and the table that goes in the log.

Words as in the rest of the package: a **step** is one target forward after the prefill; each step
**accepts** some draft tokens and adds one bonus token. Over a set of requests:

- tau   = 1 + (accepted draft tokens) / steps   (tokens committed per step)
- alpha = (accepted draft tokens) / steps       (the thesis's "average acceptance rate") = tau - 1
- the accepted-length histogram counts steps by how many draft tokens they accepted
- wall_s is the summed generation time of the requests (prefill included); tokens_per_s =
  new_tokens / wall_s. With several requests in flight (`max_batch` > 1) a request's time is its
  share of the batched loop's (`lmms_msd.speculative.batching.generate_batched`), so the sum is the
  loop's time and tokens_per_s its throughput. Under data parallelism each process decodes its own
  requests, so this is the throughput of one process; the report also keeps the number of processes.

Plain decoding (`use_msd=false`) records the same fields: every step accepts 0 draft tokens, so tau
is 1, and tokens_per_s is the baseline that a speculative run's tokens_per_s is divided by.

The plugin turns requests into `SampleRecord`s; this module gathers them from every process
(`gather_records`), describes the run (`run_meta`) and keeps the report of a run across its
generate_until calls (`RunReport`). It does not import lmms-eval.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lmms_msd.calibration.online import OnlineCalibration
    from lmms_msd.models.target import Target
    from lmms_msd.pipeline import TreeSetup

REPORT_VERSION = 1
STATS_FILE = "msd_stats.json"


@dataclass(frozen=True)
class SampleRecord:
    """The statistics of one request."""

    task: str
    doc_id: int
    new_tokens: int
    steps: int
    accepted: tuple[int, ...]  # draft tokens accepted at each step; len == steps
    prefill_s: float
    wall_s: float
    rank: int = 0  # the process that decoded it
    repeat: int = 0  # index among repeats of the same (task, doc_id)
    path: str = "speculative"  # how it was decoded: "speculative" or "plain" (use_msd=false, or chosen by use_msd=auto)

    def __post_init__(self) -> None:
        if len(self.accepted) != self.steps:
            raise ValueError(f"SampleRecord: {len(self.accepted)} accepted counts for {self.steps} steps")

    @classmethod
    def from_decode_stats(cls, task: str, doc_id: int, stats: Any, rank: int = 0, repeat: int = 0) -> SampleRecord:
        """From a `lmms_msd.speculative.decoding.DecodeStats`."""
        return cls(
            task=task,
            doc_id=int(doc_id),
            new_tokens=int(stats.new_tokens),
            steps=int(stats.steps),
            accepted=tuple(int(a) for a in stats.accepted),
            prefill_s=float(stats.prefill_s),
            wall_s=float(stats.wall_s),
            rank=rank,
            repeat=repeat,
            path="speculative" if stats.speculative else "plain",
        )

    @property
    def alpha(self) -> float:
        return sum(self.accepted) / self.steps if self.steps else 0.0

    @property
    def tau(self) -> float:
        return 1.0 + self.alpha if self.steps else 0.0

    def to_row(self) -> dict[str, Any]:
        """The per-sample row of the JSON report."""
        row = asdict(self)
        del row["task"]
        row["accepted"] = list(self.accepted)
        row["tau"] = self.tau
        row["alpha"] = self.alpha
        row["tokens_per_s"] = self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0
        return row


@dataclass(frozen=True)
class Summary:
    """Statistics over a set of requests (one task, or all of them)."""

    samples: int
    new_tokens: int
    steps: int
    accepted_tokens: int
    accepted_histogram: dict[int, int] = field(default_factory=dict)  # accepted length -> steps
    prefill_s: float = 0.0
    wall_s: float = 0.0

    @classmethod
    def of(cls, records: Iterable[SampleRecord]) -> Summary:
        records = list(records)
        histogram = Counter(a for r in records for a in r.accepted)
        return cls(
            samples=len(records),
            new_tokens=sum(r.new_tokens for r in records),
            steps=sum(r.steps for r in records),
            accepted_tokens=sum(sum(r.accepted) for r in records),
            accepted_histogram=dict(sorted(histogram.items())),
            prefill_s=sum(r.prefill_s for r in records),
            wall_s=sum(r.wall_s for r in records),
        )

    @property
    def alpha(self) -> float:
        return self.accepted_tokens / self.steps if self.steps else 0.0

    @property
    def tau(self) -> float:
        return 1.0 + self.alpha if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "accepted_tokens": self.accepted_tokens,
            "tau": self.tau,
            "alpha": self.alpha,
            # JSON keys are strings; the histogram is dense from 0 to the longest accepted length
            "accepted_histogram": {str(k): self.accepted_histogram.get(k, 0) for k in range(self.histogram_width)},
            "prefill_s": self.prefill_s,
            "wall_s": self.wall_s,
            "tokens_per_s": self.tokens_per_s,
        }

    @property
    def histogram_width(self) -> int:
        return max(self.accepted_histogram, default=-1) + 1


def build_report(records: Sequence[SampleRecord], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON report: `meta` (how the run was set up), then per task a summary and per-sample rows
    sorted by (doc_id, repeat), then the summary over all tasks."""
    tasks: dict[str, list[SampleRecord]] = {}
    for record in sorted(records, key=lambda r: (r.task, r.doc_id, r.repeat)):
        tasks.setdefault(record.task, []).append(record)
    return {
        "version": REPORT_VERSION,
        **dict(meta),
        "tasks": {
            name: {"summary": Summary.of(rows).to_dict(), "samples": [r.to_row() for r in rows]}
            for name, rows in tasks.items()
        },
        "overall": Summary.of(records).to_dict(),
    }


def dumps_report(report: Mapping[str, Any]) -> str:
    """The report as indented JSON with each per-sample row on one line (a report holds thousands)."""
    rows: list[str] = []

    def placeholder(row: Mapping[str, Any]) -> str:
        rows.append(json.dumps(row))
        return f"@@sample-row-{len(rows) - 1}@@"

    shallow = {
        **report,
        "tasks": {
            name: {**body, "samples": [placeholder(row) for row in body["samples"]]}
            for name, body in report["tasks"].items()
        },
    }
    text = json.dumps(shallow, indent=2)
    return re.sub(r'"@@sample-row-(\d+)@@"', lambda match: rows[int(match.group(1))], text) + "\n"


def write_report(report: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps_report(report))
    return path


def format_table(report: Mapping[str, Any], max_sample_rows: int = 20) -> str:
    """Markdown tables for the log: one summary row per task (and "all"), the accepted-length
    histogram, and per-sample rows (the first `max_sample_rows` of each task; the JSON has all)."""
    summaries = {name: body["summary"] for name, body in report["tasks"].items()}
    if len(summaries) != 1:
        summaries["all"] = report["overall"]
    auto = report.get("use_msd_auto")
    lines = [] if not auto else [
        f"use_msd=auto: plain steps {auto['plain_tok_s']} tokens/s, the best any tree could commit {auto['ceiling_tok_s']}, "
        + ("no speculative step decoded" if auto["estimated_tok_s"] is None else
           f"the realised speculative steps {auto['estimated_tok_s']} ({auto['speculative_steps']} steps over their modelled seconds)")
        + "; requests: " + ", ".join(f"{n} {why}" for why, n in auto["requests"].items()),
        "",
    ]  # fmt: skip
    lines += [
        "| task | samples | new tokens | steps | tau | alpha | wall s | tokens/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in summaries.items():
        lines.append(
            f"| {name} | {s['samples']} | {s['new_tokens']} | {s['steps']} | {s['tau']:.2f} | {s['alpha']:.2f} "
            f"| {s['wall_s']:.2f} | {s['tokens_per_s']:.1f} |"
        )
    width = max((len(s["accepted_histogram"]) for s in summaries.values()), default=0)
    if width:
        lines += ["", "Steps by accepted length:", "", "| task | " + " | ".join(str(k) for k in range(width)) + " |"]
        lines.append("| --- |" + " ---: |" * width)
        for name, s in summaries.items():
            counts = [s["accepted_histogram"].get(str(k), 0) for k in range(width)]
            lines.append(f"| {name} | " + " | ".join(str(c) for c in counts) + " |")
    for name, body in report["tasks"].items():
        rows = body["samples"]
        lines += [
            "",
            f"Samples of {name}:",
            "",
            "| doc_id | new tokens | steps | tau |",
            "| ---: | ---: | ---: | ---: |",
        ]
        for row in rows[:max_sample_rows]:
            lines.append(f"| {row['doc_id']} | {row['new_tokens']} | {row['steps']} | {row['tau']:.2f} |")
        if len(rows) > max_sample_rows:
            lines.append(f"({len(rows) - max_sample_rows} more samples in the JSON report)")
    return "\n".join(lines)


# ---- one run of the plugin ---------------------------------------------------------------------------------
def lmms_eval_output_path(argv: Sequence[str]) -> str | None:
    """lmms-eval's `--output_path` when this process is an lmms-eval command line run.

    lmms-eval does not hand its output path to the model, so it is read from the command line of
    `python -m lmms_eval` / `accelerate launch -m lmms_eval` / `lmms-eval`.
    """
    if not argv:
        return None
    program = Path(argv[0])
    if program.name != "lmms-eval" and program.parent.name != "lmms_eval":
        return None
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--output_path")
    known, _ = parser.parse_known_args(list(argv[1:]))
    return known.output_path


def report_path(given: str | None, argv: Sequence[str]) -> Path:
    """Where the report goes: `given` (model_args stats_path), else <lmms-eval --output_path>/msd_stats.json,
    else ./msd_stats.json."""
    if given is not None:
        return Path(given)
    output_path = lmms_eval_output_path(argv)
    return Path(output_path) / STATS_FILE if output_path else Path.cwd() / STATS_FILE


def gather_records(records: list[SampleRecord], world_size: int) -> list[SampleRecord]:
    """Every process's records, on every process; under data parallelism all processes must call this together."""
    dist = torch.distributed
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return records
    gathered: list[list[SampleRecord] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    return [r for part in gathered for r in part or []]


def file_calibration_meta(path: str, tree: TreeSetup) -> dict[str, Any]:
    """The report's calibrator block for a calibrator file."""
    return {"mode": "file", "path": path, **tree.calibrator.get_params()}


def online_calibration_meta(online: OnlineCalibration, observed: list[list[Any]]) -> dict[str, Any]:
    """The report's calibrator block for online calibration. observed: [task, doc_id, repeat] of each
    request decoded with the raw confidence while observing."""
    fitted = online.calibrated is not None
    return {
        "mode": "online",
        "train_ratio": online.train_ratio,
        "requests": len(online.order),
        "observed_requests": observed,
        "observations": len(online.observer.observations()),
        "fitted": fitted,
        **(online.calibrator.get_params() if fitted else {}),
        "label_comparison": online.label_report,
    }


def run_meta(
    model: str, model_args: Any, tree: TreeSetup | None, calibration: dict[str, Any] | None, target: Target,
    processes: int, started: str,
) -> dict[str, Any]:  # fmt: skip
    """The report's head: how the run was set up. model_args: the plugin's coerced model_args (a
    dataclass, recorded whole); tree: None for plain decoding; calibration: OPT-Tree's calibrator block
    (None: raw draft confidence). OPT-Tree's stop "cost" records its cost model (`tree.cost_model`: the
    file, whether it was measured now, its key and times in ms; None with stop "delta"). use_msd=auto
    ("decoding": "auto") records its choice under "use_msd_auto" (`PathChoice.describe`: the plain and
    ceiling rates, the estimate from the realised speculative steps, the requests per path and reason,
    the cost model); each sample row says its path."""
    tree_meta = None
    if tree is not None and tree.builder.kind == "eagle2":
        tree_meta = {"kind": model_args.tree, **tree.builder.settings()}
        if tree.total_tokens_auto is not None:
            tree_meta["total_tokens_auto"] = tree.total_tokens_auto
    elif tree is not None:
        b = tree.builder
        tree_meta = {"kind": "opt", "opt_variant": b.opt_variant, "node_budget": b.node_budget, "stop": b.stop,
                     "stop_delta": b.stop_delta, "max_depth": b.max_depth, "top_k": b.top_k,
                     "calibrator_mode": model_args.calibrator_mode, "calibrator": calibration or {"mode": "none"},
                     "cost_model": tree.cost_model}  # fmt: skip
    choice = None if tree is None else tree.path_choice
    return {
        "model": model,
        "decoding": "plain" if tree is None else "speculative" if choice is None else "auto",
        "use_msd_auto": None if choice is None else choice.describe(),
        "tree": tree_meta,
        "model_args": asdict(model_args),
        "target_layout": target.layout,
        "torch_dtype": str(target.dtype).removeprefix("torch."),
        "processes": processes,
        "started": started,
    }


@dataclass
class RunReport:
    """The report of one run across its generate_until calls: every process's records, kept on the
    process that writes (rank 0), and rewritten whole after each call."""

    path: Path
    records: list[SampleRecord] = field(default_factory=list)

    @property
    def overwrites_an_earlier_run(self) -> bool:
        """Nothing written yet, but the file exists: an earlier run's."""
        return not self.records and self.path.exists()

    def add(self, records: Sequence[SampleRecord], meta: Mapping[str, Any]) -> dict[str, Any]:
        """Add a call's records (of every process) and write the report; returns it."""
        self.records.extend(records)
        report = build_report(self.records, meta)
        write_report(report, self.path)
        return report
