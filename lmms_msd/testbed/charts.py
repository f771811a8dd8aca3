"""Synthetic charts with ChartQA-style questions, short and long answers: the testbed's data.

Each chart is a bar, line or pie chart of 3-5 categories; a category is a colour (its mark is drawn in
that colour and labelled with its name), its value an integer multiple of 5 (bars and points on a
fixed 0-65 axis, pie slices in percent of 100). The images are small (128 x 128 by default; `lmms-msd
make-data` draws them at 336 like the other families, the same figure at a higher resolution) with big,
high-contrast marks, so that a tiny vision tower trained from scratch can read them.

Questions (`question_type`) whose answers are read off the image:

    largest / smallest   "Which colour has the largest value?"        -> "red"
    value                "What is the value of the blue bar?"         -> "35"
    count                "How many slices does the chart have?"       -> "4"
    compare              "Is the red point larger than the green point?" -> "Yes"
    chart_type           "What type of chart is this?"                -> "pie"

Every question has a short answer (the answer alone) and a long one: a templated explanation that
lists every category and value, then the answer on a last line "Answer: <answer>", e.g.

    This is a bar chart with 3 bars. The red bar is 40, the blue bar is 15 and the green bar is 35.
    The largest value is 40, which belongs to the red bar.
    Answer: red

The long answers mix predictable template words with image-dependent colours and numbers: the regime
the calibrator is for. The instructions appended to the questions are the ones the local lmms-eval
tasks use (`SHORT_INSTRUCTION`, `LONG_INSTRUCTION`), so the target sees at evaluation what it saw in
training.

`build_chart_dataset` writes, under `out_dir`:

    images/{train,test}/NNNNNN.png   the charts (RGB PNG)
    llava_train.json                 LLaVA conversations (llava_v1_5_mix665k.json's format: id, image,
    llava_test.json                  conversations), one short and one long conversation per question,
                                     plus the fields question_type, chart_type, style, answer
    chartqa_short_test.parquet       ChartQA's schema (type, question, answer, image) + question_type,
    chartqa_long_test.parquet        chart_type, id (and long_answer in the long split); the image
                                     column is a datasets Image feature, as lmms-eval's loader expects
    meta.json                        settings and counts

Chart i of a split is drawn from `numpy.random.default_rng([seed, split, i])`: the same seed gives the
same charts, questions and images whatever the number of worker processes.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from lmms_msd.testbed.families.common import IMAGE_PREFIX, parallel_map, write_json

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # bump when a change alters the charts, questions or answers a seed gives (2: the figure scales with image_size)

# Fixed, distinct, high-contrast colours: the category names.
COLOURS: dict[str, str] = {
    "red": "#e41a1c",
    "blue": "#377eb8",
    "green": "#4daf4a",
    "orange": "#ff7f00",
    "purple": "#984ea3",
    "brown": "#a65628",
}
CHART_TYPES = ("bar", "line", "pie")
MARK_NOUNS = {"bar": "bar", "line": "point", "pie": "slice"}
QUESTION_TYPES = ("largest", "smallest", "value", "count", "compare", "chart_type")
# ChartQA's split label: value reading and comparisons stand for its human-written questions.
CHARTQA_TYPES = {
    "largest": "augmented_test",
    "smallest": "augmented_test",
    "value": "human_test",
    "count": "augmented_test",
    "compare": "human_test",
    "chart_type": "augmented_test",
}
MIN_CATEGORIES, MAX_CATEGORIES = 3, 5
VALUE_LEVELS = tuple(range(5, 61, 5))  # values of bars and points; pie slices too (summing to 100)
Y_MAX = 65  # fixed value axis: a bar's height in pixels tells its value
PIE_TOTAL = 100
FIGURE_INCHES = 1.28  # the figure's side; drawn at image_size / FIGURE_INCHES dpi, so a chart of any size is the
                      # 128 px chart (100 dpi) at another resolution: fonts, marks and layout scale together

# The prompts of the local lmms-eval tasks (tasks/msd_chartqa_synth*.yaml): lmms-eval's ChartQA
# short-answer instruction, and the long-answer task's request for an explanation.
SHORT_INSTRUCTION = "\nAnswer the question with a single word."
LONG_INSTRUCTION = (
    "\nFirst explain in one or two sentences how you read the answer from the chart. Then give the final "
    'answer, a single word or number, on the last line in the form "Answer: <answer>".'
)
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Chart:
    """What a chart shows; the image is drawn from it and the answers are read off it."""

    kind: str  # "bar" | "line" | "pie"
    colours: tuple[str, ...]  # the categories in drawing order: left to right, or clockwise from 12 o'clock
    values: tuple[int, ...]  # one per category, all different

    def __post_init__(self) -> None:
        assert self.kind in CHART_TYPES, f"unknown chart kind {self.kind!r}"
        assert len(self.colours) == len(self.values), f"{len(self.colours)} colours, {len(self.values)} values"
        assert len(set(self.values)) == len(self.values), f"values must differ: {self.values}"

    @property
    def noun(self) -> str:
        return MARK_NOUNS[self.kind]

    def value_of(self, colour: str) -> int:
        return self.values[self.colours.index(colour)]


@dataclass(frozen=True)
class QA:
    """One question about a chart, with its short and long answers."""

    question_type: str  # one of QUESTION_TYPES
    question: str  # without instruction
    answer: str  # the short answer, what ChartQA's relaxed accuracy compares against
    long_answer: str  # explanation, then "\nAnswer: <answer>"

    @property
    def chartqa_type(self) -> str:
        return CHARTQA_TYPES[self.question_type]


# ---- charts -------------------------------------------------------------------------------------------
def random_chart(rng: np.random.Generator) -> Chart:
    kind = CHART_TYPES[int(rng.integers(len(CHART_TYPES)))]
    n = int(rng.integers(MIN_CATEGORIES, MAX_CATEGORIES + 1))
    colours = tuple(str(c) for c in rng.choice(list(COLOURS), size=n, replace=False))
    values = pie_values(rng, n) if kind == "pie" else tuple(int(v) for v in rng.choice(VALUE_LEVELS, size=n, replace=False))
    return Chart(kind, colours, values)


def pie_values(rng: np.random.Generator, n: int) -> tuple[int, ...]:
    """n different values from VALUE_LEVELS summing to PIE_TOTAL (rejection sampling)."""
    levels = np.array(VALUE_LEVELS)
    for _ in range(10_000):
        head = [int(v) for v in rng.choice(levels, size=n - 1, replace=False)]
        last = PIE_TOTAL - sum(head)
        if last in VALUE_LEVELS and last not in head:
            return (*head, last)
    raise RuntimeError(f"found no {n} different values in {VALUE_LEVELS} summing to {PIE_TOTAL}")


def draw_chart(chart: Chart, image_size: int, value_labels: bool = False) -> bytes:
    """The chart as an RGB PNG of image_size x image_size pixels (matplotlib's Agg canvas, no pyplot
    state, so worker processes can draw in parallel). The figure is FIGURE_INCHES wide at any size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(FIGURE_INCHES, FIGURE_INCHES), dpi=image_size / FIGURE_INCHES, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    colours = [COLOURS[c] for c in chart.colours]
    if chart.kind == "pie":
        _draw_pie(fig, chart, colours, value_labels)
    else:
        _draw_axes_chart(fig, chart, colours, value_labels)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    assert rgba.shape == (image_size, image_size, 4), f"canvas {rgba.shape}, expected {image_size} px square"
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgba[..., :3])).save(buffer, format="PNG")
    return buffer.getvalue()


