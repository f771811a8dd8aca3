"""MathVista-like: a figure (a rectangle with labelled sides, a triangle with two labelled angles, a
small table, a clock) and a question that needs arithmetic on what it shows.

Problems (`PROBLEMS`; question_type free_form or multi_choice as MathVista's):

    rect_perimeter  free_form integer, unit cm  "What is the perimeter of the rectangle?"   sides 3-12 x 2-8
    triangle_angle  multi_choice (4 angles)     "What is the value of x in the triangle?"  x = 180 - a - b
    table_sum       free_form integer, unit $   "How much do the pen and the cup cost together?"  prices 1-9
    table_mean      free_form float, precision 1  "What is the average score of Ann and Cal?"  scores 2-20
    clock_later     multi_choice (4 times)      "What time will it be in 2 hours?"  h:00 or h:30, 1-4 hours

The documents follow MathVista's schema (pid, question, image, decoded_image, choices, unit, precision,
answer, question_type, answer_type, query, metadata{split, language, source, category, task, context,
grade, skills}); a multiple-choice answer is the choice's text, as in MathVista,
and the reply the model is trained to give is its option letter.

The prompts are lmms-eval's MathVista prompts (`create_one_query` in
lmms_eval/tasks/mathvista/mathvista_evals.py, zero-shot, no caption or OCR), rebuilt by `query`
because that module cannot be imported offline (it builds an OpenAI client at import and needs the
Levenshtein package). Its rule, per shot_type:

    format-prompt  [question + " (Unit: u)", "A. c1\\nB. c2..." , hint]    joined by "\\n", empties dropped
    reason-first   [hint, "Question: " + question + " (Unit: u)", "Choices:\\n(A) c1\\n(B) c2..."]

with the hint chosen by question_type, answer_type and precision (FORMAT_HINTS, REASON_FIRST_HINTS).
Worked example (a free_form integer with unit cm, format-prompt):

    "What is the perimeter of the rectangle? (Unit: cm)\\nAnswer the question using a single integer number."

The short task (tasks/msd_mathvista_synth.yaml) uses format-prompt, the long one reason-first, whose
hint asks for the final line "Answer: xxx" that the long answers end with.

A long answer is one fixed template per problem, in the verbose style of LLaVA's explanations: what the
figure shows with its values, the rule in words, each step written out with "plus", "times" and
"which is" around its numbers, and the result restated ("The figure shows a rectangle with a width of 5
cm and a height of 3 cm. The perimeter of a rectangle is two times the sum of its width and its height.
The sum of the width and the height is 5 plus 3, which is 8. So the perimeter is 2 times 8, which is 16
cm. The perimeter of the rectangle is 16."), so most tokens are predictable prose and a computed number
comes after words that announce it (the charts' explanations are of this kind).
"""

from __future__ import annotations

import math
from typing import Any

from PIL import Image

from lmms_msd.testbed.families.common import (
    ANSWER_LINE,
    BLACK,
    DESIGN_SIZE,
    OPTION_LETTERS,
    Family,
    Question,
    apex,
    arrow,
    canvas,
    draw_text,
    family_rng,
    fit,
    font,
    inside,
    join_words,
    numeric_options,
    pick,
    pick_problems,
)

PROBLEMS = ("rect_perimeter", "triangle_angle", "table_sum", "table_mean", "clock_later")
QUESTIONS_PER_IMAGE = 1  # a figure is drawn for its problem
ITEMS = ("apple", "pen", "book", "cup", "hat", "ball", "kite", "lamp")
NAMES = ("Ann", "Ben", "Cal", "Dan", "Eve", "Fay", "Gus", "Hal")
FILLS = ((255, 228, 196), (204, 229, 255), (210, 245, 210), (255, 245, 200), (235, 220, 250))

FORMAT_HINTS = {
    "multi_choice": "Answer with the option's letter from the given choices directly.",
    "integer": "Answer the question using a single integer number.",
    "float1": "Answer the question using a single floating-point number with one decimal place.",
    "float2": "Answer the question using a single floating-point number with two decimal places.",
}
REASON_FIRST_HINTS = {
    "multi_choice": "First perform reasoning, then finally select the question from the choices in the following format: Answer: xxx.",
    "integer": "First perform reasoning, then finally answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end in the following format: Answer: xxx.",
    "float1": "First perform reasoning, then finally answer the question requiring a floating-point number with one decimal place and provide the final value, e.g., 1.2, 1.3, 1.4, at the end in the following format: Answer: xxx.",
    "float2": "First perform reasoning, then finally answer the question requiring a floating-point number with two decimal places and provide the final value, e.g., 1.23, 1.34, 1.45, at the end in the following format: Answer: xxx.",
}
# MathVista's own `query` column opens with these (its "solution" hints).
QUERY_HINTS = {
    "multi_choice": "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.",
    "integer": "Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end.",
    "float1": "Hint: Please answer the question requiring a floating-point number with one decimal place and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.",
    "float2": "Hint: Please answer the question requiring a floating-point number with two decimal places and provide the final value, e.g., 1.23, 1.34, 1.45, at the end.",
}
SHOT_TYPES = ("format-prompt", "reason-first")


