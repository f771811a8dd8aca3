"""The local tasks' functions: the final answer of an explained response, then the benchmark's own
scoring. ChartQA (relaxed accuracy), AI2D (option-letter filter + exact match) and TextVQA (VQA accuracy
with EvalAIAnswerProcessor) are lmms-eval's own functions. MathVista's and MathVerse's lmms-eval modules
call an OpenAI model (MathVista to extract the answer, MathVerse to judge it) and cannot even be imported
without an API key, so their prompts and scoring rules are rewritten here, offline, each function's
docstring saying which lmms-eval code it follows and how it differs."""

from __future__ import annotations

import re
from typing import Any

from lmms_eval.api.metrics import exact_match_hf_evaluate
from lmms_eval.tasks.ai2d.utils import MultiChoiceRegexFilter, ai2d_doc_to_target
from lmms_eval.tasks.chartqa.utils import chartqa_process_results
from lmms_eval.tasks.textvqa import utils as textvqa

from lmms_msd.testbed.families.mathvista import query as mathvista_query

ANSWER_LINE = re.compile(r"answer\s*:\s*(.+)", re.IGNORECASE)
OPTION_LETTERS = "ABCDEFGH"


def extract_final_answer(response: str) -> str:
    """The text after the last "Answer:" (case-insensitive) on its line; without one, the last
    non-empty line. A trailing full stop and surrounding quotes are dropped, as ChartQA's exact
    match would otherwise fail on them.

    "The tallest bar is Limes.\\nAnswer: Limes." -> "Limes"
    """
    matches = ANSWER_LINE.findall(response)
    if matches:
        answer = matches[-1]
    else:
        lines = [line for line in response.splitlines() if line.strip()]
        answer = lines[-1] if lines else ""
    return answer.strip().rstrip(".").strip().strip("\"'")


# ---- ChartQA ------------------------------------------------------------------------------------------
def chartqa_long_process_results(doc, results):
    return chartqa_process_results(doc, [extract_final_answer(results[0])])


# ---- AI2D ---------------------------------------------------------------------------------------------
# lmms-eval's ai2d task: the filter "flexible-extract" (MultiChoiceRegexFilter: a leading "X." gives X),
# then the metric exact_match with ignore_case and ignore_punctuation against ai2d_doc_to_target (mcq).
AI2D_FILTER = MultiChoiceRegexFilter(regex_pattern=r"([A-Z])\.", group_select=0, ignore_case=True, ignore_punctuation=True)


def ai2d_process_results(doc, results):
    """lmms-eval's AI2D score of one response: "B" -> 1 and "B. leaf" -> 1 when the answer is B."""
    filtered = AI2D_FILTER.apply([[results[0]]], [doc])[0]
    target = ai2d_doc_to_target(doc, "mcq")
    return {"exact_match": float(exact_match_hf_evaluate([filtered], [target], ignore_case=True, ignore_punctuation=True)["exact_match"])}


def ai2d_long_process_results(doc, results):
    return ai2d_process_results(doc, [extract_final_answer(results[0])])


# ---- TextVQA ------------------------------------------------------------------------------------------
def textvqa_process_results(doc, results):
    """lmms-eval's TextVQA VQA accuracy (its textvqa_process_results: EvalAIAnswerProcessor on the
    response and the ten answers, then the mean over the ten leave-one-out subsets of
    min(1, matches / 3)); its submission record, a file for the test server, is left out."""
    return {"exact_match": textvqa.textvqa_process_results(doc, results)["exact_match"]}


def textvqa_long_process_results(doc, results):
    return textvqa_process_results(doc, [extract_final_answer(results[0])])


# ---- MathVista ------------------------------------------------------------------------------------------
def mathvista_doc_to_visual(doc):
    return [doc["decoded_image"].convert("RGB")]


def mathvista_doc_to_text(doc, lmms_eval_specific_kwargs):
    """lmms-eval's mathvista_doc_to_text at shot 0 without caption or OCR (`create_one_query`); the rule
    and a worked example are in lmms_msd/testbed/families/mathvista.py, which the training prompts share."""
    kwargs = lmms_eval_specific_kwargs
    if kwargs.get("shot", 0) != 0 or kwargs.get("use_caption") or kwargs.get("use_ocr"):
        raise ValueError(f"the local MathVista task builds zero-shot prompts without caption or OCR; got {kwargs}")
    return mathvista_query(doc, kwargs["shot_type"])


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of one character cost 1)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def mathvista_normalize(extraction: str, doc: dict[str, Any]) -> str | None:
    """lmms-eval's MathVistaEvaluator.normalize_extracted_answer, rewritten (its module needs an API key):
    multi_choice: "(X)" -> X; an option letter -> that choice's text; anything else -> the choice
    nearest in edit distance (the first on ties). integer: str(int(float(x))); float:
    str(round(float(x), precision)); None when the text is not a number."""
    if doc["question_type"] == "multi_choice":
        choices = list(doc["choices"])
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letter:
            extraction = letter[0].upper()
        options = [OPTION_LETTERS[i] for i in range(len(choices))]
        if extraction in options:
            return choices[options.index(extraction)]
        distances = [edit_distance(extraction, choice) for choice in choices]
        return choices[distances.index(min(distances))]
    try:
        if doc["answer_type"] == "integer":
            return str(int(float(extraction)))
        if doc["answer_type"] == "float":
            return str(round(float(extraction), int(doc["precision"])))
    except ValueError:
        return None
    return extraction


