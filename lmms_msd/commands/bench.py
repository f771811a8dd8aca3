"""`lmms-msd bench`: plain vs speculative decoding, timed on the same prompts.

Methods (`--methods`, every one by default):

    hf_generate  transformers' own `generate` on the same target (greedy only): the outside reference
    plain        `plain_generate`: one target forward per token, the reference the others must equal
    eagle2       speculative decoding, EAGLE-2 tree
    opt          speculative decoding, OPT-Tree on the raw draft confidence
    opt_cal      speculative decoding, OPT-Tree on the calibrator's predicted acceptance
    opt_cost, opt_cal_cost   opt and opt_cal with stop=cost (`lmms_msd.speculative.cost`), each on the
                 cost model of the runtime that decodes and its own scorer, measured at start-up and
                 saved in --cost_cache (read from there by a later run) (run only when named)

Every method decodes every request from the same embedded prompt (image preprocessing and the vision
tower are done once per request, untimed: they are the same for all methods). Timing:

- the first `--warmup` requests run once through every method first, untimed (allocator, kernels, caches);
- each request then runs `--repeats` times through every method, the methods interleaved so that a
  drift of the machine falls on all of them alike; each run is timed with `time.perf_counter` between
  device synchronisations; a request's time is the median of its repeats;
- per method: ms/token = the sum of the request medians / the new tokens * 1000; tokens/s; speedups are
  ratios of ms/token (so they stay right when sampling gives the methods different lengths);
- one more run per request with `profile=True` (the device synchronised at every phase boundary,
  which slows it, so it is not among the timed runs) splits the time into drafting, verification
  (target forwards after the prefill, with the acceptance: `decoding.verify_step`), other loop work (stop
  checks, cache keeping, draft advance) and the prefill, as shares of that run's wall time. The same run also records, through the
  loop's `observer` hook, what the trees looked like (speculative methods): draft nodes per step (root
  excluded), the depth of the deepest node per step, the share of steps whose accepted path reached that
  deepest level ("bottom %": the tree was not deep enough for what the target would have taken), and the
  builder's own expected accepted length (the sum of its node weights) per step, to set against alpha.

At temperature 0 every run of every method (repeats and profiled run included) must give plain
decoding's first run's token ids on every request: a speculative method that does not is marked and
the command exits 1. hf_generate's differences are reported but do not fail the run (its kernels and
cache are transformers', not ours). At a positive temperature the methods sample (each request from a
generator seeded with `--seed` + its index) and nothing is compared; hf_generate is skipped.

The pair, its trees and its runtime come from `lmms_msd.pipeline`, as the plugin's do. `--engine static`
runs plain and speculative decoding through `lmms_msd.speculative.fast.StaticEngine` (preallocated
caches, CUDA graphs on cuda); hf_generate is the same in both engines. `--inflate 7b` (or
HIDDENxLAYERS) replaces the pair, after loading, by its 7B-shaped copy (`lmms_msd.testbed.inflate`):
about 7B's cost per forward, the miniature's outputs. `--stop_delta`, `--node_budget`, `--max_depth`,
`--top_k` and `--opt_variant` set OPT-Tree's settings for every opt* method (default: `OptTree`'s; the
plugin's model_args of the same names); `--calibrator_mode` how opt_cal's (and opt_cal_cost's) calibrator scores nodes
(`weight`, or the thesis's logit `tilt`: `lmms_msd.calibration.scorer.calibrated_scorer`).

`--batch 1,4,16,64` measures throughput instead: every method at each batch size, tokens/s and
documents/s (`lmms_msd.commands.bench_batch`, which writes bench_batch.json/.md/.png).

Outputs in `--output_dir`: bench.json (the settings, the machine with its measured copy bandwidth and launch
time, `lmms_msd.commands.machine`, per-method totals and per-request numbers), bench.md (the table, also
printed) and bench.png (ms/token per method) when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from lmms_msd.commands import bench_batch
from lmms_msd.commands.bench_batch import parse_batches
from lmms_msd.commands.machine import describe, speed_text
from lmms_msd.models.target import EmbeddedPrompt, Target
from lmms_msd.pipeline import (
    ENGINES,
    Decoder,
    PairSettings,
    RuntimeSettings,
    TreeSettings,
    TreeSetup,
    build_decoder,
    build_tree,
    decode,
    default_device,
    default_dtype,
    fitted_calibrator,
    inflation_shape,
    load_pair,
    request_generator,
    resolve_pair,
    static_engine_class,
)
from lmms_msd.speculative.batching import NodeBudgets, TreeSchedule, same_tree
from lmms_msd.speculative.decoding import DecodeStats, GenerationResult, _synchronize
from lmms_msd.speculative.sampling import GenerationConfig
from lmms_msd.speculative.stopping import Stopper
from lmms_msd.speculative.tree import TreeSpec
from lmms_msd.testbed.charts import load_records, question_of, record_images

log = logging.getLogger(__name__)

METHODS = ("hf_generate", "plain", "eagle2", "opt", "opt_cal", "opt_cost", "opt_cal_cost")
DEFAULT_METHODS = METHODS[:5]
REFERENCE = "plain"
HF = "hf_generate"
SPECULATIVE = ("eagle2", "opt", "opt_cal", "opt_cost", "opt_cal_cost")
CALIBRATED = ("opt_cal", "opt_cal_cost")
REPO = Path(__file__).resolve().parents[2]
DEFAULT_TASK = "msd_chartqa_synth_long"
DEFAULT_INCLUDE_PATH = REPO / "tasks"  # the repository's local tasks (absent from an installed wheel)
DEFAULT_MAX_NEW_TOKENS = 256  # the long-answer task's setting, for a data folder
FILES = ("bench.json", "bench.md", "bench.png")

# (prompt, config, generator, profile, observer) -> result; the observer is called after every verification
# (`lmms_msd.speculative.decoding.StepObserver`; ignored by hf_generate and plain)
RunFn = Callable[[EmbeddedPrompt, GenerationConfig, "torch.Generator | None", bool, "Callable | None"], GenerationResult]


# ---- requests ------------------------------------------------------------------------------------------
@dataclass
class BenchRequest:
    """One prompt: a question (the text the plugin would get as context) and its images."""

    doc_id: int
    context: str
    images: list[Image.Image]


def requests_from_data_dir(data_dir: Path, split: str, style: str, limit: int) -> list[BenchRequest]:
    """The LLaVA conversation records of a chart data folder (`lmms-msd make-charts`), read as
    `lmms-msd calibrate` reads them: the first human turn, the record's image."""
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"--data_dir {data_dir}: no such folder; write one with `lmms-msd make-charts --out {data_dir}`, "
            "or pass --task/--include_path"
        )
    records = load_records(data_dir, split, style, limit)
    return [BenchRequest(i, question_of(record), record_images(data_dir, record)) for i, record in enumerate(records)]


