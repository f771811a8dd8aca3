"""`lmms-msd bench` on the bundled pair (CPU, a tiny chart data folder and the repository's long task), its
totals on literal numbers, its usage errors, and the profiled phase times of the decoding loops."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from lmms_msd.commands.bench import Method, Run, Summary, TreeStats, summarise
from lmms_msd.commands.cli import main

REPO = Path(__file__).resolve().parents[1]
SPECULATIVE = ("eagle2", "opt", "opt_cal")


@pytest.fixture(scope="module")
def chart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two held-out charts (long and short questions) as `lmms-msd make-charts` writes them."""
    from lmms_msd.testbed.charts import build_chart_dataset

    folder = tmp_path_factory.mktemp("charts")
    build_chart_dataset(folder, n_train=0, n_test=2, seed=5, write_parquet=False, progress=False)
    return folder


@pytest.fixture(scope="module")
def bench_report(chart_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--data_dir", str(chart_dir), "--limit", "2", "--warmup", "1", "--repeats", "1",
            "--max_new_tokens", "20", "--output_dir", str(out), "--no_progress"]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def test_bench_on_a_data_folder(bench_report):
    report, markdown = bench_report
    assert report["requests"] == 2 and report["greedy"] is True
    assert report["config"]["repeats"] == 1 and report["machine"]["torch"] and report["machine"]["device_name"]
    machine = report["machine"]  # the machine's measured speed (lmms_msd.commands.machine), in the text too
    assert machine["copy_gb_s"] > 0 and machine["launch_us"] > 0
    assert f"{machine['copy_gb_s']:g} GB/s copies, {machine['launch_us']:g} us to launch" in markdown
    # Triton's release (the static target's one-row kernel needs it), as installed here, or None without it
    from importlib.util import find_spec

    assert (machine["triton"] is not None) == (find_spec("triton") is not None)
    assert machine["triton"] is None or f", triton {machine['triton']};" in markdown
    methods = {s["method"]: s for s in report["methods"]}
    assert list(methods) == ["hf_generate", "plain", "eagle2", "opt", "opt_cal"]
    plain, hf = methods["plain"], methods["hf_generate"]
    for name, s in methods.items():
        # lossless at temperature 0, for every run (the profiled one included) of every request
        assert s["identical"] is True and s["differing_doc_ids"] == [], name
        assert s["new_tokens"] == plain["new_tokens"] and 0 < s["new_tokens"] <= 2 * 20
        assert s["ms_per_token"] == pytest.approx(1000 * s["wall_s"] / s["new_tokens"])
        assert s["tokens_per_s"] == pytest.approx(s["new_tokens"] / s["wall_s"])
        assert s["speedup_vs_plain"] == pytest.approx(plain["ms_per_token"] / s["ms_per_token"])
        assert s["speedup_vs_hf_generate"] == pytest.approx(hf["ms_per_token"] / s["ms_per_token"])
    assert plain["tau"] == 1.0 and hf["tau"] is None and hf["shares"] is None
    for name in SPECULATIVE:
        s = methods[name]
        assert s["tau"] > 1.5 and s["alpha"] == pytest.approx(s["tau"] - 1), name  # the trained draft is accepted
        assert s["shares"]["draft"] > 0 and s["shares"]["verify"] > 0 and s["shares"]["other"] > 0
        assert sum(s["shares"].values()) <= 1.0 + 1e-9
        # the profiled runs' trees: EAGLE-2 keeps 58 draft nodes at most 6 deep, OPT-Tree at most 60 and 10
        depth, most = (6, 58) if name == "eagle2" else (10, 60)
        assert 1 <= s["depth_per_step"] <= depth and 1 <= s["nodes_per_step"] <= most and 0 <= s["bottom_share"] <= 1, name
        assert s["expected_alpha"] > 0, name
    assert methods["eagle2"]["nodes_per_step"] == 58
    assert methods["plain"]["nodes_per_step"] is None and methods["hf_generate"]["depth_per_step"] is None
    assert methods["plain"]["shares"]["draft"] == 0.0 and methods["plain"]["shares"]["verify"] > 0
    assert report["trees"]["opt_cal"]["scorer"].startswith("CalibratedScorer")
    for request in report["per_request"]:
        runs = request["runs"]
        assert set(runs) == set(methods) and request["prompt_tokens"] > 0
        texts = {run["text"] for run in runs.values()}
        assert len(texts) == 1  # every method answered the same
        for name in SPECULATIVE:
            phases = runs[name]["phases"]
            assert phases["draft_s"] + phases["verify_s"] + phases["other_s"] + phases["prefill_s"] <= phases["wall_s"]
    assert "| method | ms/token | tokens/s |" in markdown and "| nodes/step | depth/step | bottom % | expected alpha |" in markdown
    assert "every speculative method gave plain decoding's token ids" in markdown


