"""Statistics aggregation (lmms_msd.lmms_eval.statistics) on hand-made records with literal expected numbers.

Records (a step commits accepted + 1 tokens; the prefill gives the first token):
  task a, doc 1: steps 3, accepted [2, 0, 1] -> new tokens 1 + 3 + 3 = 7, wall 1.0 s
  task a, doc 0: steps 2, accepted [1, 1]    -> new tokens 1 + 2 + 2 = 5, wall 0.5 s
  task b, doc 0: steps 2, accepted [0, 0]    -> new tokens 1 + 0 + 2 = 3, wall 0.5 s
Task a: 12 tokens, 5 steps, 5 accepted -> alpha 1.0, tau 2.0, 12 / 1.5 = 8 tokens/s,
        histogram {0: 1, 1: 3, 2: 1}.
All:    15 tokens, 7 steps, 5 accepted -> alpha 5/7, 15 / 2.0 = 7.5 tokens/s, histogram {0: 3, 1: 3, 2: 1}.
"""

from __future__ import annotations

import json

import pytest

from lmms_msd.lmms_eval.statistics import (
    SampleRecord,
    Summary,
    build_report,
    dumps_report,
    format_table,
    write_report,
)
from lmms_msd.speculative.decoding import DecodeStats

RECORDS = [
    SampleRecord("a", 1, new_tokens=7, steps=3, accepted=(2, 0, 1), prefill_s=0.25, wall_s=1.0, rank=1),
    SampleRecord("a", 0, new_tokens=5, steps=2, accepted=(1, 1), prefill_s=0.25, wall_s=0.5),
    SampleRecord("b", 0, new_tokens=3, steps=2, accepted=(0, 0), prefill_s=0.125, wall_s=0.5),
]


def test_summary_of_one_task():
    s = Summary.of(RECORDS[:2])
    assert (s.samples, s.new_tokens, s.steps, s.accepted_tokens) == (2, 12, 5, 5)
    assert s.alpha == 1.0 and s.tau == 2.0
    assert s.accepted_histogram == {0: 1, 1: 3, 2: 1}
    assert s.wall_s == 1.5 and s.prefill_s == 0.5 and s.tokens_per_s == 8.0


def test_summary_of_everything_and_of_nothing():
    s = Summary.of(RECORDS)
    assert (s.new_tokens, s.steps, s.accepted_tokens) == (15, 7, 5)
    assert s.alpha == pytest.approx(5 / 7) and s.tau == pytest.approx(12 / 7)
    assert s.tokens_per_s == 7.5
    assert s.to_dict()["accepted_histogram"] == {"0": 3, "1": 3, "2": 1}
    empty = Summary.of([]).to_dict()
    assert (empty["samples"], empty["tau"], empty["alpha"], empty["tokens_per_s"]) == (0, 0.0, 0.0, 0.0)
    assert empty["accepted_histogram"] == {}


def test_plain_decoding_has_tau_one():
    plain = SampleRecord("a", 0, new_tokens=4, steps=3, accepted=(0, 0, 0), prefill_s=0.1, wall_s=0.4)
    s = Summary.of([plain])
    assert (s.tau, s.alpha, s.tokens_per_s) == (1.0, 0.0, 10.0)


def test_record_from_decode_stats():
    stats = DecodeStats(new_tokens=7, steps=3, accepted=[2, 0, 1], prefill_s=0.25, wall_s=1.0, speculative=True)
    record = SampleRecord.from_decode_stats("a", 1, stats, rank=1)
    assert record == RECORDS[0]
    plain = DecodeStats(new_tokens=4, steps=3, accepted=[0, 0, 0], prefill_s=0.25, wall_s=1.0)
    assert SampleRecord.from_decode_stats("a", 1, plain).path == "plain"
    assert record.tau == stats.tau and record.alpha == stats.alpha


def test_record_checks_accepted_length():
    with pytest.raises(ValueError, match="2 accepted counts for 3 steps"):
        SampleRecord("a", 0, new_tokens=4, steps=3, accepted=(0, 1), prefill_s=0.0, wall_s=0.1)


def test_report_groups_by_task_and_sorts_by_doc_id():
    report = build_report(RECORDS, {"model": "m", "decoding": "speculative"})
    assert report["model"] == "m" and report["decoding"] == "speculative"
    assert list(report["tasks"]) == ["a", "b"]
    rows = report["tasks"]["a"]["samples"]
    assert [r["doc_id"] for r in rows] == [0, 1]
    assert rows[1] == {
        "doc_id": 1, "new_tokens": 7, "steps": 3, "accepted": [2, 0, 1], "prefill_s": 0.25, "wall_s": 1.0,
        "rank": 1, "repeat": 0, "path": "speculative", "tau": 2.0, "alpha": 1.0, "tokens_per_s": 7.0,
    }  # fmt: skip
    assert report["tasks"]["a"]["summary"]["tau"] == 2.0
    assert report["overall"]["samples"] == 3


def test_json_round_trip_with_one_line_per_sample(tmp_path):
    report = build_report(RECORDS, {"model": "m"})
    path = write_report(report, tmp_path / "deeper" / "msd_stats.json")
    text = path.read_text()
    assert json.loads(text) == json.loads(json.dumps(report))
    assert dumps_report(report) == text
    sample_lines = [line for line in text.splitlines() if line.strip().startswith('{"doc_id"')]
    assert len(sample_lines) == 3


def test_table_has_summary_histogram_and_sample_rows():
    table = format_table(build_report(RECORDS, {}))
    assert "| a | 2 | 12 | 5 | 2.00 | 1.00 | 1.50 | 8.0 |" in table
    assert "| b | 1 | 3 | 2 | 1.00 | 0.00 | 0.50 | 6.0 |" in table
    assert "| all | 3 | 15 | 7 | 1.71 | 0.71 | 2.00 | 7.5 |" in table
    assert "| a | 1 | 3 | 1 |" in table  # steps by accepted length 0, 1, 2
    assert "| all | 3 | 3 | 1 |" in table
    assert "| 1 | 7 | 3 | 2.00 |" in table  # doc 1 of task a


def test_table_caps_sample_rows():
    records = [SampleRecord("a", i, new_tokens=2, steps=1, accepted=(0,), prefill_s=0.0, wall_s=0.1) for i in range(5)]
    table = format_table(build_report(records, {}), max_sample_rows=2)
    assert "| 1 | 2 | 1 | 1.00 |" in table and "| 2 | 2 | 1 | 1.00 |" not in table
    assert "(3 more samples in the JSON report)" in table
    assert "| all |" not in table  # one task: no separate total row
