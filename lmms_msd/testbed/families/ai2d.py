"""AI2D-like: labelled diagrams with a multiple-choice question answered by option letter.

Problems (`PROBLEMS`), four options each:

    parts       a plant or an insect whose four parts carry big numbered labels (1-4, in discs at
                fixed places) with leader lines;
                "Which part of the plant is labeled 3?" -> the part's name among the four parts
    food_chain  a producer and three consumers in boxes in four rows joined by arrows from food to eater
                (top-down or bottom-up); "In this food chain, what does the fox eat?" / "... what eats
                the rabbit?"; the options are the answer and three other organisms of its kind
                (producers or consumers)
    cycle       the four stages of a cycle in boxes at the top, right, bottom and left of a ring, in a
                random arrangement, joined by arrows clockwise; "According to the diagram, which stage
                comes after pupa?"

The diagrams are drawn for the testbed's small vision tower (128 wide, trained from scratch), which
did no better on the earlier drawings than with a blank image: what decides the answer is coarse.
Labels are 34-px digits in 44-px discs; every organism has its own box colour (the stand-in for the
pictures AI2D's food webs show; `ORGANISMS`) and every stage the colour of its place in its cycle
(`STAGE_FILLS`), so a box is found by its colour as well as by its 20-26 px name; boxes sit in fixed
slots (food chains: four rows; cycles: four places on the ring) moved by a few px.

Every answer is read off the diagram: the label numbers, the order of a chain and the arrangement of a
cycle are random and the options a random order of the candidates, so the correct letter is uniform
and the question alone gives chance level: 1/4 for parts and food chains (the four options are
exchangeable: a chain's consumers are a random draw from `CONSUMERS`, the distractors too), 1/3 for a
cycle (the asked stage is an option but never the answer).

The documents follow AI2D's schema as lmms-eval reads it (lmms-lab/ai2d: question, options, answer = the
correct option's index as a string, image). The prompts are lmms-eval's AI2D prompt (`ai2d_doc_to_text`,
prompt_format mcq): the question, then "A. option" lines, then the post_prompt; the short task's is
lmms-eval's own, the long task's asks for an explanation and a last line "Answer: <letter>". The long
answers read the diagram, then every option ("owl is option B"), then name the answer's letter
(`long_answer`).
"""

from __future__ import annotations

from PIL import Image

from lmms_msd.testbed.families.common import (
    ANSWER_LINE,
    BLACK,
    DESIGN_SIZE,
    OPTION_LETTERS,
    WHITE,
    Family,
    Question,
    arrow,
    canvas,
    draw_text,
    family_rng,
    font,
    join_words,
    pick,
    pick_problems,
    text_box,
)

PROBLEMS = ("parts", "food_chain", "cycle")
QUESTIONS_PER_IMAGE = 2  # in train; two different questions about one diagram
SHORT_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
LONG_POST_PROMPT = (
    "\nFirst explain in one or two sentences how you read the answer from the diagram. Then give the option's "
    'letter on the last line in the form "Answer: <letter>".'
)
# organism -> its box colour (hues far apart; black names read on all of them)
ORGANISMS = {
    "grass": (102, 187, 106), "algae": (77, 182, 172), "leaves": (212, 225, 87), "seeds": (244, 143, 177),
    "insect": (255, 238, 88), "mouse": (176, 176, 176), "rabbit": (255, 183, 77), "frog": (129, 212, 250),
    "snake": (188, 160, 150), "fox": (239, 83, 80), "owl": (186, 104, 200), "hawk": (121, 134, 203),
}  # fmt: skip
PRODUCERS = ("grass", "algae", "leaves", "seeds")
CONSUMERS = tuple(name for name in ORGANISMS if name not in PRODUCERS)
CYCLES = {
    "life cycle of a butterfly": ("egg", "caterpillar", "pupa", "butterfly"),
    "life cycle of a frog": ("egg", "tadpole", "froglet", "frog"),
    "water cycle": ("evaporation", "condensation", "precipitation", "collection"),
    "life cycle of a plant": ("seed", "sprout", "plant", "flower"),
}
STAGE_FILLS = ((255, 238, 88), (129, 199, 132), (100, 181, 246), (240, 98, 146))  # a cycle's stages 1-4
GREEN, BROWN = (46, 125, 50), (121, 85, 72)

