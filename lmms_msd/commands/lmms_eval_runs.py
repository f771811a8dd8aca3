"""Running lmms-eval with `llava_msd_calibrated` in a subprocess and reading what it left: lmms-eval's
results, its per-document answers and the plugin's statistics. Shared by `lmms-msd regression`,
`lmms-msd reproduce` and `lmms-msd compare-runs`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOG_FILE = "lmms_eval.log"
STATS_FILE = "msd_stats.json"  # the plugin's statistics, written beside lmms-eval's results
LOG_TAIL_LINES = 40


class LmmsEvalFailed(RuntimeError):
    """An lmms-eval run that did not leave its results and our statistics; the message ends with its log."""


@dataclass(frozen=True)
class EvalRun:
    """What one lmms-eval run left under its --output_path."""

    out: Path
    results: dict[str, Any]  # lmms-eval's <date>_results.json
    stats: dict[str, Any]  # the plugin's msd_stats.json
    wall_s: float  # the whole subprocess, model loading included


def log_tail(log_file: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not log_file.is_file():
        return f"(no log at {log_file})"
    return "\n".join(log_file.read_text(errors="replace").splitlines()[-lines:])


def free_port() -> int:
    """A TCP port free right now on this machine, for accelerate's main process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(processes: int) -> list[str]:
    """The command that starts lmms-eval: `python -m lmms_eval` for one process; for several, accelerate's data
    parallelism (`accelerate launch --multi_gpu`: one process per GPU, or gloo on a machine without one).
    `--cpu --num_processes N` would start a single process, so `--multi_gpu` is used on CPU too."""
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    if processes == 1:
        return [sys.executable, "-m", "lmms_eval"]
    return [
        sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
        "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "lmms_eval",
    ]  # fmt: skip


def run_lmms_eval(
    out: Path, tasks: str, *, include_path: Path | None = None, limit: int | None = None, model_args: str = "",
    gen_kwargs: str = "", log_samples: bool = False, env: Mapping[str, str] | None = None, processes: int = 1,
) -> EvalRun:  # fmt: skip
    """`python -m lmms_eval --model llava_msd_calibrated ...` in a subprocess (on `processes` data-parallel
    processes, see `launcher`), its output in `out` (which must be empty or new, so files of an earlier run
    cannot pass for this one's) and its log in `out/lmms_eval.log`.

    lmms-eval exits 0 even when the evaluation failed: the run counts as done only when its results file and
    our statistics file exist; otherwise `LmmsEvalFailed` carries the exit status and the log's tail.
    """
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty: an earlier run's files would pass for this run's; give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    command = launcher(processes) + ["--model", "llava_msd_calibrated", "--tasks", tasks, "--batch_size", "1"]
    for flag, value in (("--model_args", model_args), ("--gen_kwargs", gen_kwargs), ("--include_path", include_path)):
        if value:
            command += [flag, str(value)]
    if limit is not None:
        command += ["--limit", str(limit)]
    if log_samples:
        command.append("--log_samples")
    command += ["--output_path", str(out)]
    log_file = out / LOG_FILE
    started = time.perf_counter()
    with log_file.open("w") as log:
        done = subprocess.run(command, check=False, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    wall_s = time.perf_counter() - started
    results = sorted(out.rglob("*_results.json"))
    stats_file = out / STATS_FILE
    if done.returncode != 0 or not results or not stats_file.is_file():
        found = f"results file {'found' if results else 'missing'}, statistics file {'found' if stats_file.is_file() else 'missing'}"
        raise LmmsEvalFailed(f"lmms-eval failed (exit {done.returncode}; {found}); the end of {log_file}:\n{log_tail(log_file)}")
    return EvalRun(out, json.loads(results[-1].read_text()), json.loads(stats_file.read_text()), wall_s)


# ---- reading a run --------------------------------------------------------------------------------------------
def read_answers(out: Path, task: str) -> dict[int, Any]:
    """doc_id -> the model's raw answer, from lmms-eval's `<date>_samples_<task>.jsonl` under `out`.

    lmms-eval drops `resps` from a sample when it equals `filtered_resps`, so `resps` is the raw answer
    when present and `filtered_resps` otherwise.
    """
    files = sorted(out.rglob(f"*_samples_{task}.jsonl"))
    if not files:
        raise LmmsEvalFailed(f"no samples file *_samples_{task}.jsonl under {out}: was the run made with --log_samples?")
    answers = {}
    for line in files[-1].read_text().splitlines():
        sample = json.loads(line)
        answers[int(sample["doc_id"])] = sample.get("resps", sample["filtered_resps"])
    return answers


def answer_differences(reference: Mapping[int, Any], answers: Mapping[int, Any]) -> list[int]:
    """The doc_ids whose answers differ, a doc_id present on one side only included."""
    missing = object()
    return sorted(d for d in set(reference) | set(answers) if reference.get(d, missing) != answers.get(d, missing))