def hint_key(doc: dict[str, Any]) -> str:
    if doc["question_type"] == "multi_choice":
        return "multi_choice"
    if doc["answer_type"] == "integer":
        return "integer"
    if doc["answer_type"] == "float" and doc["precision"] in (1, 2):
        return f"float{doc['precision']}"
    raise ValueError(f"no MathVista hint for answer_type {doc['answer_type']!r} with precision {doc['precision']!r}")


def query(doc: dict[str, Any], shot_type: str) -> str:
    """lmms-eval's zero-shot MathVista prompt for `doc` (module docstring)."""
    unit = f" (Unit: {doc['unit']})" if doc.get("unit") else ""
    choices = doc.get("choices") or []
    if shot_type == "format-prompt":
        elements = [doc["question"] + unit, "\n".join(f"{OPTION_LETTERS[i]}. {c}" for i, c in enumerate(choices)), FORMAT_HINTS[hint_key(doc)]]
    elif shot_type == "reason-first":
        listed = "\n".join(["Choices:"] + [f"({OPTION_LETTERS[i]}) {c}" for i, c in enumerate(choices)]) if choices else ""
        elements = [REASON_FIRST_HINTS[hint_key(doc)], f"Question: {doc['question']}{unit}", listed]
    else:
        raise ValueError(f"shot_type {shot_type!r} is not one of {SHOT_TYPES}")
    return "\n".join(e for e in elements if e).strip()


def dataset_query(doc: dict[str, Any]) -> str:
    """MathVista's `query` column: its solution hint, the question, the choices."""
    unit = f" (Unit: {doc['unit']})" if doc.get("unit") else ""
    choices = doc.get("choices") or []
    listed = "\n".join(["Choices:"] + [f"({OPTION_LETTERS[i]}) {c}" for i, c in enumerate(choices)]) if choices else ""
    return "\n".join(e for e in (QUERY_HINTS[hint_key(doc)], f"Question: {doc['question']}{unit}", listed) if e)


# ---- problems ---------------------------------------------------------------------------------------------
def rect_perimeter(rng) -> tuple[Image.Image, dict[str, Any], str]:
    w = int(rng.integers(3, 13))
    h = int(pick(rng, [v for v in range(2, 9) if v != w]))
    image, draw = canvas()
    unit_px = 18
    x0, y0 = (DESIGN_SIZE - w * unit_px) / 2 - 20, (DESIGN_SIZE - h * unit_px) / 2
    x1, y1 = x0 + w * unit_px, y0 + h * unit_px
    draw.rectangle([x0, y0, x1, y1], fill=pick(rng, FILLS), outline=BLACK, width=4)
    face = font("sans-bold", 24)
    draw_text(image, ((x0 + x1) / 2, y1 + 24), f"{w} cm", face, BLACK)
    draw_text(image, (x1 + 42, (y0 + y1) / 2), f"{h} cm", face, BLACK)
    perimeter = 2 * (w + h)
    doc = free_form("What is the perimeter of the rectangle?", perimeter, "cm")
    reason = (
        f"The figure shows a rectangle with a width of {w} cm and a height of {h} cm. The perimeter of a rectangle "
        f"is two times the sum of its width and its height. The sum of the width and the height is {w} plus {h}, "
        f"which is {w + h}. So the perimeter is 2 times {w + h}, which is {perimeter} cm. "
        f"The perimeter of the rectangle is {perimeter}."
    )
    return image, doc, reason


