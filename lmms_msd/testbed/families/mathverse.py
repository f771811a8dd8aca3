"""MathVerse-like: one plane-geometry problem in versions that move its information between the text
and the image, so that how much the answer depends on the image is the controlled variable.

Problems (`PROBLEMS`):

    triangle_angle  multi-choice  triangle ABC, angles A and B given, find angle C (four options)
    rectangle_area  free-form     rectangle ABCD, AB and BC given, find the area
    hypotenuse      free-form     right triangle ABC (right angle at C), AC and BC given, find AB
    supplementary   free-form     A, O, B on a line, angle AOC given, find angle BOC

Versions (`VERSIONS`, MathVerse's names; each problem's text is description + conditions + request):

    Text Dominant    all of it in the text; the figure shows the shape and its letters, no values
    Text Lite        the conditions and the request in the text (no description); the same figure
    Vision Dominant  the description and the request in the text; the values only in the figure
    Vision Only      no question text at all: the figure carries the values and the question is
                     written in the image above it

so a model that ignores the image can answer the first two and not the last two. In the test split
the documents come in groups of four, one problem in every version (same problem_index, the same
values), cycling through the problems; in train every image is a new problem in a random version.

The documents follow MathVerse's schema as lmms-eval reads it (CaraJ/MathVerse-lmmseval: sample_index,
problem_index, problem_version, question, image, answer, question_type multi-choice|free-form,
metadata{split, source, subject, subfield}, query_wo, query_cot, question_for_eval). The multiple-choice
options are written into the question as MathVerse does ("Choices:\\nA:60°\\nB:70°..."), the answer is
the option letter or the value. query_wo and query_cot are MathVerse's instructions followed by
"Question: " and the question (its "According to the question shown in the image, ..." sentence alone
in Vision Only); lmms-eval's prompt is the one or the other (query_type), unchanged. The short task
uses query_wo, the long task query_cot, whose answers end with a line "Answer: <answer>".

A long answer is one fixed template per problem (`explanation`), in the verbose style of LLaVA's
explanations: the description, where the values are ("The question says that" in the text versions,
"The figure shows that" in the vision ones) and the values, the rule in words, each step written out
with "minus", "times" and "which is" around its numbers, and the result restated, so most tokens are
predictable prose and a computed number comes after words that announce it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from PIL import Image

from lmms_msd.testbed.families.common import (
    ANSWER_LINE,
    BLACK,
    DESIGN_SIZE,
    OPTION_LETTERS,
    Family,
    Question,
    apex,
    canvas,
    draw_text,
    family_rng,
    fit,
    font,
    inside,
    numeric_options,
    pick,
    text_box,
    wrap,
)

PROBLEMS = ("triangle_angle", "rectangle_area", "hypotenuse", "supplementary")
VERSIONS = ("Text Dominant", "Text Lite", "Vision Dominant", "Vision Only")
TEXT_VERSIONS = ("Text Dominant", "Text Lite")  # versions whose text carries the values
TRIPLES = ((3, 4, 5), (6, 8, 10), (5, 12, 13), (9, 12, 15), (8, 15, 17), (12, 16, 20))
FILLS = ((255, 236, 179), (200, 230, 201), (187, 222, 251), (225, 190, 231))
INSTRUCTIONS = {  # (question_type, query) -> MathVerse's instruction
    ("multi-choice", "wo"): "Please directly answer the question and provide the correct option letter, e.g., A, B, C, D.",
    ("multi-choice", "cot"): "Please first conduct reasoning, and then answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.",
    ("free-form", "wo"): "Please directly answer the question and provide the final value, e.g., 1, 2.5, 300.",
    ("free-form", "cot"): "Please first conduct reasoning, and then answer the question and provide the final value, e.g., 1, 2.5, 300, at the end.",
}
VISION_ONLY_OPENING = "According to the question shown in the image, please"


@dataclass(frozen=True)
class Problem:
    """A problem before it is put in a version."""

    description: str  # what the figure is ("As shown in the figure, ABC is a triangle.")
    conditions: str  # the values ("Angle A = 50° and angle B = 60°.")
    request: str  # what to find ("Find the measure of angle C.")
    choices: list[str] | None  # option texts (multi-choice) or None
    answer: str  # the option letter or the value
    given: str  # the values as the explanation restates them ("angle A = 50° and angle B = 60°")
    solution: str  # the explanation's reasoning after the values
    subfield: str
    draw: Callable[[bool, tuple[float, float, float, float]], Image.Image]  # (values shown, figure box) -> image

    @property
    def question_type(self) -> str:
        return "free-form" if self.choices is None else "multi-choice"

    def choice_lines(self) -> str:
        return "" if self.choices is None else "\nChoices:\n" + "\n".join(f"{OPTION_LETTERS[i]}:{c}" for i, c in enumerate(self.choices))


def triangle_angle(rng) -> Problem:
    while True:
        a, b = (int(v) for v in rng.choice(range(30, 85, 5), size=2, replace=False))
        c = 180 - a - b
        if 30 <= c <= 110:
            break
    options, correct = numeric_options(rng, c, step=10, low=10)
    fill = pick(rng, FILLS)
    letter = OPTION_LETTERS[correct]

    def draw(values: bool, box: tuple[float, float, float, float]) -> Image.Image:
        image, pen = canvas()
        corners = fit([(0.0, 0.0), (1.0, 0.0), apex(a, b)], box)
        pen.polygon(corners, fill=fill, outline=BLACK, width=4)
        label_corners(image, corners, "ABC")
        if values:
            face = font("sans-bold", 22)
            for corner, value in zip(corners, (a, b)):
                draw_text(image, inside(corners, corner, 22), f"{value}°", face, BLACK)
        return image

    return Problem(
        "As shown in the figure, ABC is a triangle.", f"Angle A = {a}° and angle B = {b}°.", "Find the measure of angle C.",
        [f"{v}°" for v in options], letter, f"angle A = {a}° and angle B = {b}°",
        f"The three angles of a triangle add up to 180°. So angle C is 180° minus {a}° minus {b}°, which is {c}°. "
        f"The measure of angle C is {c}°, which is option {letter}.",
        "Angle", draw,
    )  # fmt: skip


def rectangle_area(rng) -> Problem:
    w = int(rng.integers(4, 13))
    h = int(pick(rng, [v for v in range(2, 10) if v != w]))
    fill = pick(rng, FILLS)

    def draw(values: bool, box: tuple[float, float, float, float]) -> Image.Image:
        image, pen = canvas()
        corners = fit([(0.0, 0.0), (float(w), 0.0), (float(w), float(h)), (0.0, float(h))], shrink(box, 30))
        pen.polygon(corners, fill=fill, outline=BLACK, width=4)
        label_corners(image, corners, "ABCD")
        if values:
            face = font("sans-bold", 24)
            (x0, y0), (x1, _), (_, y1) = corners[0], corners[1], corners[2]
            draw_text(image, ((x0 + x1) / 2, y0 - 20), str(w), face, BLACK)
            draw_text(image, (x1 + 22, (y0 + y1) / 2), str(h), face, BLACK)
        return image

    area = w * h
    return Problem(
        "As shown in the figure, ABCD is a rectangle.", f"AB = {w} and BC = {h}.", "Find the area of ABCD.",
        None, str(area), f"AB = {w} and BC = {h}",
        f"The area of a rectangle is its length times its width. The length AB is {w} and the width BC is {h}. "
        f"So the area of ABCD is {w} times {h}, which is {area}. The area of ABCD is {area}.",
        "Area", draw,
    )  # fmt: skip


def hypotenuse(rng) -> Problem:
    a, b, c = pick(rng, TRIPLES)
    if rng.integers(2):
        a, b = b, a
    fill = pick(rng, FILLS)

    def draw(values: bool, box: tuple[float, float, float, float]) -> Image.Image:
        image, pen = canvas()
        corners = fit([(0.0, -float(a)), (float(b), 0.0), (0.0, 0.0)], shrink(box, 30))  # A, B, C
        pen.polygon(corners, fill=fill, outline=BLACK, width=4)
        (cx, cy) = corners[2]
        pen.line([(cx, cy - 18), (cx + 18, cy - 18), (cx + 18, cy)], fill=BLACK, width=2)
        label_corners(image, corners, "ABC")
        if values:
            face = font("sans-bold", 24)
            draw_text(image, (cx - 24, (corners[0][1] + cy) / 2), str(a), face, BLACK)
            draw_text(image, ((cx + corners[1][0]) / 2, cy + 22), str(b), face, BLACK)
        return image

    return Problem(
        "As shown in the figure, ABC is a right triangle with the right angle at C.", f"AC = {a} and BC = {b}.",
        "Find the length of AB.", None, str(c), f"AC = {a} and BC = {b}",
        f"By the Pythagorean theorem, the square of the hypotenuse AB is the sum of the squares of the legs AC and BC. "
        f"The square of AC is {a} times {a}, which is {a * a}, and the square of BC is {b} times {b}, which is {b * b}. "
        f"The sum of the squares is {a * a} plus {b * b}, which is {c * c}. So AB is the square root of {c * c}, "
        f"which is {c}. The length of AB is {c}.",
        "Length", draw,
    )  # fmt: skip


def supplementary(rng) -> Problem:
    angle = int(pick(rng, range(30, 155, 5)))
    other = 180 - angle

    def draw(values: bool, box: tuple[float, float, float, float]) -> Image.Image:
        image, pen = canvas()
        left, top, right, bottom = box
        ox, oy = (left + right) / 2, bottom - 40
        arm = min((right - left) / 2 - 10, bottom - top - 60)
        rad = math.radians(angle)
        a, b, c = (ox - arm, oy), (ox + arm, oy), (ox - arm * math.cos(rad), oy - arm * math.sin(rad))
        pen.line([a, b], fill=BLACK, width=4)
        pen.line([(ox, oy), c], fill=BLACK, width=4)
        pen.ellipse([ox - 5, oy - 5, ox + 5, oy + 5], fill=BLACK)
        face = font("sans-bold", 22)
        for point, letter, offset in ((a, "A", (0, 20)), (b, "B", (0, 20)), (c, "C", (0, -20)), ((ox, oy), "O", (0, 20))):
            draw_text(image, (point[0] + offset[0], point[1] + offset[1]), letter, face, BLACK)
        if values:
            half = math.radians(angle / 2)
            distance = max(44.0, 26 / math.sin(half))
            draw_text(image, (ox - distance * math.cos(half), oy - distance * math.sin(half)), f"{angle}°", face, BLACK)
        return image

    return Problem(
        "As shown in the figure, A, O and B lie on a straight line.", f"Angle AOC = {angle}°.", "Find the measure of angle BOC in degrees.",
        None, str(other), f"angle AOC = {angle}°",
        f"The angles AOC and BOC together make the straight angle AOB, and a straight angle is 180°. So angle BOC is "
        f"180° minus {angle}°, which is {other}°. The measure of angle BOC is {other}°.",
        "Angle", draw,
    )  # fmt: skip


PROBLEM_FUNCTIONS: dict[str, Callable[[Any], Problem]] = {
    "triangle_angle": triangle_angle,
    "rectangle_area": rectangle_area,
    "hypotenuse": hypotenuse,
    "supplementary": supplementary,
}


# ---- drawing helpers -------------------------------------------------------------------------------------------
def shrink(box: tuple[float, float, float, float], margin: float) -> tuple[float, float, float, float]:
    return box[0] + margin, box[1] + margin, box[2] - margin, box[3] - margin


def label_corners(image: Image.Image, corners: list[tuple[float, float]], letters: str) -> None:
    """Each corner's letter just outside the polygon (away from its centroid)."""
    face = font("sans-bold", 22)
    mx, my = sum(c[0] for c in corners) / len(corners), sum(c[1] for c in corners) / len(corners)
    for (x, y), letter in zip(corners, letters):
        dx, dy = x - mx, y - my
        norm = math.hypot(dx, dy)
        draw_text(image, (x + 18 * dx / norm, y + 18 * dy / norm), letter, face, BLACK)


