"""`lmms-msd compare-runs`: the figures and the answer comparison on synthetic runs (lmms-eval's samples
and the plugin's statistics written by hand, `run_lmms_eval` replaced), the launcher of the data-parallel
run, and one short end-to-end comparison of the bundled pair through lmms-eval on 1 and 2 CPU processes
(about 1.5 min on 2 cores)."""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

import pytest

from lmms_msd.commands import compare_runs
from lmms_msd.commands.cli import main
from lmms_msd.commands.compare_runs import generation_seconds, run_report
from lmms_msd.commands.lmms_eval_runs import EvalRun, LmmsEvalFailed, launcher

REPO = Path(__file__).resolve().parents[1]
TASK = "msd_chartqa_synth_long"
METRIC = "relaxed_overall,none"


def sample_row(doc_id: int, rank: int, wall_s: float, new_tokens: int = 10, steps: int = 4) -> dict:
    return {"doc_id": doc_id, "rank": rank, "wall_s": wall_s, "new_tokens": new_tokens, "steps": steps}


def fake_run(out: Path, answers: dict[int, str], processes: int, score: float = 0.75, wall_s: float = 10.0) -> EvalRun:
    """What run_lmms_eval would return, with lmms-eval's samples file written under `out`: each document took
    1 s and made 10 tokens in 4 steps, document d decoded on rank d % processes."""
    out.mkdir(parents=True, exist_ok=True)
    samples = "\n".join(json.dumps({"doc_id": d, "filtered_resps": a}) for d, a in sorted(answers.items()))
    (out / f"20260101_000000_samples_{TASK}.jsonl").write_text(samples + "\n")
    rows = [sample_row(d, d % processes, 1.0) for d in sorted(answers)]
    n = len(rows)
    summary = {"samples": n, "new_tokens": 10 * n, "steps": 4 * n, "tau": 2.5, "alpha": 1.5, "wall_s": float(n), "tokens_per_s": 10.0}
    stats = {"processes": processes, "tasks": {TASK: {"summary": summary, "samples": rows}}}
    results = {
        "configs": {TASK: {"task": TASK, "metric_list": [{"metric": METRIC.split(",")[0]}]}},
        "results": {TASK: {"alias": TASK, METRIC: score, f"{METRIC.split(',')[0]}_stderr,none": "N/A"}},
    }
    return EvalRun(out, results, stats, wall_s)


def patch_runs(monkeypatch: pytest.MonkeyPatch, answers_by_processes: dict[int, dict[int, str]], ran_on: dict[int, int] | None = None) -> list[dict]:
    """Replace run_lmms_eval by fake runs; returns the list of the calls' keyword arguments."""
    calls = []

    def fake(out, task, **kwargs):
        calls.append({"out": out, "task": task, **kwargs})
        processes = kwargs["processes"]
        return fake_run(out, answers_by_processes[processes], (ran_on or {}).get(processes, processes))

    monkeypatch.setattr(compare_runs, "run_lmms_eval", fake)
    return calls


def compare(tmp_path: Path, *extra: str) -> int:
    return main(["compare-runs", "--task", TASK, "--limit", "4", "--num_processes", "2", "--output_dir", str(tmp_path / "cmp"), *extra])


# ---- literal inputs --------------------------------------------------------------------------------------
def test_generation_time_is_the_busiest_rank():
    rows = [sample_row(0, 0, 1.0), sample_row(1, 1, 2.5), sample_row(2, 0, 1.0), sample_row(3, 1, 0.5)]
    assert generation_seconds(rows) == 3.0  # rank 0: 1 + 1, rank 1: 2.5 + 0.5
    assert generation_seconds([]) == 0.0


def test_run_report_throughput_over_generation_time(tmp_path: Path):
    report = run_report(fake_run(tmp_path, {d: "a" for d in range(4)}, processes=2), TASK, 2)
    assert (report.metric, report.score, report.samples, report.new_tokens, report.tau) == (METRIC, 0.75, 4, 40, 2.5)
    assert report.generation_s == 2.0  # two documents of 1 s on each rank
    assert report.docs_per_s == 2.0 and report.tokens_per_s == 20.0 and report.tokens_per_s_per_process == 10.0


