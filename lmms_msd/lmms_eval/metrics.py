"""A task's primary metric, read from its configuration or from an lmms-eval results file (standard
library only: the commands import it to build their --help).

The primary metric of a task is the first entry of its YAML's `metric_list` (ChartQA's `relaxed_overall`,
AI2D's and TextVQA's `exact_match`, the local MathVista and MathVerse tasks' `accuracy`). lmms-eval writes
each task's configuration into its results file (`configs`) and each score under "<metric>,<filter>"
(`relaxed_overall,none`; AI2D's real task: `exact_match,flexible-extract`), so `primary_metric` reads both
from a results file. It is not "the first metric in the results": lmms-eval leaves out a metric that no
document returned (the local ChartQA tasks return no `relaxed_human_split`), so the results' order is not
the YAML's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def primary_metric_name(config: Mapping[str, Any]) -> str:
    """The first metric of a task configuration's metric_list: {"metric_list": [{"metric": "accuracy"},
    {"metric": "text_lite"}]} -> "accuracy"."""
    metrics = config.get("metric_list") or []
    if not metrics or "metric" not in metrics[0]:
        raise ValueError(f"task {config.get('task')!r} has no metric_list in its configuration; its YAML must name at least one metric")
    return metrics[0]["metric"]


def primary_metric(results: Mapping[str, Any], task: str) -> tuple[str, float]:
    """(key, score) of the task's primary metric in an lmms-eval results file's content: the key is
    "<metric>,<filter>", the first such key of the task's results. Worked example: configs.t.metric_list
    = [relaxed_overall, relaxed_human_split, relaxed_augmented_split] and results.t = {"alias": "t",
    "relaxed_augmented_split,none": 1.0, "relaxed_overall,none": 0.95} -> ("relaxed_overall,none", 0.95)."""
    configs = results.get("configs", {})
    if task not in configs:
        raise ValueError(f"lmms-eval's results have no configuration for task {task!r} (configs: {sorted(configs)}); is it a group? name its tasks")
    name = primary_metric_name(configs[task])
    scores = results["results"][task]
    for key, value in scores.items():
        if key.split(",")[0] == name and "," in key:
            return key, float(value)
    raise ValueError(f"task {task!r}: lmms-eval's results have no score for its primary metric {name!r} (keys: {sorted(scores)})")
