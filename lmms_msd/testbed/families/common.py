"""What the synthetic task families share: the question record, seeded generators, drawing helpers
(fonts, rotated text, arrows), and the writer of a family's data folder.

A family is a module with a `FAMILY` (`Family`): a name, a seed code, its problem templates and a
`sample(seed, split, index, image_size)` that returns one image and its questions. `build_family_dataset`
turns it into the folder layout `lmms_msd.testbed.charts` writes for the charts:

    images/{train,test}/NNNNNN.png   the images (RGB PNG)
    llava_train.json, llava_test.json
                                     LLaVA conversations (id, image, conversations), a short and a long
                                     one per question, plus family, question_type (the problem template),
                                     style, answer (the short reply) and the family's extra fields
    <family>_test.parquet            the eval split in the real benchmark's document schema, one row per
                                     test question, plus id, problem, short_answer and long_answer;
                                     the image column is a datasets Image feature (both the short and the
                                     long lmms-eval task read this one file)
    meta.json                        settings and counts

Image `index` of a split is drawn from `numpy.random.default_rng([seed, family code, split, index])`,
so the output depends on the seed alone, not on the number of worker processes. The images are drawn
on a DESIGN_SIZE (336 px, LLaVA-1.5's input) canvas, with text at least 18 px high, and resized when
another size is asked for. Fonts are PIL's bundled default (Aileron) and the DejaVu faces matplotlib
ships, so every machine with the package's dependencies has them; glyphs are rasterised by FreeType,
so PNG bytes can differ between FreeType releases (not between runs on one machine).
"""

from __future__ import annotations

import io
import json
import logging
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

GENERATOR_VERSION = 3  # bump when a change alters the images, questions or answers a seed gives (2: text and cues sized for the testbed, templated explanations; 3: AI2D explanations read the options before the letter)
DESIGN_SIZE = 336  # the canvas every family draws on (LLaVA-1.5's image side)
IMAGE_PREFIX = "<image>\n"  # where LLaVA's conversations put the image
SPLITS = ("train", "test")
ANSWER_LINE = "\nAnswer: "  # a long answer ends with this, then the short answer
OPTION_LETTERS = "ABCDEFGH"

# name -> file in matplotlib's mpl-data/fonts/ttf (None: PIL's bundled default font, Aileron Regular)
FONT_FILES: dict[str, str | None] = {
    "aileron": None,
    "sans": "DejaVuSans.ttf",
    "sans-bold": "DejaVuSans-Bold.ttf",
    "sans-oblique": "DejaVuSans-Oblique.ttf",
    "serif": "DejaVuSerif.ttf",
    "serif-bold": "DejaVuSerif-Bold.ttf",
    "mono-bold": "DejaVuSansMono-Bold.ttf",
}
BLACK = (0, 0, 0)
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class Question:
    """One question about an image: the benchmark document it is evaluated as, and the two training
    conversations (short and long) it gives."""

    problem: str  # the problem template, one of the family's `problems`
    short_prompt: str  # the short task's prompt for `doc` (what lmms-eval's doc_to_text returns), no "<image>\n"
    long_prompt: str  # the long task's prompt for `doc`
    answer: str  # the short reply (an option letter for multiple choice)
    long_answer: str  # an explanation, then ANSWER_LINE + answer
    doc: dict[str, Any]  # the eval document in the benchmark's schema, without its image column
    extra: dict[str, Any] = field(default_factory=dict)  # family fields copied into the conversation records

    def __post_init__(self) -> None:
        assert self.long_answer.endswith(ANSWER_LINE + self.answer), f"long answer must end with the answer line: {self.long_answer!r}"
        assert "<image>" not in self.short_prompt + self.long_prompt, "prompts carry no image placeholder"


Sampler = Callable[[int, str, int], tuple[Image.Image, list[Question]]]


@dataclass(frozen=True)
class Family:
    """A task family: `sample(seed, split, index)` draws image `index` of `split` on the DESIGN_SIZE canvas."""

    name: str  # also the parquet file's stem: <name>_test.parquet
    code: int  # mixed into the seed, so families given one seed draw independent streams
    problems: tuple[str, ...]  # the problem templates; the test split cycles through them
    image_column: str  # the benchmark's image column ("image"; MathVista's is "decoded_image")
    sample: Sampler

    @property
    def parquet_name(self) -> str:
        return f"{self.name}_test.parquet"


def family_rng(family: Family, seed: int, split: str, key: int) -> np.random.Generator:
    """The generator of item `key` of `split` (an image, or for MathVerse's test split a problem)."""
    return np.random.default_rng([seed, family.code, SPLITS.index(split), key])


def pick_problems(rng: np.random.Generator, problems: Sequence[str], split: str, index: int, k: int) -> list[str]:
    """The problem templates of image `index`: in test one, cycling through all (a held-out set balanced
    by template); in train k distinct random ones."""
    if split == "test":
        return [problems[index % len(problems)]]
    return [problems[int(i)] for i in rng.choice(len(problems), size=k, replace=False)]


