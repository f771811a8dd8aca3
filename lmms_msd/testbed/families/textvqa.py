"""TextVQA-like: outdoor scenes drawn with shapes (sky, ground, trees, houses, sun, clouds) that carry
rendered text, and questions about the text.

Every scene has a sign on a pole with one word (top), a round or square tag with a number (middle, at
the left or the right edge) and two words painted on the ground in two named colours, one above the
other (bottom). Questions (`PROBLEMS`):

    sign    "what does the sign say?"              -> the sign's word, lower case
    number  "what number is on the tag?"           -> the number
    colour  "what word is written in blue?"        -> the painted word of that colour, lower case

The text is sized for the testbed's small vision tower (128 wide, trained from scratch on 14-px patches),
which could not read 22-40 px words in seven fonts from a 45-word list (5% accuracy, as with a blank
image). So the variety of real TextVQA photos is kept in a moderate form: words come from `WORDS`, 16
signs of 3-7 letters with 16 different first letters, written in capitals; numbers have one digit
(1-9); each text uses one of three bold faces (`FONTS`: DejaVu sans, serif and mono) at 34-48 px (a
capital spans two to three patches), dark on light or light on dark, tilted at most 4 degrees (signs),
6 (tags) or 8 (painted words); each text has its place in the layout, moved by up to 40 px. The answer
is uniform over its values (the words are three distinct draws from `WORDS`, the number a uniform
digit, the asked colour one of the two painted words), so without the image a model does no better
than chance (1/16 for a word, 1/9 for the number).

The documents follow TextVQA's schema as lmms-eval reads it (lmms-lab/textvqa: question_id, question,
image_id, image, image_classes, flickr_original_url, flickr_300k_url, image_width, image_height,
answers (ten annotators' answers), question_tokens, ocr_tokens, ocr_info, set_name) plus `answer`, the
canonical answer. The ten answers are the word as written and in lower case, and with probability 0.3
one annotator's slip (the word missing its last letter, or the number plus one), so lmms-eval's VQA
accuracy gives a right answer 1 and the slip min(1, 1/3). The prompt is lmms-eval's
(`textvqa_doc_to_text`: the question capitalised, then the post_prompt), the short task's post_prompt
lmms-eval's own, the long task's asking for an explanation and a last line "Answer: <answer>".
"""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw

from lmms_msd.testbed.charts import COLOURS
from lmms_msd.testbed.families.common import (
    ANSWER_LINE,
    BLACK,
    DESIGN_SIZE,
    WHITE,
    Family,
    Question,
    canvas,
    draw_text,
    family_rng,
    font,
    join_words,
    pick,
    pick_problems,
    text_box,
)

PROBLEMS = ("sign", "number", "colour")
QUESTIONS_PER_IMAGE = 2  # in train
SHORT_POST_PROMPT = "\nAnswer the question using a single word or phrase."
LONG_POST_PROMPT = (
    "\nFirst say in one or two sentences what text the image shows and where. Then give the answer, a single "
    'word or number, on the last line in the form "Answer: <answer>".'
)
WORDS = (
    "bus", "cafe", "danger", "exit", "farm", "gym", "hotel", "library",
    "menu", "open", "pizza", "ramen", "stop", "taxi", "welcome", "zoo",
)  # fmt: skip
NUMBERS = tuple(str(n) for n in range(1, 10))
BOARDS = {"white": (245, 245, 245), "yellow": (255, 214, 0), "navy": (26, 35, 126), "dark green": (27, 94, 32)}
DARK_BOARDS = ("navy", "dark green")
PAINTS = ("red", "blue", "green")  # keys of charts.COLOURS, dark enough on every ground
SKIES = ((187, 222, 251), (225, 245, 254), (236, 239, 241), (255, 243, 224))
GROUNDS = ((222, 222, 222), (239, 235, 233), (215, 215, 205))  # light, greyish: every paint reads on them
FONTS = ("sans-bold", "serif-bold", "mono-bold")


def prompt(question: str, post_prompt: str) -> str:
    """lmms-eval's textvqa_doc_to_text (no OCR tokens): the question capitalised, then the post_prompt."""
    return question.capitalize() + post_prompt


def rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def fitted_font(rng, text: str, low: int, high: int, max_width: int):
    """A random face of FONTS at a random size in low..high, shrunk until `text` is at most max_width px wide."""
    name = pick(rng, FONTS)
    size = int(rng.integers(low, high + 1))
    while size > 24 and text_box(text, font(name, size))[0] > max_width:
        size -= 2
    return name, font(name, size)


# ---- the scene -----------------------------------------------------------------------------------------------
def background(rng) -> tuple[Image.Image, ImageDraw.ImageDraw, int, list[str]]:
    horizon = int(rng.integers(196, 211))
    image, draw = canvas(pick(rng, SKIES))
    draw.rectangle([0, horizon, DESIGN_SIZE, DESIGN_SIZE], fill=pick(rng, GROUNDS))
    classes = []
    for kind in pick(rng, ("tree", "house", "sun", "cloud"), int(rng.integers(2, 4))):
        x = int(rng.integers(30, DESIGN_SIZE - 30))
        if kind == "tree":
            draw.rectangle([x - 5, horizon - 40, x + 5, horizon + 6], fill=(121, 85, 72))
            draw.ellipse([x - 26, horizon - 86, x + 26, horizon - 34], fill=(102, 187, 106))
        elif kind == "house":
            draw.rectangle([x - 30, horizon - 44, x + 30, horizon + 4], fill=(215, 204, 200), outline=(120, 120, 120))
            draw.polygon([(x - 36, horizon - 44), (x + 36, horizon - 44), (x, horizon - 74)], fill=(161, 136, 127))
        elif kind == "sun":
            draw.ellipse([x - 20, 14, x + 20, 54], fill=(255, 235, 59))
        else:
            for dx in (-22, 0, 22):
                draw.ellipse([x + dx - 20, 20, x + dx + 20, 48], fill=WHITE)
        classes.append(kind.title())
    return image, draw, horizon, classes


def place_sign(
    image: Image.Image, draw: ImageDraw.ImageDraw, rng, horizon: int, word: str
) -> tuple[str, tuple[int, int, int, int]]:
    """The sign: a board centred at x 148-188, y 58-78, its word at most 250 px wide, on a pole."""
    board = pick(rng, tuple(BOARDS))
    _, face = fitted_font(rng, word, 40, 48, 250)
    width, height = text_box(word, face)
    x, y = int(rng.integers(148, 189)), int(rng.integers(58, 79))
    draw.rectangle([x - 4, y, x + 4, horizon + 10], fill=(97, 97, 97))
    half_w, half_h = width // 2 + 14, height // 2 + 12
    draw.rectangle([x - half_w, y - half_h, x + half_w, y + half_h], fill=BOARDS[board], outline=BLACK, width=3)
    ink = WHITE if board in DARK_BOARDS else BLACK
    box = draw_text(image, (x, y), word, face, ink, angle=float(rng.uniform(-4, 4)))
    return board, box


def place_tag(image: Image.Image, draw: ImageDraw.ImageDraw, rng, number: str) -> tuple[int, int, int, int]:
    """The tag: a 70-px disc or rounded square at the left or right edge (x 44-84 or 252-292, y 144-164)."""
    x = int(rng.integers(44, 85)) if rng.integers(2) else int(rng.integers(252, 293))
    y = int(rng.integers(144, 165))
    dark = bool(rng.integers(2))
    fill, ink = ((40, 40, 40), WHITE) if dark else ((255, 255, 255), BLACK)
    if rng.integers(2):
        draw.ellipse([x - 35, y - 35, x + 35, y + 35], fill=fill, outline=BLACK, width=3)
    else:
        draw.rounded_rectangle([x - 35, y - 33, x + 35, y + 33], radius=8, fill=fill, outline=BLACK, width=3)
    _, face = fitted_font(rng, number, 44, 52, 56)
    return draw_text(image, (x, y), number, face, ink, angle=float(rng.uniform(-6, 6)))