def test_bench_on_the_task(tmp_path: Path):
    """The task path: the repository's long task, with lmms-eval's default stop string (which hf_generate
    gets as stop_strings)."""
    argv = ["bench", "--task", "msd_chartqa_synth_long", "--include_path", str(REPO / "tasks"), "--limit", "1",
            "--warmup", "0", "--repeats", "2", "--max_new_tokens", "12", "--methods", "opt,hf_generate,plain",
            "--stop_delta", "0.1", "--opt_variant", "upstream", "--output_dir", str(tmp_path), "--no_progress"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["generation"]["until"] == ["\n\n"] and report["generation"]["do_sample"] is False
    assert [s["method"] for s in report["methods"]] == ["hf_generate", "plain", "opt"]
    assert all(s["identical"] is True for s in report["methods"])
    assert len(report["per_request"][0]["runs"]["opt"]["wall_s_repeats"]) == 2
    assert report["trees"]["opt"]["stop_delta"] == 0.1 and report["per_request"][0]["runs"]["opt"]["trees"]["steps"] > 0
    assert report["trees"]["opt"]["variant"] == "upstream"
    # lmms-eval's prompt: the document's question and the task's post_prompt
    assert report["per_request"][0]["context"].endswith('on the last line in the form "Answer: <answer>".')


def test_sampling_skips_hf_generate_and_the_comparison(chart_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    argv = ["bench", "--data_dir", str(chart_dir), "--limit", "1", "--warmup", "0", "--repeats", "1",
            "--max_new_tokens", "8", "--temperature", "1", "--methods", "hf_generate,plain,eagle2",
            "--output_dir", str(tmp_path), "--no_progress"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["greedy"] is False and [s["method"] for s in report["methods"]] == ["plain", "eagle2"]
    assert all(s["identical"] is None for s in report["methods"])
    assert "not checked (sampling)" in capsys.readouterr().out


def test_a_lossy_method_is_marked_and_fails(chart_dir: Path, tmp_path: Path, monkeypatch, capsys):
    import lmms_msd.pipeline as pipeline

    real = pipeline.speculative_generate

    def lossy(*args, **kwargs):
        result = real(*args, **kwargs)
        result.token_ids[-1] += 1
        return result

    monkeypatch.setattr(pipeline, "speculative_generate", lossy)
    argv = ["bench", "--data_dir", str(chart_dir), "--limit", "2", "--warmup", "0", "--repeats", "1",
            "--max_new_tokens", "6", "--methods", "plain,eagle2", "--output_dir", str(tmp_path), "--no_progress"]  # fmt: skip
    assert main(argv) == 1
    eagle2 = json.loads((tmp_path / "bench.json").read_text())["methods"][1]
    assert eagle2["identical"] is False and eagle2["differing_doc_ids"] == [0, 1]
    assert "**NO** (docs 0, 1)" in capsys.readouterr().out


def test_summary_totals_on_literal_numbers():
    """ms/token from the sums of request medians; speedups are ms/token ratios; shares of the profiled wall."""

    def run(tokens, wall, steps, accepted, identical, phases=None):
        return Run(tokens, wall, [wall], steps, accepted, "", identical, phases)

    plain_phases = {"draft_s": 0.0, "verify_s": 0.5, "other_s": 0.1, "prefill_s": 0.2, "wall_s": 1.0}
    spec_phases = {"draft_s": 0.2, "verify_s": 0.1, "other_s": 0.1, "prefill_s": 0.1, "wall_s": 0.5}
    measured = [
        {"doc_id": 3, "runs": {"plain": run(10, 0.5, 9, 0, True, plain_phases), "opt": run(10, 0.2, 3, 6, True, spec_phases)}},
        {"doc_id": 7, "runs": {"plain": run(30, 1.5, 29, 0, True, plain_phases), "opt": run(30, 0.3, 5, 20, False, spec_phases)}},
    ]
    methods = [Method("plain", "plain", None), Method("opt", "speculative", None)]
    plain, opt = summarise(methods, measured)
    assert plain.ms_per_token == pytest.approx(50.0) and opt.ms_per_token == pytest.approx(12.5)
    assert opt.speedup_vs_plain == pytest.approx(4.0) and plain.speedup_vs_plain == pytest.approx(1.0)
    assert opt.speedup_vs_hf_generate is None
    assert opt.tau == pytest.approx(1 + 26 / 8) and plain.tau == pytest.approx(1.0)
    assert opt.shares == pytest.approx({"draft": 0.4, "verify": 0.2, "other": 0.2, "prefill": 0.2})
    assert opt.identical is False and opt.differing_doc_ids == [7] and plain.identical is True
    assert isinstance(opt, Summary) and opt.nodes_per_step is None  # no trees recorded


def test_tree_stats_on_a_hand_made_tree():
    """Per step: draft nodes, the deepest depth, whether the accepted path reached it, the sum of the weights."""
    import torch

    from lmms_msd.commands.bench import tree_totals
    from lmms_msd.speculative.tree import Tree
    from lmms_msd.speculative.verify import Acceptance

    # root -> 1 -> 3 -> 4, root -> 2: 4 draft nodes, deepest at depth 3
    tree = Tree(tokens=torch.tensor([5, 6, 7, 8, 9]), parents=torch.tensor([-1, 0, 0, 1, 3]),
                depths=torch.tensor([0, 1, 1, 2, 3]), scores=torch.log(torch.tensor([1.0, 0.8, 0.1, 0.4, 0.2])))  # fmt: skip
    stats = TreeStats()
    stats(tree, None, Acceptance(path=[0, 1, 3, 4], bonus=1))  # reached the bottom
    stats(tree, None, Acceptance(path=[0, 2], bonus=1))
    assert (stats.steps, stats.nodes, stats.depth, stats.bottom) == (2, 8, 6, 1)
    assert stats.expected == pytest.approx(2 * 1.5)
    totals = tree_totals([stats, TreeStats(steps=2, nodes=4, depth=2, bottom=0, expected=1.0)])
    assert totals == pytest.approx({"nodes_per_step": 3.0, "depth_per_step": 2.0, "bottom_share": 0.25, "expected_alpha": 1.0})


def test_bad_data_dir_names_the_path(tmp_path: Path):
    missing = tmp_path / "no-charts-here"
    with pytest.raises(SystemExit) as error:
        main(["bench", "--data_dir", str(missing), "--output_dir", str(tmp_path / "out")])
    assert str(missing) in str(error.value) and "make-charts" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_missing_static_engine_is_a_clear_error(tmp_path, monkeypatch, chart_dir):
    monkeypatch.setitem(sys.modules, "lmms_msd.speculative.fast", None)  # as if absent: importing it raises ImportError
    with pytest.raises(SystemExit) as error:
        main(["bench", "--data_dir", str(chart_dir), "--engine", "static", "--output_dir", str(tmp_path)])
    assert "lmms_msd.speculative.fast.StaticEngine" in str(error.value) and "--engine eager" in str(error.value)


def test_bad_inflation_shape_is_a_clear_error(tmp_path, chart_dir):
    with pytest.raises(SystemExit) as error:
        main(["bench", "--data_dir", str(chart_dir), "--inflate", "huge", "--output_dir", str(tmp_path)])
    assert "--inflate huge" in str(error.value) and "HIDDENxLAYERS" in str(error.value)


def test_torch_compile_without_the_static_engine_is_a_usage_error_before_loading(tmp_path, monkeypatch, chart_dir):
    def no_loading(settings):
        raise AssertionError("bench loaded the pair before refusing --torch_compile")

    monkeypatch.setattr("lmms_msd.commands.bench.load_pair", no_loading)
    with pytest.raises(SystemExit) as error:
        main(["bench", "--data_dir", str(chart_dir), "--torch_compile", "--output_dir", str(tmp_path)])
    assert str(error.value) == "lmms-msd bench: --torch_compile compiles the static engine's forwards: add --engine static"


def _first_answer(argv_tail: list[str], chart_dir: Path, out: Path) -> dict:
    argv = ["bench", "--data_dir", str(chart_dir), "--limit", "1", "--warmup", "0", "--repeats", "1",
            "--max_new_tokens", "20", "--methods", "plain,opt", "--output_dir", str(out), "--no_progress", *argv_tail]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "bench.json").read_text())


def test_inflated_pair_gives_the_same_answers(bench_report, chart_dir: Path, tmp_path: Path):
    """256 -> 1024 wide (a power-of-four ratio: bit-exact in fp32 on CPU), same answers as the miniature."""
    report = _first_answer(["--inflate", "1024x4"], chart_dir, tmp_path)
    assert all(s["identical"] is True for s in report["methods"])
    assert report["per_request"][0]["runs"]["opt"]["text"] == bench_report[0]["per_request"][0]["runs"]["opt"]["text"]


def test_static_engine_gives_the_same_answers(bench_report, chart_dir: Path, tmp_path: Path):
    pytest.importorskip("lmms_msd.speculative.fast")
    report = _first_answer(["--engine", "static"], chart_dir, tmp_path)
    assert report["config"]["engine"] == "static" and all(s["identical"] is True for s in report["methods"])
    assert report["per_request"][0]["runs"]["opt"]["text"] == bench_report[0]["per_request"][0]["runs"]["opt"]["text"]
    assert report["methods"][1]["shares"]["draft"] > 0  # the engine fills the profiled phases too


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_cost_rows_give_the_same_answers_and_their_cost_models(chart_dir: Path, tmp_path: Path, engine: str):
    argv = ["bench", "--data_dir", str(chart_dir), "--limit", "1", "--warmup", "0", "--repeats", "1", "--engine", engine,
            "--max_new_tokens", "20", "--methods", "plain,opt_cost,opt_cal_cost", "--output_dir", str(tmp_path), "--no_progress"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [s["method"] for s in report["methods"]] == ["plain", "opt_cost", "opt_cal_cost"]
    assert all(s["identical"] is True for s in report["methods"])
    runtime = {"eager": "EagerRuntime", "static": "StaticEngine"}[engine]
    scorers = {name: (cost["key"]["runtime"], cost["key"]["scorer"]) for name, cost in report["cost_models"].items()}
    assert scorers == {"opt_cost": (runtime, "DraftConfidence"), "opt_cal_cost": (runtime, "CalibratedScorer")}
    assert all(cost["measured_now"] and str(tmp_path / "cost_models") in cost["file"] for cost in report["cost_models"].values())
    assert (report["trees"]["opt_cost"]["stop"], report["trees"]["opt_cost"]["stop_delta"]) == ("cost", None)
    assert "Cost model of opt_cal_cost (measured at start-up" in (tmp_path / "bench.md").read_text()


# ---- profiled phases of the decoding loops ---------------------------------------------------------------
@pytest.fixture(scope="module")
def bundled_pair():
    from lmms_msd.models.draft import load_draft
    from lmms_msd.models.loading import load_target
    from lmms_msd.testbed.bundled import bundled_paths

    target_dir, draft_dir = bundled_paths()
    target = load_target(str(target_dir))
    return target, load_draft(str(draft_dir))


def test_profile_splits_the_loop_without_changing_the_output(bundled_pair, chart_dir):
    from PIL import Image

    from lmms_msd.speculative.decoding import plain_generate, speculative_generate
    from lmms_msd.speculative.runtime import EagerRuntime
    from lmms_msd.speculative.sampling import GenerationConfig
    from lmms_msd.speculative.tree import OptTree
    from lmms_msd.testbed.charts import load_records, question_of

    target, draft = bundled_pair
    record = load_records(chart_dir, "test", "long", 1)[0]
    with Image.open(chart_dir / record["image"]) as image:
        prompt = target.prepare(question_of(record), [image.convert("RGB")])
    config = GenerationConfig(max_new_tokens=24)
    fast = speculative_generate(EagerRuntime(target, draft), prompt, config, OptTree())
    profiled = speculative_generate(EagerRuntime(target, draft), prompt, config, OptTree(), profile=True)
    assert profiled.token_ids == fast.token_ids
    assert (fast.stats.draft_s, fast.stats.verify_s, fast.stats.other_s) == (0.0, 0.0, 0.0)
    s = profiled.stats
    assert s.steps > 1 and s.draft_s > 0 and s.verify_s > 0 and s.other_s > 0
    assert s.draft_s + s.verify_s + s.other_s <= s.wall_s - s.prefill_s
    plain = plain_generate(EagerRuntime(target), prompt, config, profile=True)
    assert plain.token_ids == fast.token_ids
    p = plain.stats
    assert p.draft_s == 0.0 and p.verify_s > 0 and p.other_s > 0
    assert p.verify_s + p.other_s <= p.wall_s - p.prefill_s
    assert plain_generate(EagerRuntime(target), prompt, config).stats.verify_s == 0.0


def test_opt_cal_scores_nodes_by_the_calibrator_mode():
    """--calibrator_mode tilt gives opt_cal the thesis's logit tilt (and visual tracking, which its alpha reads)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from lmms_msd.commands.bench import method_trees
    from lmms_msd.pipeline import build_tree
    from lmms_msd.testbed.bundled import bundled_calibrator, bundled_paths

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_paths()[0]))
    decoder = SimpleNamespace(target=SimpleNamespace(tokenizer=tokenizer, vocab_size=len(tokenizer), device="cpu"))
    [tilt] = method_trees(["plain", "opt_cal"], {"stop_delta": 0.2}, str(bundled_calibrator()), "tilt").values()
    tilt = build_tree(tilt, decoder)
    assert type(tilt.builder.scorer).__name__ == "TiltScorer" and tilt.track_visual and tilt.builder.stop_delta == 0.2
    [weight] = method_trees(["opt_cal"], {}, str(bundled_calibrator())).values()
    assert type(build_tree(weight, decoder).builder.scorer).__name__ == "CalibratedScorer"


def test_the_machine_measures_time_what_they_say():
    """`copy_bandwidth` counts a copy's bytes twice (read and write) over its time, and `launch_seconds` is the
    time per operation: both against the clock around the same work, with a slowed copy and a slowed launch."""
    from unittest import mock

    from lmms_msd.commands import machine

    device = torch.device("cpu")
    assert machine.launch_seconds(device, operations=50, rounds=3) > 0
    real_copy = torch.Tensor.copy_

    def slow_copy(self, *args, **kwargs):
        time.sleep(0.01)
        return real_copy(self, *args, **kwargs)

    with mock.patch.object(torch.Tensor, "copy_", slow_copy):
        # 2 x 1 MiB per copy, each at least 10 ms: at most 2 MiB / 10 ms
        assert 0 < machine.copy_bandwidth(device, gib=2**-10, repeats=3) <= 2 * 2**20 / 0.01
    real_add = torch.Tensor.add_

    def slow_add(self, *args, **kwargs):
        time.sleep(0.002)
        return real_add(self, *args, **kwargs)

    with mock.patch.object(torch.Tensor, "add_", slow_add):
        assert machine.launch_seconds(device, operations=5, rounds=1) >= 0.002
    assert machine.speed_text({"copy_gb_s": 4010.3, "launch_us": 5.2}) == "; measured: 4010.3 GB/s copies, 5.2 us to launch a small operation"
    assert machine.speed_text({"device_name": "old report"}) == ""