# A drawn question: (question, options, index of the correct option, the explanation's last sentence
# without "which is option X.").
Drawn = tuple[str, list[str], int, str]


def prompt(question: str, options: list[str], post_prompt: str) -> str:
    """lmms-eval's ai2d_doc_to_text with prompt_format mcq and an empty pre_prompt."""
    return question + "\n" + "\n".join(f"{OPTION_LETTERS[i]}. {o}" for i, o in enumerate(options)) + post_prompt


# ---- parts ----------------------------------------------------------------------------------------------------
# object -> part -> (anchor the leader line ends at, label centre), in design px before the jitter
PART_LAYOUTS: dict[str, dict[str, tuple[tuple[int, int], tuple[int, int]]]] = {
    "plant": {
        "flower": ((168, 78), (290, 52)),
        "leaf": ((126, 170), (40, 140)),
        "stem": ((168, 222), (290, 200)),
        "root": ((150, 282), (40, 282)),
    },
    "insect": {
        "abdomen": ((92, 166), (70, 50)),
        "thorax": ((176, 160), (176, 50)),
        "head": ((246, 156), (282, 50)),
        "leg": ((214, 214), (250, 292)),
    },
}


def parts(rng, k: int) -> tuple[Image.Image, list[Drawn], str]:
    thing = pick(rng, tuple(PART_LAYOUTS))
    layout = PART_LAYOUTS[thing]
    names = list(layout)
    numbers = [int(v) + 1 for v in rng.permutation(len(names))]  # numbers[i] labels names[i]
    dx, dy = (int(v) for v in rng.integers(-12, 13, size=2))
    image, draw = canvas()
    (draw_plant if thing == "plant" else draw_insect)(draw, dx, dy, rng)
    face = font("sans-bold", 34)
    for name, number in zip(names, numbers):
        (ax, ay), (lx, ly) = layout[name]
        draw.line([(lx + dx, ly + dy), (ax + dx, ay + dy)], fill=BLACK, width=3)
        draw.ellipse([lx + dx - 22, ly + dy - 22, lx + dx + 22, ly + dy + 22], fill=WHITE, outline=BLACK, width=3)
        draw_text(image, (lx + dx, ly + dy), str(number), face, BLACK)
    by_number = sorted(zip(numbers, names))
    listing = join_words([f"label {n} points to the {name}" for n, name in by_number])
    questions = []
    for number, name in pick(rng, by_number, k):
        options = [names[int(i)] for i in rng.permutation(len(names))]
        reason = (
            f"The diagram shows {article(thing)} with four numbered labels: {listing}. The question asks which part "
            f"is labeled {number}. Label {number} points to the {name}, so the part labeled {number} is the {name}"
        )
        questions.append((f"Which part of the {thing} is labeled {number}?", options, options.index(name), reason))
    return image, questions, thing


def article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def draw_plant(draw, dx: int, dy: int, rng) -> None:
    draw.rectangle([0, 250 + dy, DESIGN_SIZE, DESIGN_SIZE], fill=(215, 190, 160))
    for end in ((132, 300), (150, 318), (186, 316), (204, 298)):
        draw.line([(168 + dx, 250 + dy), (end[0] + dx, end[1] + dy)], fill=BROWN, width=4)
    draw.line([(168 + dx, 250 + dy), (168 + dx, 96 + dy)], fill=GREEN, width=9)
    for y0, side in ((180, -1), (204, 1)):
        x0, y0 = 168 + dx, y0 + dy
        draw.polygon([(x0, y0), (x0 + side * 28, y0 - 24), (x0 + side * 64, y0 - 22), (x0 + side * 34, y0 + 6)], fill=GREEN)
    petal = pick(rng, ((229, 57, 53), (216, 27, 96), (255, 193, 7), (142, 36, 170)))
    fx, fy = 168 + dx, 78 + dy
    for ox, oy in ((0, -24), (21, -12), (21, 12), (0, 24), (-21, 12), (-21, -12)):
        draw.ellipse([fx + ox - 15, fy + oy - 15, fx + ox + 15, fy + oy + 15], fill=petal)
    draw.ellipse([fx - 13, fy - 13, fx + 13, fy + 13], fill=(255, 235, 59), outline=(120, 90, 0))