def _draw_axes_chart(fig: Any, chart: Chart, colours: list[str], value_labels: bool) -> None:
    ax = fig.add_axes((0.17, 0.13, 0.8, 0.84))
    x = np.arange(len(chart.values))
    if chart.kind == "bar":
        bars = ax.bar(x, chart.values, width=0.7, color=colours)
        if value_labels:
            ax.bar_label(bars, fontsize=5, padding=1)
    else:
        ax.plot(x, chart.values, color="#333333", linewidth=1.5, zorder=1)
        ax.scatter(x, chart.values, s=70, c=colours, zorder=2, edgecolors="none")
        if value_labels:
            for xi, value in zip(x, chart.values):
                ax.annotate(str(value), (xi, value), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=5)
    ax.set_xlim(-0.5, len(x) - 0.5)
    ax.set_ylim(0, Y_MAX)
    ax.set_yticks([0, 20, 40, 60])
    ax.set_xticks(x, labels=list(chart.colours))
    ax.tick_params(labelsize=5, length=2, pad=1)
    ax.tick_params(axis="x", labelsize=4.5)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _draw_pie(fig: Any, chart: Chart, colours: list[str], value_labels: bool) -> None:
    ax = fig.add_axes((0.03, 0.03, 0.94, 0.94))
    labels = [f"{c}\n{v}" for c, v in zip(chart.colours, chart.values)] if value_labels else list(chart.colours)
    ax.pie(
        chart.values,
        colors=colours,
        labels=labels,
        labeldistance=0.6,
        startangle=90,
        counterclock=False,
        wedgeprops={"linewidth": 1, "edgecolor": "white"},
        textprops={"fontsize": 5, "color": "white", "ha": "center", "va": "center"},
    )
    ax.set_aspect("equal")


