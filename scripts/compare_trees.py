"""A fair comparison of OPT-Tree's stop rules and node scorers on the same prompts (issue 14).

Every OPT-Tree variant x scorer (raw draft confidence, the calibrator as node weight, the thesis's
logit tilt) x stop (delta, with its threshold chosen on a development split; cost, on the cost model
of that scorer on the runtime that decodes, measured at start-up and kept in OUTPUT_DIR/cost_models,
where a later run reads it), with EAGLE-2 and plain decoding. The pair, the runtime and every tree
come from `lmms_msd.pipeline` (as the plugin's); they are timed by `lmms-msd bench`'s machinery
(`lmms_msd.commands.bench.bench`: methods interleaved per request, the median of the repeats, one
extra profiled run per request for the tree statistics).

1. Development split: charts that share none with the test task or the calibrator's fit data
   (`make-charts` seed 2's test split at 336 px, the long-answer instruction, as docs/calibrator_vs_opt_tree.md),
   written to OUTPUT_DIR/dev_charts unless --dev_data_dir names a folder. Every delta of --deltas runs
   there at temperature 0; per variant and scorer the delta with the lowest ms/token is kept (the
   larger delta on a tie: fewer draft levels). The test set plays no part in the choice.
   --chosen_from reads the choice from an earlier run's compare_trees.json instead (so the test set
   can run at another temperature, or on another occasion, without the development runs; --dev_only
   runs the development split alone).
2. Test set: the first --limit documents of the long-answer task, at each of --temperatures; per
   method: ms/token, tau, the realised accepted tokens per step (alpha) beside the builder's own
   prediction (expected alpha, the sum of the kept nodes' weights per step) and their ratio.

Outputs in --output_dir: compare_trees.md (the tables), compare_trees.json (every summary, the chosen
deltas, the cost models), compare_trees_t<T>.png (ms/token per method) when matplotlib is installed.
Exit status 1 when a method's temperature-0 tokens differ from plain decoding's.

    OMP_NUM_THREADS=1 python scripts/compare_trees.py --limit 8 --dev_limit 8 --output_dir build/compare_trees
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

log = logging.getLogger("compare_trees")

SCORERS = ("raw", "weight", "tilt")
VARIANTS = ("frontier", "upstream")


def parse_list(kind, choices=None):
    def parse(text: str):
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        if not values or (choices and set(values) - set(choices)):
            raise argparse.ArgumentTypeError(f"a comma list{f' of {choices}' if choices else ''}, got {text!r}")
        return values

    return parse


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("build/compare_trees"))
    parser.add_argument("--limit", type=int, default=8, help="test documents of the long-answer task [8]")
    parser.add_argument("--dev_limit", type=int, default=8, help="development charts [8]")
    parser.add_argument("--dev_data_dir", type=Path, default=None, help="[OUTPUT_DIR/dev_charts, written when missing: seed 2]")
    parser.add_argument("--chosen_from", type=Path, default=None, help="an earlier compare_trees.json: its chosen deltas, no development runs")
    parser.add_argument("--dev_only", action="store_true", help="the development split only (for a later --chosen_from)")
    parser.add_argument("--deltas", type=parse_list(float), default=[0.1, 0.3, 0.6, 1.0, 1.5], help="stop_delta candidates")
    parser.add_argument("--temperatures", type=parse_list(float), default=[0.0, 1.0])
    parser.add_argument("--variants", type=parse_list(str, VARIANTS), default=["frontier"])
    parser.add_argument("--scorers", type=parse_list(str, SCORERS), default=list(SCORERS))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per test request and method [3]")
    parser.add_argument("--dev_repeats", type=int, default=1, help="timed runs per development request [1]")
    parser.add_argument("--warmup", type=int, default=1, help="requests run once, untimed, first [1]")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="[the task's, 256]")
    parser.add_argument("--engine", default="eager", choices=("eager", "static"))
    parser.add_argument("--max_length", type=int, default=2048, help="--engine static: cache slots [2048]")
    parser.add_argument("--inflate", default=None, help='"7b" or HIDDENxLAYERS: the 7B-shaped testbed (lmms_msd.testbed.inflate)')
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--msd_model_path", default=None)
    parser.add_argument("--calibrator", default=None, help="[the bundled pair's]")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def opt_trees(scorers: dict[str, dict[str, Any]], deltas, decoder, cost_cache: Path) -> dict[str, dict[str, Any]]:
    """(variant, scorer) name -> {"delta <d>": TreeSetup, ..., "cost": TreeSetup}, each built by the
    pipeline from TreeSettings' OPT-Tree fields `scorers[name]`."""
    from lmms_msd.pipeline import TreeSettings, build_tree

    trees = {}
    for name, fields in scorers.items():
        trees[name] = {f"delta {d:g}": build_tree(TreeSettings("opt", **fields, stop_delta=d), decoder) for d in deltas}
        trees[name]["cost"] = build_tree(TreeSettings("opt", **fields, stop="cost", cost_cache=str(cost_cache)), decoder)
    return trees