def draw_insect(draw, dx: int, dy: int, rng) -> None:
    body = pick(rng, ((93, 64, 55), (56, 142, 60), (230, 81, 0), (69, 90, 100)))
    for x in (160, 180, 200):
        for side in (-1, 1):
            knee = (x + 14 + dx, 160 + side * 36 + dy)
            draw.line([(x + dx, 160 + dy), knee, (x + 30 + dx, 160 + side * 62 + dy)], fill=BLACK, width=4)
    draw.line([(254 + dx, 140 + dy), (276 + dx, 96 + dy)], fill=BLACK, width=3)
    draw.line([(262 + dx, 144 + dy), (300 + dx, 110 + dy)], fill=BLACK, width=3)
    draw.ellipse([32 + dx, 136 + dy, 150 + dx, 196 + dy], fill=body, outline=BLACK, width=2)
    draw.ellipse([148 + dx, 138 + dy, 208 + dx, 182 + dy], fill=body, outline=BLACK, width=2)
    draw.ellipse([218 + dx, 130 + dy, 274 + dx, 184 + dy], fill=body, outline=BLACK, width=2)


# ---- food chain --------------------------------------------------------------------------------------------------
def food_chain(rng, k: int) -> tuple[Image.Image, list[Drawn], str]:
    chain = [pick(rng, PRODUCERS), *pick(rng, CONSUMERS, 3)]
    upward = bool(rng.integers(2))  # the producer at the bottom, arrows pointing up
    ys = [283, 206, 129, 52] if upward else [52, 129, 206, 283]
    xs = [int(v) for v in rng.integers(148, 189, size=4)]
    image, draw = canvas()
    face = font("sans-bold", 26)
    for x, y, name in zip(xs, ys, chain):
        draw.rounded_rectangle([x - 76, y - 24, x + 76, y + 24], radius=8, fill=ORGANISMS[name], outline=BLACK, width=2)
        draw_text(image, (x, y), name, face, BLACK)
    for i in range(3):
        step = 1 if ys[i + 1] > ys[i] else -1
        arrow(draw, (xs[i], ys[i] + step * 25), (xs[i + 1], ys[i + 1] - step * 25), BLACK, width=4, head=14)
    links = join_words([f"{a} to {b}" for a, b in zip(chain, chain[1:])])
    opening = f"The diagram shows a food chain. The arrows point from the food to the animal that eats it: {links}."
    asks = [("eats", i) for i in (1, 2, 3)] + [("eaten", i) for i in (0, 1, 2)]
    questions = []
    for kind, i in pick(rng, asks, k):
        subject = chain[i]
        answer = chain[i - 1] if kind == "eats" else chain[i + 1]
        kind_of_answer = PRODUCERS if answer in PRODUCERS else CONSUMERS  # the options: the answer and 3 of its kind
        others = pick(rng, [c for c in kind_of_answer if c not in (answer, subject)], 3)
        options = [[answer, *others][int(j)] for j in rng.permutation(4)]
        if kind == "eats":
            question = f"In this food chain, what does the {subject} eat?"
            reason = (
                f"{opening} The question asks what the {subject} eats. The arrow into the {subject} comes from the "
                f"{answer}, so the {subject} eats the {answer}"
            )
        else:
            question = f"In this food chain, what eats the {subject}?"
            reason = (
                f"{opening} The question asks what eats the {subject}. The arrow from the {subject} points to the "
                f"{answer}, so the {subject} is eaten by the {answer}"
            )
        questions.append((question, options, options.index(answer), reason))
    return image, questions, "food chain"


# ---- cycle ---------------------------------------------------------------------------------------------------
CYCLE_SLOTS = ((168, 58), (252, 168), (168, 278), (84, 168))  # top, right, bottom, left (clockwise)


def stage_font(name: str):
    """Bold sans at 26 px, or smaller (down to 20) until `name` is at most 140 px wide."""
    for size in (26, 24, 22):
        if text_box(name, font("sans-bold", size))[0] <= 140:
            return font("sans-bold", size)
    return font("sans-bold", 20)