# ---- questions and answers ------------------------------------------------------------------------------
def make_qa(chart: Chart, question_type: str, rng: np.random.Generator) -> QA:
    """One question of the given type about `chart` (rng picks the categories it names)."""
    noun, n = chart.noun, len(chart.values)
    if question_type in ("largest", "smallest"):
        pick = max if question_type == "largest" else min
        value = pick(chart.values)
        colour = chart.colours[chart.values.index(value)]
        question = f"Which colour has the {question_type} value?"
        answer = colour
        reason = f"The {question_type} value is {value}, which belongs to the {colour} {noun}."
    elif question_type == "value":
        colour = chart.colours[int(rng.integers(n))]
        question = f"What is the value of the {colour} {noun}?"
        answer = str(chart.value_of(colour))
        reason = f"So the value of the {colour} {noun} is {answer}."
    elif question_type == "count":
        question = f"How many {noun}s does the chart have?"
        answer = str(n)
        reason = f"Counting the {noun}s gives {n}."
    elif question_type == "compare":
        a, b = (chart.colours[int(i)] for i in rng.choice(n, size=2, replace=False))
        va, vb = chart.value_of(a), chart.value_of(b)
        question = f"Is the {a} {noun} larger than the {b} {noun}?"
        answer = "Yes" if va > vb else "No"
        relation = "larger" if va > vb else "smaller"
        negation = "" if va > vb else "not "
        reason = f"{va} is {relation} than {vb}, so the {a} {noun} is {negation}larger than the {b} {noun}."
    elif question_type == "chart_type":
        question = "What type of chart is this?"
        answer = chart.kind
        reason = f"The values are drawn as {noun}s, so it is a {chart.kind} chart."
    else:
        raise ValueError(f"unknown question_type {question_type!r}; valid ones: {list(QUESTION_TYPES)}")
    return QA(question_type, question, answer, f"{describe(chart)} {reason}\nAnswer: {answer}")


def describe(chart: Chart) -> str:
    """The explanation's opening: the chart type, then every category with its value, in drawing order."""
    noun = chart.noun
    items = [f"the {c} {noun} is {v}" for c, v in zip(chart.colours, chart.values)]
    listing = ", ".join(items[:-1]) + " and " + items[-1]
    return f"This is a {chart.kind} chart with {len(items)} {noun}s. {listing[0].upper()}{listing[1:]}."


def chart_questions(rng: np.random.Generator, split: str, index: int, questions_per_chart: int) -> list[str]:
    """Question types for chart `index`: random distinct ones in train, one per chart cycling through
    all types in test (so the held-out set is balanced by question type)."""
    if split == "test":
        return [QUESTION_TYPES[index % len(QUESTION_TYPES)]]
    picked = rng.choice(len(QUESTION_TYPES), size=questions_per_chart, replace=False)
    return [QUESTION_TYPES[int(i)] for i in picked]