FULL_BOX = (40.0, 40.0, 296.0, 296.0)  # the figure's box when no question is written in the image
TEXT_TOP = 10  # where a Vision Only question starts


def vision_only_image(problem: Problem) -> Image.Image:
    """The question (description, request, choices) written at the top, the figure with its values below."""
    face = font("sans", 18)
    text = f"{problem.description} {problem.request}"
    if problem.choices is not None:
        text += "\nChoices: " + "  ".join(f"{OPTION_LETTERS[i]}:{c}" for i, c in enumerate(problem.choices))
    lines = wrap(text, face, DESIGN_SIZE - 24)
    line_height = 23
    figure_top = TEXT_TOP + line_height * len(lines) + 14
    image = problem.draw(True, (60.0, float(figure_top) + 20, 276.0, 316.0))
    for i, line in enumerate(lines):
        draw_text(image, (12 + text_box(line, face)[0] / 2, TEXT_TOP + line_height * i + line_height / 2), line, face, BLACK)
    return image


# ---- versions ----------------------------------------------------------------------------------------------------
def question_text(problem: Problem, version: str) -> str:
    parts = {
        "Text Dominant": (problem.description, problem.conditions, problem.request),
        "Text Lite": (problem.conditions, problem.request),
        "Vision Dominant": (problem.description, problem.request),
        "Vision Only": (),
    }[version]
    return " ".join(parts) + (problem.choice_lines() if parts else "")


