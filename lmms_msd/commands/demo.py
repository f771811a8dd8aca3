"""`lmms-msd demo` and `lmms-msd generate`: plain and speculative decoding side by side.

Both run every request twice, plainly and speculatively, check that the outputs are identical, and
report tau, alpha and tokens/s. `demo` needs nothing: it writes a tiny random LLaVA (HF layout) to a
temporary folder, loads it through the real loader, dampens its context so that a hand-built MSD
head can follow it, saves and reloads that head in the MSD checkpoint format, and runs a few chart
questions on generated images. `generate` does the same for a target and draft you name.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from lmms_msd.models.draft import load_draft, save_draft
from lmms_msd.models.loading import load_target
from lmms_msd.pipeline import (
    Decoder,
    Pair,
    PairSettings,
    RuntimeSettings,
    build_decoder,
    decode,
    default_device,
    load_pair,
)
from lmms_msd.speculative.sampling import GenerationConfig
from lmms_msd.speculative.tree import EagleTree
from lmms_msd.testbed.tiny import dampen_context_, following_draft, save_tiny_hf_target

log = logging.getLogger(__name__)

DEMO_QUESTIONS = (
    "What is the value of the largest bar?",
    "How many points are above 10.5? Answer with a number.",
    "Which colour is the line?",
    "Describe the chart.",
)


@dataclass
class Comparison:
    question: str
    text: str
    identical: bool
    plain: Any  # DecodeStats
    speculative: Any  # DecodeStats


def compare(decoder: Decoder, tree, questions, images, config, seed: int = 0) -> list[Comparison]:
    """Run each (question, image) plainly and speculatively with the same seed."""
    target = decoder.target
    rows = []
    for question, image in zip(questions, images):
        prompt = target.prepare(question, [image] if image is not None else [])
        plain = decode(decoder, prompt, config, torch.Generator(target.device).manual_seed(seed))
        spec = decode(decoder, prompt, config, torch.Generator(target.device).manual_seed(seed), tree)
        identical = plain.token_ids == spec.token_ids
        rows.append(Comparison(question, spec.text, identical, plain.stats, spec.stats))
    return rows


def format_table(rows: list[Comparison]) -> str:
    lines = [
        f"{'#':>2}  {'same':>4}  {'tokens':>6}  {'steps':>5}  {'tau':>5}  {'alpha':>5}  {'plain tok/s':>11}  {'spec tok/s':>10}  answer",
    ]
    for i, r in enumerate(rows):
        answer = r.text.replace("\n", " ")
        lines.append(
            f"{i:>2}  {'yes' if r.identical else 'NO':>4}  {r.speculative.new_tokens:>6}  {r.speculative.steps:>5}  "
            f"{r.speculative.tau:>5.2f}  {r.speculative.alpha:>5.2f}  {r.plain.tokens_per_s:>11.1f}  "
            f"{r.speculative.tokens_per_s:>10.1f}  {answer[:40]!r}"
        )
    steps = sum(r.speculative.steps for r in rows)
    accepted = sum(sum(r.speculative.accepted) for r in rows)
    plain_s = sum(r.plain.wall_s for r in rows)
    spec_s = sum(r.speculative.wall_s for r in rows)
    alpha = accepted / steps if steps else 0.0
    lines.append(
        f"all: identical {sum(r.identical for r in rows)}/{len(rows)}, tau {alpha + 1:.2f}, alpha {alpha:.2f}, "
        f"speedup {plain_s / spec_s:.2f}x (wall time, this machine)"
    )
    return "\n".join(lines)


def demo_images(n: int, size: int, seed: int):
    """Simple bar-chart-like pictures: coloured bars of seeded heights."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(n):
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        heights = (1 + torch.rand(4, generator=g) * size * 0.9).tolist()
        for j, h in enumerate(heights):
            x = int(size * (0.1 + 0.2 * j))
            draw.rectangle([x, size - 1 - int(h), x + size // 8, size - 1], fill=("red", "green", "blue", "orange")[j])
        images.append(image)
    return images


def add_tree_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--total_tokens", type=int, default=59, help="tree nodes, root included (default 59)")
    parser.add_argument("--depth", type=int, default=5, help="draft forwards after the root's children: nodes reach depth + 1 (default 5)")
    parser.add_argument("--top_k", type=int, default=10, help="children per expanded node (default 10)")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)


def settings(args: argparse.Namespace):
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0, temperature=args.temperature, top_p=args.top_p
    )
    return config, EagleTree(total_tokens=args.total_tokens, depth=args.depth, top_k=args.top_k)


def add_device_arguments(parser: argparse.ArgumentParser, dtype: str) -> None:
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--dtype", default=dtype, choices=["auto", "float16", "bfloat16", "float32"])


def add_demo_arguments(parser: argparse.ArgumentParser):
    add_tree_arguments(parser)
    add_device_arguments(parser, dtype="float32")
    parser.add_argument("--context_scale", type=float, default=0.05, help="how much context the tiny target uses (1 = all)")
    return run_demo


def run_demo(args: argparse.Namespace) -> int:
    config, tree = settings(args)
    with tempfile.TemporaryDirectory() as tmp:
        save_tiny_hf_target(Path(tmp) / "target", seed=args.seed)
        target = load_target(str(Path(tmp) / "target"), device=args.device, dtype=args.dtype)
        dampen_context_(target.model, args.context_scale)
        save_draft(following_draft(target), Path(tmp) / "draft")
        draft = load_draft(str(Path(tmp) / "draft"), device=target.device, dtype=target.dtype)
    size = target.model.config.vision_config.image_size
    decoder = build_decoder(Pair(target, draft), RuntimeSettings())
    rows = compare(decoder, tree, DEMO_QUESTIONS, demo_images(len(DEMO_QUESTIONS), size, args.seed), config, args.seed)
    print("tiny random LLaVA (HF layout) + a hand-built MSD head; outputs are gibberish, equality and tau are the point")
    print(format_table(rows))
    return 0 if all(r.identical for r in rows) else 1


def add_generate_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--pretrained", required=True, help="target: folder or hub id, HF or original LLaVA layout")
    parser.add_argument("--msd_model_path", required=True, help="MSD draft: folder or hub id")
    parser.add_argument("--question", required=True, action="append", help="repeat for several requests")
    parser.add_argument("--image", action="append", default=[], help="one per question (omit for text-only)")
    parser.add_argument("--vision_tower", default=None, help="original layout: override mm_vision_tower")
    add_device_arguments(parser, dtype="auto")
    add_tree_arguments(parser)
    return run_generate


def run_generate(args: argparse.Namespace) -> int:
    if args.image and len(args.image) != len(args.question):
        raise SystemExit(f"give one --image per --question ({len(args.image)} images, {len(args.question)} questions)")
    images = []
    for path in args.image:
        if not Path(path).is_file():
            raise SystemExit(f"image not found: {path}")
        images.append(Image.open(path).convert("RGB"))
    config, tree = settings(args)
    pair = load_pair(PairSettings(args.pretrained, args.msd_model_path, args.device, args.dtype, vision_tower=args.vision_tower))
    rows = compare(build_decoder(pair, RuntimeSettings()), tree, args.question, images or [None] * len(args.question), config, args.seed)
    print(format_table(rows))
    return 0 if all(r.identical for r in rows) else 1
