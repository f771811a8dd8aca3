"""The CI regression: each task's score is its own primary metric, the comparison with the baseline (old
baselines without a metric per task included), and the CI group's tasks (the run itself is a step of
.ci/run: `lmms-msd regression`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmms_msd.commands import regression
from lmms_msd.commands.lmms_eval_runs import EvalRun
from lmms_msd.commands.regression import LEGACY_METRIC, compare, run_tasks
from lmms_msd.lmms_eval.metrics import primary_metric, primary_metric_name

TASKS = Path(__file__).resolve().parents[1] / "tasks"
BASELINE = {"tasks": {
    "a": {"metric": "relaxed_overall,none", "score": 0.95, "tau": 4.97, "samples": 20},
    "b": {"metric": "accuracy,none", "score": 1.0, "tau": 1.45, "samples": 20},
}}  # fmt: skip


def test_a_matching_run_passes():
    measured = {"a": {**BASELINE["tasks"]["a"], "tau": 4.99}, "b": dict(BASELINE["tasks"]["b"])}
    assert compare(measured, BASELINE, tau_tolerance=0.05) == []


def test_score_must_be_equal_and_tau_within_tolerance():
    measured = {"a": {**BASELINE["tasks"]["a"], "score": 0.9, "tau": 4.8}, "b": {**BASELINE["tasks"]["b"], "samples": 19}}
    assert compare(measured, BASELINE, tau_tolerance=0.05) == [
        "a: relaxed_overall,none 0.9000, baseline 0.9500 (must be equal at temperature 0)",
        "a: tau 4.800, baseline 4.970 (tolerance 0.05)",
        "b: 19 samples, baseline 20",
    ]


def test_a_task_scored_by_another_metric_is_a_regression():
    measured = {"a": dict(BASELINE["tasks"]["a"]), "b": {**BASELINE["tasks"]["b"], "metric": "exact_match,none"}}
    (problem,) = compare(measured, BASELINE, tau_tolerance=0.05)
    assert problem.startswith("b: scored by exact_match,none, the baseline by accuracy,none")


def test_a_baseline_without_metrics_holds_relaxed_accuracy():
    """The format written before each task recorded its metric: the scores were ChartQA's relaxed_overall."""
    legacy = {"tasks": {"a": {"score": 0.95, "tau": 4.97, "samples": 20}}}
    assert LEGACY_METRIC == "relaxed_overall,none"
    assert compare({"a": dict(BASELINE["tasks"]["a"])}, legacy, 0.05) == []
    moved = {"a": {**BASELINE["tasks"]["a"], "metric": "accuracy,none"}}
    assert compare(moved, legacy, 0.05)[0].startswith("a: scored by accuracy,none, the baseline by relaxed_overall,none")


def test_missing_task_is_a_regression():
    assert compare({"a": BASELINE["tasks"]["a"]}, BASELINE, 0.05) == ["tasks differ: ran ['a'], baseline has ['a', 'b']"]


def test_primary_metric_is_the_yamls_first_not_the_results_first():
    """lmms-eval leaves out a metric no document returned, so the results' first key can be another metric."""
    results = {
        "configs": {"t": {"task": "t", "metric_list": [{"metric": "relaxed_overall"}, {"metric": "relaxed_human_split"},
                                                       {"metric": "relaxed_augmented_split"}]},
                    "ai2d": {"task": "ai2d", "metric_list": [{"metric": "exact_match"}]}},
        "results": {"t": {"alias": "t", "relaxed_augmented_split,none": 1.0, "relaxed_augmented_split_stderr,none": 0.0,
                          "relaxed_overall,none": 0.95, "relaxed_overall_stderr,none": 0.05},
                    "ai2d": {"alias": "ai2d", "exact_match_stderr,flexible-extract": 0.1, "exact_match,flexible-extract": 0.5}},
    }  # fmt: skip
    assert primary_metric(results, "t") == ("relaxed_overall,none", 0.95)
    assert primary_metric(results, "ai2d") == ("exact_match,flexible-extract", 0.5)
    with pytest.raises(ValueError, match="no configuration for task 'group'.*is it a group"):
        primary_metric(results, "group")
    with pytest.raises(ValueError, match="no score for its primary metric 'relaxed_overall'"):
        primary_metric({**results, "results": {"t": {"alias": "t", "relaxed_augmented_split,none": 1.0}}}, "t")
    with pytest.raises(ValueError, match="no metric_list"):
        primary_metric_name({"task": "t"})


def test_run_tasks_reads_each_tasks_primary_metric(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def fake(out, tasks, **kwargs):
        assert (tasks, kwargs["limit"]) == ("msd_ci", 3)
        results = {
            "configs": {"c": {"metric_list": [{"metric": "relaxed_overall"}, {"metric": "relaxed_human_split"}]},
                        "m": {"metric_list": [{"metric": "accuracy"}, {"metric": "text_lite"}]}},
            "results": {"c": {"alias": "c", "relaxed_overall,none": 0.5}, "m": {"alias": "m", "text_lite,none": 0.0, "accuracy,none": 1.0}},
        }  # fmt: skip
        summary = {"tau": 2.5, "samples": 3}
        return EvalRun(out, results, {"tasks": {"m": {"summary": summary}, "c": {"summary": summary}}}, 1.0)

    monkeypatch.setattr(regression, "run_lmms_eval", fake)
    assert run_tasks(TASKS, "msd_ci", 3, tmp_path) == {
        "c": {"metric": "relaxed_overall,none", "score": 0.5, "tau": 2.5, "samples": 3},
        "m": {"metric": "accuracy,none", "score": 1.0, "tau": 2.5, "samples": 3},
    }


def ci_group_tasks() -> list[str]:
    return yaml.safe_load((TASKS / "msd_ci.yaml").read_text())["task"]


def test_the_ci_group_covers_every_family():
    """Both chart tasks, then each other family's long-answer task."""
    assert ci_group_tasks() == [
        "msd_chartqa_synth", "msd_chartqa_synth_long", "msd_mathvista_synth_long", "msd_ai2d_synth_long",
        "msd_mathverse_synth_long", "msd_textvqa_synth_long",
    ]  # fmt: skip
    assert all((TASKS / f"{task}.yaml").is_file() for task in ci_group_tasks())


def test_committed_baseline_is_the_ci_groups():
    baseline = json.loads((TASKS / "ci_baseline.json").read_text())
    assert baseline["tasks_group"] == "msd_ci" and baseline["temperature"] == 0
    assert baseline["tasks"]["msd_chartqa_synth_long"]["tau"] >= 3.0
    if not all("metric" in entry for entry in baseline["tasks"].values()):
        pytest.skip("tasks/ci_baseline.json predates the five-family CI group (no metric per task): regenerate it with `lmms-msd regression --update`")
    assert sorted(baseline["tasks"]) == sorted(ci_group_tasks())
    assert baseline["limit"] == regression.DEFAULT_LIMIT
