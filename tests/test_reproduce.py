"""`lmms-msd reproduce`: the table, the gains and the answer comparison on literal inputs; the runner's
guards; and one short end-to-end run of the bundled pair through lmms-eval (about 1.5 min on 2 cores)."""

from __future__ import annotations

import argparse
import csv
import json
from importlib import metadata
from pathlib import Path

import pytest

from lmms_msd.commands import reproduce
from lmms_msd.commands.benchmark_data import (
    BENCHMARK_TASKS,
    LOCAL_TASKS,
    THESIS_TASKS,
    DefaultTasks,
    benchmark_dataset,
    dataset_cached,
    default_tasks,
    lmms_eval_tasks_dir,
)
from lmms_msd.commands.cli import main
from lmms_msd.commands.lmms_eval_runs import (
    EvalRun,
    LmmsEvalFailed,
    answer_differences,
    read_answers,
    run_lmms_eval,
)
from lmms_msd.commands.presets import PRESETS, THESIS, TUNED
from lmms_msd.commands.reproduce import (
    Measurement,
    gains,
    mark_differences,
    markdown_tables,
)

REPO = Path(__file__).resolve().parents[1]
TASK = "msd_chartqa_synth_long"
ROWS = TUNED.table_rows("calibrator=online,train_ratio=0.3")


def cell(row: str, alpha: float, temperature: float = 0.0, task: str = "a", score: float = 0.5, tps: float = 100.0) -> Measurement:
    tau = 1.0 + alpha
    return Measurement(row, task, temperature, alpha=alpha, tau=tau, score=score, metric="relaxed_overall,none", tokens_per_s=tps, samples=3)


def four_rows(temperature: float = 0.0) -> list[Measurement]:
    return [
        cell("plain", 0.0, temperature, tps=100.0),
        cell("eagle2", 4.0, temperature, tps=150.0),
        cell("opt", 5.0, temperature, tps=160.0),
        cell("opt_cal", 5.5, temperature, tps=170.0),
    ]


# ---- literal inputs --------------------------------------------------------------------------------------
def test_rows_are_plain_then_the_thesis_rows():
    assert [r.key for r in ROWS] == ["plain", "eagle2", "opt", "opt_cal"]
    assert [r.model_args for r in ROWS] == [
        "use_msd=false",
        "use_msd=true,tree=eagle2,total_tokens=59,depth=5,top_k=10",
        "use_msd=true,tree=opt,opt_variant=frontier,node_budget=60,stop_delta=0.3,max_depth=10,top_k=10,calibrator=none",
        "use_msd=true,tree=opt,opt_variant=frontier,node_budget=60,stop_delta=0.3,max_depth=10,top_k=10,calibrator_mode=weight,calibrator=online,train_ratio=0.3",
    ]