def requests_from_task(task: str, include_path: Path, limit: int) -> tuple[list[BenchRequest], GenerationConfig]:
    """The first `limit` documents of a task (its YAML under `include_path`), made into requests as lmms-eval
    makes them for the plugin, and the settings of the task's gen_kwargs (`lmms_msd.lmms_eval.tasks`; lmms-eval,
    imported there, is not needed for a data folder)."""
    from lmms_msd.lmms_eval.tasks import (
        find_task_yaml,
        load_task,
        task_generation_config,
        task_prompts,
    )

    loaded = load_task(find_task_yaml(task, include_path))
    requests = [BenchRequest(p.doc_id, p.context, p.images) for p in task_prompts(loaded, limit)]
    return requests, task_generation_config(loaded)


# ---- the methods ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One way to decode. kind: "hf" (transformers' generate), "plain" or "speculative"; tau and the
    phases are reported for plain and speculative methods, losslessness is enforced on speculative ones."""

    name: str
    kind: str
    run: RunFn


def method_trees(
    names, opt: dict[str, Any], calibrator: str | None, calibrator_mode: str = "weight", cost_cache: str | None = None
) -> dict[str, TreeSettings]:
    """name -> the tree settings of each speculative method in `names`: eagle2 the plugin's defaults;
    opt and opt_cal OPT-Tree with `opt` (TreeSettings' OPT-Tree fields, e.g. {"stop_delta": 0.2}) over
    its defaults, opt_cal scored by `calibrator` in `calibrator_mode`; opt_cost and opt_cal_cost the same
    with stop "cost", their cost models in `cost_cache`."""
    calibrated = {"calibrator": calibrator, "calibrator_mode": calibrator_mode}
    cost = {"stop": "cost", "cost_cache": cost_cache}
    trees = {"eagle2": TreeSettings("eagle2"), "opt": TreeSettings("opt", **opt), "opt_cal": TreeSettings("opt", **opt, **calibrated),
             "opt_cost": TreeSettings("opt", **opt, **cost), "opt_cal_cost": TreeSettings("opt", **opt, **calibrated, **cost)}  # fmt: skip
    return {name: trees[name] for name in names if name in SPECULATIVE}


def builder_settings(tree: TreeSpec) -> dict[str, Any]:
    """A tree spec's settings for the JSON, kind named by its constructor (its scorer by repr; a cost
    model is the report's "cost_models")."""
    settings: dict[str, Any] = {"kind": {"eagle2": "EagleTree", "opt": "OptTree"}[tree.kind]}
    for name, value in tree.settings().items():
        if name != "cost":
            settings[name] = value if value is None or isinstance(value, (int, float, str)) else repr(value)
    return settings


def hf_generate_method(target: Target) -> Method:
    """transformers' `generate` from the same input embeddings, cut where our stopping rule cuts."""

    @torch.inference_mode()
    def run(prompt, config, generator, profile, observer=None):
        if not config.greedy:
            raise ValueError("hf_generate is benchmarked greedy only")
        stop_strings = {"stop_strings": list(config.until), "tokenizer": target.tokenizer} if config.until else {}
        mask = torch.ones(prompt.inputs_embeds.shape[:2], dtype=torch.long, device=target.device)
        start = time.perf_counter()
        out = target.model.generate(
            inputs_embeds=prompt.inputs_embeds, attention_mask=mask, max_new_tokens=config.max_new_tokens,
            do_sample=False, eos_token_id=target.eos_token_id, pad_token_id=target.eos_token_id, **stop_strings,
        )  # fmt: skip
        wall = time.perf_counter() - start
        # from inputs_embeds alone, generate returns the new tokens only (the prompt has no ids to echo)
        if out.shape[1] > config.max_new_tokens:
            raise RuntimeError(
                f"hf_generate returned {out.shape[1]} tokens for max_new_tokens={config.max_new_tokens}: "
                "this transformers version echoes the prompt; the comparison would be wrong"
            )
        tokens = out[0].tolist()
        stopper = Stopper(target.tokenizer, target.eos_token_id, config.max_new_tokens, config.until)
        del tokens[stopper.first_stop(tokens, 0) or len(tokens) :]
        return GenerationResult(stopper.text(tokens), tokens, DecodeStats(new_tokens=len(tokens), wall_s=wall))

    return Method(HF, "hf", run)


def build_methods(names, decoder: Decoder, trees: dict[str, TreeSetup]) -> list[Method]:
    """The methods in `names`: plain and speculative decoding on the decoder's runtime (eager or
    static), speculative with `trees[name]`, and hf_generate on its target."""

    def plain(p, c, g, profile, observer=None):
        return decode(decoder, p, c, g, profile=profile)

    built = {REFERENCE: Method(REFERENCE, "plain", plain), HF: hf_generate_method(decoder.target)}
    for name, tree in trees.items():

        def run(p, c, g, profile, observer=None, tree=tree):
            return decode(decoder, p, c, g, tree.builder, observer, tree.track_visual, profile)

        built[name] = Method(name, "speculative", run)
    return [built[name] for name in names]


# ---- timing ------------------------------------------------------------------------------------------------
@dataclass
class TreeStats:
    """Sums over the steps of one run, recorded by the decoding loop's observer (the profiled run only: it
    reads the device once per step).

    Example: a step over a tree of 6 draft nodes whose deepest is at depth 3, with 3 nodes accepted, adds
    1 step, 6 nodes, depth 3 and 1 bottom step (the path reached depth 3: a deeper tree might have given more).
    """

    steps: int = 0
    nodes: int = 0  # draft nodes (root excluded)
    depth: int = 0  # the deepest node's depth
    bottom: int = 0  # steps whose accepted path reached the deepest node's depth
    expected: float = 0.0  # the builder's expected accepted length: the sum of the draft nodes' weights exp(score)

    def __call__(self, tree, logits, acceptance) -> None:
        deepest, expected = torch.stack([tree.depths.max().float(), tree.scores[1:].exp().sum().float()]).tolist()
        self.steps += 1
        self.nodes += len(tree) - 1
        self.depth += int(deepest)
        self.bottom += int(acceptance.accepted >= deepest > 0)
        self.expected += expected


@dataclass
class Run:
    """One method on one request: the median wall time of the timed repeats, the statistics of the first,
    and the phases of the profiled run (None for hf_generate)."""

    new_tokens: int
    wall_s: float  # median of wall_s_repeats
    wall_s_repeats: list[float]
    steps: int
    accepted: int  # draft tokens accepted over the request
    text: str
    identical: bool | None = None  # every run's token ids equal plain's first run's; None: not compared
    phases: dict[str, float] | None = None  # draft_s, verify_s, other_s, prefill_s, wall_s of the profiled run
    trees: TreeStats | None = None  # the profiled run's trees (speculative methods)


def timed_run(method: Method, prompt, config, seed: int, device, profile: bool = False, observer=None) -> tuple[Any, float]:
    """One run between device synchronisations: (result, seconds)."""
    generator = request_generator(config, seed, device)
    _synchronize(device)
    start = time.perf_counter()
    result = method.run(prompt, config, generator, profile, observer)
    _synchronize(device)
    return result, time.perf_counter() - start


def measure_request(methods: list[Method], prompt, config, seed: int, repeats: int, device) -> dict[str, Run]:
    results: dict[str, list] = {m.name: [] for m in methods}
    seconds: dict[str, list[float]] = {m.name: [] for m in methods}
    for _ in range(repeats):
        for method in methods:  # interleaved: a drift of the machine falls on every method alike
            result, wall = timed_run(method, prompt, config, seed, device)
            results[method.name].append(result)
            seconds[method.name].append(wall)
    runs = {}
    for method in methods:
        first = results[method.name][0]
        run = Run(
            new_tokens=first.stats.new_tokens, wall_s=statistics.median(seconds[method.name]),
            wall_s_repeats=seconds[method.name], steps=first.stats.steps, accepted=sum(first.stats.accepted), text=first.text,
        )  # fmt: skip
        if method.kind != "hf":
            trees = TreeStats() if method.kind == "speculative" else None
            profiled, _ = timed_run(method, prompt, config, seed, device, profile=True, observer=trees)
            run.trees = trees
            s = profiled.stats
            run.phases = {"draft_s": s.draft_s, "verify_s": s.verify_s, "other_s": s.other_s, "prefill_s": s.prefill_s, "wall_s": s.wall_s}
            results[method.name].append(profiled)
        runs[method.name] = run
    if config.greedy and REFERENCE in results:
        reference = results[REFERENCE][0].token_ids
        for method in methods:
            runs[method.name].identical = all(r.token_ids == reference for r in results[method.name])
    return runs


def bench(methods: list[Method], target, requests: list[BenchRequest], config, *, warmup: int, repeats: int, seed: int,
          progress: bool = True) -> list[dict[str, Any]]:  # fmt: skip
    """Warm up, then time every request through every method: per request {doc_id, context, prompt_tokens, runs}."""
    prompts = [target.prepare(r.context, r.images) for r in requests]
    for i, prompt in enumerate(prompts[:warmup]):
        for method in methods:
            timed_run(method, prompt, config, seed + i, target.device)
    log.info("warmed up on %d request(s)", min(warmup, len(prompts)))
    measured = []
    for i, (request, prompt) in enumerate(tqdm(list(zip(requests, prompts)), desc="bench", disable=not progress)):
        runs = measure_request(methods, prompt, config, seed + i, repeats, target.device)
        measured.append({"doc_id": request.doc_id, "context": request.context, "prompt_tokens": int(prompt.input_ids.shape[0]),
                         "runs": runs})  # fmt: skip
    return measured


# ---- totals --------------------------------------------------------------------------------------------------
@dataclass
class Summary:
    """One method over all requests."""

    method: str
    requests: int
    new_tokens: int
    wall_s: float  # sum of the request medians
    ms_per_token: float
    tokens_per_s: float
    tau: float | None  # committed tokens per step (plain: 1); None for hf_generate
    alpha: float | None  # accepted draft tokens per step
    shares: dict[str, float] | None  # draft, verify, other, prefill: shares of the profiled runs' wall time
    identical: bool | None  # None: not compared (sampling, or no plain method)
    differing_doc_ids: list[int] = field(default_factory=list)
    speedup_vs_plain: float | None = None  # plain's ms/token / this method's
    speedup_vs_hf_generate: float | None = None
    # the profiled runs' trees (speculative methods; `TreeStats`): per step, over all requests
    nodes_per_step: float | None = None  # draft nodes
    depth_per_step: float | None = None  # the deepest node's depth
    bottom_share: float | None = None  # share of steps whose accepted path reached the deepest node
    expected_alpha: float | None = None  # the builder's own expected accepted length (sum of node weights)


def summarise(methods: list[Method], measured: list[dict[str, Any]]) -> list[Summary]:
    summaries = []
    for method in methods:
        runs = [(m["doc_id"], m["runs"][method.name]) for m in measured]
        tokens = sum(r.new_tokens for _, r in runs)
        wall = sum(r.wall_s for _, r in runs)
        steps, accepted = sum(r.steps for _, r in runs), sum(r.accepted for _, r in runs)
        alpha = accepted / steps if steps and method.kind != "hf" else None
        shares = None
        if method.kind != "hf":
            total = sum(r.phases["wall_s"] for _, r in runs)
            shares = {k: sum(r.phases[f"{k}_s"] for _, r in runs) / total for k in ("draft", "verify", "other", "prefill")}
        compared = [r.identical for _, r in runs]
        trees = tree_totals([r.trees for _, r in runs]) if method.kind == "speculative" else {}
        summaries.append(Summary(
            method=method.name, requests=len(runs), new_tokens=tokens, wall_s=wall,
            ms_per_token=1000 * wall / tokens if tokens else float("nan"), tokens_per_s=tokens / wall if wall else 0.0,
            tau=None if alpha is None else alpha + 1, alpha=alpha, shares=shares,
            identical=None if None in compared else all(compared),
            differing_doc_ids=[doc_id for doc_id, r in runs if r.identical is False], **trees,
        ))  # fmt: skip
    by_name = {s.method: s for s in summaries}
    for s in summaries:
        for reference, attribute in ((REFERENCE, "speedup_vs_plain"), (HF, "speedup_vs_hf_generate")):
            if reference in by_name:
                setattr(s, attribute, by_name[reference].ms_per_token / s.ms_per_token)
    return summaries


def tree_totals(stats: list[TreeStats | None]) -> dict[str, float]:
    """Summary's per-step tree fields from the requests' `TreeStats` (empty when none was recorded)."""
    if any(s is None for s in stats):
        return {}
    steps = sum(s.steps for s in stats)
    if not steps:
        return {}
    return {"nodes_per_step": sum(s.nodes for s in stats) / steps, "depth_per_step": sum(s.depth for s in stats) / steps,
            "bottom_share": sum(s.bottom for s in stats) / steps, "expected_alpha": sum(s.expected for s in stats) / steps}  # fmt: skip


def lossless_failures(summaries: list[Summary]) -> list[Summary]:
    """Speculative methods whose greedy outputs differ from plain decoding's."""
    return [s for s in summaries if s.method in SPECULATIVE and s.identical is False]


# ---- outputs -------------------------------------------------------------------------------------------------
def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{fmt}}{suffix}"