def mathvista_process_results(doc, results):
    """Offline equivalent of lmms-eval's mathvista_process_results. lmms-eval takes the response as its
    own extraction when it parses (a choice's text; an int or float for those answer types) and
    otherwise asks an OpenAI model to extract the answer; here the extraction is the final answer
    (`extract_final_answer`: after the last "Answer:", else the last line), which is what that model is
    prompted to return. Then lmms-eval's normalisation (`mathvista_normalize`) and its safe_equal (the
    two strings equal after strip). Worked examples, choices ["40", "50", "60", "70"] and answer "60":
    "C" -> 1, "(C) 60" -> 1, "...\\nAnswer: C" -> 1, "B" -> 0; integer answer "22": "22.0" -> 1,
    "22 cm" -> 0 (not a number); float answer "13.5" with precision 1: "13.50" -> 1, "13" -> 0."""
    prediction = mathvista_normalize(extract_final_answer(results[0].strip()), doc)
    return {"accuracy": float(prediction is not None and str(prediction).strip() == str(doc["answer"]).strip())}


# ---- MathVerse ------------------------------------------------------------------------------------------
MATHVERSE_VERSIONS = ("Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only", "Text Only")
CHOICE_LINE = re.compile(r"^([A-H])\s*[:.]\s*(.+?)\s*$", re.MULTILINE)
LEADING_LETTER = re.compile(r"^\(?([A-H])\)?(?:$|[\s.:,)])")


def mathverse_doc_to_visual(doc):
    if str(doc["image"]).strip() == "":
        return []
    return [doc["image"].convert("RGB")]


def mathverse_doc_to_text(doc, lmms_eval_specific_kwargs):
    """lmms-eval's mathverse_doc_to_text with shot_type format-prompt (its only offline setting): the
    document's query_wo or query_cot (`query_type`), stripped."""
    kwargs = lmms_eval_specific_kwargs
    if kwargs["shot_type"] != "format-prompt" or kwargs["query_type"] not in ("query_wo", "query_cot"):
        raise ValueError(f"the local MathVerse task uses shot_type format-prompt with query_type query_wo or query_cot; got {kwargs}")
    return doc[kwargs["query_type"]].strip()


def as_number(text: str) -> float | None:
    try:
        return float(text.replace("°", "").replace(",", "").strip())
    except ValueError:
        return None


def mathverse_correct(response: str, doc: dict[str, Any]) -> bool:
    """Offline equivalent of lmms-eval's MathVerse judge (MathVerseEvaluator.score_answer asks an OpenAI
    model whether the response's answer and the standard answer agree: the same option for
    multiple choice, the same value for free-form). The rule: the final answer is
    `extract_final_answer(response)`; lmms-eval's quick_match (the response equal to the answer) counts;
    multi-choice: a leading option letter ("B", "(B)", "B. 70°") equal to the answer's, or the text of
    the right option ("70°"); free-form: the same number (degree signs and commas dropped, within 1e-6
    relative), else the same text up to case. Worked examples, answer "B" with choices A:60° B:70°:
    "B" -> 1, "Answer: (B)" -> 1, "70°" -> 1, "A" -> 0; answer "13": "13.0" -> 1, "Answer: 13" -> 1, "12" -> 0."""
    if response.strip() == doc["answer"]:
        return True
    final = extract_final_answer(response)
    if doc["question_type"] == "multi-choice":
        letter = LEADING_LETTER.match(final)
        if letter:
            return letter.group(1) == doc["answer"]
        options = dict(CHOICE_LINE.findall(doc["question_for_eval"]))
        return final == options.get(doc["answer"])
    predicted, answer = as_number(final), as_number(doc["answer"])
    if predicted is not None and answer is not None:
        return abs(predicted - answer) <= 1e-6 * max(1.0, abs(answer))
    return final.lower() == doc["answer"].lower()


def mathverse_metric(version: str) -> str:
    """The metric key of one problem version: "Vision Only" -> "vision_only"."""
    return version.lower().replace(" ", "_")


def mathverse_process_results(doc, results):
    """{"accuracy": 0/1, "<problem version>": 0/1}: the overall score and, like ChartQA's split metrics,
    the score under the document's own version (so the table shows accuracy by visual reliance)."""
    if doc["problem_version"] not in MATHVERSE_VERSIONS:
        raise ValueError(f"problem_version {doc['problem_version']!r} is not one of MathVerse's {MATHVERSE_VERSIONS}")
    score = float(mathverse_correct(results[0], doc))
    return {"accuracy": score, mathverse_metric(doc["problem_version"]): score}