def test_the_thesis_preset():
    """nodes 500 (499 besides the root), threshold 0.2, max_depth 10, frontier 10, OPT-Tree's own selection,
    the calibrator as a logit tilt, fitted online on 0.2 of the requests with soft labels and its groups
    (type x 5 attention bins, pooled over depth: calibrators.py 803-833), MSD's prompt."""
    rows = THESIS.table_rows(THESIS.online(THESIS.train_ratio))
    opt = "tree=opt,opt_variant=upstream,node_budget=499,stop_delta=0.2,max_depth=10,top_k=10"
    assert [(r.key, r.model_args) for r in rows] == [
        ("plain", "conv_template=msd,use_msd=false"),
        ("eagle2", "conv_template=msd,use_msd=true,tree=eagle2,total_tokens=59,depth=5,top_k=10"),
        ("opt", f"conv_template=msd,use_msd=true,{opt},calibrator=none"),
        ("opt_cal", (f"conv_template=msd,use_msd=true,{opt},calibrator_mode=tilt,calibrator=online,train_ratio=0.2,"
                     "calibrator_label=soft,attention_bins=5,min_group_size=200,depth_edges=none")),
    ]  # fmt: skip
    assert [r.label for r in rows] == [r.label for r in ROWS]
    assert reproduce.reserved_model_args(THESIS) >= {"conv_template", "top_k", "calibrator_mode", "attention_bins", "depth_edges", "stats_path"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_model_args_are_the_plugins(name):
    """Every model_arg a preset sets is one the plugin takes, and every choice it makes is a valid one."""
    import inspect

    from lmms_msd.calibration.scorer import CALIBRATOR_MODES
    from lmms_msd.lmms_eval.model_args import CALIBRATOR_LABELS
    from lmms_msd.lmms_eval.plugin import LlavaMsdCalibrated
    from lmms_msd.models.prompt import TEMPLATE_SYSTEM_PROMPTS
    from lmms_msd.speculative.tree import OPT_VARIANTS

    accepted = set(inspect.signature(LlavaMsdCalibrated.__init__).parameters)
    assert PRESETS[name].row_names() <= accepted
    choices = {"tree": {"eagle2", "opt"}, "opt_variant": set(OPT_VARIANTS), "calibrator_mode": set(CALIBRATOR_MODES),
               "calibrator_label": set(CALIBRATOR_LABELS), "conv_template": set(TEMPLATE_SYSTEM_PROMPTS)}  # fmt: skip
    p = PRESETS[name]
    for text in [p.shared, p.online_args, *(r.model_args for r in p.rows)]:
        for key, _, value in (a.partition("=") for a in text.split(",") if a):
            assert key not in choices or value in choices[key], f"{name}: {key}={value} is not one of {choices[key]}"


def test_a_cell_scores_by_its_tasks_primary_metric(tmp_path: Path):
    """The first of the task's metric_list (lmms-eval's results keep only the metrics some document returned,
    so their first key may be another one)."""
    results = {
        "configs": {"m": {"metric_list": [{"metric": "accuracy"}, {"metric": "text_dominant"}]}},
        "results": {"m": {"alias": "m", "text_dominant,none": 0.0, "accuracy,none": 0.75}},
    }  # fmt: skip
    stats = {"tasks": {"m": {"summary": {"alpha": 2.0, "tau": 3.0, "tokens_per_s": 50.0, "samples": 4}}}}
    m = reproduce.measure(EvalRun(tmp_path, results, stats, 1.0), ROWS[1], "m", 0.0)
    assert (m.metric, m.score, m.tau, m.samples) == ("accuracy,none", 0.75, 3.0, 4)


# ---- the default tasks --------------------------------------------------------------------------------------
def write_yaml(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_lmms_eval_tasks(root: Path) -> Path:
    """lmms-eval 0.7.3's layout for the five benchmarks: a folder per benchmark; mathvista, mathverse and textvqa
    groups (mathvista of a group and a task) beside their tasks, textvqa's tasks including a template that
    names the dataset."""
    write_yaml(root / "chartqa" / "chartqa.yaml", "task: chartqa\ndataset_path: lab/ChartQA\ndoc_to_text: !function utils.x\n")
    write_yaml(root / "ai2d" / "ai2d.yaml", "task: ai2d\ndataset_path: lab/ai2d\n")
    write_yaml(root / "ai2d" / "ai2d_lite.yaml", "task: ai2d_lite\ndataset_path: lab/Lite\n")  # another task of the folder
    write_yaml(root / "mathvista" / "mathvista.yaml", "group: mathvista\ntask:\n  - mathvista_testmini\n  - mathvista_test\n")
    write_yaml(root / "mathvista" / "mathvista_testmini.yaml", "group: mathvista_testmini\ntask:\n  - mathvista_testmini_format\n")
    write_yaml(root / "mathvista" / "mathvista_testmini_format.yaml", "task: mathvista_testmini_format\ndataset_path: AI4Math/MathVista\n")
    write_yaml(root / "mathvista" / "mathvista_test.yaml", "task: mathvista_test\ndataset_path: AI4Math/MathVista\n")
    write_yaml(root / "mathverse" / "mathverse.yaml", "group: mathverse\ntask:\n  - mathverse_testmini\n")
    write_yaml(root / "mathverse" / "mathverse_testmini.yaml", "task: mathverse_testmini\ndataset_path: CaraJ/MathVerse-lmmseval\ndataset_name: testmini\n")
    write_yaml(root / "textvqa" / "_default_template_textvqa_yaml", "dataset_path: lab/textvqa\n")
    write_yaml(root / "textvqa" / "_textvqa.yaml", "group: textvqa\ntask:\n- textvqa_val\n")
    write_yaml(root / "textvqa" / "textvqa_val.yaml", "task: textvqa_val\ninclude: _default_template_textvqa_yaml\n")
    return root


def test_benchmark_dataset_reads_includes_and_refuses_groups(tmp_path: Path):
    pytest.importorskip("lmms_eval")
    root = fake_lmms_eval_tasks(tmp_path / "tasks")
    assert {task: benchmark_dataset(task, root / folder) for folder, task in BENCHMARK_TASKS.items()} == {
        "chartqa": "lab/ChartQA", "mathvista_testmini_format": "AI4Math/MathVista", "ai2d": "lab/ai2d",
        "mathverse_testmini": "CaraJ/MathVerse-lmmseval", "textvqa_val": "lab/textvqa",
    }  # fmt: skip
    with pytest.raises(LookupError, match=r"'mathvista' is a group of lmms-eval tasks .*\(mathvista_testmini, mathvista_test\)"):
        benchmark_dataset("mathvista", root / "mathvista")
    with pytest.raises(LookupError, match="no task 'mmmu'"):
        benchmark_dataset("mmmu", root / "ai2d")


def test_default_benchmark_tasks_are_tasks_of_the_installed_lmms_eval():
    """Each default real-benchmark name is a task, not a group, in the installed lmms-eval's own task folders
    (the YAMLs are read; no dataset is loaded), and reads the benchmark's hub dataset."""
    pytest.importorskip("lmms_eval")
    tasks_dir = lmms_eval_tasks_dir()
    assert THESIS_TASKS == ("chartqa", "mathvista_testmini_format", "ai2d", "mathverse_testmini", "textvqa_val")
    datasets = {task: benchmark_dataset(task, tasks_dir / folder) for folder, task in BENCHMARK_TASKS.items()}
    assert all(folder.lower() in datasets[task].lower() for folder, task in BENCHMARK_TASKS.items()), datasets
    for group in ("mathvista", "mathverse", "textvqa"):
        with pytest.raises(LookupError, match=f"'{group}' is a group"):
            benchmark_dataset(group, tasks_dir / group)


def test_a_dataset_is_cached_as_a_hub_snapshot_or_prepared_by_datasets(tmp_path: Path):
    """huggingface_hub: <hub>/datasets--<org>--<name>/snapshots/<revision>; datasets: <cache>/<org>___<snake_case
    name>/<config>/<version>/<hash> (MathVista -> math_vista)."""
    pytest.importorskip("datasets")
    hub, prepared = tmp_path / "hub", tmp_path / "datasets"
    (hub / "datasets--lab--ChartQA" / "snapshots" / "0123abc").mkdir(parents=True)
    (hub / "datasets--lab--ai2d" / "snapshots").mkdir(parents=True)  # no revision: an interrupted download
    (prepared / "AI4Math___math_vista" / "default" / "0.0.0" / "f00d").mkdir(parents=True)
    assert [dataset_cached(d, hub, prepared) for d in ("lab/ChartQA", "lab/ai2d", "AI4Math/MathVista", "lab/textvqa")] == [
        True, False, True, False,
    ]  # fmt: skip


def test_default_tasks_are_the_local_families_unless_every_benchmark_is_cached(tmp_path: Path):
    pytest.importorskip("lmms_eval")
    root = fake_lmms_eval_tasks(tmp_path / "tasks")
    hub, prepared = tmp_path / "hub", tmp_path / "datasets"
    for hub_id in ("lab/ChartQA", "AI4Math/MathVista", "lab/ai2d", "CaraJ/MathVerse-lmmseval"):
        (hub / f"datasets--{hub_id.replace('/', '--')}" / "snapshots" / "r").mkdir(parents=True)
    local = default_tasks(root, hub, prepared)
    assert local.tasks == LOCAL_TASKS == (
        "msd_chartqa_synth_long", "msd_mathvista_synth_long", "msd_ai2d_synth_long", "msd_mathverse_synth_long",
        "msd_textvqa_synth_long",
    ) and local.local  # fmt: skip
    assert "not in the Hugging Face cache" in local.why and "textvqa_val: lab/textvqa;" in local.why and "chartqa" not in local.why
    (hub / "datasets--lab--textvqa" / "snapshots" / "r").mkdir(parents=True)
    real = default_tasks(root, hub, prepared)
    assert real.tasks == THESIS_TASKS and not real.local and "are in the Hugging Face cache" in real.why


def test_without_tasks_reproduce_takes_the_default_and_says_why(monkeypatch: pytest.MonkeyPatch):
    choice = DefaultTasks(LOCAL_TASKS, local=True, why="the real benchmarks cannot run offline")
    monkeypatch.setattr(reproduce, "default_tasks", lambda: choice)
    args = argparse.Namespace(tasks=None, include_path=None)
    assert reproduce.choose_tasks(args) == choice.why
    assert args.tasks == ",".join(LOCAL_TASKS) and args.include_path == REPO / "tasks"
    args = argparse.Namespace(tasks=None, include_path=Path("mine"))
    reproduce.choose_tasks(args)
    assert args.include_path == Path("mine")  # the user's folder is kept
    args = argparse.Namespace(tasks="chartqa", include_path=None)
    assert reproduce.choose_tasks(args) is None and (args.tasks, args.include_path) == ("chartqa", None)
    monkeypatch.setattr(reproduce, "default_tasks", lambda: DefaultTasks(THESIS_TASKS, local=False, why="cached"))
    args = argparse.Namespace(tasks=None, include_path=None)
    reproduce.choose_tasks(args)
    assert args.tasks == "chartqa,mathvista_testmini_format,ai2d,mathverse_testmini,textvqa_val" and args.include_path is None


def test_answer_differences_per_doc_id():
    plain = {0: "a", 1: "b", 2: "c"}
    assert answer_differences(plain, {2: "c", 0: "a", 1: "b"}) == []
    assert answer_differences(plain, {0: "a", 1: "B", 2: "c"}) == [1]
    assert answer_differences(plain, {0: "a", 1: "b", 3: "d"}) == [2, 3]  # missing on either side


def test_marking_compares_temperature_zero_against_plain_only():
    measurements = four_rows(0.0) + four_rows(1.0)
    answers = {(m.row, m.task, m.temperature): {0: "x", 1: "y"} for m in measurements}
    answers[("opt", "a", 0.0)] = {0: "x", 1: "z"}
    answers[("opt", "a", 1.0)] = {0: "other", 1: "sample"}  # sampling: never compared
    mark_differences(measurements, answers)
    compared = {(m.row, m.temperature): m.differing_doc_ids for m in measurements}
    assert compared == {
        ("plain", 0.0): None, ("eagle2", 0.0): [], ("opt", 0.0): [1], ("opt_cal", 0.0): [],
        ("plain", 1.0): None, ("eagle2", 1.0): None, ("opt", 1.0): None, ("opt_cal", 1.0): None,
    }  # fmt: skip


def test_markdown_table_rows_by_tasks_and_the_mark():
    measurements = four_rows(0.0) + [cell("eagle2", 2.0, task="b", score=0.25, tps=80.0)]
    measurements[2].differing_doc_ids = [1, 4]
    text = markdown_tables(measurements, ROWS, ["a", "b"], [0.0])
    assert text.splitlines() == [
        "### Temperature 0",
        "",
        "| row | a (relaxed_overall) | b (relaxed_overall) |",
        "|---|---|---|",
        "| plain decoding (reference) | 0.00 / 1.00 / 0.500 / 100 | – |",
        "| MSD baseline (EAGLE-2 tree) | 4.00 / 5.00 / 0.500 / 150 | 2.00 / 3.00 / 0.250 / 80 |",
        "| + OPT-Tree ⚠ answers differ from plain decoding | 5.00 / 6.00 / 0.500 / 160 **DIFFERS** (doc_ids 1, 4) | – |",
        "| + OPT-Tree + calibrator | 5.50 / 6.50 / 0.500 / 170 | – |",
    ]


def test_gains_per_task_and_temperature():
    (at0, at1) = gains(four_rows(0.0) + [m for m in four_rows(1.0) if m.row != "opt_cal"])
    assert at0 == pytest.approx({
        "task": "a", "temperature": 0.0, "opt_vs_eagle2": 0.25, "cal_vs_opt": 0.1,
        "speedup_eagle2": 1.5, "speedup_opt": 1.6, "speedup_opt_cal": 1.7,
    })  # fmt: skip
    assert at1["temperature"] == 1.0 and at1["cal_vs_opt"] is None and at1["speedup_opt_cal"] is None


def test_read_answers_takes_resps_when_lmms_eval_kept_them(tmp_path: Path):
    samples = tmp_path / "model" / f"20260101_000000_samples_{TASK}.jsonl"
    samples.parent.mkdir()
    lines = [{"doc_id": 1, "filtered_resps": "blue"}, {"doc_id": 0, "resps": "It is red.\nAnswer: red", "filtered_resps": "red"}]
    samples.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert read_answers(tmp_path, TASK) == {0: "It is red.\nAnswer: red", 1: "blue"}
    with pytest.raises(LmmsEvalFailed, match="--log_samples"):
        read_answers(tmp_path, "other_task")


def test_outputs_from_a_literal_report(tmp_path: Path):
    measurements = four_rows(0.0) + four_rows(1.0)
    for m, differing in zip(measurements[1:4], ([], [], [2])):
        m.differing_doc_ids = differing
    report = {
        "command": "lmms-msd reproduce ...", "calibrator": "file x.json", "pair": "the bundled miniature pair",
        "preset": {"name": "tuned", "summary": "our settings", "notes": ["a note"]},
        "tasks": ["a"], "temperatures": [0.0, 1.0], "limit": 3, "rows": [],
        "measurements": [m.__dict__ for m in measurements], "relative_gains": gains(measurements),
    }  # fmt: skip
    text = reproduce.write_outputs(report, ROWS, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(reproduce.FILES)
    assert "| a | 0 | +25.0% | +10.0% | 1.50x | 1.60x | 1.70x |" in text
    assert "Preset: tuned. Calibrator: file x.json." in text
    settings = text[text.index("### Settings: preset `tuned`"):].splitlines()
    assert settings[2] == "our settings." and settings[-1] == "- a note"
    assert settings[4:10] == [
        "| row | model_args |", "|---|---|", "| plain decoding (reference) | `use_msd=false` |",
        "| MSD baseline (EAGLE-2 tree) | `use_msd=true,tree=eagle2,total_tokens=59,depth=5,top_k=10` |",
        "| + OPT-Tree | `use_msd=true,tree=opt,opt_variant=frontier,node_budget=60,stop_delta=0.3,max_depth=10,top_k=10,calibrator=none` |",
        ("| + OPT-Tree + calibrator | `use_msd=true,tree=opt,opt_variant=frontier,node_budget=60,stop_delta=0.3,max_depth=10,top_k=10,calibrator_mode=weight,"
         "calibrator=online,train_ratio=0.3` |"),
    ]  # fmt: skip
    assert "**Answers differ from plain decoding at temperature 0" in text and "opt_cal on a, doc_ids [2]" in text
    with (tmp_path / "results.csv").open() as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 8
    assert [(r["row"], r["answers_compared"], r["answers_differ"], r["differing_doc_ids"]) for r in lines[:4]] == [
        ("plain", "False", "False", ""), ("eagle2", "True", "False", ""), ("opt", "True", "False", ""), ("opt_cal", "True", "True", "2"),
    ]  # fmt: skip
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["measurements"][3]["differing_doc_ids"] == [2]


def test_calibrator_default_and_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fitted = tmp_path / "miniature.json"
    monkeypatch.setattr(reproduce, "default_calibrator", lambda: None)
    args, text = reproduce.choose_calibrator(None, None, bundled_pair=True, preset=TUNED)
    assert args == "calibrator=online,train_ratio=0.3" and "calibrators/miniature.json not found" in text
    fitted.write_text("{}")
    monkeypatch.setattr(reproduce, "default_calibrator", lambda: fitted)
    assert reproduce.choose_calibrator(None, None, bundled_pair=True, preset=TUNED)[0] == f"calibrator={fitted}"
    assert reproduce.choose_calibrator(None, None, bundled_pair=False, preset=TUNED)[0] == "calibrator=online,train_ratio=0.3"
    assert reproduce.choose_calibrator("online", 0.5, bundled_pair=True, preset=TUNED)[0] == "calibrator=online,train_ratio=0.5"
    with pytest.raises(SystemExit, match="no such file"):
        reproduce.choose_calibrator(str(tmp_path / "missing.json"), None, bundled_pair=True, preset=TUNED)
    # the thesis's calibrator is online, with its own label and groups, even for the bundled pair
    online = "calibrator=online,train_ratio=0.2,calibrator_label=soft,attention_bins=5,min_group_size=200,depth_edges=none"
    args, text = reproduce.choose_calibrator(None, None, bundled_pair=True, preset=THESIS)
    assert args == online and text == "online, fitted on the first 0.2 of each run's requests (preset thesis)"
    assert reproduce.choose_calibrator(None, 0.5, bundled_pair=True, preset=THESIS)[0] == online.replace("0.2", "0.5")
    assert reproduce.choose_calibrator(str(fitted), None, bundled_pair=True, preset=THESIS)[0] == f"calibrator={fitted}"


def test_model_args_may_not_set_what_the_rows_set(tmp_path: Path):
    with pytest.raises(SystemExit, match=r"may not set \['tree'\]: the rows of preset thesis set them"):
        main(["reproduce", "--model_args", "pretrained=x,tree=opt", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"may not set \['conv_template', 'top_k'\]"):
        main(["reproduce", "--model_args", "pretrained=x,top_k=4,conv_template=vicuna_v1", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"may not set \['calibrator_mode'\]: the rows of preset tuned"):
        main(["reproduce", "--preset", "tuned", "--model_args", "calibrator_mode=tilt,seed=1", "--output_dir", str(tmp_path)])


def test_a_failed_run_names_row_task_and_temperature(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def failing(out, task, **kwargs):
        raise LmmsEvalFailed("lmms-eval failed (exit 0; results file missing, statistics file missing); the end of log:\nTraceback")

    monkeypatch.setattr(reproduce, "run_lmms_eval", failing)
    args = argparse.Namespace(temperatures=[1.0], limit=3, include_path=None, model_args="")
    with pytest.raises(SystemExit, match=r"row 'plain decoding \(reference\)', task a, temperature 1: lmms-eval failed (?s:.*)Traceback"):
        reproduce.measure_all(args, ROWS, ["a"], tmp_path)


def test_the_runner_refuses_a_folder_with_earlier_files(tmp_path: Path):
    (tmp_path / "msd_stats.json").write_text("{}")
    with pytest.raises(ValueError, match="not empty"):
        run_lmms_eval(tmp_path, TASK)


# ---- end to end ----------------------------------------------------------------------------------------------
try:
    metadata.distribution("lmms-msd")
    INSTALLED = True
except metadata.PackageNotFoundError:
    INSTALLED = False


@pytest.mark.skipif(not INSTALLED, reason="lmms-msd is not installed: lmms-eval finds the model through its entry point")
def test_reproduce_end_to_end_on_the_bundled_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "reproduce"
    argv = ["reproduce", "--preset", "tuned", "--tasks", TASK, "--include_path", str(REPO / "tasks"), "--limit", "3",
            "--temperatures", "0", "--output_dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "every row's answers equal plain decoding's" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted([*reproduce.FILES, "runs"])
    report = json.loads((out / "results.json").read_text())
    assert [(m["row"], m["task"], m["temperature"], m["samples"]) for m in report["measurements"]] == [
        (row, TASK, 0.0, 3) for row in ("plain", "eagle2", "opt", "opt_cal")
    ]
    assert [m["differing_doc_ids"] for m in report["measurements"]] == [None, [], [], []]
    assert report["measurements"][0]["tau"] == 1.0 and all(m["tau"] > 1.5 for m in report["measurements"][1:])
    table = (out / "results.md").read_text()
    for label in ("plain decoding (reference)", "MSD baseline (EAGLE-2 tree)", "+ OPT-Tree", "+ OPT-Tree + calibrator"):
        assert f"| {label} | " in table
    assert "DIFFERS" not in table and "⚠" not in table
    assert report["preset"]["name"] == "tuned" and [r["model_args"] for r in report["rows"]][:3] == [r.model_args for r in ROWS[:3]]
    assert "### Settings: preset `tuned`" in table and "| + OPT-Tree | `use_msd=true,tree=opt,opt_variant=frontier,node_budget=60," in table


def test_conv_template_replaces_the_presets_prompt_in_every_row():
    rows = THESIS.table_rows("calibrator=online,train_ratio=0.2", reproduce.shared_args(THESIS, "vicuna_v1"))
    assert [r.model_args.split(",")[0] for r in rows] == ["conv_template=vicuna_v1"] * len(rows)
    assert not any("conv_template=msd" in r.model_args for r in rows)
    assert reproduce.shared_args(THESIS, None) is None  # the preset's own prompt
    assert THESIS.table_rows("", None)[0].model_args == "conv_template=msd,use_msd=false"
    with pytest.raises(SystemExit, match="--conv_template 'vicuna' is not one of"):
        reproduce.shared_args(THESIS, "vicuna")