def triangle_angle(rng) -> tuple[Image.Image, dict[str, Any], str]:
    while True:
        a, b = (int(v) for v in rng.choice(range(30, 85, 5), size=2, replace=False))
        x = 180 - a - b
        if 20 <= x <= 110:
            break
    image, draw = canvas()
    corners = fit([(0.0, 0.0), (1.0, 0.0), apex(a, b)], box=(40, 50, 296, 290))
    draw.polygon(corners, fill=pick(rng, FILLS), outline=BLACK, width=4)
    face = font("sans-bold", 24)
    for corner, label in zip(corners, (f"{a}°", f"{b}°", "x")):
        draw_text(image, inside(corners, corner, 24), label, face, BLACK)
    options, correct = numeric_options(rng, x, step=10, low=10)
    doc = multi_choice("What is the value of x in the triangle?", [str(v) for v in options], correct)
    letter = OPTION_LETTERS[correct]
    reason = (
        f"The figure shows a triangle with an angle of {a} degrees, an angle of {b} degrees and an unknown angle x. "
        f"The three angles of a triangle add up to 180 degrees. So x is 180 degrees minus {a} degrees minus "
        f"{b} degrees, which is {x} degrees. The value of x is {x}, which is choice ({letter})."
    )
    return image, doc, reason


def table_sum(rng) -> tuple[Image.Image, dict[str, Any], str]:
    items = pick(rng, ITEMS, 3)
    prices = [int(v) for v in rng.integers(1, 10, size=3)]
    image = draw_table(("Item", "Price ($)"), list(zip(items, prices)))
    i, j = sorted(int(v) for v in rng.choice(3, size=2, replace=False))
    total = prices[i] + prices[j]
    doc = free_form(f"How much do the {items[i]} and the {items[j]} cost together?", total, "$")
    listing = join_words([f"the {item} costs {price} dollars" for item, price in zip(items, prices)])
    reason = (
        f"The table shows the prices of three items: {listing}. The question asks for the total price of "
        f"the {items[i]} and the {items[j]}. The {items[i]} costs {prices[i]} dollars and the {items[j]} costs "
        f"{prices[j]} dollars. So together they cost {prices[i]} plus {prices[j]} dollars, which is {total} dollars."
    )
    return image, doc, reason


def table_mean(rng) -> tuple[Image.Image, dict[str, Any], str]:
    names = pick(rng, NAMES, 3)
    scores = [int(v) for v in rng.integers(2, 21, size=3)]
    image = draw_table(("Name", "Score"), list(zip(names, scores)))
    i, j = sorted(int(v) for v in rng.choice(3, size=2, replace=False))
    mean = round((scores[i] + scores[j]) / 2, 1)
    doc = free_form(f"What is the average score of {names[i]} and {names[j]}?", mean, None, precision=1)
    listing = join_words([f"{name} has a score of {score}" for name, score in zip(names, scores)])
    total = scores[i] + scores[j]
    reason = (
        f"The table shows the scores of three people: {listing}. The question asks for the average score of "
        f"{names[i]} and {names[j]}. {names[i]} has a score of {scores[i]} and {names[j]} has a score of {scores[j]}. "
        f"The sum of the two scores is {scores[i]} plus {scores[j]}, which is {total}. The average is the sum "
        f"divided by 2, so it is {total} divided by 2, which is {mean}."
    )
    return image, doc, reason


def clock_later(rng) -> tuple[Image.Image, dict[str, Any], str]:
    hour, minute, later = int(rng.integers(1, 13)), int(pick(rng, (0, 30))), int(rng.integers(1, 5))
    image = draw_clock(hour, minute)
    shifts = [later, 0, later + 1, later - 1 if later > 1 else later + 2]
    times = [clock_time(hour + s, minute) for s in shifts]
    order = [int(v) for v in rng.permutation(4)]
    options = [times[k] for k in order]
    correct = order.index(0)
    hours = "1 hour" if later == 1 else f"{later} hours"
    doc = multi_choice(f"What time will it be in {hours}?", options, correct)
    hand = "12" if minute == 0 else "6"
    between = f"at {hour}" if minute == 0 else f"between {hour} and {hour % 12 + 1}"
    now = clock_time(hour, minute)
    reason = (
        f"The figure shows a clock. The short hand points {between} and the long hand points at {hand}, so the "
        f"clock shows {now}. The question asks for the time {hours} later. Adding {hours} to {now} gives "
        f"{times[0]}. The time {times[0]} is choice ({OPTION_LETTERS[correct]})."
    )
    return image, doc, reason


PROBLEM_FUNCTIONS = {
    "rect_perimeter": rect_perimeter,
    "triangle_angle": triangle_angle,
    "table_sum": table_sum,
    "table_mean": table_mean,
    "clock_later": clock_later,
}
METADATA = {  # problem -> (task, context, grade, skills), in MathVista's vocabulary
    "rect_perimeter": ("geometry problem solving", "geometry diagram", "elementary school", ["geometry reasoning", "arithmetic reasoning"]),
    "triangle_angle": ("geometry problem solving", "geometry diagram", "high school", ["geometry reasoning", "algebraic reasoning"]),
    "table_sum": ("math word problem", "table", "elementary school", ["arithmetic reasoning"]),
    "table_mean": ("math word problem", "table", "elementary school", ["arithmetic reasoning", "statistical reasoning"]),
    "clock_later": ("figure question answering", "abstract scene", "elementary school", ["numeric commonsense", "arithmetic reasoning"]),
}


