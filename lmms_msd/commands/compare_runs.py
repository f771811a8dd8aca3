"""`lmms-msd compare-runs`: the same lmms-eval task, model_args and documents on one process and on N
data-parallel processes (`accelerate launch --multi_gpu`: one GPU each, or gloo on CPU).

Data parallelism must change only where each document is decoded, never its answer: the command
compares the answers doc_id by doc_id and exits 1 when any differs (or is missing from one run). For each
run it reports the score, the whole run's wall time, and the throughput of generation:

- generation_s: the busiest process's summed generation time (prefill included), read from the
  plugin's per-request statistics, so model loading and lmms-eval's own work are left out;
- docs/s = documents / generation_s and tokens/s = generated tokens / generation_s, all processes together;
- tokens/s per process: the plugin's own figure (generated tokens / summed generation time);
- tau and alpha from the plugin's statistics (tokens per step, and accepted draft tokens per step).

Outputs in `--output_dir`: compare.json, compare.md, and runs/p1, runs/p<N> (each run's lmms-eval
results, samples, statistics and log; replaced on every call).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmms_msd.commands.lmms_eval_runs import (
    EvalRun,
    LmmsEvalFailed,
    answer_differences,
    read_answers,
    run_lmms_eval,
)
from lmms_msd.lmms_eval.metrics import primary_metric

log = logging.getLogger(__name__)

FILES = ("compare.json", "compare.md")
MAX_LISTED_DIFFERENCES = 20  # in the markdown; the JSON lists every one


@dataclass(frozen=True)
class RunReport:
    """One lmms-eval run, read from its results and the plugin's statistics."""

    processes: int
    metric: str  # lmms-eval's key of the score, e.g. "relaxed_overall,none"
    score: float
    samples: int
    new_tokens: int
    steps: int
    tau: float  # committed tokens per step
    alpha: float  # accepted draft tokens per step = tau - 1
    wall_s: float  # the whole lmms-eval run, model loading included
    generation_s: float  # the busiest process's summed generation time
    docs_per_s: float  # samples / generation_s
    tokens_per_s: float  # new_tokens / generation_s, all processes together
    tokens_per_s_per_process: float  # the plugin's: new_tokens / summed generation time of all requests
    out: str  # the run's --output_path


def generation_seconds(sample_rows: Sequence[Mapping[str, Any]]) -> float:
    """The busiest process's summed generation time: the processes decode their shares at the same time,
    so the run's generation lasts as long as its slowest share."""
    per_rank: dict[int, float] = defaultdict(float)
    for row in sample_rows:
        per_rank[int(row.get("rank", 0))] += float(row["wall_s"])
    return max(per_rank.values(), default=0.0)


def run_report(run: EvalRun, task: str, processes: int) -> RunReport:
    """The run's figures for `task`; `LmmsEvalFailed` when the run lacks the task or ran on another number of
    processes than asked (accelerate can quietly start fewer)."""
    if task not in run.results["results"] or task not in run.stats["tasks"]:
        raise LmmsEvalFailed(
            f"the run in {run.out} has no results for {task!r} (lmms-eval: {sorted(run.results['results'])}, "
            f"statistics: {sorted(run.stats['tasks'])}); is it a group? name one of its tasks"
        )
    if run.stats.get("processes") != processes:
        raise LmmsEvalFailed(f"the run in {run.out} was asked for {processes} processes and ran on {run.stats.get('processes')}")
    metric, score = primary_metric(run.results, task)
    body = run.stats["tasks"][task]
    summary = body["summary"]
    generation_s = generation_seconds(body["samples"])
    return RunReport(
        processes=processes, metric=metric, score=score, samples=summary["samples"], new_tokens=summary["new_tokens"],
        steps=summary["steps"], tau=summary["tau"], alpha=summary["alpha"], wall_s=run.wall_s, generation_s=generation_s,
        docs_per_s=summary["samples"] / generation_s if generation_s > 0 else 0.0,
        tokens_per_s=summary["new_tokens"] / generation_s if generation_s > 0 else 0.0,
        tokens_per_s_per_process=summary["tokens_per_s"], out=str(run.out),
    )  # fmt: skip