def queries(problem: Problem, version: str, question: str) -> tuple[str, str]:
    """MathVerse's query_wo and query_cot."""
    wo, cot = (INSTRUCTIONS[(problem.question_type, kind)] for kind in ("wo", "cot"))
    if version == "Vision Only":
        return f"{VISION_ONLY_OPENING} {wo.removeprefix('Please ')}", f"{VISION_ONLY_OPENING} {cot.removeprefix('Please ')}"
    return f"{wo}\nQuestion: {question}", f"{cot}\nQuestion: {question}"


def explanation(problem: Problem, version: str) -> str:
    """The figure's description, where the values come from and the values, then the solution: "As shown in
    the figure, ABCD is a rectangle. The figure shows that AB = 5 and BC = 3. The area of a rectangle ..."."""
    source = "The question says that" if version in TEXT_VERSIONS else "The figure shows that"
    return f"{problem.description} {source} {problem.given}. {problem.solution}"


def make_question(problem: Problem, problem_name: str, version: str, sample_index: int, problem_index: int) -> tuple[Image.Image, Question]:
    if version == "Vision Only":
        image = vision_only_image(problem)
    else:
        image = problem.draw(version not in TEXT_VERSIONS, FULL_BOX)
    question = question_text(problem, version)
    query_wo, query_cot = queries(problem, version, question)
    doc = {
        "sample_index": str(sample_index),
        "problem_index": str(problem_index),
        "problem_version": version,
        "question": question,
        "answer": problem.answer,
        "question_type": problem.question_type,
        "metadata": {"split": "testmini", "source": "synthetic", "subject": "Plane Geometry", "subfield": problem.subfield},
        "query_wo": query_wo,
        "query_cot": query_cot,
        "question_for_eval": question_text(problem, "Text Dominant"),
    }
    return image, Question(
        problem=problem_name,
        short_prompt=query_wo,
        long_prompt=query_cot,
        answer=problem.answer,
        long_answer=explanation(problem, version) + ANSWER_LINE + problem.answer,
        doc=doc,
        extra={"problem_version": version},
    )


def sample(seed: int, split: str, index: int) -> tuple[Image.Image, list[Question]]:
    if split == "test":
        key, version = index // len(VERSIONS), VERSIONS[index % len(VERSIONS)]
        rng = family_rng(FAMILY, seed, split, key)
        name = PROBLEMS[key % len(PROBLEMS)]
    else:
        key = index
        rng = family_rng(FAMILY, seed, split, key)
        name, version = pick(rng, PROBLEMS), pick(rng, VERSIONS)
    problem = PROBLEM_FUNCTIONS[name](rng)
    image, question = make_question(problem, name, version, index + 1, key + 1)
    return image, [question]


FAMILY = Family(name="mathverse", code=3, problems=PROBLEMS, image_column="image", sample=sample)