def _identical_text(s: Summary, greedy: bool) -> str:
    if s.identical is None:
        return "not checked (sampling)" if not greedy else "not checked (no plain)"
    return "yes" if s.identical else f"**NO** (docs {', '.join(map(str, s.differing_doc_ids))})"


def markdown_table(summaries: list[Summary], greedy: bool) -> str:
    lines = [
        (
            "| method | ms/token | tokens/s | speedup vs plain | speedup vs hf_generate | tau | alpha | draft % | verify % | "
            "other % | prefill % | nodes/step | depth/step | bottom % | expected alpha | identical |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        shares = [None] * 4 if s.shares is None else [100 * s.shares[k] for k in ("draft", "verify", "other", "prefill")]
        lines.append(
            f"| {s.method} | {s.ms_per_token:.2f} | {s.tokens_per_s:.1f} | {_num(s.speedup_vs_plain, '.2f', 'x')} | "
            f"{_num(s.speedup_vs_hf_generate, '.2f', 'x')} | {_num(s.tau, '.2f')} | {_num(s.alpha, '.2f')} | "
            + " | ".join(_num(v, ".1f") for v in shares)
            + f" | {_num(s.nodes_per_step, '.1f')} | {_num(s.depth_per_step, '.2f')} | "
            + f"{_num(None if s.bottom_share is None else 100 * s.bottom_share, '.1f')} | {_num(s.expected_alpha, '.2f')}"
            + f" | {_identical_text(s, greedy)} |"
        )
    return "\n".join(lines)


def markdown_report(report: dict[str, Any]) -> str:
    c = report["config"]
    summaries = [Summary(**s) for s in report["methods"]]
    greedy = report["greedy"]
    source = f"task {c['task']} ({c['include_path']})" if c["task"] else f"data folder {c['data_dir']} ({c['split']}, {c['style']})"
    pair = f"Pair: {c['pretrained']} + {c['msd_model_path']}" + (f", inflated to {c['inflate']}" if c["inflate"] else "")
    m = report["machine"]
    trees = "".join(f" {name}: " + ", ".join(f"{k} {v}" for k, v in t.items() if k not in ("kind", "scorer") and v is not None) + "."
                    for name, t in report["trees"].items())  # fmt: skip
    parts = [
        "# lmms-msd bench",
        f"{pair}. Calibrator: {c['calibrator'] or 'none'}. Engine: {c['engine']}.{trees}",
        f"Machine: {m['device_name']} ({c['device']}, {m['dtype']}); torch {m['torch']}, transformers {m['transformers']}"
        + (f", triton {m['triton']}" if m.get("triton") else "") + speed_text(m) + ".",
        (
            f"Requests: {report['requests']} from {source}; max_new_tokens {report['generation']['max_new_tokens']}, "
            f"temperature {c['temperature']:g}, stop strings {json.dumps(report['generation']['until'])}; "
            f"warm-up {c['warmup']} request(s), median of {c['repeats']} repeat(s)."
        ),
        markdown_table(summaries, greedy),
        *[cost_text(name, cost) for name, cost in report.get("cost_models", {}).items()],
        (
            "ms/token: the sum over requests of the median wall time of the repeats, over the new tokens. Speedups are "
            "ratios of ms/token. Phase shares come from one extra profiled run per request (device synchronised "
            "between phases) and are shares of that run's wall time; verify includes the acceptance; other = stop checks, "
            "cache keeping and the draft's advance over the committed tokens. tau = committed tokens per step, alpha = tau - 1. "
            "The tree columns come from the same profiled runs, per step: draft nodes (root excluded), the depth of the "
            "deepest node, the share of steps whose accepted path reached that depth (bottom %), and the tree "
            "builder's own expected accepted length (the sum of its node weights: raw draft confidences for eagle2 "
            "and opt*, calibrated ones for opt_cal*) to set against alpha."
        ),
    ]
    if not greedy:
        parts.append(f"Outputs were not compared: at temperature {c['temperature']:g} the methods sample; hf_generate is greedy only.")
    else:
        failed = lossless_failures(summaries)
        if failed:
            parts.append("**Speculative decoding differs from plain decoding at temperature 0:** "
                         + "; ".join(f"{s.method} on docs {s.differing_doc_ids}" for s in failed))  # fmt: skip
        elif REFERENCE not in {s.method for s in summaries}:
            parts.append("Outputs were not compared: plain decoding, the reference, was not among the methods.")
        else:
            parts.append("At temperature 0 every speculative method gave plain decoding's token ids on every request.")
    return "\n\n".join(parts) + "\n"


def cost_text(name: str, cost: dict[str, Any]) -> str:
    """A *_cost method's cost model (`lmms_msd.pipeline.TreeSetup.cost_model`) in a sentence."""
    verify = ", ".join(f"{w}: {t:.2f}" for w, t in cost["verify_ms"].items())
    return (
        f"Cost model of {name} ({'measured at start-up' if cost['measured_now'] else 'read from ' + cost['file']}, ms): "
        f"verification by tree size (root included) {verify}; first level {cost['draft_root_ms']:.2f}, each further "
        f"level {cost['draft_level_ms']:.2f}, rest of a step {cost['step_ms']:.2f}; plain decoding's step {cost['plain_step_ms']:.2f}."
    )


def plot(summaries: list[Summary], path: Path) -> bool:
    """A bar chart of ms/token per method; False when matplotlib is missing (it is optional: imported here)."""
    if importlib.util.find_spec("matplotlib") is None:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.2 * len(summaries) + 2, 3.2), dpi=110)
    canvas = FigureCanvasAgg(fig)
    ax = fig.subplots()
    bars = ax.bar([s.method for s in summaries], [s.ms_per_token for s in summaries],
                  color=[f"C{i}" for i in range(len(summaries))], hatch=None)  # fmt: skip
    for bar, s in zip(bars, summaries):
        if s.speedup_vs_plain is not None:
            ax.annotate(f"{s.speedup_vs_plain:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ms / token (lower is faster)")
    ax.set_title("lmms-msd bench (labels: speedup vs plain)", fontsize=9)
    fig.tight_layout()
    canvas.print_png(str(path))
    return True