def differences(reference: Mapping[int, Any], other: Mapping[int, Any]) -> list[dict[str, Any]]:
    """{"doc_id", "one_process", "n_processes"} for each doc_id whose answers differ; a side that has no
    answer for the doc_id shows None."""
    return [
        {"doc_id": doc_id, "one_process": reference.get(doc_id), "n_processes": other.get(doc_id)}
        for doc_id in answer_differences(reference, other)
    ]


def compare_report(
    task: str, runs: Sequence[RunReport], answers: Sequence[Mapping[int, Any]], command: str, model_args: str,
    gen_kwargs: str, limit: int | None,
) -> dict[str, Any]:  # fmt: skip
    """The JSON report of a one-process run (`runs[0]`, `answers[0]`) against an N-process run."""
    one, many = runs
    differing = differences(answers[0], answers[1])
    return {
        "command": command,
        "task": task,
        "model_args": model_args,
        "gen_kwargs": gen_kwargs,
        "limit": limit,
        "runs": [asdict(r) for r in runs],
        "generation_speedup": one.generation_s / many.generation_s if many.generation_s > 0 else None,
        "documents_compared": len(set(answers[0]) | set(answers[1])),
        "answers_identical": not differing,
        "differing": differing,
    }


def shorten(text: Any, width: int = 80) -> str:
    """An answer on one markdown table line."""
    flat = json.dumps(text, ensure_ascii=False) if not isinstance(text, str) else text
    flat = flat.replace("\n", "\\n").replace("|", "\\|")
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def markdown_report(report: Mapping[str, Any]) -> str:
    runs = [RunReport(**r) for r in report["runs"]]
    n = runs[1].processes
    lines = [
        f"# lmms-eval on 1 vs {n} processes: {report['task']}",
        "",
        f"Command: `{report['command']}`",
        "",
        (
            f"model_args: `{report['model_args'] or '(default: the bundled pair)'}`; "
            f"gen_kwargs: `{report['gen_kwargs'] or '(the task’s)'}`; documents: {report['limit'] or 'all'}."
        ),
        "",
        "| processes | score | documents | wall s | generation s | docs/s | tokens/s | tokens/s per process | tau | alpha |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r.processes} | {r.score:.4f} | {r.samples} | {r.wall_s:.1f} | {r.generation_s:.2f} | {r.docs_per_s:.3f} | "
            f"{r.tokens_per_s:.1f} | {r.tokens_per_s_per_process:.1f} | {r.tau:.3f} | {r.alpha:.3f} |"
        )
    speedup = report["generation_speedup"]
    lines += [
        "",
        (
            f"Score: {runs[0].metric}. Wall s: the whole lmms-eval run, model loading included. Generation s: the "
            "busiest process's summed generation time; docs/s and tokens/s divide by it, all processes together."
        ),
        "",
        f"Generation speedup on {n} processes: " + ("–" if speedup is None else f"{speedup:.2f}x (ideal {n}x)") + ".",
        "",
    ]
    if report["answers_identical"]:
        lines.append(f"Answers: identical on all {report['documents_compared']} documents, doc_id by doc_id.")
    else:
        differing = report["differing"]
        lines += [
            (
                f"**Answers DIFFER on {len(differing)} of {report['documents_compared']} documents** "
                f"(doc_ids {', '.join(str(d['doc_id']) for d in differing)}):"
            ),
            "",
            f"| doc_id | 1 process | {n} processes |",
            "|---:|---|---|",
        ]
        for d in differing[:MAX_LISTED_DIFFERENCES]:
            lines.append(f"| {d['doc_id']} | {shorten(d['one_process'])} | {shorten(d['n_processes'])} |")
        if len(differing) > MAX_LISTED_DIFFERENCES:
            lines.append(f"({len(differing) - MAX_LISTED_DIFFERENCES} more in compare.json)")
    return "\n".join(lines) + "\n"