def cycle(rng, k: int) -> tuple[Image.Image, list[Drawn], str]:
    title = pick(rng, tuple(CYCLES))
    stages = [CYCLES[title][int(i)] for i in rng.permutation(4)]  # stages[i] sits in CYCLE_SLOTS[i]
    dx, dy = (int(v) for v in rng.integers(-6, 7, size=2))
    slots = [(x + dx, y + dy) for x, y in CYCLE_SLOTS]
    image, draw = canvas()
    for (x, y), name in zip(slots, stages):
        face = stage_font(name)
        half = max(text_box(name, face)[0] // 2 + 10, 44)
        fill = STAGE_FILLS[CYCLES[title].index(name)]
        draw.rounded_rectangle([x - half, y - 24, x + half, y + 24], radius=10, fill=fill, outline=BLACK, width=2)
        draw_text(image, (x, y), name, face, BLACK)
    for a in range(4):  # clockwise, slot a to slot a + 1
        (x0, y0), (x1, y1) = slots[a], slots[(a + 1) % 4]
        start = (x0 + 0.3 * (x1 - x0) + (x1 - x0) * 0.1, y0 + 0.3 * (y1 - y0))
        end = (x0 + 0.7 * (x1 - x0), y0 + 0.7 * (y1 - y0) - (y1 - y0) * 0.1)
        arrow(draw, start, end, (60, 60, 60), width=6, head=18)
    listing = join_words(stages)
    questions = []
    for i in pick(rng, range(4), k):
        stage, following = stages[i], stages[(i + 1) % 4]
        options = [stages[int(j)] for j in rng.permutation(4)]
        reason = (
            f"The diagram shows the {title} as four stages joined by arrows that go clockwise: {listing}. "
            f"The question asks which stage comes after {stage}. The arrow from {stage} points to {following}, "
            f"so {following} comes after {stage}"
        )
        questions.append((f"According to the diagram, which stage comes after {stage}?", options, options.index(following), reason))
    return image, questions, title


PROBLEM_FUNCTIONS = {"parts": parts, "food_chain": food_chain, "cycle": cycle}


# ---- the family ----------------------------------------------------------------------------------------------
def long_answer(reason: str, options: list[str], correct: int) -> str:
    """The explanation, then each option read as "<name> is option <letter>", then the answer's.

    The option walk turns choosing the letter into copying: after "So <name> is option" the letter is the
    one that followed "<name> is option" a sentence before. The testbed's small target could not do the
    lookup from the prompt's option list alone (the pair trained on generator version 2 named the right
    food-chain organism in all 7 of the first 20 held-out diagrams and answered "B" in all 20).

    Worked example (tests/test_testbed_families.py): reason "... so the fox is eaten by the owl", options
    hawk, owl, correct 1 -> "... so the fox is eaten by the owl. Reading the options: hawk is option A and owl
    is option B. So owl is option B.", then "\nAnswer: B".
    """
    letter = OPTION_LETTERS[correct]
    walk = join_words([f"{name} is option {OPTION_LETTERS[i]}" for i, name in enumerate(options)])
    return f"{reason}. Reading the options: {walk}. So {options[correct]} is option {letter}.{ANSWER_LINE}{letter}"


def sample(seed: int, split: str, index: int) -> tuple[Image.Image, list[Question]]:
    rng = family_rng(FAMILY, seed, split, index)
    (problem,) = pick_problems(rng, PROBLEMS, split, index, 1)
    image, drawn, subject = PROBLEM_FUNCTIONS[problem](rng, QUESTIONS_PER_IMAGE if split == "train" else 1)
    questions = []
    for text, options, correct, reason in drawn:
        letter = OPTION_LETTERS[correct]
        questions.append(Question(
            problem=problem,
            short_prompt=prompt(text, options, SHORT_POST_PROMPT),
            long_prompt=prompt(text, options, LONG_POST_PROMPT),
            answer=letter,
            long_answer=long_answer(reason, options, correct),
            doc={"question": text, "options": options, "answer": str(correct)},
            extra={"subject": subject},
        ))  # fmt: skip
    return image, questions


FAMILY = Family(name="ai2d", code=2, problems=PROBLEMS, image_column="image", sample=sample)