def test_run_report_refuses_a_run_on_other_processes_or_without_the_task(tmp_path: Path):
    run = fake_run(tmp_path, {0: "a"}, processes=1)
    with pytest.raises(LmmsEvalFailed, match="asked for 2 processes and ran on 1"):
        run_report(run, TASK, 2)
    with pytest.raises(LmmsEvalFailed, match="no results for 'other'"):
        run_report(run, "other", 1)


def test_launcher_one_process_and_data_parallel():
    assert launcher(1) == [sys.executable, "-m", "lmms_eval"]
    many = launcher(3)
    assert many[:5] == [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu"]
    assert many[many.index("--num_processes") + 1] == "3" and many[-2:] == ["-m", "lmms_eval"]
    with pytest.raises(ValueError, match="at least 1"):
        launcher(0)


# ---- the command on synthetic runs ----------------------------------------------------------------------
def test_identical_answers_exit_0_and_report_both_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    answers = {d: f"answer {d}" for d in range(4)}
    calls = patch_runs(monkeypatch, {1: answers, 2: dict(answers)})
    assert compare(tmp_path, "--model_args", "inflate=7b,engine=static,tree=opt") == 0
    assert [c["processes"] for c in calls] == [1, 2]
    assert all(c["model_args"] == "inflate=7b,engine=static,tree=opt" and c["log_samples"] and c["limit"] == 4 for c in calls)
    assert [c["out"] for c in calls] == [tmp_path / "cmp" / "runs" / "p1", tmp_path / "cmp" / "runs" / "p2"]
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert report["answers_identical"] and report["differing"] == [] and report["documents_compared"] == 4
    assert [r["processes"] for r in report["runs"]] == [1, 2]
    assert report["generation_speedup"] == 2.0  # 4 s on one process, 2 s on the busier of two
    assert "identical on all 4 documents" in (tmp_path / "cmp" / "compare.md").read_text()


def test_a_differing_or_missing_answer_is_reported_and_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    one = {d: f"answer {d}" for d in range(4)}
    two = {0: "answer 0", 1: "something else", 2: "answer 2"}  # doc 1 differs, doc 3 missing
    patch_runs(monkeypatch, {1: one, 2: two})
    assert compare(tmp_path) == 1
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert not report["answers_identical"]
    assert report["differing"] == [
        {"doc_id": 1, "one_process": "answer 1", "n_processes": "something else"},
        {"doc_id": 3, "one_process": "answer 3", "n_processes": None},
    ]
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "Answers DIFFER on 2 of 4 documents" in text and "| 1 | answer 1 | something else |" in text


def test_a_run_on_fewer_processes_than_asked_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    answers = {d: "a" for d in range(4)}
    patch_runs(monkeypatch, {1: answers, 2: answers}, ran_on={2: 1})
    with pytest.raises(SystemExit, match="run on 2 process.*ran on 1"):
        compare(tmp_path)


def test_arguments_are_checked(tmp_path: Path):
    with pytest.raises(SystemExit, match="at least 2"):
        compare(tmp_path, "--num_processes", "1")
    with pytest.raises(SystemExit, match="one task"):
        main(["compare-runs", "--task", "a,b", "--output_dir", str(tmp_path)])


# ---- end to end ------------------------------------------------------------------------------------------
def _installed() -> bool:
    try:
        metadata.distribution("lmms-msd")
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _installed(), reason="lmms-msd is not installed (pip install .): lmms-eval finds the model through its entry point")
def test_compare_runs_end_to_end_on_the_bundled_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    status = main([
        "compare-runs", "--task", TASK, "--include_path", str(REPO / "tasks"), "--limit", "2", "--num_processes", "2",
        "--gen_kwargs", "max_new_tokens=32", "--model_args", "use_msd=true", "--output_dir", str(tmp_path),
    ])  # fmt: skip
    assert status == 0, capsys.readouterr().out
    report = json.loads((tmp_path / "compare.json").read_text())
    assert report["answers_identical"] and report["documents_compared"] == 2
    one, two = report["runs"]
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["samples"] == two["samples"] == 2 and one["new_tokens"] == two["new_tokens"] > 0
    assert one["score"] == two["score"] and one["tau"] == two["tau"] > 1
    assert two["tokens_per_s"] > 0 and two["generation_s"] > 0
