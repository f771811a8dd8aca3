"""Scoring of the long-answer task: find the final answer in an explained response, then score it
with lmms-eval's own ChartQA relaxed accuracy."""

from __future__ import annotations

import re

from lmms_eval.tasks.chartqa.utils import chartqa_process_results

ANSWER_LINE = re.compile(r"answer\s*:\s*(.+)", re.IGNORECASE)


def extract_final_answer(response: str) -> str:
    """The text after the last "Answer:" (case-insensitive) on its line; without one, the last
    non-empty line. A trailing full stop and surrounding quotes are dropped, as ChartQA's exact
    match would otherwise fail on them.

    "The tallest bar is Limes.\\nAnswer: Limes." -> "Limes"
    """
    matches = ANSWER_LINE.findall(response)
    if matches:
        answer = matches[-1]
    else:
        lines = [line for line in response.splitlines() if line.strip()]
        answer = lines[-1] if lines else ""
    return answer.strip().rstrip(".").strip().strip("\"'")


def chartqa_long_process_results(doc, results):
    return chartqa_process_results(doc, [extract_final_answer(results[0])])