def write_outputs(report: Mapping[str, Any], output_dir: Path) -> str:
    """compare.json and compare.md in `output_dir`; returns the markdown."""
    text = markdown_report(report)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "compare.md").write_text(text)
    (output_dir / "compare.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return text


# ---- the command ---------------------------------------------------------------------------------------------
def command_line(args: argparse.Namespace) -> str:
    """The command that repeats this comparison, every setting spelled out."""
    words = ["lmms-msd", "compare-runs", "--task", args.task]
    if args.include_path is not None:
        words += ["--include_path", str(args.include_path)]
    if args.limit is not None:
        words += ["--limit", str(args.limit)]
    words += ["--num_processes", str(args.num_processes)]
    if args.model_args:
        words += ["--model_args", args.model_args]
    if args.gen_kwargs:
        words += ["--gen_kwargs", args.gen_kwargs]
    words += ["--output_dir", str(args.output_dir)]
    return shlex.join(words)


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--task", required=True, help="one lmms-eval task (not a group), e.g. msd_chartqa_synth_long")
    parser.add_argument("--include_path", type=Path, default=None, help="a folder of extra task YAMLs, e.g. the repository's tasks/")
    parser.add_argument("--limit", type=int, default=None, help="documents (default: all)")
    parser.add_argument("--num_processes", type=int, default=2, help="processes of the data-parallel run (default 2; one GPU each)")
    parser.add_argument("--model_args", default="", help="passed through to both runs (default: the bundled pair)")
    parser.add_argument("--gen_kwargs", default="", help="passed through to both runs (default: the task's)")
    parser.add_argument("--output_dir", type=Path, default=Path("build/compare-runs"), help="compare.{json,md} and runs/ (replaced) go here")
    return run


def run(args: argparse.Namespace) -> int:
    if args.num_processes < 2:
        raise SystemExit(f"lmms-msd compare-runs: --num_processes must be at least 2 (it is compared with 1), got {args.num_processes}")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"lmms-msd compare-runs: --limit must be at least 1, got {args.limit}")
    if "," in args.task:
        raise SystemExit(f"lmms-msd compare-runs: --task takes one task, got {args.task!r}")
    runs_dir = args.output_dir / "runs"
    if runs_dir.exists():
        shutil.rmtree(runs_dir)  # an earlier comparison's runs; each run needs an empty folder
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # small models on CPU: threads cost more than they give
    reports, answers = [], []
    for processes in (1, args.num_processes):
        out = runs_dir / f"p{processes}"
        log.info("lmms-eval on %d process%s: %s", processes, "" if processes == 1 else "es", out)
        try:
            result = run_lmms_eval(
                out, args.task, include_path=args.include_path, limit=args.limit, model_args=args.model_args,
                gen_kwargs=args.gen_kwargs, log_samples=True, env=env, processes=processes,
            )  # fmt: skip
            reports.append(run_report(result, args.task, processes))
            answers.append(read_answers(out, args.task))
        except LmmsEvalFailed as error:
            raise SystemExit(f"lmms-msd compare-runs: the run on {processes} process(es): {error}") from error
        r = reports[-1]
        log.info(
            "%d process(es): %s %.4f, %d docs, wall %.1f s, generation %.2f s, %.3f docs/s, %.1f tok/s, tau %.3f",
            processes, r.metric, r.score, r.samples, r.wall_s, r.generation_s, r.docs_per_s, r.tokens_per_s, r.tau,
        )  # fmt: skip
    report = compare_report(args.task, reports, answers, command_line(args), args.model_args, args.gen_kwargs, args.limit)
    print(write_outputs(report, args.output_dir))
    print(f"written to {args.output_dir}: {', '.join(FILES)}")
    if not report["answers_identical"]:
        log.error("answers differ between 1 and %d processes on doc_ids %s", args.num_processes, [d["doc_id"] for d in report["differing"]])
        return 1
    return 0
