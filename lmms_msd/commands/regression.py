"""`lmms-msd regression`: the CI regression run of the bundled pair.

Runs lmms-eval on the CI task group (`msd_ci` in the repository's `tasks/`: the short- and long-answer
chart tasks and the long-answer task of each other family, the first `--limit` documents of each) with
the bundled miniature pair at temperature 0, then compares each task's score (exactly: greedy decoding
is deterministic) and tau (within `--tau_tolerance`, for arithmetic that differs across CPUs) with the
baseline file committed beside the tasks. A task's score is its primary metric, the first of its YAML's
metric_list (`lmms_msd.lmms_eval.metrics`): relaxed_overall for the charts, accuracy for MathVista and
MathVerse, exact_match for AI2D and TextVQA. `--update` rewrites the baseline from the run instead, for a
change that moves them on purpose.

The baseline (tasks/ci_baseline.json): {"tasks_group", "limit", "temperature": 0, "pair", "tasks": {task:
{"metric": lmms-eval's key of the score, e.g. "accuracy,none", "score", "tau", "samples"}}}. A baseline
written before each task recorded its metric (issue 13) has no "metric": its scores are ChartQA's
`relaxed_overall,none` (`LEGACY_METRIC`), the only metric it could hold.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from lmms_msd.commands.lmms_eval_runs import run_lmms_eval
from lmms_msd.lmms_eval.metrics import primary_metric

LEGACY_METRIC = "relaxed_overall,none"  # the score of a baseline task entry without "metric"
DEFAULT_LIMIT = 20  # documents per task: the six tasks took 3 min 22 s and 4 min 8 s on a shared 2-core CPU (README)
CI_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_tasks(include_path: Path, tasks: str, limit: int, out: Path) -> dict[str, dict[str, Any]]:
    """The CI run: {task: {"metric", "score", "tau", "samples"}} from lmms-eval's results (the task's
    primary metric) and our statistics."""
    # use_msd=true: the plugin's default (auto) decodes plainly where no tree pays, and tau is what is checked
    run = run_lmms_eval(out, tasks, include_path=include_path, limit=limit, model_args="use_msd=true", env=CI_ENV)
    measured = {}
    for task, summary in sorted(run.stats["tasks"].items()):
        metric, score = primary_metric(run.results, task)
        measured[task] = {"metric": metric, "score": score, "tau": summary["summary"]["tau"], "samples": summary["summary"]["samples"]}
    return measured


def compare(measured: dict[str, dict[str, Any]], baseline: dict[str, Any], tau_tolerance: float) -> list[str]:
    """The regressions, in words; empty when the run matches the baseline (a baseline task without
    "metric" holds `LEGACY_METRIC`)."""
    problems = []
    expected = baseline["tasks"]
    if sorted(measured) != sorted(expected):
        problems.append(f"tasks differ: ran {sorted(measured)}, baseline has {sorted(expected)}")
    for task in sorted(set(measured) & set(expected)):
        got, want = measured[task], expected[task]
        want_metric = want.get("metric", LEGACY_METRIC)
        if got["samples"] != want["samples"]:
            problems.append(f"{task}: {got['samples']} samples, baseline {want['samples']}")
        if got["metric"] != want_metric:
            problems.append(f"{task}: scored by {got['metric']}, the baseline by {want_metric}; update the baseline (--update) if the task changed on purpose")
        elif got["score"] != want["score"]:
            problems.append(f"{task}: {got['metric']} {got['score']:.4f}, baseline {want['score']:.4f} (must be equal at temperature 0)")
        if abs(got["tau"] - want["tau"]) > tau_tolerance:
            problems.append(f"{task}: tau {got['tau']:.3f}, baseline {want['tau']:.3f} (tolerance {tau_tolerance})")
    return problems


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--tasks_dir", type=Path, default=Path("tasks"), help="the repository's tasks/ (default ./tasks)")
    parser.add_argument("--baseline", type=Path, default=None, help="default: <tasks_dir>/ci_baseline.json")
    parser.add_argument("--tasks", default="msd_ci")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help=f"documents per task, the first ones [{DEFAULT_LIMIT}]")
    parser.add_argument("--tau_tolerance", type=float, default=0.05)
    parser.add_argument("--update", action="store_true", help="rewrite the baseline from this run")
    return run


def run(args: argparse.Namespace) -> int:
    baseline_file = args.baseline or args.tasks_dir / "ci_baseline.json"
    with tempfile.TemporaryDirectory() as tmp:
        measured = run_tasks(args.tasks_dir, args.tasks, args.limit, Path(tmp))
    print(json.dumps(measured, indent=2))
    if args.update:
        baseline = {"tasks_group": args.tasks, "limit": args.limit, "temperature": 0, "pair": "bundled miniature", "tasks": measured}
        baseline_file.write_text(json.dumps(baseline, indent=2) + "\n")
        print(f"baseline written to {baseline_file}")
        return 0
    if not baseline_file.is_file():
        raise SystemExit(f"no baseline at {baseline_file}; create it with --update")
    baseline = json.loads(baseline_file.read_text())
    if baseline["limit"] != args.limit or baseline["tasks_group"] != args.tasks:
        raise SystemExit(f"the baseline is for --tasks {baseline['tasks_group']} --limit {baseline['limit']}; run with those")
    problems = compare(measured, baseline, args.tau_tolerance)
    for problem in problems:
        print(f"REGRESSION: {problem}")
    print("regression check: " + ("FAILED" if problems else "OK"))
    return 1 if problems else 0