# ---- one chart, in a worker --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChartJob:
    out_dir: str
    split: str
    index: int
    seed: int
    image_size: int
    questions_per_chart: int
    value_labels: bool

    @property
    def image_path(self) -> str:
        """Relative to out_dir, as LLaVA's conversation files name images."""
        return f"images/{self.split}/{self.index:06d}.png"


def make_chart(job: ChartJob) -> tuple[Chart, list[QA]]:
    """Draw chart `job.index` of `job.split`, write its PNG, return the chart and its questions."""
    rng = np.random.default_rng([job.seed, SPLITS.index(job.split), job.index])
    chart = random_chart(rng)
    qas = [make_qa(chart, kind, rng) for kind in chart_questions(rng, job.split, job.index, job.questions_per_chart)]
    (Path(job.out_dir) / job.image_path).write_bytes(draw_chart(chart, job.image_size, job.value_labels))
    return chart, qas


def conversations(job: ChartJob, chart: Chart, qas: list[QA]) -> Iterator[dict[str, Any]]:
    """LLaVA conversation records: a short and a long one per question."""
    for q, qa in enumerate(qas):
        for style, instruction, reply in (("short", SHORT_INSTRUCTION, qa.answer), ("long", LONG_INSTRUCTION, qa.long_answer)):
            yield {
                "id": f"{job.split}-{job.index:06d}-{q}-{style}",
                "image": job.image_path,
                "conversations": [
                    {"from": "human", "value": IMAGE_PREFIX + qa.question + instruction},
                    {"from": "gpt", "value": reply},
                ],
                "question_type": qa.question_type,
                "chart_type": chart.kind,
                "style": style,
                "answer": qa.answer,
            }


