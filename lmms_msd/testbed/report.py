"""The testbed report: what a pair does on one task family's held-out documents (`lmms-msd testbed-report`,
lmms_msd.commands.testbed_report, runs it on each family).

For a family's short-answer and long-answer documents:

- the target's score (the task's primary metric, computed by the task's own scorer) with greedy plain
  decoding, with the real image and with a blank one (a white image of the same size: how much of the
  score the image earns);
- the mean length of the long answers in tokens;
- tau and alpha of speculative decoding with the EAGLE-2 tree on the long-answer documents, at each
  temperature asked for (0 by default), and whether its temperature-0 answers equal plain decoding's
  (they must: greedy speculative decoding is lossless);
- the acceptance rate by token type: of the output tokens of a type, the share that came from accepted
  draft nodes rather than from the target's bonus token.

The documents come with their prompt, image, generation settings and scorer (`Document`); this module
decodes and counts, and does not know which benchmark a document belongs to.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from PIL import Image

from lmms_msd.calibration.token_types import TYPE_NAMES, token_type_table
from lmms_msd.pipeline import Decoder, decode, request_generator
from lmms_msd.speculative.sampling import GenerationConfig
from lmms_msd.speculative.tree import EagleTree

log = logging.getLogger(__name__)


class Document(Protocol):
    """One evaluation document: what to decode and how to score the answer."""

    doc_id: int
    context: str  # the question, without `<image>`
    images: list[Image.Image]  # none or one
    config: GenerationConfig  # the task's generation settings (greedy)
    score: Callable[[str], float]  # the task's primary metric of an answer


class AcceptanceByType:
    """A step observer: counts output tokens by type and how many came from accepted draft nodes."""

    def __init__(self, types: torch.Tensor) -> None:
        self.types = types.tolist()
        self.tokens = [0] * len(TYPE_NAMES)
        self.accepted = [0] * len(TYPE_NAMES)

    def __call__(self, tree, logits, result) -> None:
        path_tokens = tree.tokens[result.path[1:]].tolist() if result.accepted else []
        for token in path_tokens:
            self.tokens[self.types[token]] += 1
            self.accepted[self.types[token]] += 1
        self.tokens[self.types[result.bonus]] += 1

    def rates(self) -> dict[str, dict[str, float]]:
        return {
            name: {"tokens": n, "accepted": a, "rate": a / n if n else None}  # None: no output token of the type
            for name, n, a in zip(TYPE_NAMES, self.tokens, self.accepted)
        }


def blank_images(images: Sequence[Image.Image]) -> list[Image.Image]:
    """A white RGB image of each image's size."""
    return [Image.new("RGB", image.size, "white") for image in images]


def plain_answers(decoder: Decoder, documents: Sequence[Document], blank: bool) -> dict[str, Any]:
    """Greedy plain decoding of every document (with blank images when `blank`): {"score": the mean of the
    documents' scores, "n", "mean_tokens": new tokens per answer, "answers": {doc_id: answer}}."""
    scores, lengths, answers = [], [], {}
    for doc in documents:
        images = blank_images(doc.images) if blank else doc.images
        result = decode(decoder, decoder.target.prepare(doc.context, images), doc.config)
        answers[doc.doc_id] = result.text.strip()
        scores.append(doc.score(answers[doc.doc_id]))
        lengths.append(result.stats.new_tokens)
    return {"score": sum(scores) / len(scores), "n": len(scores), "mean_tokens": sum(lengths) / len(lengths), "answers": answers}


TREE = EagleTree()  # EAGLE-2 at its defaults (total_tokens 59, depth 5, top_k 10), as the plugin's default tree


def speculative_answers(decoder: Decoder, documents: Sequence[Document], temperature: float, seed: int) -> dict[str, Any]:
    """Speculative decoding with the EAGLE-2 tree (`TREE`) at `temperature` (document d samples from a
    generator seeded with seed + d): tau, alpha, steps, new tokens, the acceptance by token type, the score
    and the answers."""
    target = decoder.target
    observer = AcceptanceByType(token_type_table(target.tokenizer, target.vocab_size))
    steps = accepted = tokens = 0
    scores, answers = [], {}
    for doc in documents:
        config = dataclasses.replace(doc.config, do_sample=temperature > 0, temperature=temperature)
        generator = request_generator(config, seed + doc.doc_id, target.device)
        result = decode(decoder, target.prepare(doc.context, doc.images), config, generator, TREE, observer)
        steps += result.stats.steps
        accepted += sum(result.stats.accepted)
        tokens += result.stats.new_tokens
        answers[doc.doc_id] = result.text.strip()
        scores.append(doc.score(answers[doc.doc_id]))
    alpha = accepted / steps
    return {
        "temperature": temperature, "tau": alpha + 1, "alpha": alpha, "steps": steps, "new_tokens": tokens,
        "score": sum(scores) / len(scores), "acceptance_by_type": observer.rates(), "answers": answers,
    }  # fmt: skip


def family_report(
    decoder: Decoder, short: Sequence[Document], long: Sequence[Document], temperatures: Sequence[float], seed: int
) -> dict[str, Any]:  # fmt: skip
    """One family's figures (module docstring). At temperature 0, `differing_doc_ids` lists the long-answer
    documents whose speculative answer differs from plain decoding's (empty: lossless, as it must be)."""
    report: dict[str, Any] = {}
    for style, documents in (("short", short), ("long", long)):
        report[style] = {"with_image": plain_answers(decoder, documents, blank=False), "blank_image": plain_answers(decoder, documents, blank=True)}
    plain = report["long"]["with_image"]["answers"]
    report["speculative"] = []
    for temperature in temperatures:
        run = speculative_answers(decoder, long, temperature, seed)
        if temperature == 0:
            run["differing_doc_ids"] = sorted(d for d in plain if run["answers"].get(d) != plain[d])
        report["speculative"].append(run)
    return report


def percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def to_markdown(report: dict[str, Any]) -> str:
    """Two tables, one row per family: the scores with and without the image and the long answers'
    length; then speculative decoding (tau, alpha, acceptance by token type) per temperature."""
    families = report["families"]
    lines = [
        "| family | metric | short: image | short: blank | long: image | long: blank | long answer, mean tokens | documents |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, family in families.items():
        short, long = family["short"], family["long"]
        lines.append(
            f"| {name} | {family['metric']} | {short['with_image']['score']:.1%} | {short['blank_image']['score']:.1%} | "
            f"{long['with_image']['score']:.1%} | {long['blank_image']['score']:.1%} | {long['with_image']['mean_tokens']:.1f} | "
            f"{short['with_image']['n']} + {long['with_image']['n']} |"
        )
    lines += [
        "",
        "| family | temperature | tau | alpha | " + " | ".join(f"accepted: {n}" for n in TYPE_NAMES) + " | answers = plain |",
        "|---|---|---|---|" + "---|" * len(TYPE_NAMES) + "---|",
    ]
    for name, family in families.items():
        for run in family["speculative"]:
            rates = " | ".join(percent(run["acceptance_by_type"][n]["rate"]) for n in TYPE_NAMES)
            if "differing_doc_ids" not in run:
                same = "not compared (sampling)"
            else:
                same = "yes" if not run["differing_doc_ids"] else f"**no** (doc_ids {run['differing_doc_ids']})"
            lines.append(f"| {name} | {run['temperature']:g} | {run['tau']:.2f} | {run['alpha']:.2f} | {rates} | {same} |")
    return "\n".join(lines) + "\n"
