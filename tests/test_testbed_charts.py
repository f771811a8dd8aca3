"""The synthetic chart data: answers read off the chart, determinism, and both output formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmms_msd.testbed.charts import (
    IMAGE_PREFIX,
    LONG_INSTRUCTION,
    PIE_TOTAL,
    QUESTION_TYPES,
    SHORT_INSTRUCTION,
    Chart,
    build_chart_dataset,
    draw_chart,
    make_qa,
    pie_values,
    random_chart,
)

IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def chart_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same seed built twice, with one and with two drawing processes."""
    root = tmp_path_factory.mktemp("charts")
    a = root / "a"
    b = root / "b"
    build_chart_dataset(a, n_train=8, n_test=6, seed=3, image_size=IMAGE_SIZE, workers=1, progress=False)
    build_chart_dataset(b, n_train=8, n_test=6, seed=3, image_size=IMAGE_SIZE, workers=2, write_parquet=False, progress=False)
    return a, b


def test_answers_are_read_off_the_chart() -> None:
    chart = Chart("bar", ("red", "blue", "green"), (40, 15, 35))
    rng = np.random.default_rng(0)
    largest = make_qa(chart, "largest", rng)
    assert (largest.question, largest.answer) == ("Which colour has the largest value?", "red")
    assert largest.long_answer == (
        "This is a bar chart with 3 bars. The red bar is 40, the blue bar is 15 and the green bar is 35. "
        "The largest value is 40, which belongs to the red bar.\nAnswer: red"
    )
    assert make_qa(chart, "smallest", rng).answer == "blue"
    assert make_qa(chart, "count", rng).answer == "3"
    assert make_qa(chart, "chart_type", rng).answer == "bar"
    value = make_qa(chart, "value", rng)
    colour = value.question.removeprefix("What is the value of the ").split()[0]
    assert value.answer == str(chart.value_of(colour))
    compare = make_qa(chart, "compare", rng)
    a, b = compare.question.removeprefix("Is the ").split(" bar larger than the ")
    assert compare.answer == ("Yes" if chart.value_of(a) > chart.value_of(b.split()[0]) else "No")
    for kind in QUESTION_TYPES:
        qa = make_qa(chart, kind, rng)
        assert qa.long_answer.endswith(f"\nAnswer: {qa.answer}")
        assert qa.chartqa_type in ("human_test", "augmented_test")


def test_random_charts_are_valid() -> None:
    rng = np.random.default_rng(1)
    charts = [random_chart(rng) for _ in range(200)]
    assert {chart.kind for chart in charts} == {"bar", "line", "pie"}
    for chart in charts:
        assert 3 <= len(chart.values) <= 5
        assert len(set(chart.colours)) == len(chart.colours)
        if chart.kind == "pie":
            assert sum(chart.values) == PIE_TOTAL
    assert sum(pie_values(np.random.default_rng(2), 5)) == PIE_TOTAL


def test_images_are_square_rgb_pngs() -> None:
    import io

    from PIL import Image

    for kind, values in (("bar", (5, 60, 30)), ("line", (10, 20, 30, 40)), ("pie", (50, 30, 20))):
        png = draw_chart(Chart(kind, ("red", "blue", "green", "orange")[: len(values)], values), IMAGE_SIZE)
        image = Image.open(io.BytesIO(png))
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (IMAGE_SIZE, IMAGE_SIZE))


def test_same_seed_same_data_whatever_the_workers(chart_dirs: tuple[Path, Path]) -> None:
    a, b = chart_dirs
    for split in ("train", "test"):
        assert (a / f"llava_{split}.json").read_text() == (b / f"llava_{split}.json").read_text()
        pngs = sorted((a / "images" / split).iterdir())
        assert len(pngs) == (8 if split == "train" else 6)
        for png in pngs:
            assert png.read_bytes() == (b / "images" / split / png.name).read_bytes(), png


def test_other_seed_other_data(chart_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    build_chart_dataset(tmp_path, n_train=8, n_test=0, seed=4, image_size=IMAGE_SIZE, progress=False)
    assert (tmp_path / "llava_train.json").read_text() != (chart_dirs[0] / "llava_train.json").read_text()


def test_llava_conversation_format(chart_dirs: tuple[Path, Path]) -> None:
    root = chart_dirs[0]
    records = json.loads((root / "llava_train.json").read_text())
    assert len(records) == 8 * 2 * 2  # 2 questions per chart, a short and a long conversation each
    assert len({record["id"] for record in records}) == len(records)
    for record in records:
        assert {"id", "image", "conversations"} <= set(record)
        assert (root / record["image"]).is_file()
        human, gpt = record["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith(IMAGE_PREFIX) and human["value"].count("<image>") == 1
        instruction = SHORT_INSTRUCTION if record["style"] == "short" else LONG_INSTRUCTION
        assert human["value"].endswith(instruction)
        if record["style"] == "short":
            assert gpt["value"] == record["answer"]
        else:
            assert gpt["value"].endswith(f"\nAnswer: {record['answer']}")
            assert len(gpt["value"].split()) >= 25
    test = json.loads((root / "llava_test.json").read_text())
    assert [record["question_type"] for record in test[::2]] == list(QUESTION_TYPES)  # balanced, one per chart


def test_chartqa_parquet_splits(chart_dirs: tuple[Path, Path]) -> None:
    from datasets import load_dataset

    root = chart_dirs[0]
    llava = json.loads((root / "llava_test.json").read_text())
    for style in ("short", "long"):
        rows = load_dataset("parquet", data_files={"test": str(root / f"chartqa_{style}_test.parquet")})["test"]
        assert len(rows) == 6
        assert {"type", "question", "answer", "image", "question_type", "chart_type"} <= set(rows.column_names)
        assert ("long_answer" in rows.column_names) == (style == "long")
        row = rows[0]
        assert row["image"].size == (IMAGE_SIZE, IMAGE_SIZE)  # decoded to PIL by the Image feature
        assert row["type"] in ("human_test", "augmented_test")
        first = llava[0]
        assert row["answer"] == first["answer"] and row["question_type"] == first["question_type"]
        assert first["conversations"][0]["value"] == IMAGE_PREFIX + row["question"] + SHORT_INSTRUCTION
        assert row["image"].convert("RGB").tobytes() == _rgb(root / first["image"])


def _rgb(path: Path) -> bytes:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB").tobytes()
