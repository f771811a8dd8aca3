"""`lmms-msd bench --batch`: throughput per method and batch size on the bundled pair (CPU, a tiny chart
data folder), its check against plain decoding at T=0, and its usage errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from test_bench import chart_dir  # noqa: F401  (fixture)

from lmms_msd.commands.bench_batch import parse_batches
from lmms_msd.commands.cli import main


def argv(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["bench", "--data_dir", str(data_dir), "--limit", "2", "--warmup", "0", "--max_new_tokens", "12",
            "--output_dir", str(out), "--no_progress", *extra]  # fmt: skip


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_throughput_per_method_and_batch(chart_dir: Path, tmp_path: Path, engine: str):  # noqa: F811
    args = argv(chart_dir, tmp_path, "--batch", "2,1", "--methods", "hf_generate,plain,eagle2", "--engine", engine,
                "--batch_node_budgets", "1:58,2:4")  # fmt: skip
    assert main(args) == 0
    report = json.loads((tmp_path / "bench_batch.json").read_text())
    runs = [(r["method"], r["batch"]) for r in report["runs"]]
    assert runs == [("plain", 1), ("plain", 2), ("eagle2", 1), ("eagle2", 2)]  # hf_generate is not batched
    assert report["reference"] == "plain at batch 1"
    for r in report["runs"]:
        assert r["identical"] is True and r["requests"] == 2 and r["new_tokens"] == report["runs"][0]["new_tokens"]
        assert r["tokens_per_s"] == pytest.approx(r["new_tokens"] / r["wall_s"])
        assert r["docs_per_s"] == pytest.approx(2 / r["wall_s"])
        assert 0 < r["prefill_s"] < r["wall_s"]  # the prompts' share of the pass, within it
    table = (tmp_path / "bench_batch.md").read_text()
    assert "| eagle2 | 2 |" in table and "| prefill share | decoding tokens/s |" in table
    assert f"{report['machine']['launch_us']:g} us to launch a small operation" in table  # the machine's measured speed


def test_schedules_compared_in_one_run(chart_dir: Path, tmp_path: Path):  # noqa: F811
    args = argv(chart_dir, tmp_path, "--batch", "2", "--methods", "plain,eagle2", "--batch_node_budgets", "1:58",
                "--batch_node_budgets", "1:58,2:0")  # fmt: skip
    assert main(args) == 0
    runs = json.loads((tmp_path / "bench_batch.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["plain", "eagle2 @1:58", "eagle2 @1:58,2:0"]
    assert all(r["identical"] for r in runs)
    assert runs[2]["tau"] == 1.0 < runs[1]["tau"]  # at batch 2 the second table makes plain steps


def test_a_lossy_batched_method_fails(chart_dir: Path, tmp_path: Path, monkeypatch):  # noqa: F811
    from lmms_msd.speculative import batching

    real = batching.record_steps

    def lossy(steps):
        for *_, result in steps:
            result.bonus += 1
        return real(steps)

    monkeypatch.setattr(batching, "record_steps", lossy)
    assert main(argv(chart_dir, tmp_path, "--batch", "2", "--methods", "plain,eagle2")) == 1
    runs = json.loads((tmp_path / "bench_batch.json").read_text())["runs"]
    assert runs[0]["identical"] is True and runs[1]["identical"] is False and runs[1]["differing_doc_ids"] == [0, 1]


def test_the_table_says_how_far_free_decoding_could_get():
    """"at most, free decoding" is plain's best wall time over the row's prefill (the docstring's example)."""
    from lmms_msd.commands.bench_batch import BatchRun, markdown_table

    def run(method, batch, wall, prefill):
        return BatchRun(method=method, batch=batch, requests=128, new_tokens=7864, wall_s=wall, tokens_per_s=7864 / wall,
                        docs_per_s=128 / wall, tau=None, identical=True, differing_doc_ids=[], prefill_s=prefill)  # fmt: skip

    rows = markdown_table([run("plain", 64, 3.5, 1.75), run("plain", 128, 3.15, 1.73), run("eagle2", 64, 3.6, 2.0)]).splitlines()
    assert "| vs plain's best | at most, free decoding |" in rows[0]
    assert rows[2].startswith("| plain | 64 | 2246.9 | 36.571 | 0.90x | 1.80x |")  # 3.15 / 1.75
    assert rows[3].startswith("| plain | 128 | 2496.5 | 40.635 | 1.00x | 1.82x |")  # 3.15 / 1.73
    assert rows[4].startswith("| eagle2 | 64 | 2184.4 | 35.556 | 0.88x | 1.57x |")  # 3.15 / 2.0
    from lmms_msd.commands.bench_batch import free_decoding_tokens_per_s

    assert free_decoding_tokens_per_s([run("plain", 64, 3.5, 1.75), run("plain", 128, 3.15, 1.73)]) == 7864 / 1.73
    assert free_decoding_tokens_per_s([run("plain", 64, 3.5, None)]) is None  # an older report: no prefill times


@pytest.mark.parametrize("text", ["", "0,4", "a", "1,-2"])
def test_bad_batch_sizes(text):
    with pytest.raises(argparse.ArgumentTypeError, match="--batch"):
        parse_batches(text)


def test_batch_sizes_are_sorted():
    assert parse_batches("16,1,4,4") == [1, 4, 16]


def test_bad_node_budgets_are_a_usage_error(chart_dir: Path, tmp_path: Path):  # noqa: F811
    with pytest.raises(SystemExit, match="--batch_node_budgets"):
        main(argv(chart_dir, tmp_path, "--batch", "2", "--batch_node_budgets", "4:1"))
