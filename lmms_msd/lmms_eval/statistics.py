"""Speculative-decoding statistics of an evaluation run: per-sample records, per-task summaries, the
JSON report and the table that goes in the log.

Words as in the rest of the package: a **step** is one target forward after the prefill; each step
**accepts** some draft tokens and adds one bonus token. Over a set of requests:

- tau   = 1 + (accepted draft tokens) / steps   (tokens committed per step)
- alpha = (accepted draft tokens) / steps       (the thesis's "average acceptance rate") = tau - 1
- the accepted-length histogram counts steps by how many draft tokens they accepted
- wall_s is the summed generation time of the requests (prefill included); tokens_per_s =
  new_tokens / wall_s. Under data parallelism each process decodes its own requests, so this is the
  throughput of one process; the report also keeps the number of processes.

Plain decoding (`use_msd=false`) records the same fields: every step accepts 0 draft tokens, so tau
is 1, and tokens_per_s is the baseline that a speculative run's tokens_per_s is divided by.

This module knows nothing about lmms-eval; the plugin turns requests into `SampleRecord`s.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPORT_VERSION = 1


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
    lines = [
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