def pick(rng: np.random.Generator, items: Sequence[Any], k: int | None = None) -> Any:
    """One item (k=None) or k distinct items of `items`, chosen by rng."""
    if k is None:
        return items[int(rng.integers(len(items)))]
    return [items[int(i)] for i in rng.choice(len(items), size=k, replace=False)]


def join_words(words: Sequence[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def numeric_options(rng: np.random.Generator, answer: int, step: int, low: int, n: int = 4) -> tuple[list[int], int]:
    """n different integers at multiples of `step` around `answer`, none below `low`, in increasing
    order, with the answer at a random place; returns them and the answer's index."""
    below = int(rng.integers(0, n))
    below = min(below, (answer - low) // step)  # no option below `low`
    values = [answer + step * (i - below) for i in range(n)]
    return values, below


# ---- drawing ------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """Font `name` (a key of FONT_FILES) at `size` px."""
    if name not in FONT_FILES:
        raise ValueError(f"unknown font {name!r}; known: {sorted(FONT_FILES)}")
    file = FONT_FILES[name]
    if file is None:
        return ImageFont.load_default(size=size)
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / file), size)


def text_box(text: str, face: ImageFont.FreeTypeFont) -> tuple[int, int]:
    """Width and height in px of `text` drawn with `face`."""
    left, top, right, bottom = face.getbbox(text)
    return right - left, bottom - top


def draw_text(
    image: Image.Image, center: tuple[float, float], text: str, face: ImageFont.FreeTypeFont,
    fill: tuple[int, int, int], angle: float = 0.0,
) -> tuple[int, int, int, int]:  # fmt: skip
    """Draw `text` centred at `center`, turned `angle` degrees counter-clockwise; returns its box
    (left, top, right, bottom) in px."""
    left, top, right, bottom = face.getbbox(text)
    pad = 2
    layer = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad), (*fill, 0))
    ImageDraw.Draw(layer).text((pad - left, pad - top), text, font=face, fill=(*fill, 255))
    if angle:
        layer = layer.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    x0, y0 = round(center[0] - layer.width / 2), round(center[1] - layer.height / 2)
    image.paste(layer, (x0, y0), layer)
    return x0, y0, x0 + layer.width, y0 + layer.height


def arrow(draw: ImageDraw.ImageDraw, start: tuple[float, float], end: tuple[float, float], fill: tuple[int, int, int], width: int = 3, head: float = 13.0) -> None:
    """A line from start to end with a filled triangular head at end."""
    angle = math.atan2(end[1] - start[1], end[0] - start[0])
    base = (end[0] - head * math.cos(angle), end[1] - head * math.sin(angle))
    draw.line([start, base], fill=fill, width=width)
    spread = head * 0.55
    left = (base[0] + spread * math.sin(angle), base[1] - spread * math.cos(angle))
    right = (base[0] - spread * math.sin(angle), base[1] + spread * math.cos(angle))
    draw.polygon([end, left, right], fill=fill)


def apex(a: int, b: int) -> tuple[float, float]:
    """The third corner of the triangle on the unit base (0,0)-(1,0) with angles a and b (degrees) at
    its ends, y pointing down (above the base is negative y)."""
    ra, rb = math.radians(a), math.radians(b)
    t = math.sin(rb) / math.sin(ra + rb)
    return t * math.cos(ra), -t * math.sin(ra)


def fit(points: list[tuple[float, float]], box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    """The points scaled (one factor) and moved to fill box (left, top, right, bottom), centred."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    scale = min((box[2] - box[0]) / (max(xs) - min(xs)), (box[3] - box[1]) / (max(ys) - min(ys)))
    dx = box[0] + ((box[2] - box[0]) - scale * (max(xs) - min(xs))) / 2 - scale * min(xs)
    dy = box[1] + ((box[3] - box[1]) - scale * (max(ys) - min(ys))) / 2 - scale * min(ys)
    return [(scale * x + dx, scale * y + dy) for x, y in points]


def inside(corners: list[tuple[float, float]], corner: tuple[float, float], clearance: float) -> tuple[float, float]:
    """A point on the bisector of the angle at `corner`, into the polygon, `clearance` px from both
    sides (at most 90 px from the corner)."""
    others = [c for c in corners if c != corner][:2]
    units = []
    for other in others:
        dx, dy = other[0] - corner[0], other[1] - corner[1]
        norm = math.hypot(dx, dy)
        units.append((dx / norm, dy / norm))
    bx, by = units[0][0] + units[1][0], units[0][1] + units[1][1]
    norm = math.hypot(bx, by)
    half_angle = math.acos(max(-1.0, min(1.0, units[0][0] * units[1][0] + units[0][1] * units[1][1]))) / 2
    distance = min(90.0, clearance / math.sin(half_angle))
    return corner[0] + distance * bx / norm, corner[1] + distance * by / norm


def wrap(text: str, face: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """`text` broken into lines no wider than `width` px (at spaces; newlines kept)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and text_box(candidate, face)[0] > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def canvas(colour: tuple[int, int, int] = WHITE) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (DESIGN_SIZE, DESIGN_SIZE), colour)
    return image, ImageDraw.Draw(image)