def write_outputs(report: dict[str, Any], output_dir: Path) -> str:
    output_dir.mkdir(parents=True, exist_ok=True)
    text = markdown_report(report)
    (output_dir / "bench.md").write_text(text)
    (output_dir / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    if not plot([Summary(**s) for s in report["methods"]], output_dir / "bench.png"):
        log.info("matplotlib is not installed: no bench.png")
    return text


# ---- the command ---------------------------------------------------------------------------------------------
def parse_methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = sorted(set(names) - set(METHODS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--methods takes a comma list of {', '.join(METHODS)}; got {text!r}")
    return [m for m in METHODS if m in names]  # the table's order, duplicates dropped


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--pretrained", default=None, help="target folder or hub id (default: the bundled miniature)")
    parser.add_argument("--msd_model_path", default=None, help="MSD draft folder or hub id (default: the bundled miniature's)")
    parser.add_argument("--calibrator", default=None, help="opt_cal's calibrator JSON (default with the bundled pair: its own)")
    source = parser.add_argument_group("prompts (default: the repository's long-answer chart task)")
    source.add_argument("--data_dir", type=Path, default=None, help="a chart data folder (`lmms-msd make-charts`): llava_<split>.json + images")
    source.add_argument("--split", default="test", help="the data folder's split [test]")
    source.add_argument("--style", default="long", choices=("long", "short", "all"), help="the data folder's answer style [long]")
    source.add_argument("--task", default=None, help=f"an lmms-eval task with local data [{DEFAULT_TASK}]")
    source.add_argument("--include_path", type=Path, default=None, help="the folder of the task's YAML [the repository's tasks/]")
    parser.add_argument("--limit", type=int, default=20, help="requests [20]")
    parser.add_argument("--max_new_tokens", type=int, default=None, help=f"[the task's; {DEFAULT_MAX_NEW_TOKENS} for a data folder]")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy, outputs checked against plain [0]")
    parser.add_argument("--seed", type=int, default=0, help="sampling: request i draws from seed + i [0]")
    parser.add_argument("--warmup", type=int, default=2, help="requests run once, untimed, before timing [2]")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per request and method; the median counts [3]")
    parser.add_argument("--methods", type=parse_methods, default=list(DEFAULT_METHODS),
                        help=f"comma list of {','.join(METHODS)} [{','.join(DEFAULT_METHODS)}]")  # fmt: skip
    opt = parser.add_argument_group("OPT-Tree's settings, for every opt* method [OptTree's defaults]")
    opt.add_argument("--stop_delta", type=float, default=None, help="early-stop threshold on the expected accepted length")
    opt.add_argument("--node_budget", type=int, default=None, help="draft nodes kept (the root not counted)")
    opt.add_argument("--max_depth", type=int, default=None, help="the deepest a node can be")
    opt.add_argument("--top_k", type=int, default=None, help="frontier width and children per frontier node")
    opt.add_argument("--opt_variant", default=None, help="upstream or frontier (lmms_msd.speculative.tree.OptTree)")
    opt.add_argument(
        "--calibrator_mode", default="weight", choices=("weight", "tilt"),
        help="opt_cal: the calibrated probability as the node weight, or the thesis's tilt of the draft's logits [weight]",
    )  # fmt: skip
    parser.add_argument("--engine", default="eager", choices=ENGINES, help="eager: lmms_msd.speculative.decoding; static: lmms_msd.speculative.fast [eager]")
    parser.add_argument("--max_length", type=int, default=2048, help="--engine static: the preallocated cache length [2048]")
    parser.add_argument(
        "--batched_drafting", action="store_true",
        help="--engine static with --batch: all rows grow their trees in one draft forward per level (BatchedStaticEngine)",
    )  # fmt: skip
    parser.add_argument(
        "--torch_compile", action="store_true",
        help="--engine static: the target's layers (and at batch 1 the draft's head) through torch.compile; compilations happen in the warm-up",
    )  # fmt: skip
    parser.add_argument(
        "--inflate", default=None,
        help='benchmark the pair embedded into a bigger shape computing the same function: "7b" or HIDDENxLAYERS, e.g. 512x6',
    )  # fmt: skip
    parser.add_argument("--device", default=None, help="[cuda if available, else cpu]")
    parser.add_argument("--dtype", default=None, help="float16 / bfloat16 / float32 / auto [auto on cuda, float32 on cpu]")
    parser.add_argument("--output_dir", type=Path, default=Path("build/bench"), help="bench.json, bench.md, bench.png [build/bench]")
    parser.add_argument("--cost_cache", type=Path, default=None,
                        help="opt_cost, opt_cal_cost: their cost models' folder, read when there, else measured and saved [OUTPUT_DIR/cost_models]")  # fmt: skip
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    batch = parser.add_argument_group("throughput (lmms_msd.commands.bench_batch): many requests at once")
    batch.add_argument("--batch", type=parse_batches, default=None,
                       help="comma list of batch sizes, e.g. 1,4,16,64: tokens/s and documents/s of every method at each, "
                            "instead of the per-request latency table [unset]")  # fmt: skip
    batch.add_argument("--batch_node_budgets", default=None, action="append",
                       help="--batch: the trees' node budget by batch size, B:N,... (0: plain steps), e.g. 1:60,16:20,64:0; "
                            "repeat it to compare schedules [the trees' own]")  # fmt: skip
    return run


def check_args(args: argparse.Namespace) -> None:
    """Usage errors, before anything is loaded."""
    if args.data_dir is not None and args.task is not None:
        raise SystemExit("lmms-msd bench: give --data_dir or --task, not both")
    for name, least in (("limit", 1), ("repeats", 1), ("warmup", 0)):
        if getattr(args, name) < least:
            raise SystemExit(f"lmms-msd bench: --{name} must be at least {least}, got {getattr(args, name)}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise SystemExit(f"lmms-msd bench: --max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise SystemExit(f"lmms-msd bench: --temperature must be >= 0, got {args.temperature}")
    try:
        TreeSettings("opt", **opt_settings(args))
    except ValueError as error:
        raise SystemExit(f"lmms-msd bench: {error} (--stop_delta, --node_budget, --max_depth, --top_k, --opt_variant)") from error


def opt_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The OPT-Tree settings given on the command line, as TreeSettings' fields."""
    given = {"stop_delta": args.stop_delta, "node_budget": args.node_budget, "max_depth": args.max_depth,
             "top_k": args.top_k, "opt_variant": args.opt_variant}  # fmt: skip
    return {name: value for name, value in given.items() if value is not None}


def resolve_pair_and_calibrator(args: argparse.Namespace) -> None:
    """Fills in the bundled pair (and its calibrator) where nothing was named (`lmms_msd.pipeline.resolve_pair`)."""
    try:
        pair = resolve_pair(args.pretrained, args.msd_model_path, need_draft=bool(set(args.methods) & set(SPECULATIVE)))
    except ValueError as error:
        raise SystemExit(f"lmms-msd bench: {error}") from error
    args.pretrained, args.msd_model_path = pair.pretrained, pair.msd_model_path
    if set(CALIBRATED) & set(args.methods):
        if args.calibrator is None:
            args.calibrator = fitted_calibrator(pair)
        if args.calibrator is None:
            raise SystemExit(
                "lmms-msd bench: opt_cal and opt_cal_cost need --calibrator <json> for this pair (fit one with "
                "`lmms-msd calibrate`), or drop them from --methods"
            )
        if not Path(args.calibrator).is_file():
            raise SystemExit(f"lmms-msd bench: --calibrator {args.calibrator}: no such file")


def load_requests(args: argparse.Namespace):
    """(requests, GenerationConfig) from the data folder or the task."""
    if args.data_dir is not None:
        requests = requests_from_data_dir(args.data_dir, args.split, args.style, args.limit)
        config = GenerationConfig(max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    else:
        args.task = args.task or DEFAULT_TASK
        args.include_path = args.include_path or DEFAULT_INCLUDE_PATH
        requests, config = requests_from_task(args.task, args.include_path, args.limit)
    if not requests:
        raise SystemExit("lmms-msd bench: no requests to run")
    return requests, at_temperature(config, args.temperature, args.max_new_tokens)


def at_temperature(config: GenerationConfig, temperature: float, max_new_tokens: int | None = None) -> GenerationConfig:
    """The requests' settings `config` (a task's gen_kwargs) decoded at `temperature` (0: greedy, the task's own
    temperature kept), with `max_new_tokens` when given: what --temperature and --max_new_tokens mean."""
    return replace(
        config, max_new_tokens=max_new_tokens or config.max_new_tokens, do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else config.temperature,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    check_args(args)
    if args.engine == "static":
        try:
            static_engine_class()  # fail before loading anything
        except (ImportError, AttributeError) as error:
            raise SystemExit(
                f"lmms-msd bench: --engine static needs lmms_msd.speculative.fast.StaticEngine, which cannot be imported ({error}); "
                "use --engine eager"
            ) from error
    try:
        schedules = {table: NodeBudgets.parse(table) for table in args.batch_node_budgets or []} or {"": same_tree}
    except ValueError as error:
        raise SystemExit(f"lmms-msd bench: --batch_node_budgets: {error}") from error
    try:
        shape = inflation_shape(args.inflate)
    except ValueError as error:
        raise SystemExit(f"lmms-msd bench: --inflate {args.inflate}: {error}") from error
    runtime = RuntimeSettings(args.engine, args.max_length, max_batch=max(args.batch or [1]), batched_drafting=args.batched_drafting)
    try:
        runtime = replace(runtime, compile=args.torch_compile)
    except ValueError as error:  # valid without it: RuntimeSettings refused --torch_compile (compile there)
        raise SystemExit("lmms-msd bench: --torch_compile compiles the static engine's forwards: add --engine static") from error
    args.device = args.device or default_device()
    args.dtype = args.dtype or default_dtype(args.device)
    resolve_pair_and_calibrator(args)
    try:
        requests, config = load_requests(args)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"lmms-msd bench: {error}") from error
    names = list(args.methods)
    if not config.greedy and HF in names:
        log.warning("hf_generate is greedy only: skipped at temperature %g", config.temperature)
        names.remove(HF)
    if args.batch is not None and HF in names:
        log.warning("hf_generate is not batched here: skipped with --batch")
        names.remove(HF)
    if not names:
        raise SystemExit("lmms-msd bench: no method left to run")
    need_draft = bool(set(names) & set(SPECULATIVE))
    pair = load_pair(PairSettings(args.pretrained, args.msd_model_path if need_draft else None, args.device, args.dtype, inflate=shape))
    decoder = build_decoder(pair, runtime)
    args.cost_cache = args.cost_cache or args.output_dir / "cost_models"
    settings = method_trees(names, opt_settings(args), args.calibrator, args.calibrator_mode, str(args.cost_cache))
    trees = {name: build_tree(tree, decoder) for name, tree in settings.items()}
    if args.batch is not None:
        return run_batches(args, decoder, names, trees, requests, config, schedules)
    methods = build_methods(names, decoder, trees)
    measured = bench(methods, decoder.target, requests, config, warmup=args.warmup, repeats=args.repeats, seed=args.seed,
                     progress=not args.no_progress)  # fmt: skip
    summaries = summarise(methods, measured)
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "handler"},
        "machine": describe(decoder.target.device, decoder.target.dtype),
        "generation": asdict(config),
        "greedy": config.greedy,
        "requests": len(requests),
        "trees": {name: builder_settings(tree.builder) for name, tree in trees.items()},
        "cost_models": {name: tree.cost_model for name, tree in trees.items() if tree.cost_model is not None},
        "methods": [asdict(s) for s in summaries],
        "per_request": [{**m, "runs": {name: asdict(r) for name, r in m["runs"].items()}} for m in measured],
    }
    text = write_outputs(report, args.output_dir)
    print(text)
    print(f"written to {args.output_dir}: {', '.join(f for f in FILES if (args.output_dir / f).exists())}")
    failed = lossless_failures(summaries) if config.greedy else []
    for s in failed:
        log.error("%s differs from plain decoding at temperature 0 on docs %s", s.method, s.differing_doc_ids)
    hf = next((s for s in summaries if s.method == HF and s.identical is False), None)
    if hf is not None:
        log.warning("hf_generate differs from plain decoding on docs %s (reported, not a failure)", hf.differing_doc_ids)
    return 1 if failed else 0


def run_batches(
    args, decoder: Decoder, names: list[str], trees: dict[str, TreeSetup], requests, config, schedules: dict[str, TreeSchedule]
) -> int:
    """--batch: every method at every batch size, each speculative one with each schedule (by its table;
    "METHOD @TABLE" when there are several) (`lmms_msd.commands.bench_batch`); 1 when a greedy run differs."""
    prompts = [decoder.target.prepare(r.context, r.images) for r in requests]
    by_name: dict[str, tuple[TreeSetup | None, TreeSchedule]] = {}
    for name in names:
        if name not in SPECULATIVE:
            by_name[name] = (None, same_tree)
            continue
        for table, schedule in schedules.items():
            by_name[name if len(schedules) == 1 else f"{name} @{table}"] = (trees[name], schedule)
    base = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "handler"},
        "machine": describe(decoder.target.device, decoder.target.dtype), "requests": len(requests),
        "trees": {name: builder_settings(tree.builder) for name, tree in trees.items()},
    }  # fmt: skip

    def write(runs_so_far: list[bench_batch.BatchRun], reference_name: str) -> str:
        return bench_batch.write_outputs(bench_batch.report_of(runs_so_far, reference_name, config, base), args.output_dir)

    runs, reference = bench_batch.throughput(
        decoder, by_name, prompts, [r.doc_id for r in requests], config, args.batch, seed=args.seed,
        warmup=args.warmup, progress=not args.no_progress, on_run=write,
    )  # fmt: skip
    text = write(runs, reference)
    print(text)
    print(f"written to {args.output_dir}: {', '.join(f for f in bench_batch.FILES if (args.output_dir / f).exists())}")
    failed = [r for r in runs if r.identical is False]
    for r in failed:
        log.error("%s at batch %d differs from %s on docs %s", r.method, r.batch, reference, r.differing_doc_ids)
    return 1 if failed else 0
