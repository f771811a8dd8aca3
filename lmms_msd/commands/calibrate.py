"""`lmms-msd calibrate`: collect observations with a target/draft pair, fit the calibrator, report.

1. Collect: run speculative decoding (OPT-Tree on the raw draft confidence, temperature 0 unless
   `--temperature` says otherwise) over the LLaVA conversation records of a data folder
   (`llava_<split>.json` and its images, as `lmms_msd.testbed.charts` writes them), recording every
   labelled node (`lmms_msd.calibration.observations.CalibrationObserver`). Or read observations saved earlier
   (`--observations`).
2. Split by request (seeded): fit on `--fit_ratio` of the requests, report on the rest.
3. Fit on each label (hard and soft), score both against the held-out hard labels; keep the one
   with the lower Brier score (or the one `--label` names) and write it to `--output` (JSON).
4. Report in `--report_dir`: `report.json`, `report.md` (ECE and Brier, raw vs calibrated, overall
   and per token type, and the label comparison) and `reliability.png`.

The default split is `train`: the test split is what the evaluation tasks run on, and a calibrator
fitted there would be tuned on the test set.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmms_msd.calibration.observations import (
    CalibrationObserver,
    Observations,
    split_by_request,
)
from lmms_msd.calibration.token_types import token_type_table
from lmms_msd.pipeline import (
    Decoder,
    PairPaths,
    RuntimeSettings,
    TreeSettings,
    build_tree,
    decode,
    load_decoder,
    request_generator,
    resolve_pair,
)
from lmms_msd.speculative.sampling import GenerationConfig
from lmms_msd.speculative.tree import TreeSpec
from lmms_msd.testbed.charts import load_records, question_of, record_images

log = logging.getLogger(__name__)

STYLES = ("long", "short", "all")


def add_arguments(parser: argparse.ArgumentParser):
    source = parser.add_argument_group("observations (one of)")
    source.add_argument("--data_dir", type=Path, help="a folder with llava_<split>.json and its images (the chart generator's)")
    source.add_argument("--observations", type=Path, help="observations saved earlier (.npz or .json): skip decoding")
    parser.add_argument("--pretrained", default=None, help="target folder or hub id (default: the bundled miniature)")
    parser.add_argument("--msd_model_path", default=None, help="MSD draft folder or hub id (default: the bundled miniature's)")
    parser.add_argument("--split", default="train", help="which llava_<split>.json to decode [train]")
    parser.add_argument("--style", default="long", choices=STYLES, help="records of this answer style [long]")
    parser.add_argument("--limit", type=int, default=200, help="requests to decode (0: all) [200]")
    parser.add_argument("--output", type=Path, required=True, help="the calibrator JSON, e.g. calibrators/<name>.json")
    parser.add_argument("--report_dir", type=Path, default=None, help="report folder [<output without .json>_report]")
    parser.add_argument("--save_observations", type=Path, default=None, help="also write the observations (.npz or .json)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampling [0]")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--fit_ratio", type=float, default=0.5, help="share of the requests to fit on; the rest is held out [0.5]")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split and sampling [0]")
    parser.add_argument("--label", default="auto", choices=("auto", "hard", "soft"), help="auto: the better on held-out steps")
    parser.add_argument("--attention_bins", type=int, default=3)
    parser.add_argument("--min_group_size", type=int, default=50)
    parser.add_argument(
        "--depth_edges", type=parse_depth_edges, default=(2,),
        help="depths that start a new depth bucket, comma-separated; 'none' pools every depth [2: depth 1 (the root's "
        "children, drafted from the target's hidden state) apart from deeper nodes; chosen on the fit split, README]",
    )  # fmt: skip
    parser.add_argument("--ece_bins", type=int, default=10, help="equal-width bins of the ECE and the diagram [10]")
    parser.add_argument("--node_budget", type=int, default=60)
    parser.add_argument("--stop_delta", type=float, default=0.3)
    parser.add_argument("--max_depth", type=int, default=10)
    parser.add_argument("--top_k", type=int, default=10)
    parser.add_argument("--device", default=None, help="[cuda if available, else cpu]")
    parser.add_argument("--dtype", default=None, help="the target's dtype [auto on cuda, float32 on cpu]")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return run


def run(args: argparse.Namespace) -> int:
    if (args.data_dir is None) == (args.observations is None):
        raise SystemExit("lmms-msd calibrate: give exactly one of --data_dir (decode and observe) or --observations (a saved file)")
    if args.observations is not None:
        observations = Observations.load(args.observations)
    else:
        observations = collect_from_folder(args)
    if args.save_observations is not None:
        observations.save(args.save_observations)
        log.info("observations written to %s", args.save_observations)
    report_dir = args.report_dir or args.output.with_name(args.output.stem + "_report")
    report = fit_and_report(
        observations, args.output, report_dir, fit_ratio=args.fit_ratio, seed=args.seed, label=args.label,
        attention_bins=args.attention_bins, min_group_size=args.min_group_size, ece_bins=args.ece_bins,
        depth_edges=args.depth_edges,
    )  # fmt: skip
    chosen = report["chosen"]
    print(
        f"calibrator ({report['label']} label) written to {args.output}; held-out ECE {chosen['raw']['ece']:.4f} raw -> "
        f"{chosen['calibrated']['ece']:.4f} calibrated, Brier {chosen['raw']['brier']:.4f} -> {chosen['calibrated']['brier']:.4f}; "
        f"report in {report_dir}"
    )
    return 0


def parse_depth_edges(text: str) -> tuple[int, ...]:
    """--depth_edges: "2" -> (2,), "2,4" -> (2, 4), "none" -> ()."""
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--depth_edges takes integers like 2 or 2,4, or none; got {text!r}") from error


# ---- 1. collect ------------------------------------------------------------------------------------------
def pair_paths(args: argparse.Namespace) -> PairPaths:
    """--pretrained and --msd_model_path, or the bundled pair when neither is given."""
    try:
        return resolve_pair(args.pretrained, args.msd_model_path)
    except FileNotFoundError as error:
        raise SystemExit(
            f"lmms-msd calibrate: no --pretrained/--msd_model_path given and the bundled pair is not available ({error}); "
            "pass --pretrained <target> --msd_model_path <draft>"
        ) from error
    except ValueError as error:
        raise SystemExit(f"lmms-msd calibrate: {error}") from error


def collect_from_folder(args: argparse.Namespace) -> Observations:
    records = load_records(args.data_dir, args.split, args.style, args.limit)  # before loading models: fail fast
    pair = pair_paths(args)
    decoder = load_decoder(pair, RuntimeSettings(), args.device, args.dtype)
    tree = TreeSettings("opt", node_budget=args.node_budget, stop_delta=args.stop_delta, max_depth=args.max_depth, top_k=args.top_k)
    observations = collect_observations(
        decoder, records, args.data_dir, build_tree(tree, decoder).builder, args.temperature, args.max_new_tokens, args.seed,
        not args.no_progress,
    )  # fmt: skip
    observations.meta.update(
        pretrained=pair.pretrained, msd_model_path=pair.msd_model_path, data_dir=str(args.data_dir), split=args.split,
        style=args.style, requests=len(records),
    )  # fmt: skip
    return observations


def collect_observations(
    decoder: Decoder, records, data_dir: Path, tree: TreeSpec, temperature: float, max_new_tokens: int, seed: int, progress: bool = True
) -> Observations:
    """Speculative decoding over the records with `tree`, observing every step. Request i is records[i].

    Sampling (temperature > 0) draws request i from a generator seeded with seed + i.
    """
    target = decoder.target
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature or 1.0)
    observer = CalibrationObserver(token_type_table(target.tokenizer, target.vocab_size))
    tokens = steps = accepted = 0
    for i, record in enumerate(tqdm(records, desc="calibrate: decoding", disable=not progress)):
        prompt = target.prepare(question_of(record), record_images(data_dir, record))
        observer.start_request(i, config)
        result = decode(decoder, prompt, config, request_generator(config, seed + i, target.device), tree, observer, track_visual=True)
        tokens += result.stats.new_tokens
        steps += result.stats.steps
        accepted += sum(result.stats.accepted)
    observations = observer.observations()
    observations.meta.update(
        temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
        tree={"kind": "opt", "node_budget": tree.node_budget, "stop_delta": tree.stop_delta, "max_depth": tree.max_depth,
              "top_k": tree.top_k, "scorer": "draft confidence"},
        decoding={"new_tokens": tokens, "steps": steps, "alpha": accepted / steps if steps else 0.0},
    )  # fmt: skip
    log.info("observed %d labelled nodes over %d steps of %d requests", len(observations), steps, len(records))
    return observations


# ---- 2-4. fit and report ---------------------------------------------------------------------------------
def fit_and_report(
    observations,
    output: Path,
    report_dir: Path,
    *,
    fit_ratio: float,
    seed: int,
    label: str,
    attention_bins: int,
    min_group_size: int,
    ece_bins: int,
    depth_edges: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Split, fit on both labels, pick one, write the calibrator and the report; returns the report."""
    # scikit-learn (seconds to import) only here: `lmms-msd --help` imports this module
    from lmms_msd.calibration.quality import compare_labels, reliability_diagram

    fit_part, held_out = split_by_request(observations, fit_ratio, seed)
    fitted, comparison = compare_labels(fit_part, held_out, attention_bins, min_group_size, ece_bins, depth_edges)
    chosen_label = comparison["winner"] if label == "auto" else label
    calibrator = fitted[chosen_label]
    report = {
        "label": chosen_label,
        "label_rule": "auto: lower held-out Brier score against hard labels" if label == "auto" else "given",
        "chosen": comparison[chosen_label]["all"],
        "label_comparison": comparison,
        "observations": {
            "total": len(observations), "fit": len(fit_part), "held_out": len(held_out),
            "fit_requests": len(np.unique(fit_part.request)), "held_out_requests": len(np.unique(held_out.request)),
        },
        "settings": {
            "fit_ratio": fit_ratio, "seed": seed, "attention_bins": attention_bins, "min_group_size": min_group_size,
            "depth_edges": list(depth_edges), "ece_bins": ece_bins,
            "ece": f"{ece_bins} equal-width bins of the prediction over [0, 1]",
        },
        "groups": [{k: m[k] for k in ("name", "level", "n")} for m in calibrator.models_],
        "bin_edges": calibrator.bin_edges_.tolist(),
        "collection": observations.meta,
        "calibrator": str(output),
    }  # fmt: skip
    calibrator.save(output, extra={"collection": observations.meta, "held_out": report["chosen"]})
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (report_dir / "report.md").write_text(to_markdown(report))
    reliability_diagram(
        {"raw confidence": (held_out.confidence, held_out.hard),
         f"calibrated ({chosen_label} label)": (calibrator.predict_observations(held_out), held_out.hard)},
        report_dir / "reliability.png",
        title=f"held-out steps ({len(held_out)} nodes), {ece_bins} equal-width bins",
        n_bins=ece_bins,
    )  # fmt: skip
    return report