def png_bytes(image: Image.Image, size: int) -> bytes:
    """The image resized to size x size (Lanczos) as RGB PNG bytes."""
    assert image.size == (DESIGN_SIZE, DESIGN_SIZE), f"families draw on {DESIGN_SIZE} px, got {image.size}"
    if size != DESIGN_SIZE:
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


# ---- one image, in a worker ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    family: str
    out_dir: str
    split: str
    index: int
    seed: int
    image_size: int

    @property
    def image_path(self) -> str:
        """Relative to out_dir, as LLaVA's conversation files name images."""
        return f"images/{self.split}/{self.index:06d}.png"


def run_job(job: Job) -> list[Question]:
    """Draw image `job.index` of `job.split`, write its PNG, return its questions."""
    from lmms_msd.testbed.families import get_family

    image, questions = get_family(job.family).sample(job.seed, job.split, job.index)
    (Path(job.out_dir) / job.image_path).write_bytes(png_bytes(image, job.image_size))
    return questions


def conversations(job: Job, questions: list[Question]) -> Iterator[dict[str, Any]]:
    """LLaVA conversation records: a short and a long one per question."""
    for q, question in enumerate(questions):
        for style, prompt, reply in (("short", question.short_prompt, question.answer), ("long", question.long_prompt, question.long_answer)):
            yield {
                "id": f"{job.split}-{job.index:06d}-{q}-{style}",
                "image": job.image_path,
                "conversations": [
                    {"from": "human", "value": IMAGE_PREFIX + prompt},
                    {"from": "gpt", "value": reply},
                ],
                "family": job.family,
                "question_type": question.problem,
                "style": style,
                "answer": question.answer,
                **question.extra,
            }


def eval_row(job: Job, question: Question, q: int) -> dict[str, Any]:
    return {
        **question.doc,
        "id": f"{job.split}-{job.index:06d}-{q}",
        "problem": question.problem,
        "short_answer": question.answer,
        "long_answer": question.long_answer,
        "image_path": job.image_path,
    }


def parallel_map(fn: Callable[[Any], Any], jobs: list[Any], workers: int, progress: bool, desc: str) -> Iterator[Any]:
    """fn over jobs in order, in `workers` processes, with a progress bar."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=desc, disable=not progress, mininterval=2)
    if workers <= 1:
        for job in jobs:
            yield fn(job)
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(fn, jobs, chunksize=max(1, min(256, len(jobs) // (8 * workers)))):
                yield result
                bar.update()
    bar.close()


# ---- the data set ---------------------------------------------------------------------------------------
def build_family_dataset(
    family: Family,
    out_dir: str | Path,
    n_train: int,
    n_test: int,
    seed: int = 0,
    *,
    image_size: int = DESIGN_SIZE,
    workers: int = 1,
    write_parquet: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Draw n_train + n_test images of `family` and write every format (module docstring); returns
    meta.json's content. workers: drawing processes (the output does not depend on it); write_parquet:
    the eval parquet needs the `datasets` package, False skips it."""
    if n_train < 0 or n_test < 0 or n_train + n_test == 0:
        raise ValueError(f"n_train={n_train}, n_test={n_test}: ask for at least one image, and no negative counts")
    if image_size < 32:
        raise ValueError(f"image_size={image_size}: too small to read anything; use at least 32 (default {DESIGN_SIZE})")
    out = Path(out_dir)
    counts: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for split, n in (("train", n_train), ("test", n_test)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        jobs = [Job(family.name, str(out), split, i, seed, image_size) for i in range(n)]
        records: list[dict[str, Any]] = []
        for job, questions in zip(jobs, parallel_map(run_job, jobs, workers, progress, f"{family.name} ({split})")):
            records.extend(conversations(job, questions))
            if split == "test":
                rows.extend(eval_row(job, question, q) for q, question in enumerate(questions))
        write_json(out / f"llava_{split}.json", records)
        counts[split] = {"images": n, "conversations": len(records)}
    if write_parquet and rows:
        write_eval_parquet(out / family.parquet_name, rows, family.image_column, out)
    meta = {
        "family": family.name,
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "problems": list(family.problems),
        "counts": counts,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("wrote %s: %s", out, counts)
    return meta


def write_eval_parquet(path: Path, rows: list[dict[str, Any]], image_column: str, image_root: Path) -> None:
    """The eval rows as parquet, the image column a datasets Image feature ({"bytes": PNG, "path": None})
    so lmms-eval's parquet loader returns PIL images; the other columns' types are inferred."""
    try:
        from datasets import Dataset
        from datasets import Image as ImageFeature
    except ImportError as error:
        raise ImportError(
            "writing the eval parquet files needs the `datasets` package (pip install datasets); "
            "or pass --no-parquet to write the LLaVA conversation files only"
        ) from error
    table = [{k: v for k, v in row.items() if k != "image_path"} for row in rows]
    for row, source in zip(table, rows):
        row[image_column] = {"bytes": (image_root / source["image_path"]).read_bytes(), "path": None}
    dataset = Dataset.from_list(table).cast_column(image_column, ImageFeature())
    dataset.to_parquet(str(path))


def write_json(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps(records, ensure_ascii=False) + "\n")