# ---- the data set ----------------------------------------------------------------------------------------
def build_chart_dataset(
    out_dir: str | Path,
    n_train: int,
    n_test: int,
    seed: int = 0,
    *,
    image_size: int = 128,
    questions_per_chart: int = 2,
    value_labels: bool = False,
    workers: int = 1,
    write_parquet: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Draw n_train + n_test charts and write every format (see the module docstring); returns meta.json's content.

    questions_per_chart: train only (test charts get one question each, balanced by type)
    workers: processes drawing charts (the output does not depend on it)
    write_parquet: the test parquet files need the `datasets` package; False skips them
    """
    if n_train < 0 or n_test < 0 or (n_train + n_test) == 0:
        raise ValueError(f"n_train={n_train}, n_test={n_test}: ask for at least one chart, and no negative counts")
    if not 1 <= questions_per_chart <= len(QUESTION_TYPES):
        raise ValueError(f"questions_per_chart must be in 1..{len(QUESTION_TYPES)}, got {questions_per_chart}")
    out = Path(out_dir)
    counts: dict[str, Any] = {}
    test_rows: list[dict[str, Any]] = []
    for split, n in (("train", n_train), ("test", n_test)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        jobs = [ChartJob(str(out), split, i, seed, image_size, questions_per_chart, value_labels) for i in range(n)]
        records: list[dict[str, Any]] = []
        for job, (chart, qas) in zip(jobs, parallel_map(make_chart, jobs, workers, progress, f"charts ({split})")):
            records.extend(conversations(job, chart, qas))
            if split == "test":
                test_rows.extend(_chartqa_row(job, chart, qa, q) for q, qa in enumerate(qas))
        write_json(out / f"llava_{split}.json", records)
        counts[split] = {"charts": n, "conversations": len(records)}
    if write_parquet and n_test:
        write_chartqa_parquet(out, test_rows)
    meta = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "questions_per_chart": questions_per_chart,
        "value_labels": value_labels,
        "short_instruction": SHORT_INSTRUCTION,
        "long_instruction": LONG_INSTRUCTION,
        "counts": counts,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("wrote %s: %s", out, counts)
    return meta


def _chartqa_row(job: ChartJob, chart: Chart, qa: QA, q: int) -> dict[str, Any]:
    return {
        "id": f"{job.split}-{job.index:06d}-{q}",
        "type": qa.chartqa_type,
        "question": qa.question,
        "answer": qa.answer,
        "long_answer": qa.long_answer,
        "question_type": qa.question_type,
        "chart_type": chart.kind,
        "image_path": job.image_path,
    }


def write_chartqa_parquet(out: Path, rows: list[dict[str, Any]]) -> None:
    """chartqa_short_test.parquet and chartqa_long_test.parquet, ChartQA's columns first; the image
    column is a datasets Image feature ({"bytes": PNG, "path": None}) so lmms-eval's parquet loader
    returns PIL images."""
    try:
        from datasets import Dataset, Features, Image, Value
    except ImportError as error:
        raise ImportError(
            "writing the ChartQA parquet files needs the `datasets` package (pip install datasets); "
            "or pass write_parquet=False (--no-parquet) to write the LLaVA conversation files only"
        ) from error
    for style in ("short", "long"):
        names = ["type", "question", "answer", "question_type", "chart_type", "id"] + (["long_answer"] if style == "long" else [])
        columns: dict[str, list[Any]] = {name: [row[name] for row in rows] for name in names}
        columns["image"] = [{"bytes": (out / row["image_path"]).read_bytes(), "path": None} for row in rows]
        features = Features({**{name: Value("string") for name in names}, "image": Image()})
        Dataset.from_dict(columns, features=features).to_parquet(str(out / f"chartqa_{style}_test.parquet"))


def read_conversations(data_dir: str | Path, split: str) -> list[dict[str, Any]]:
    """The LLaVA conversation records of a split (`llava_{split}.json`)."""
    path = Path(data_dir) / f"llava_{split}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no {path.name} in {data_dir}; build the chart data first: lmms-msd make-charts --out {data_dir}"
        )
    return json.loads(path.read_text())


def load_records(data_dir: str | Path, split: str, style: str, limit: int) -> list[dict[str, Any]]:
    """The first `limit` (0: all) conversation records of a split whose answer style is `style` ("all":
    every record): what `lmms-msd calibrate` and `bench` decode."""
    path = Path(data_dir) / f"llava_{split}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no {path.name} in {data_dir}; write a data folder with `lmms-msd make-charts --out {data_dir}` "
            "or pick another --split"
        )
    records = json.loads(path.read_text())
    if style != "all":
        records = [r for r in records if r.get("style", style) == style]
    if not records:
        raise ValueError(f"{path} has no records of style {style!r}; use --style all")
    return records[:limit] if limit else records


def record_images(data_dir: str | Path, record: dict[str, Any]) -> list[Image.Image]:
    """The record's image as RGB, or none for a text-only record."""
    if not record.get("image"):
        return []
    with Image.open(Path(data_dir) / record["image"]) as image:
        return [image.convert("RGB")]


def question_of(record: dict[str, Any]) -> str:
    """The first human turn without the `<image>` placeholder (the prompt format adds it back)."""
    turns = record.get("conversations") or []
    if not turns or turns[0].get("from") != "human":
        raise ValueError(f"record {record.get('id')!r} does not start with a human turn")
    return turns[0]["value"].replace("<image>", "").strip()


# ---- command line ---------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    parser.add_argument("--out", required=True, help="output folder (images/, llava_*.json, chartqa_*_test.parquet, meta.json)")
    parser.add_argument("--n-train", type=int, default=40_000, help="training charts (default 40000)")
    parser.add_argument("--n-test", type=int, default=300, help="held-out charts, one question each (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=128, help="pixels per side (default 128)")
    parser.add_argument("--questions-per-chart", type=int, default=2, help="training questions per chart (default 2)")
    parser.add_argument("--value-labels", action="store_true", help="print the values on the marks")
    parser.add_argument("--workers", type=int, default=1, help="drawing processes (default 1)")
    parser.add_argument("--no-parquet", action="store_true", help="skip the ChartQA parquet files (no `datasets` needed)")
    return _run


def _run(args: argparse.Namespace) -> int:
    build_chart_dataset(
        args.out, args.n_train, args.n_test, args.seed,
        image_size=args.image_size, questions_per_chart=args.questions_per_chart, value_labels=args.value_labels,
        workers=args.workers, write_parquet=not args.no_parquet,
    )
    return 0

