"""The testbed report: the families' tasks read through lmms-eval's own task code (prompt, image, settings,
scorer, primary metric), acceptance counted by type, the tables, and one short run of the bundled pair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lmms_msd.calibration.token_types import CONTENT, FUNCTION, NUMBER
from lmms_msd.commands.cli import main
from lmms_msd.commands.testbed_report import FAMILIES, family_tasks, find_data_file
from lmms_msd.speculative.tree import Tree
from lmms_msd.speculative.verify import Acceptance
from lmms_msd.testbed.report import AcceptanceByType, blank_images, to_markdown

TASKS = Path(__file__).resolve().parents[1] / "tasks"


def test_acceptance_by_type_counts_path_and_bonus():
    types = torch.tensor([NUMBER, FUNCTION, CONTENT, NUMBER])
    observer = AcceptanceByType(types)
    tree = Tree(tokens=torch.tensor([1, 2, 0, 3]), parents=torch.tensor([-1, 0, 1, 0]),
                depths=torch.tensor([0, 1, 2, 1]), scores=torch.zeros(4))  # fmt: skip
    observer(tree, None, Acceptance(path=[0, 1, 2], bonus=3))  # accepted content 2, number 0; bonus number 3
    observer(tree, None, Acceptance(path=[0], bonus=1))  # bonus function word
    rates = observer.rates()
    assert rates["number"] == {"tokens": 2, "accepted": 1, "rate": 0.5}
    assert rates["content"] == {"tokens": 1, "accepted": 1, "rate": 1.0}
    assert rates["punctuation/function"] == {"tokens": 1, "accepted": 0, "rate": 0.0}
    assert AcceptanceByType(types).rates()["number"] == {"tokens": 0, "accepted": 0, "rate": None}


def test_blank_images_keep_the_size():
    (blank,) = blank_images([Image.new("RGB", (336, 200), (10, 20, 30))])
    assert blank.size == (336, 200) and blank.getextrema() == ((255, 255), (255, 255), (255, 255))


def test_each_family_has_a_short_and_a_long_task():
    assert [family_tasks(f) for f in FAMILIES] == [(f"msd_{f}_synth", f"msd_{f}_synth_long") for f in FAMILIES]
    assert all((TASKS / f"{name}.yaml").is_file() for f in FAMILIES for name in family_tasks(f))


@pytest.mark.parametrize(
    "task, metric",
    [("msd_chartqa_synth", "relaxed_overall"), ("msd_mathvista_synth_long", "accuracy"), ("msd_ai2d_synth", "exact_match"),
     ("msd_mathverse_synth_long", "accuracy"), ("msd_textvqa_synth_long", "exact_match")],
)  # fmt: skip
def test_primary_metric_is_the_first_of_the_yaml(task, metric):
    pytest.importorskip("lmms_eval")
    from lmms_msd.lmms_eval.metrics import primary_metric_name
    from lmms_msd.lmms_eval.tasks import load_task

    assert primary_metric_name(vars(load_task(TASKS / f"{task}.yaml").config)) == metric


def test_documents_use_the_tasks_prompt_settings_and_scorer():
    """The first AI2D-like long document (tasks/data/ai2d_test.parquet, answer B): lmms-eval's AI2D prompt with
    the task's post_prompt, its generation_kwargs (lmms-eval adds until ["\\n\\n"]), the image, and the
    task's own scorer (the final "Answer:" line, then AI2D's option-letter filter and exact match)."""
    pytest.importorskip("lmms_eval")
    from lmms_msd.lmms_eval.tasks import data_file_name, load_task, task_documents

    yaml_path = TASKS / "msd_ai2d_synth_long.yaml"
    assert data_file_name(yaml_path) == "ai2d_test.parquet"
    assert data_file_name(TASKS / "msd_chartqa_synth_long.yaml") == "chartqa_long_test.parquet"
    (doc,) = task_documents(load_task(yaml_path), limit=1)
    assert doc.doc_id == 0
    assert doc.context.startswith("Which part of the insect is labeled 1?\nA. thorax\nB. head\nC. abdomen\nD. leg\nFirst explain")
    assert (doc.config.max_new_tokens, doc.config.greedy, doc.config.until) == (256, True, ("\n\n",))
    assert [image.size for image in doc.images] == [(336, 336)]
    assert [doc.score(a) for a in ("The head is labeled 1.\nAnswer: B", "Answer: A", "B")] == [1.0, 0.0, 1.0]


def test_a_make_data_folder_replaces_the_tasks_data(tmp_path: Path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "ai2d_test.parquet").write_bytes(b"")
    (tmp_path / "all" / "charts").mkdir(parents=True)
    (tmp_path / "all" / "charts" / "chartqa_long_test.parquet").write_bytes(b"")
    assert find_data_file(tmp_path / "one", "ai2d", "ai2d_test.parquet") == tmp_path / "one" / "ai2d_test.parquet"
    assert find_data_file(tmp_path / "all", "chartqa", "chartqa_long_test.parquet") == tmp_path / "all" / "charts" / "chartqa_long_test.parquet"
    with pytest.raises(SystemExit, match="no textvqa_test.parquet for family textvqa .* make-data --family textvqa"):
        find_data_file(tmp_path / "all", "textvqa", "textvqa_test.parquet")


def test_markdown_from_a_literal_report():
    rates = {"number": {"rate": 0.75}, "punctuation/function": {"rate": 0.8}, "content": {"rate": None}}
    family = {
        "metric": "exact_match",
        "short": {"with_image": {"score": 0.9, "n": 20}, "blank_image": {"score": 0.25, "n": 20}},
        "long": {"with_image": {"score": 0.95, "n": 20, "mean_tokens": 41.25}, "blank_image": {"score": 0.3, "n": 20}},
        "speculative": [{"temperature": 0.0, "tau": 4.5, "alpha": 3.5, "acceptance_by_type": rates, "differing_doc_ids": [3]},
                        {"temperature": 1.0, "tau": 4.0, "alpha": 3.0, "acceptance_by_type": rates}],
    }  # fmt: skip
    assert to_markdown({"families": {"ai2d": family}}).splitlines() == [
        "| family | metric | short: image | short: blank | long: image | long: blank | long answer, mean tokens | documents |",
        "|---|---|---|---|---|---|---|---|",
        "| ai2d | exact_match | 90.0% | 25.0% | 95.0% | 30.0% | 41.2 | 20 + 20 |",
        "",
        "| family | temperature | tau | alpha | accepted: number | accepted: punctuation/function | accepted: content | answers = plain |",
        "|---|---|---|---|---|---|---|---|",
        "| ai2d | 0 | 4.50 | 3.50 | 75.0% | 80.0% | – | **no** (doc_ids [3]) |",
        "| ai2d | 1 | 4.00 | 3.00 | 75.0% | 80.0% | – | not compared (sampling) |",
    ]


def test_report_of_the_bundled_pair_on_one_family(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Two documents per task of the chart family, greedy: speculative answers equal plain decoding's."""
    pytest.importorskip("lmms_eval")
    out = tmp_path / "report"
    assert main(["testbed-report", "--families", "chartqa", "--limit", "2", "--device", "cpu", "--output", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    chart = report["families"]["chartqa"]
    assert chart["tasks"] == ["msd_chartqa_synth", "msd_chartqa_synth_long"] and chart["metric"] == "relaxed_overall"
    assert [chart[s][i]["n"] for s in ("short", "long") for i in ("with_image", "blank_image")] == [2, 2, 2, 2]
    assert sorted(chart["long"]["with_image"]["answers"]) == ["0", "1"]  # JSON keys
    (greedy,) = chart["speculative"]
    assert greedy["temperature"] == 0.0 and greedy["differing_doc_ids"] == [] and greedy["tau"] > 1.0
    assert greedy["score"] == chart["long"]["with_image"]["score"]
    assert "| chartqa | relaxed_overall |" in capsys.readouterr().out
    assert out.with_suffix(".md").read_text().startswith("| family | metric |")