def scene(rng) -> tuple[Image.Image, dict[str, Any]]:
    image, draw, horizon, classes = background(rng)
    words = pick(rng, WORDS, 3)
    shown = [w.upper() for w in words]
    number = pick(rng, NUMBERS)
    board, sign_box = place_sign(image, draw, rng, horizon, shown[0])
    tag_box = place_tag(image, draw, rng, number)
    colours = pick(rng, PAINTS, 2)
    painted = []
    for i in range(2):  # one row each: about 34 and 92 px below the horizon
        _, face = fitted_font(rng, shown[1 + i], 34, 42, 290)
        centre = (DESIGN_SIZE // 2 + int(rng.integers(-20, 21)), horizon + 34 + 58 * i + int(rng.integers(-4, 5)))
        box = draw_text(image, centre, shown[1 + i], face, rgb(COLOURS[colours[i]]), angle=float(rng.uniform(-8, 8)))
        painted.append((words[1 + i], shown[1 + i], colours[i], box))
    return image, {
        "sign": (words[0], shown[0], board, sign_box),
        "number": (number, tag_box),
        "painted": painted,
        "classes": sorted({*classes, "Sign"}),
    }


# ---- questions -----------------------------------------------------------------------------------------------
def answers(rng, written: str, canonical: str) -> list[str]:
    """Ten annotators' answers: the text as written or in lower case, and at times one slip."""
    out = [written if rng.integers(2) else canonical for _ in range(10)]
    if rng.random() < 0.3:
        out[int(rng.integers(10))] = str(int(canonical) + 1) if canonical.isdigit() else canonical[:-1]
    return out


def ocr_info(word: str, box: tuple[int, int, int, int]) -> dict[str, Any]:
    left, top, right, bottom = box
    return {"word": word, "bounding_box": {
        "top_left_x": left / DESIGN_SIZE, "top_left_y": top / DESIGN_SIZE, "width": (right - left) / DESIGN_SIZE,
        "height": (bottom - top) / DESIGN_SIZE, "rotation": 0.0, "roll": 0.0, "pitch": 0.0, "yaw": 0.0,
    }}  # fmt: skip


def sample(seed: int, split: str, index: int) -> tuple[Image.Image, list[Question]]:
    rng = family_rng(FAMILY, seed, split, index)
    image, parts = scene(rng)
    sign_word, sign_shown, board, sign_box = parts["sign"]
    number, tag_box = parts["number"]
    painted = parts["painted"]
    listing = join_words([f"the word {shown} written in {colour}" for _, shown, colour, _ in painted])
    description = (
        f"There is {'an' if board[0] in 'aeiou' else 'a'} {board} sign on a pole with the word {sign_shown} on it, "
        f"a tag with the number {number}, and on the ground {listing}."
    )
    ocr = [(sign_shown, sign_box), (number, tag_box)] + [(shown, box) for _, shown, _, box in painted]
    questions = []
    for q, problem in enumerate(pick_problems(rng, PROBLEMS, split, index, QUESTIONS_PER_IMAGE)):
        if problem == "sign":
            question, written, answer = "what does the sign say?", sign_shown, sign_word
            conclusion = f"So the sign says {sign_shown}."
        elif problem == "number":
            question, written, answer = "what number is on the tag?", number, number
            conclusion = f"So the number on the tag is {number}."
        else:
            word, shown, colour, _ = pick(rng, painted)
            question, written, answer = f"what word is written in {colour}?", shown, word
            conclusion = f"So the word written in {colour} is {shown}."
        doc = {
            "question_id": QUESTIONS_PER_IMAGE * index + q,
            "question": question,
            "image_id": f"{index:06d}",
            "image_classes": parts["classes"],
            "flickr_original_url": "",
            "flickr_300k_url": "",
            "image_width": DESIGN_SIZE,
            "image_height": DESIGN_SIZE,
            "answers": answers(rng, written, answer),
            "question_tokens": question.rstrip("?").split(),
            "ocr_tokens": [text for text, _ in ocr],
            "ocr_info": [ocr_info(text, box) for text, box in ocr],
            "set_name": "val",
            "answer": answer,
        }
        questions.append(Question(
            problem=problem,
            short_prompt=prompt(question, SHORT_POST_PROMPT),
            long_prompt=prompt(question, LONG_POST_PROMPT),
            answer=answer,
            long_answer=f"{description} {conclusion}{ANSWER_LINE}{answer}",
            doc=doc,
        ))  # fmt: skip
    return image, questions


FAMILY = Family(name="textvqa", code=4, problems=PROBLEMS, image_column="image", sample=sample)