def to_markdown(report: dict[str, Any]) -> str:
    obs = report["observations"]
    lines = [
        f"# Calibration report ({report['label']} label, {report['label_rule']})",
        "",
        (
            f"Observations: {obs['total']} labelled nodes; fit on {obs['fit']} ({obs['fit_requests']} requests), "
            f"held out {obs['held_out']} ({obs['held_out_requests']} requests). ECE: {report['settings']['ece']}. "
            "Scores are against the held-out hard labels (the acceptance rule in use)."
        ),
        "",
        "| tokens | n | ECE raw | ECE calibrated | Brier raw | Brier calibrated | mean label |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in report["label_comparison"][report["label"]].items():
        raw, cal = row["raw"], row["calibrated"]
        lines.append(
            f"| {name} | {raw['n']} | {raw['ece']:.4f} | {cal['ece']:.4f} | {raw['brier']:.4f} | {cal['brier']:.4f} | "
            f"{raw['mean_label']:.3f} |"
        )
    lines += ["", "Which label predicts acceptance better (fit on each, scored on held-out hard labels):", ""]
    lines += ["| fitted on | ECE | Brier |", "|---|---|---|"]
    for label in ("hard", "soft"):
        cal = report["label_comparison"][label]["all"]["calibrated"]
        mark = " (chosen)" if label == report["label"] else ""
        lines.append(f"| {label}{mark} | {cal['ece']:.4f} | {cal['brier']:.4f} |")
    lines += ["", "Groups: " + ", ".join(f"{g['name']} ({g['level']}, n={g['n']})" for g in report["groups"]), ""]
    lines += ["![reliability diagram](reliability.png)", ""]
    return "\n".join(lines)
