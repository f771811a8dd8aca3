"""`lmms-msd testbed-report`: what the miniature pair does on its held-out charts.

- the target's relaxed accuracy (ChartQA's: numbers within 5%, other answers exact up to case) by
  question type, on the short- and long-answer test questions, beside the same model given a blank
  image (how much of the score the image earns);
- mean answer length in tokens on the long-answer questions;
- tau and alpha of speculative decoding with the EAGLE-2 tree at temperature 0 and 1;
- the acceptance rate by token type: of the output tokens of a type, the share that came from
  accepted draft nodes rather than from the target's bonus token.

Writes JSON and Markdown; every figure is recomputed from the checkpoints and the data folder.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lmms_msd.calibration.token_types import TYPE_NAMES, token_type_table
from lmms_msd.pipeline import (
    Decoder,
    PairSettings,
    RuntimeSettings,
    build_decoder,
    decode,
    default_device,
    load_pair,
    request_generator,
    resolve_pair,
)
from lmms_msd.speculative.sampling import GenerationConfig
from lmms_msd.speculative.tree import EagleTree
from lmms_msd.testbed.charts import load_records, question_of, record_images

log = logging.getLogger(__name__)

ANSWER_PREFIX = "Answer:"


def relaxed_correct(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA's relaxed accuracy for one answer, as lmms-eval's ChartQA task scores it: a number
    (a trailing % divides by 100) within 5% of a non-zero number, otherwise equal up to case."""

    def number(text: str) -> float | None:
        try:
            return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
        except ValueError:
            return None

    p, t = number(prediction), number(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()


def final_answer(text: str) -> str:
    """The answer of a long response: what follows the last "Answer:" (the whole text if none)."""
    head, sep, tail = text.rpartition(ANSWER_PREFIX)
    return (tail if sep else text).strip().rstrip(".")


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
            name: {"tokens": n, "accepted": a, "rate": a / n if n else float("nan")}
            for name, n, a in zip(TYPE_NAMES, self.tokens, self.accepted)
        }


def accuracy(decoder: Decoder, records, data_dir: Path, config, blank: bool) -> dict[str, Any]:
    """Greedy plain decoding over the records; relaxed accuracy by question type, mean length."""
    by_type: dict[str, list[bool]] = defaultdict(list)
    lengths = []
    for record in records:
        images = record_images(data_dir, record)
        if blank:
            images = [Image.new("RGB", image.size, "white") for image in images]
        result = decode(decoder, decoder.target.prepare(question_of(record), images), config)
        by_type[record["question_type"]].append(relaxed_correct(final_answer(result.text), record["answer"]))
        lengths.append(result.stats.new_tokens)
    scores = {kind: sum(v) / len(v) for kind, v in sorted(by_type.items())}
    every = [x for v in by_type.values() for x in v]
    return {"overall": sum(every) / len(every), "by_question_type": scores, "mean_tokens": sum(lengths) / len(lengths), "n": len(every)}


def speculation(decoder: Decoder, records, data_dir: Path, temperature: float, max_new_tokens: int, seed: int) -> dict[str, Any]:
    target = decoder.target
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature or 1.0)
    observer = AcceptanceByType(token_type_table(target.tokenizer, target.vocab_size))
    steps = accepted = tokens = 0
    for i, record in enumerate(records):
        prompt = target.prepare(question_of(record), record_images(data_dir, record))
        result = decode(decoder, prompt, config, request_generator(config, seed + i, target.device), EagleTree(), observer)
        steps += result.stats.steps
        accepted += sum(result.stats.accepted)
        tokens += result.stats.new_tokens
    alpha = accepted / steps
    return {"temperature": temperature, "tau": alpha + 1, "alpha": alpha, "steps": steps, "new_tokens": tokens, "acceptance_by_type": observer.rates()}


def build_report(decoder: Decoder, data_dir: Path, limit: int | None, max_new_tokens: int, seed: int) -> dict[str, Any]:
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    report: dict[str, Any] = {"data_dir": str(data_dir), "limit": limit, "max_new_tokens": max_new_tokens}
    for style in ("short", "long"):
        records = load_records(data_dir, "test", style, limit or 0)
        report[f"{style}_answers"] = {
            "with_image": accuracy(decoder, records, data_dir, config, blank=False),
            "blank_image": accuracy(decoder, records, data_dir, config, blank=True),
        }
    long_records = load_records(data_dir, "test", "long", limit or 0)
    report["speculative"] = [speculation(decoder, long_records, data_dir, t, max_new_tokens, seed) for t in (0.0, 1.0)]
    return report


def to_markdown(report: dict[str, Any]) -> str:
    lines = ["| answers | question type | relaxed accuracy | blank image |", "|---|---|---|---|"]
    for style in ("short", "long"):
        with_image, blank = report[f"{style}_answers"]["with_image"], report[f"{style}_answers"]["blank_image"]
        for kind, score in with_image["by_question_type"].items():
            lines.append(f"| {style} | {kind} | {score:.1%} | {blank['by_question_type'][kind]:.1%} |")
        lines.append(f"| {style} | **all** ({with_image['n']}) | **{with_image['overall']:.1%}** | **{blank['overall']:.1%}** |")
    lines.append("")
    lines.append(f"Mean long-answer length: {report['long_answers']['with_image']['mean_tokens']:.1f} tokens.")
    lines.append("")
    lines.append("| temperature | tau | alpha | " + " | ".join(f"accepted: {n}" for n in TYPE_NAMES) + " |")
    lines.append("|---|---|---|" + "---|" * len(TYPE_NAMES))
    for row in report["speculative"]:
        rates = " | ".join(f"{row['acceptance_by_type'][n]['rate']:.1%}" for n in TYPE_NAMES)
        lines.append(f"| {row['temperature']:g} | {row['tau']:.2f} | {row['alpha']:.2f} | {rates} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--pretrained", default=None, help="target folder (default: the bundled miniature)")
    parser.add_argument("--msd_model_path", default=None, help="draft folder (default: the bundled miniature's)")
    parser.add_argument("--data_dir", required=True, type=Path, help="a folder written by `lmms-msd make-charts`")
    parser.add_argument("--limit", type=int, default=100, help="questions per answer style (0: all)")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--output", type=Path, default=Path("testbed_report"), help="writes OUTPUT.json and OUTPUT.md")
    return run


def run(args: argparse.Namespace) -> int:
    try:
        pair = resolve_pair(args.pretrained, args.msd_model_path)
    except ValueError as error:
        raise SystemExit(f"lmms-msd testbed-report: {error}") from error
    args.pretrained, args.msd_model_path = pair.pretrained, pair.msd_model_path
    decoder = build_decoder(load_pair(PairSettings(args.pretrained, args.msd_model_path, args.device, "float32")), RuntimeSettings())
    report = build_report(decoder, args.data_dir, args.limit or None, args.max_new_tokens, args.seed)
    report["pretrained"], report["msd_model_path"] = args.pretrained, args.msd_model_path
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = to_markdown(report)
    args.output.with_suffix(".md").write_text(markdown)
    print(markdown)
    return 0
