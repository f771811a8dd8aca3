"""The CI regression comparison (the run itself is a step of .ci/run: `lmms-msd regression`)."""

from __future__ import annotations

import json
from pathlib import Path

from lmms_msd.commands.regression import compare

BASELINE = {"tasks": {"a": {"score": 0.95, "tau": 4.97, "samples": 20}, "b": {"score": 1.0, "tau": 1.45, "samples": 20}}}


def test_a_matching_run_passes():
    measured = {"a": {"score": 0.95, "tau": 4.99, "samples": 20}, "b": {"score": 1.0, "tau": 1.45, "samples": 20}}
    assert compare(measured, BASELINE, tau_tolerance=0.05) == []


def test_score_must_be_equal_and_tau_within_tolerance():
    measured = {"a": {"score": 0.9, "tau": 4.8, "samples": 20}, "b": {"score": 1.0, "tau": 1.45, "samples": 19}}
    problems = compare(measured, BASELINE, tau_tolerance=0.05)
    assert any("a: relaxed accuracy 0.9000, baseline 0.9500" in p for p in problems)
    assert any("a: tau 4.800, baseline 4.970" in p for p in problems)
    assert any("b: 19 samples, baseline 20" in p for p in problems)


def test_missing_task_is_a_regression():
    assert compare({"a": BASELINE["tasks"]["a"]}, BASELINE, 0.05) == ["tasks differ: ran ['a'], baseline has ['a', 'b']"]


def test_committed_baseline_names_the_ci_group():
    baseline = json.loads((Path(__file__).resolve().parents[1] / "tasks" / "ci_baseline.json").read_text())
    assert baseline["tasks_group"] == "msd_ci" and baseline["temperature"] == 0
    assert set(baseline["tasks"]) == {"msd_chartqa_synth", "msd_chartqa_synth_long"}
    assert baseline["tasks"]["msd_chartqa_synth_long"]["tau"] >= 3.0
