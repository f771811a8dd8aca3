"""Predicted against realised accepted tokens per step, per task and temperature (issue 14).

A tree builder predicts each step's accepted length: the sum of its kept draft nodes' weights (each the
product of acceptance estimates along the node's path). This decodes the first --limit held-out documents
of each task (the local long-answer tasks by default: the bundled calibrator was fitted on `make-data`
seed 1's images, none of them the tasks') once per tree and temperature, and sums, over every step, the
prediction and the draft tokens the step accepted (the verification's own count, before a stop cuts the
last step), so predicted / realised is the builder's bias per step. No timing: each request runs once.

Trees (--trees, from `lmms_msd.pipeline.TreeSettings`): weight_cost (OPT-Tree scored by the calibrator as
node weight, stop=cost: the calibrated builder of the cost rule), weight_delta (the same, stop_delta
--delta), raw_cost (the raw draft confidence, stop=cost), tilt_cost (the thesis's tilt, stop=cost).

    OMP_NUM_THREADS=1 python scripts/predicted_accepted.py --limit 6 --output_dir build/predicted_accepted
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("predicted_accepted")

TASKS = ("msd_chartqa_synth_long", "msd_mathvista_synth_long", "msd_ai2d_synth_long", "msd_mathverse_synth_long",
         "msd_textvqa_synth_long")  # fmt: skip
TREES = ("weight_cost", "weight_delta", "raw_cost", "tilt_cost")


@dataclass
class Prediction:
    """A `StepObserver` summing, over the steps it sees, the tree's predicted accepted length and the realised
    one, in total and by depth (depth d: the predicted probability that the accepted path reaches d, the sum
    of the weights at depth d, against whether it did)."""

    steps: int = 0
    predicted: float = 0.0
    realised: int = 0
    predicted_by_depth: dict[int, float] = field(default_factory=dict)
    realised_by_depth: dict[int, int] = field(default_factory=dict)

    def __call__(self, tree, logits, acceptance) -> None:
        weights, depths = tree.scores[1:].exp().tolist(), tree.depths[1:].tolist()
        self.steps += 1
        self.predicted += sum(weights)
        self.realised += acceptance.accepted
        for weight, depth in zip(weights, depths):
            self.predicted_by_depth[depth] = self.predicted_by_depth.get(depth, 0.0) + weight
        for depth in range(1, max(depths, default=0) + 1):
            self.realised_by_depth[depth] = self.realised_by_depth.get(depth, 0) + int(acceptance.accepted >= depth)


def ratio_standard_error(per_request: list[tuple[float, float]]) -> float:
    """Standard error of sum(predicted) / sum(realised) over requests (the ratio estimator's, to first order):
    sqrt(sum((p_i - R a_i)^2) / (n (n - 1))) / mean(a), R the ratio. It says how far the ratio of these few
    requests may lie from the ratio of many like them: a per-task bias smaller than it is not resolved."""
    n = len(per_request)
    realised = sum(a for _, a in per_request)
    if n < 2 or realised == 0:
        return float("nan")
    ratio = sum(p for p, _ in per_request) / realised
    spread = sum((p - ratio * a) ** 2 for p, a in per_request) / (n * (n - 1))
    return spread**0.5 / (realised / n)


def parse_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path("build/predicted_accepted"))
    parser.add_argument("--tasks", type=parse_list, default=list(TASKS))
    parser.add_argument("--trees", type=parse_list, default=list(TREES))
    parser.add_argument("--temperatures", type=lambda t: [float(v) for v in parse_list(t)], default=[0.0, 1.0])
    parser.add_argument("--limit", type=int, default=6, help="documents per task [6]")
    parser.add_argument("--delta", type=float, default=0.6, help="weight_delta's stop_delta [0.6: chosen on the development split]")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="[each task's]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibrator", default=None, help="calibrator JSON [the bundled pair's]")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.trees) - set(TREES))
    if unknown:
        parser.error(f"--trees: unknown {unknown}; valid: {list(TREES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from lmms_msd.commands import bench
    from lmms_msd.lmms_eval.requests import prepare_prompt
    from lmms_msd.pipeline import (
        RuntimeSettings,
        TreeSettings,
        build_tree,
        decode,
        fitted_calibrator,
        load_decoder,
        request_generator,
        resolve_pair,
    )

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = arguments(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    paths = resolve_pair(None, None)
    calibrator = args.calibrator or fitted_calibrator(paths)
    decoder = load_decoder(paths, RuntimeSettings("eager"), "cpu", "float32")
    cost = {"stop": "cost", "cost_cache": str(args.output_dir / "cost_models")}
    settings = {
        "weight_cost": TreeSettings("opt", calibrator=calibrator, calibrator_mode="weight", **cost),
        "weight_delta": TreeSettings("opt", calibrator=calibrator, calibrator_mode="weight", stop_delta=args.delta),
        "raw_cost": TreeSettings("opt", **cost),
        "tilt_cost": TreeSettings("opt", calibrator=calibrator, calibrator_mode="tilt", **cost),
    }
    trees = {name: build_tree(settings[name], decoder) for name in args.trees}
    rows = []
    for task in args.tasks:
        requests, task_config = bench.requests_from_task(task, bench.DEFAULT_INCLUDE_PATH, args.limit)
        for temperature in args.temperatures:
            config = bench.at_temperature(task_config, temperature, args.max_new_tokens)
            for name, tree in trees.items():
                seen = Prediction()
                per_request = []  # (predicted, realised) of each request
                for request in requests:
                    prompt = prepare_prompt(decoder.target, request.context, request.images)
                    generator = request_generator(config, args.seed + request.doc_id, decoder.target.device)
                    before = (seen.predicted, seen.realised)
                    decode(decoder, prompt, config, generator, tree.builder, seen, tree.track_visual)
                    per_request.append((seen.predicted - before[0], seen.realised - before[1]))
                ratio = seen.predicted / seen.realised if seen.realised else float("nan")
                rows.append({"task": task, "temperature": temperature, "tree": name, "requests": len(requests), "steps": seen.steps,
                             "predicted_per_step": seen.predicted / seen.steps, "realised_per_step": seen.realised / seen.steps,
                             "ratio": ratio, "ratio_se": ratio_standard_error(per_request), "per_request": per_request,
                             "predicted_by_depth": seen.predicted_by_depth,
                             "realised_by_depth": seen.realised_by_depth})  # fmt: skip
                log.info("%s T=%g %s: predicted %.3f, realised %.3f per step (%.3f)", task, temperature, name,
                         rows[-1]["predicted_per_step"], rows[-1]["realised_per_step"], ratio)  # fmt: skip
    lines = [f"# Predicted vs realised accepted tokens per step ({' '.join(sys.argv[1:]) or 'defaults'})", "",
             f"torch {torch.__version__}; the first {args.limit} documents of each task; calibrator {calibrator}.", "",
             "| task | T | tree | steps | predicted / step | realised / step | predicted / realised | s.e. over requests |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['task']} | {r['temperature']:g} | {r['tree']} | {r['steps']} | {r['predicted_per_step']:.3f} | "
              f"{r['realised_per_step']:.3f} | {r['ratio']:.3f} | {r['ratio_se']:.3f} |" for r in rows]  # fmt: skip
    for name in trees:
        for temperature in args.temperatures:
            chosen = [r for r in rows if r["tree"] == name and r["temperature"] == temperature]
            predicted = sum(r["predicted_per_step"] * r["steps"] for r in chosen)
            realised = sum(r["realised_per_step"] * r["steps"] for r in chosen)
            se = ratio_standard_error([pair for r in chosen for pair in r["per_request"]])
            steps = sum(r["steps"] for r in chosen)
            lines.append(f"| all | {temperature:g} | {name} | {steps} | | | {predicted / realised:.3f} | {se:.3f} |")
    lines += ["", "By depth (all tasks): predicted / realised steps whose accepted path reached the depth, per step", "",
              "| tree | T | " + " | ".join(f"depth {d}" for d in range(1, 7)) + " |", "|---|---|" + "---|" * 6]  # fmt: skip
    for name in trees:
        for temperature in args.temperatures:
            chosen = [r for r in rows if r["tree"] == name and r["temperature"] == temperature]
            cells = []
            for d in range(1, 7):
                predicted = sum(r["predicted_by_depth"].get(d, 0.0) for r in chosen)
                realised = sum(r["realised_by_depth"].get(d, 0) for r in chosen)
                cells.append(f"{predicted / realised:.3f}" if realised else "–")
            lines.append(f"| {name} | {temperature:g} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (args.output_dir / "predicted_accepted.md").write_text(text)
    (args.output_dir / "predicted_accepted.json").write_text(json.dumps({"args": sys.argv[1:], "rows": rows}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
