"""The four task families beside the charts (mathvista, ai2d, mathverse, textvqa) and `lmms-msd make-data`:
determinism per seed, the benchmarks' document schemas, the training prompts equal to what the lmms-eval
tasks ask, the scorers on literal worked examples, every generated answer scoring 1 under its task's
scorer, long answers' length, and one lmms-eval run of a family's task on the bundled pair.

Long answers' length is counted in whitespace-separated words: a byte-level BPE (the testbed's tokenizer,
GPT-2's pre-tokenisation) never merges across a space, so every word is at least one token and the word
count is a lower bound on the token count whatever the vocabulary.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from lmms_msd.testbed.families import FAMILY_NAMES, get_family
from lmms_msd.testbed.families.ai2d import CONSUMERS, PRODUCERS
from lmms_msd.testbed.families.common import (
    ANSWER_LINE,
    DESIGN_SIZE,
    IMAGE_PREFIX,
    build_family_dataset,
)
from lmms_msd.testbed.families.mathverse import VERSIONS

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tasks"
IMAGE_SIZE = 112
N_TRAIN, N_TEST = 6, 8
MIN_MEAN_LONG_WORDS = 30


def task_utils():
    """tasks/utils.py, the local tasks' functions, imported as lmms-eval imports it (by file)."""
    spec = importlib.util.spec_from_file_location("msd_task_utils", TASKS / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


UTILS = task_utils()


def task_kwargs(task: str) -> dict[str, Any]:
    """The lmms_eval_specific_kwargs (default) of tasks/<task>.yaml, its !function tags read as text."""
    loader = type("Loader", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load((TASKS / f"{task}.yaml").read_text(), Loader=loader)["lmms_eval_specific_kwargs"]["default"]


def doc_to_text(family: str, doc: dict[str, Any], task: str) -> str:
    """What the lmms-eval task prompts for `doc`: lmms-eval's own function where it can be imported
    offline (AI2D, TextVQA), tasks/utils.py's where not (MathVista, MathVerse)."""
    kwargs = task_kwargs(task)
    if family == "ai2d":
        from lmms_eval.tasks.ai2d.utils import ai2d_doc_to_text

        return ai2d_doc_to_text(doc, kwargs)
    if family == "textvqa":
        from lmms_eval.tasks.textvqa.utils import textvqa_doc_to_text

        return textvqa_doc_to_text(doc, kwargs)
    return getattr(UTILS, f"{family}_doc_to_text")(doc, kwargs)


def score(family: str, doc: dict[str, Any], response: str, long: bool) -> float:
    """The local task's score of one response (its process_results' first metric)."""
    name = {"mathvista": "mathvista_process_results", "mathverse": "mathverse_process_results"}.get(
        family, f"{family}_long_process_results" if long else f"{family}_process_results"
    )
    fields = copy.deepcopy({k: v for k, v in doc.items() if not isinstance(v, Image.Image)})  # TextVQA's scorer edits answers
    return next(iter(getattr(UTILS, name)(fields, [response]).values()))


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Each family built twice with the same seed, with one and with two drawing processes."""
    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for family in FAMILY_NAMES:
        a, b = root / family / "a", root / family / "b"
        build_family_dataset(get_family(family), a, N_TRAIN, N_TEST, seed=3, image_size=IMAGE_SIZE, workers=1, progress=False)
        build_family_dataset(get_family(family), b, N_TRAIN, N_TEST, seed=3, image_size=IMAGE_SIZE, workers=2, write_parquet=False, progress=False)
        dirs[family] = (a, b)
    return dirs


def records(folder: Path, split: str) -> list[dict[str, Any]]:
    return json.loads((folder / f"llava_{split}.json").read_text())


def eval_docs(folder: Path, family: str) -> list[dict[str, Any]]:
    from datasets import load_dataset

    return list(load_dataset("parquet", data_files={"test": str(folder / get_family(family).parquet_name)})["test"])


# ---- determinism ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_same_seed_same_data_whatever_the_workers(family: str, family_dirs) -> None:
    a, b = family_dirs[family]
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        assert (a / f"llava_{split}.json").read_text() == (b / f"llava_{split}.json").read_text()
        pngs = sorted((a / "images" / split).iterdir())
        assert len(pngs) == n
        for png in pngs:
            assert png.read_bytes() == (b / "images" / split / png.name).read_bytes(), png


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_other_seed_other_data(family: str, family_dirs, tmp_path: Path) -> None:
    build_family_dataset(get_family(family), tmp_path, N_TRAIN, 0, seed=4, image_size=IMAGE_SIZE, progress=False)
    assert (tmp_path / "llava_train.json").read_text() != (family_dirs[family][0] / "llava_train.json").read_text()


# ---- formats ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_llava_conversations(family: str, family_dirs) -> None:
    root = family_dirs[family][0]
    train = records(root, "train")
    assert len({r["id"] for r in train}) == len(train)
    for record in train:
        assert (root / record["image"]).is_file()
        human, gpt = record["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert human["value"].startswith(IMAGE_PREFIX) and human["value"].count("<image>") == 1
        assert record["family"] == family and record["question_type"] in get_family(family).problems
        if record["style"] == "short":
            assert gpt["value"] == record["answer"]
        else:
            assert gpt["value"].endswith(ANSWER_LINE + record["answer"])
    test = [r for r in records(root, "test") if r["style"] == "short"]
    problems = get_family(family).problems
    if family == "mathverse":  # four versions of each problem in a row
        assert [r["question_type"] for r in test] == [problems[i // len(VERSIONS) % len(problems)] for i in range(N_TEST)]
        assert [r["problem_version"] for r in test] == [VERSIONS[i % len(VERSIONS)] for i in range(N_TEST)]
    else:  # balanced: the problems in turn
        assert [r["question_type"] for r in test] == [problems[i % len(problems)] for i in range(N_TEST)]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_long_answers_are_long(family: str, family_dirs) -> None:
    long = [r["conversations"][1]["value"] for r in records(family_dirs[family][0], "train") if r["style"] == "long"]
    mean_words = sum(len(text.split()) for text in long) / len(long)
    assert mean_words >= MIN_MEAN_LONG_WORDS, f"{family}: long answers average {mean_words:.1f} words"


def test_mathvista_schema(family_dirs) -> None:
    docs = eval_docs(family_dirs["mathvista"][0], "mathvista")
    assert len(docs) == N_TEST
    for doc in docs:
        assert {"pid", "question", "image", "decoded_image", "choices", "unit", "precision", "answer", "question_type",
                "answer_type", "query", "metadata"} <= set(doc)  # fmt: skip
        assert isinstance(doc["pid"], str) and isinstance(doc["question"], str) and isinstance(doc["query"], str)
        assert doc["decoded_image"].size == (IMAGE_SIZE, IMAGE_SIZE)
        assert set(doc["metadata"]) == {"split", "language", "source", "category", "task", "context", "grade", "skills"}
        assert isinstance(doc["metadata"]["skills"], list)
        if doc["question_type"] == "multi_choice":
            assert doc["answer_type"] == "text" and doc["answer"] in doc["choices"] and len(doc["choices"]) == 4
        else:
            assert doc["question_type"] == "free_form" and doc["choices"] is None
            assert doc["answer_type"] in ("integer", "float")
            assert (doc["precision"] == 1) == (doc["answer_type"] == "float")
            float(doc["answer"])


def test_ai2d_schema(family_dirs) -> None:
    for doc in eval_docs(family_dirs["ai2d"][0], "ai2d"):
        assert {"question", "options", "answer", "image"} <= set(doc)
        assert isinstance(doc["question"], str) and len(doc["options"]) == 4 and all(isinstance(o, str) for o in doc["options"])
        assert isinstance(doc["answer"], str) and 0 <= int(doc["answer"]) < 4
        assert doc["image"].size == (IMAGE_SIZE, IMAGE_SIZE)
        if doc["problem"] == "food_chain":  # the answer and three of its kind: the question alone gives 1/4
            assert set(doc["options"]) <= set(PRODUCERS) or set(doc["options"]) <= set(CONSUMERS), doc["options"]
            assert len(set(doc["options"])) == 4


def test_mathverse_schema_and_versions(family_dirs) -> None:
    docs = eval_docs(family_dirs["mathverse"][0], "mathverse")
    for doc in docs:
        assert {"sample_index", "problem_index", "problem_version", "question", "image", "answer", "question_type",
                "metadata", "query_wo", "query_cot", "question_for_eval"} <= set(doc)  # fmt: skip
        assert isinstance(doc["sample_index"], str) and isinstance(doc["problem_index"], str)
        assert doc["question_type"] in ("multi-choice", "free-form") and doc["problem_version"] in VERSIONS
        assert set(doc["metadata"]) == {"split", "source", "subject", "subfield"}
    for start in range(0, N_TEST, len(VERSIONS)):  # one problem in four versions
        group = docs[start : start + len(VERSIONS)]
        assert len({d["problem_index"] for d in group}) == 1 and len({d["answer"] for d in group}) == 1
        by_version = {d["problem_version"]: d for d in group}
        full = by_version["Text Dominant"]["question"]
        assert full == by_version["Vision Only"]["question_for_eval"]
        assert by_version["Vision Only"]["question"] == ""
        assert by_version["Vision Only"]["query_wo"].startswith("According to the question shown in the image, please")
        stated = full.split("\nChoices:")[0]
        hidden = by_version["Vision Dominant"]["question"].split("\nChoices:")[0]
        assert re.search(r"\d", stated) and not re.search(r"\d", hidden), (stated, hidden)  # the values left the text
    images = {d["problem_version"]: d["image"].tobytes() for d in docs[: len(VERSIONS)]}
    assert images["Text Dominant"] == images["Text Lite"] != images["Vision Dominant"] != images["Vision Only"]


def test_textvqa_schema(family_dirs) -> None:
    for doc in eval_docs(family_dirs["textvqa"][0], "textvqa"):
        assert {"question_id", "question", "image_id", "image", "image_classes", "image_width", "image_height", "answers",
                "question_tokens", "ocr_tokens", "ocr_info", "set_name", "answer"} <= set(doc)  # fmt: skip
        assert isinstance(doc["question_id"], int) and isinstance(doc["question"], str)
        assert len(doc["answers"]) == 10 and all(isinstance(a, str) for a in doc["answers"])
        assert doc["answer"] in [token.lower() for token in doc["ocr_tokens"]]  # the answer is written in the image
        assert [info["word"] for info in doc["ocr_info"]] == doc["ocr_tokens"]
        for info in doc["ocr_info"]:  # inside the image, and at least 30 px tall on the 336-px canvas (two 14-px patches)
            box = info["bounding_box"]
            assert 0 <= box["top_left_x"] and box["top_left_x"] + box["width"] <= 1, box
            assert 0 <= box["top_left_y"] and box["top_left_y"] + box["height"] <= 1, box
            assert box["height"] * DESIGN_SIZE >= 30, box


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_parquet_rows_match_the_conversations(family: str, family_dirs) -> None:
    root = family_dirs[family][0]
    docs = eval_docs(root, family)
    test = records(root, "test")
    column = get_family(family).image_column
    for doc, short, long in zip(docs, test[::2], test[1::2]):
        assert short["id"] == long["id"].replace("-long", "-short") and doc["short_answer"] == short["answer"]
        assert doc["long_answer"] == long["conversations"][1]["value"]
        with Image.open(root / short["image"]) as png:
            assert doc[column].convert("RGB").tobytes() == png.convert("RGB").tobytes()


# ---- prompts and scores -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_training_prompts_are_the_tasks_prompts(family: str, family_dirs) -> None:
    root = family_dirs[family][0]
    test = records(root, "test")
    for doc, short, long in zip(eval_docs(root, family), test[::2], test[1::2]):
        assert short["conversations"][0]["value"] == IMAGE_PREFIX + doc_to_text(family, doc, f"msd_{family}_synth")
        assert long["conversations"][0]["value"] == IMAGE_PREFIX + doc_to_text(family, doc, f"msd_{family}_synth_long")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_generated_answers_score_one(family: str, family_dirs) -> None:
    for doc in eval_docs(family_dirs[family][0], family):
        assert score(family, doc, doc["short_answer"], long=False) == 1.0, doc["id"]
        assert score(family, doc, doc["long_answer"], long=True) == 1.0, doc["id"]


def test_mathvista_prompt_worked_example() -> None:
    free = {"question": "What is the perimeter of the rectangle?", "unit": "cm", "choices": None, "precision": None,
            "question_type": "free_form", "answer_type": "integer"}  # fmt: skip
    assert UTILS.mathvista_doc_to_text(free, {"shot_type": "format-prompt", "shot": 0}) == (
        "What is the perimeter of the rectangle? (Unit: cm)\nAnswer the question using a single integer number."
    )
    choice = {"question": "What is the value of x in the triangle?", "unit": None, "choices": ["40", "50"], "precision": None,
              "question_type": "multi_choice", "answer_type": "text"}  # fmt: skip
    assert UTILS.mathvista_doc_to_text(choice, {"shot_type": "reason-first", "shot": 0}) == (
        "First perform reasoning, then finally select the question from the choices in the following format: Answer: xxx.\n"
        "Question: What is the value of x in the triangle?\nChoices:\n(A) 40\n(B) 50"
    )
    assert UTILS.mathvista_doc_to_text(choice, {"shot_type": "format-prompt", "shot": 0}) == (
        "What is the value of x in the triangle?\nA. 40\nB. 50\nAnswer with the option's letter from the given choices directly."
    )


def test_mathvista_scorer_worked_examples() -> None:
    choice = {"question_type": "multi_choice", "answer_type": "text", "choices": ["40", "50", "60", "70"], "precision": None, "answer": "60"}
    for response, expected in (("C", 1.0), ("(C) 60", 1.0), ("x = 60, choice (C).\nAnswer: C", 1.0), ("60", 1.0), ("B", 0.0), ("59", 0.0)):
        assert UTILS.mathvista_process_results(choice, [response]) == {"accuracy": expected}, response
    integer = {"question_type": "free_form", "answer_type": "integer", "choices": None, "precision": None, "answer": "22"}
    for response, expected in (("22", 1.0), ("22.0", 1.0), ("2 * 11 = 22.\nAnswer: 22", 1.0), ("22 cm", 0.0), ("23", 0.0)):
        assert UTILS.mathvista_process_results(integer, [response]) == {"accuracy": expected}, response
    real = {"question_type": "free_form", "answer_type": "float", "choices": None, "precision": 1, "answer": "13.5"}
    for response, expected in (("13.50", 1.0), ("13.5", 1.0), ("13", 0.0)):
        assert UTILS.mathvista_process_results(real, [response]) == {"accuracy": expected}, response


def test_mathverse_scorer_worked_examples() -> None:
    question = "Find angle C.\nChoices:\nA:60°\nB:70°"
    choice = {"question_type": "multi-choice", "answer": "B", "question_for_eval": question, "problem_version": "Vision Only"}
    for response, expected in (("B", 1.0), ("Answer: (B)", 1.0), ("so C = 70°.\nAnswer: B. 70°", 1.0), ("70°", 1.0), ("A", 0.0), ("60°", 0.0)):
        assert UTILS.mathverse_process_results(choice, [response]) == {"accuracy": expected, "vision_only": expected}, response
    free = {"question_type": "free-form", "answer": "13", "question_for_eval": "Find AB.", "problem_version": "Text Lite"}
    for response, expected in (("13", 1.0), ("13.0", 1.0), ("AB = 13.\nAnswer: 13", 1.0), ("12", 0.0)):
        assert UTILS.mathverse_process_results(free, [response]) == {"accuracy": expected, "text_lite": expected}, response


def test_ai2d_scorer_worked_examples() -> None:
    doc = {"question": "Which part is labeled 1?", "options": ["thorax", "head", "abdomen", "leg"], "answer": "1"}  # B
    for response, expected in (("B", 1.0), ("B. head", 1.0), ("b", 1.0), ("C", 0.0), ("head", 0.0)):
        assert UTILS.ai2d_process_results(doc, [response]) == {"exact_match": expected}, response
    assert UTILS.ai2d_long_process_results(doc, ["Label 1 points to the head.\nAnswer: B"]) == {"exact_match": 1.0}
    assert UTILS.ai2d_long_process_results(doc, ["Label 1 points to the leg.\nAnswer: D"]) == {"exact_match": 0.0}


def test_ai2d_long_answer_worked_example() -> None:
    """The explanation reads every option as "<name> is option <letter>" before naming the answer's."""
    from lmms_msd.testbed.families.ai2d import long_answer

    reason = "The arrow from the fox points to the owl, so the fox is eaten by the owl"
    assert long_answer(reason, ["hawk", "owl", "snake", "frog"], 1) == (
        "The arrow from the fox points to the owl, so the fox is eaten by the owl. Reading the options: hawk is "
        "option A, owl is option B, snake is option C and frog is option D. So owl is option B.\nAnswer: B"
    )


def test_textvqa_vqa_accuracy_worked_examples() -> None:
    # VQA accuracy: the mean over the ten leave-one-out sets of min(1, matches among the other nine / 3),
    # after EvalAIAnswerProcessor (lower case, punctuation and articles dropped).
    slip = {"question_id": 0, "answers": ["stop"] * 9 + ["sto"]}
    assert UTILS.textvqa_process_results(dict(slip, answers=list(slip["answers"])), ["STOP"]) == {"exact_match": 1.0}
    assert UTILS.textvqa_process_results(dict(slip, answers=list(slip["answers"])), ["The stop."]) == {"exact_match": 1.0}
    # "sto": 9 sets of nine holding the one "sto" give 1/3, the set without it 0 -> 9 * (1/3) / 10 = 0.3
    assert UTILS.textvqa_process_results(dict(slip, answers=list(slip["answers"])), ["sto"])["exact_match"] == pytest.approx(0.3, abs=1e-12)
    # two "cafe" among ten: the 2 sets without one of them see 1 -> 1/3, the 8 others see 2 -> 2/3: (2/3 + 16/3) / 10 = 0.6
    split = {"question_id": 1, "answers": ["cafe"] * 2 + ["coffee"] * 8}
    assert UTILS.textvqa_process_results(split, ["Cafe"])["exact_match"] == pytest.approx(0.6, abs=1e-12)
    assert UTILS.textvqa_process_results({"question_id": 2, "answers": ["stop"] * 10}, ["go"]) == {"exact_match": 0.0}
    assert UTILS.textvqa_long_process_results({"question_id": 3, "answers": ["42"] * 10}, ["The tag shows 42.\nAnswer: 42"]) == {"exact_match": 1.0}


# ---- the command ---------------------------------------------------------------------------------------
def test_make_data_all_writes_the_mix(tmp_path: Path) -> None:
    from lmms_msd.commands.cli import main

    out = tmp_path / "mix"
    assert main(["make-data", "--family", "all", "--out", str(out), "--n", "2", "--n-test", "3", "--seed", "1", "--no-parquet"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["mix"] == ["charts", *FAMILY_NAMES] and meta["image_size"] == 336
    train = records(out, "train")
    assert {r["family"] for r in train} == set(meta["mix"])
    assert len({r["id"] for r in train}) == len(train)
    for record in train + records(out, "test"):
        assert record["image"].startswith(record["family"] + "/") and (out / record["image"]).is_file()
    for family in meta["mix"]:
        assert len([r for r in train if r["family"] == family]) == len(records(out / family, "train"))
        assert json.loads((out / family / "meta.json").read_text())["image_size"] == 336


def test_make_charts_alias_keeps_its_options(tmp_path: Path) -> None:
    from lmms_msd.commands.cli import main

    assert main(["make-charts", "--out", str(tmp_path), "--n-train", "2", "--n-test", "0", "--image-size", "64", "--no-parquet"]) == 0
    assert json.loads((tmp_path / "meta.json").read_text())["image_size"] == 64


# ---- lmms-eval ---------------------------------------------------------------------------------------------
try:
    metadata.distribution("lmms-msd")
    INSTALLED = True
except metadata.PackageNotFoundError:
    INSTALLED = False


@pytest.mark.skipif(not INSTALLED, reason="lmms-msd is not installed (pip install .): lmms-eval finds the model through its entry point")
def test_lmms_eval_runs_a_family_task_offline(tmp_path: Path) -> None:
    from lmms_msd.commands.lmms_eval_runs import run_lmms_eval

    run = run_lmms_eval(tmp_path / "out", "msd_ai2d_synth", include_path=TASKS, limit=2,
                        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})  # fmt: skip
    result = run.results["results"]["msd_ai2d_synth"]
    assert 0.0 <= result["exact_match,none"] <= 1.0
    assert run.stats["tasks"]["msd_ai2d_synth"]["summary"]["samples"] == 2


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_committed_eval_data_is_the_generators(family: str, tmp_path: Path) -> None:
    """tasks/data/<family>_test.parquet is `make-data --family <family> --n 0 --n-test 60 --seed 0`'s (its
    first documents redrawn; the images are left out, as FreeType releases may rasterise glyphs differently)."""
    from datasets import load_dataset

    committed = load_dataset("parquet", data_files={"test": str(TASKS / "data" / get_family(family).parquet_name)})["test"]
    assert len(committed) == 60
    build_family_dataset(get_family(family), tmp_path, 0, 4, seed=0, progress=False)
    column = get_family(family).image_column
    for fresh, kept in zip(eval_docs(tmp_path, family), committed):
        assert {k: v for k, v in fresh.items() if k != column} == {k: v for k, v in kept.items() if k != column}
        assert kept[column].size == (336, 336)