def run_methods(bench, trees: dict[str, Any], decoder, requests, config, args, repeats):
    """bench's summaries of plain and `trees` (name -> TreeSetup) on the requests."""
    methods = bench.build_methods(["plain", *trees], decoder, trees)
    measured = bench.bench(methods, decoder.target, requests, config, warmup=args.warmup, repeats=repeats, seed=args.seed, progress=True)
    return bench.summarise(methods, measured)


def row(s, greedy: bool) -> str:
    ratio = "–" if not s.alpha or s.expected_alpha is None else f"{s.expected_alpha / s.alpha:.2f}"
    same = "–" if not greedy else {True: "yes", False: "**NO**", None: "–"}[s.identical]
    speedup = "–" if s.speedup_vs_plain is None else f"{s.speedup_vs_plain:.2f}x"
    cells = [s.method, f"{s.ms_per_token:.2f}", speedup, f"{s.tau:.2f}", f"{s.alpha:.2f}",
             "–" if s.expected_alpha is None else f"{s.expected_alpha:.2f}", ratio,
             "–" if s.nodes_per_step is None else f"{s.nodes_per_step:.1f}",
             "–" if s.depth_per_step is None else f"{s.depth_per_step:.2f}", same]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def plot(summaries, path: Path, title: str) -> bool:
    """Horizontal bars of ms/token per method (the names are long); False when matplotlib is missing."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 0.42 * len(summaries) + 1.2), dpi=110)
    canvas = FigureCanvasAgg(fig)
    ax = fig.subplots()
    names = [s.method for s in summaries][::-1]
    values = [s.ms_per_token for s in summaries][::-1]
    bars = ax.barh(names, values, color=[f"C{i}" for i in range(len(names))])
    for bar, s in zip(bars, summaries[::-1]):
        label = f" {s.ms_per_token:.2f}" + ("" if s.speedup_vs_plain is None else f" ({s.speedup_vs_plain:.2f}x plain)")
        ax.annotate(label, (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center", fontsize=8)
    ax.set_xlabel("ms / token (lower is faster)")
    ax.set_xlim(0, max(values) * 1.35)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    canvas.print_png(str(path))
    return True


HEADER = (
    "| method | ms/token | speedup vs plain | tau | alpha (realised) | expected alpha (predicted) | predicted / realised "
    "| nodes/step | depth/step | identical to plain |\n|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> int:
    from lmms_msd.commands import bench
    from lmms_msd.pipeline import (
        RuntimeSettings,
        TreeSettings,
        build_tree,
        default_device,
        default_dtype,
        fitted_calibrator,
        inflation_shape,
        load_decoder,
        resolve_pair,
    )
    from lmms_msd.speculative.sampling import GenerationConfig
    from lmms_msd.testbed.charts import build_chart_dataset
    from lmms_msd.testbed.families.common import DESIGN_SIZE

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = arguments(argv)
    args.device = args.device or default_device()
    args.dtype = args.dtype or default_dtype(args.device)
    pair_paths = resolve_pair(args.pretrained, args.msd_model_path)
    args.pretrained, args.msd_model_path = pair_paths.pretrained, pair_paths.msd_model_path
    args.calibrator = args.calibrator or fitted_calibrator(pair_paths)
    if args.calibrator is None and set(args.scorers) - {"raw"}:
        raise SystemExit("compare_trees: --calibrator <json> is needed for the weight and tilt scorers with this pair")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    decoder = load_decoder(
        pair_paths, RuntimeSettings(args.engine, args.max_length), args.device, args.dtype, inflation_shape(args.inflate)
    )
    target = decoder.target

    # the trees: every variant x scorer, each with every delta and with its own cost model
    scorers = {}
    for variant in args.variants:
        for scorer in args.scorers:
            calibrated = {} if scorer == "raw" else {"calibrator": args.calibrator, "calibrator_mode": scorer}
            scorers[f"opt {variant} {scorer}"] = {"opt_variant": variant, **calibrated}
    trees = opt_trees(scorers, args.deltas, decoder, args.output_dir / "cost_models")
    cost_models = {name: stops["cost"].cost_model for name, stops in trees.items()}

    # 1. the development split: choose each delta by ms/token at temperature 0
    if args.chosen_from is not None:
        earlier = json.loads(args.chosen_from.read_text())
        chosen, dev, dev_note = earlier["chosen_delta"], [], f"Deltas chosen by {args.chosen_from} (its development runs)."
        missing = sorted(set(trees) - set(chosen))
        if missing:
            raise SystemExit(f"compare_trees: {args.chosen_from} chose no delta for {missing}; run the development split")
        for name, stops in trees.items():
            stops.setdefault(f"delta {chosen[name]:g}", build_tree(TreeSettings("opt", **scorers[name], stop_delta=chosen[name]), decoder))
    else:
        dev_dir = args.dev_data_dir or args.output_dir / "dev_charts"
        if not (dev_dir / "llava_test.json").is_file():
            build_chart_dataset(dev_dir, n_train=0, n_test=max(80, args.dev_limit), seed=2, image_size=DESIGN_SIZE,
                                write_parquet=False, progress=False)  # fmt: skip
        dev_requests = bench.requests_from_data_dir(dev_dir, "test", "long", args.dev_limit)
        dev_config = GenerationConfig(max_new_tokens=args.max_new_tokens or bench.DEFAULT_MAX_NEW_TOKENS)
        dev_trees = {f"{name} / {stop}": t for name, stops in trees.items() for stop, t in stops.items() if stop != "cost"}
        dev = run_methods(bench, dev_trees, decoder, dev_requests, dev_config, args, args.dev_repeats)
        dev_ms = {s.method: s.ms_per_token for s in dev}
        chosen = {}
        for name in trees:
            ranked = sorted((dev_ms[f"{name} / delta {d:g}"], -d) for d in args.deltas)
            chosen[name] = -ranked[0][1]
        dev_note = (
            f"Development: {len(dev_requests)} charts of {dev_dir} (seed 2, long answers), temperature 0, median of "
            f"{args.dev_repeats}.\n\n## Development split: ms/token by stop_delta\n\n| tree / scorer | "
            + " | ".join(f"delta {d:g}" for d in args.deltas) + " | chosen |\n|---|" + "---|" * (len(args.deltas) + 1) + "\n"
            + "\n".join(f"| {name} | " + " | ".join(f"{dev_ms[f'{name} / delta {d:g}']:.2f}" for d in args.deltas)
                        + f" | {chosen[name]:g} |" for name in trees)
        )  # fmt: skip

    # 2. the test set at each temperature
    requests, task_config = bench.requests_from_task(bench.DEFAULT_TASK, bench.DEFAULT_INCLUDE_PATH, args.limit)
    results, failed = {}, []
    parts = [
        "# OPT-Tree stop rules and scorers on the same prompts (scripts/compare_trees.py)",
        f"Pair {args.pretrained} + {args.msd_model_path}{f', inflated to {args.inflate}' if args.inflate else ''}; "
        f"calibrator {args.calibrator}; engine {args.engine}; machine {bench.machine(target)['device_name']} "
        f"({target.dtype}). "
        + ("" if args.dev_only else f"Test: the first {len(requests)} documents of {bench.DEFAULT_TASK}, median of "
                                    f"{args.repeats}, warm-up {args.warmup}. ")
        + dev_note,
    ]  # fmt: skip
    eagle2 = build_tree(TreeSettings("eagle2"), decoder)
    for temperature in [] if args.dev_only else args.temperatures:
        config = bench.at_temperature(task_config, temperature, args.max_new_tokens)
        test_trees = {"eagle2 raw": eagle2}
        for name, stops in trees.items():
            test_trees[f"{name} / delta {chosen[name]:g}"] = stops[f"delta {chosen[name]:g}"]
            test_trees[f"{name} / cost"] = stops["cost"]
        summaries = run_methods(bench, test_trees, decoder, requests, config, args, args.repeats)
        results[f"{temperature:g}"] = [asdict(s) for s in summaries]
        if config.greedy:
            failed += [f"T={temperature:g} {s.method}" for s in summaries if s.identical is False]
        parts.append(f"## Test set, temperature {temperature:g}\n\n{HEADER}\n" + "\n".join(row(s, config.greedy) for s in summaries))
        title = f"{bench.machine(target)['device_name']}, {args.engine}{f', inflated {args.inflate}' if args.inflate else ''}, T={temperature:g}"
        plot(summaries, args.output_dir / f"compare_trees_t{temperature:g}.png", title)
    parts.append("Cost models (ms), of the runtime that decodes:\n\n"
                 + "\n".join(f"- {name}: {json.dumps({k: v for k, v in c.items() if k != 'key'})}" for name, c in cost_models.items()))  # fmt: skip
    if failed:
        parts.append("**Differs from plain decoding at temperature 0:** " + "; ".join(failed))
    text = "\n\n".join(parts) + "\n"
    (args.output_dir / "compare_trees.md").write_text(text)
    report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "chosen_delta": chosen,
              "development": [asdict(s) for s in dev], "test": results, "cost_models": cost_models}  # fmt: skip
    (args.output_dir / "compare_trees.json").write_text(json.dumps(report, indent=2) + "\n")
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