def free_form(question: str, answer: float, unit: str | None, precision: int | None = None) -> dict[str, Any]:
    answer_type = "integer" if precision is None else "float"
    return {"question": question, "choices": None, "unit": unit, "precision": precision, "answer": str(answer),
            "question_type": "free_form", "answer_type": answer_type}  # fmt: skip


def multi_choice(question: str, options: list[str], correct: int) -> dict[str, Any]:
    return {"question": question, "choices": options, "unit": None, "precision": None, "answer": options[correct],
            "question_type": "multi_choice", "answer_type": "text"}  # fmt: skip


def clock_time(hour: int, minute: int) -> str:
    return f"{(hour - 1) % 12 + 1}:{minute:02d}"


# ---- drawing ------------------------------------------------------------------------------------------------
def draw_table(header: tuple[str, str], rows: list[tuple[str, int]]) -> Image.Image:
    image, draw = canvas()
    cell_w, cell_h = 130, 46
    x0, y0 = (DESIGN_SIZE - 2 * cell_w) / 2, (DESIGN_SIZE - (len(rows) + 1) * cell_h) / 2
    draw.rectangle([x0, y0, x0 + 2 * cell_w, y0 + cell_h], fill=(225, 225, 225))
    bold, regular = font("sans-bold", 22), font("sans", 24)
    for r, cells in enumerate([header, *rows]):
        for c, text in enumerate(cells):
            left, top = x0 + c * cell_w, y0 + r * cell_h
            draw.rectangle([left, top, left + cell_w, top + cell_h], outline=BLACK, width=2)
            draw_text(image, (left + cell_w / 2, top + cell_h / 2), str(text), bold if r == 0 else regular, BLACK)
    return image


def draw_clock(hour: int, minute: int) -> Image.Image:
    image, draw = canvas()
    cx = cy = DESIGN_SIZE / 2
    radius = 140
    draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=(250, 250, 240), outline=BLACK, width=6)
    face = font("sans-bold", 24)
    for h in range(1, 13):
        angle = math.radians(h * 30)
        draw_text(image, (cx + 112 * math.sin(angle), cy - 112 * math.cos(angle)), str(h), face, BLACK)
    hour_angle = math.radians((hour % 12 + minute / 60) * 30)
    minute_angle = math.radians(minute * 6)
    draw.line([(cx, cy), (cx + 62 * math.sin(hour_angle), cy - 62 * math.cos(hour_angle))], fill=BLACK, width=10)
    arrow(draw, (cx, cy), (cx + 96 * math.sin(minute_angle), cy - 96 * math.cos(minute_angle)), (40, 40, 160), width=5, head=16)
    draw.ellipse([cx - 8, cy - 8, cx + 8, cy + 8], fill=BLACK)
    return image


# ---- the family ----------------------------------------------------------------------------------------------
def sample(seed: int, split: str, index: int) -> tuple[Image.Image, list[Question]]:
    rng = family_rng(FAMILY, seed, split, index)
    (problem,) = pick_problems(rng, PROBLEMS, split, index, QUESTIONS_PER_IMAGE)
    image, doc, reason = PROBLEM_FUNCTIONS[problem](rng)
    task, context, grade, skills = METADATA[problem]
    pid = str(index + 1)
    metadata = {"split": "testmini", "language": "english", "source": "synthetic", "category": "math-targeted-vqa",
                "task": task, "context": context, "grade": grade, "skills": skills}  # fmt: skip
    doc = {"pid": pid, **doc, "image": f"images/{pid}.png", "metadata": metadata}
    doc["query"] = dataset_query(doc)
    answer = OPTION_LETTERS[doc["choices"].index(doc["answer"])] if doc["question_type"] == "multi_choice" else doc["answer"]
    question = Question(
        problem=problem,
        short_prompt=query(doc, "format-prompt"),
        long_prompt=query(doc, "reason-first"),
        answer=answer,
        long_answer=reason + ANSWER_LINE + answer,
        doc=doc,
    )
    return image, [question]


FAMILY = Family(name="mathvista", code=1, problems=PROBLEMS, image_column="decoded_image", sample=sample)
