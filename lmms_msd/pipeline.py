"""From settings to decoded requests: the one place that builds a pair, its tree and its runtime.

Every caller that decodes goes through here (the lmms-eval plugin, `lmms-msd bench`, `calibrate`,
`generate`, `testbed-report`; `reproduce` for the bundled-pair rule), top to bottom:

1. `resolve_pair`: which checkpoints. Naming neither the target nor the draft means the bundled
   miniature pair (`lmms_msd.testbed.bundled`), whose fitted calibrator `fitted_calibrator` returns.
2. `load_pair`: load the target, then the draft on the target's device and dtype, check that the draft
   fits the target (an error naming both sizes), and embed both into a testbed shape when asked
   (`inflation_shape`, `lmms_msd.testbed.inflate`: the same function at a bigger model's cost).
3. `build_decoder`: the pair on its runtime, eager (transformers' forward, any device) or static
   (static caches and CUDA graphs, `lmms_msd.speculative.fast`). This is the only eager/static choice.
4. `build_tree`: the tree builder from `TreeSettings`: EAGLE-2, or OPT-Tree scored by the raw draft
   confidence or by a fitted calibrator; EAGLE-2's total_tokens=auto is timed on the decoder's runtime,
   and so is OPT-Tree's cost model with stop=cost (`lmms_msd.speculative.cost`, cached per machine).
5. `decode`: the one call of the decoding loops. `decode_requests` runs a run's requests through it one
   at a time, in online calibration's order when there is one (`online_calibration`), or many at
   once through the batched loop (`max_batch`, `lmms_msd.speculative.batching`); the CPU stage of the
   next requests (`Request.load`) runs ahead on a background thread (`prefetch`, `lmms_msd.prefetch`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from lmms_msd.calibration.token_types import token_type_table
from lmms_msd.models.draft import MSDDraft, check_draft_fits, load_draft
from lmms_msd.models.loading import load_target
from lmms_msd.models.target import EmbeddedPrompt, Target
from lmms_msd.prefetch import Prefetcher
from lmms_msd.speculative.batching import (
    BatchRequest,
    TreeSchedule,
    generate_batched,
    same_tree,
)
from lmms_msd.speculative.cost import (
    STOPS,
    PathChoice,
    cached_cost_model,
    describe,
    summary_line,
)
from lmms_msd.speculative.decoding import (
    GenerationResult,
    StepObserver,
    _synchronize,
    plain_generate,
    speculative_generate,
)
from lmms_msd.speculative.runtime import BatchedRuntime, EagerRuntime, Runtime
from lmms_msd.speculative.sampling import GenerationConfig
from lmms_msd.speculative.tree import (
    AUTO_TOTAL_TOKENS,
    EagleTree,
    OptTree,
    Tree,
    TreeSpec,
    choose_total_tokens,
)
from lmms_msd.testbed.bundled import bundled_calibrator, bundled_paths
from lmms_msd.testbed.inflate import (
    TextShape,
    inflate_pair,
    inflate_target,
    shape_from_name,
)

if TYPE_CHECKING:
    from lmms_msd.calibration.isotonic import GroupedIsotonicCalibrator
    from lmms_msd.calibration.online import OnlineCalibration

log = logging.getLogger(__name__)

TREES = ("eagle2", "opt")
ENGINES = ("eager", "static")
PREFETCH = 2  # `decode_requests`: requests whose CPU stage may run ahead of their turn


# ---- 1. which pair -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairPaths:
    """The checkpoints of a pair, as named or as bundled."""

    pretrained: str  # the target: folder or hub id
    msd_model_path: str | None  # the draft: folder or hub id; None: not named (plain decoding needs none)
    bundled: bool  # neither was named: the miniature pair shipped in the package


def uses_bundled_pair(pretrained: str | None, msd_model_path: str | None) -> bool:
    """The rule every caller follows: naming neither the target nor the draft means the bundled pair.

    A draft named alone is refused (the bundled target fits only its own draft, and the other way
    round); a target named alone decodes plainly or is refused when a draft is needed.
    """
    return pretrained is None and msd_model_path is None


def resolve_pair(pretrained: str | None, msd_model_path: str | None, need_draft: bool = True) -> PairPaths:
    """The pair to load: the bundled miniature pair when neither is named, else both as named.

    need_draft: whether the draft must be named along with the target (False: plain decoding only).
    Raises ValueError when the draft is named alone, or the target alone while a draft is needed;
    FileNotFoundError from `bundled_paths` when the bundled pair is asked for but not installed.
    """
    if uses_bundled_pair(pretrained, msd_model_path):
        target, draft = bundled_paths()
        return PairPaths(str(target), str(draft), bundled=True)
    if pretrained is None or (need_draft and msd_model_path is None):
        raise ValueError("name both --pretrained and --msd_model_path, or neither (the bundled pair)")
    return PairPaths(pretrained, msd_model_path, bundled=False)


def fitted_calibrator(pair: PairPaths) -> str | None:
    """The calibrator fitted for the pair: the bundled pair's own (shipped with it); None for a named pair."""
    return str(bundled_calibrator()) if pair.bundled else None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    """The checkpoint's own dtype on a GPU; float32 on a CPU, where half precision is slow or missing."""
    return "auto" if device.startswith("cuda") else "float32"


# ---- 2. load and check -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairSettings:
    """How to load a pair (the plugin's model_args and the commands' options of the same names)."""

    pretrained: str
    msd_model_path: str | None  # None: the target alone, for plain decoding
    device: str
    dtype: str  # float16 / bfloat16 / float32 / auto (the checkpoint's)
    attn_implementation: str | None = "sdpa"  # the target's attention
    conv_template: str | None = None  # the prompt's conversation template [vicuna_v1]
    system_prompt: str | None = None  # overrides the template's
    vision_tower: str | None = None  # original layout only: the CLIP tower, overriding mm_vision_tower
    inflate: TextShape | None = None  # embed the loaded pair into this testbed shape (`inflation_shape`)


@dataclass(frozen=True)
class Pair:
    target: Target
    draft: MSDDraft | None  # None: plain decoding only


def load_pair(settings: PairSettings) -> Pair:
    """Load the target, then the draft (when named) on the target's device and dtype; check that the
    draft fits the target; embed both into `settings.inflate` when given."""
    s = settings
    target = load_target(
        s.pretrained, vision_tower=s.vision_tower, device=s.device, dtype=s.dtype,
        attn_implementation=s.attn_implementation, conv_template=s.conv_template, system_prompt=s.system_prompt,
    )  # fmt: skip
    draft = None
    if s.msd_model_path is not None:
        draft = load_draft(s.msd_model_path, device=target.device, dtype=target.dtype)
        try:
            check_draft_fits(draft, target.hidden_size, target.vocab_size)
        except ValueError as error:
            raise ValueError(f"msd_model_path={s.msd_model_path!r} cannot draft for pretrained={s.pretrained!r}: {error}") from error
    if s.inflate is None:
        return Pair(target, draft)
    log.info("inflating the loaded pair to %s: the same function at a bigger model's cost", s.inflate)
    if draft is None:
        return Pair(inflate_target(target, s.inflate), None)
    return Pair(*inflate_pair(target, draft, s.inflate))


def inflation_shape(name: str | None) -> TextShape | None:
    """The testbed shape an inflate setting names: "7b" or HIDDENxLAYERS such as "512x6"
    (`shape_from_name`, whose ValueError says what is valid); None for None, "" or "none"."""
    if name is None or name.strip().lower() in ("", "none"):
        return None
    return shape_from_name(name)


# ---- 3. the runtime ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RuntimeSettings:
    """What runs the pair's forwards (`build_decoder`). Checked when made (and by `dataclasses.replace`),
    so before anything is loaded; the ValueError names the fields as spelled here, which a caller whose
    users spell one otherwise (torch_compile for compile) rewords."""

    engine: str = "eager"  # ENGINES: "eager" (transformers' forward) or "static" (static caches, CUDA graphs on cuda)
    max_length: int = 2048  # static: the preallocated cache slots (clipped to the target's maximum length)
    max_batch: int = 1  # sequences decoded at once; static: more than 1 takes the batched engine, a cache row each
    batched_drafting: bool = False  # static, max_batch > 1: all rows draft in one forward per tree level (BatchedStaticEngine)
    compile: bool = False  # static: the target's layers (and, one sequence at a time, the draft's head) through torch.compile

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {list(ENGINES)}, got {self.engine!r}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.compile and self.engine != "static":
            raise ValueError(f"compile=True compiles the static engine's forwards; engine is {self.engine!r}: set engine 'static'")


@dataclass(frozen=True)
class Decoder:
    """A loaded pair on the runtime that runs its forwards: what `decode` decodes with."""

    target: Target
    draft: MSDDraft | None  # None: plain decoding only
    runtime: Runtime


def static_engine_class() -> type:
    """`lmms_msd.speculative.fast.StaticEngine`, imported here only when a static runtime is asked for:
    eager decoding must not depend on the CUDA-graph engine, the part of the package most tied to one
    torch release. Commands call it before loading anything, to fail early."""
    from lmms_msd.speculative.fast import StaticEngine

    return StaticEngine


def build_decoder(pair: Pair, settings: RuntimeSettings) -> Decoder:
    """The pair on the runtime `settings.engine` names: the one place that chooses eager or static.
    Static with max_batch > 1 is `lmms_msd.speculative.fast.BatchedStaticEngine` (a cache row per
    sequence); the eager runtime batches any number."""
    if settings.engine == "static" and settings.max_batch > 1:
        # imported only when asked for, as static_engine_class
        from lmms_msd.speculative.fast import BatchedStaticEngine

        runtime = BatchedStaticEngine(
            pair.target, pair.draft, max_batch=settings.max_batch, max_length=settings.max_length,
            batched_drafting=settings.batched_drafting, compile=settings.compile,
        )  # fmt: skip
    elif settings.engine == "static":
        runtime = static_engine_class()(pair.target, pair.draft, max_length=settings.max_length, compile=settings.compile)
    else:  # "eager", the one other engine `RuntimeSettings` accepts
        runtime = EagerRuntime(pair.target, pair.draft)
    return Decoder(pair.target, pair.draft, runtime)


def load_decoder(
    paths: PairPaths, runtime: RuntimeSettings, device: str | None = None, dtype: str | None = None, inflate: TextShape | None = None
) -> Decoder:
    """The pair `paths` names, loaded (`load_pair`) on `device` in `dtype` (None: `default_device`, and
    `default_dtype` for that device) and put on `runtime` (`build_decoder`): what a command decodes with."""
    device = device or default_device()
    settings = PairSettings(paths.pretrained, paths.msd_model_path, device, dtype or default_dtype(device), inflate=inflate)
    return build_decoder(load_pair(settings), runtime)


# ---- 4. the tree ---------------------------------------------------------------------------------------------
_EAGLE2, _OPT = EagleTree(), OptTree()  # the builders' defaults


@dataclass(frozen=True)
class TreeSettings:
    """Which draft tree to grow and how (the plugin's model_args of the same names); the defaults are
    the builders' own. EAGLE-2 reads total_tokens, depth and top_k; OPT-Tree reads top_k, node_budget,
    stop, stop_delta (stop "delta"), max_depth, opt_variant, the calibrator and cost_cache (stop "cost")."""

    kind: str = "eagle2"  # TREES: "eagle2" (`EagleTree`) or "opt" (`OptTree`)
    total_tokens: int | None = _EAGLE2.total_tokens  # nodes counting the root; None: auto, timed (`build_tree`)
    depth: int = _EAGLE2.depth
    top_k: int = _EAGLE2.top_k  # frontier width and children per frontier node, both trees
    node_budget: int = _OPT.node_budget
    stop_delta: float = _OPT.stop_delta
    max_depth: int = _OPT.max_depth
    opt_variant: str = _OPT.opt_variant
    calibrator: str | None = None  # a calibrator JSON (`lmms-msd calibrate`); None: the raw draft confidence
    calibrator_mode: str = "weight"  # how the calibrator scores nodes (`lmms_msd.calibration.scorer`)
    stop: str = _OPT.stop  # OPT-Tree's stop rule: "delta" (stop_delta) or "cost" (`lmms_msd.speculative.cost`)
    cost_cache: str | None = None  # stop "cost" and choose_path: the folder of cached cost models [cost.default_cache()]
    choose_path: bool = False  # use_msd=auto: each request plain or speculative by the measured costs (`PathChoice`)

    def __post_init__(self) -> None:
        if self.kind not in TREES:
            raise ValueError(f"unknown tree {self.kind!r}; valid: {list(TREES)}")
        if self.calibrator is not None and self.kind != "opt":
            raise ValueError(f"a calibrator scores OPT-Tree's nodes; tree {self.kind!r} does not read one")
        if self.stop not in STOPS or (self.stop != "delta" and self.kind != "opt"):
            raise ValueError(f"stop={self.stop!r}: one of {list(STOPS)}, and only OPT-Tree stops otherwise than by delta (tree {self.kind!r})")
        tree_builder(self)  # the builder checks its own settings, before anything is loaded


def tree_builder(settings: TreeSettings) -> TreeSpec:
    """The uncalibrated builder the settings describe; with total_tokens auto, EAGLE-2 holds the largest
    candidate until `build_tree` times them; with stop "cost", OPT-Tree stops by delta until `build_tree`
    has its cost model (what the cost model times does not depend on the stop)."""
    s = settings
    if s.kind == "opt":
        return OptTree(node_budget=s.node_budget, stop_delta=s.stop_delta, max_depth=s.max_depth, top_k=s.top_k, variant=s.opt_variant)
    return EagleTree(s.total_tokens or AUTO_TOTAL_TOKENS[-1], s.depth, s.top_k)


@dataclass(frozen=True)
class TreeSetup:
    """A tree builder ready to decode with, and where its settings came from."""

    builder: TreeSpec
    track_visual: bool  # its scorer reads the draft's visual attention (a calibrator with attention bins)
    calibrator: GroupedIsotonicCalibrator | None = None  # the fitted calibrator scoring its nodes, if any
    total_tokens_auto: dict[str, Any] | None = None  # total_tokens auto: candidates, seconds, chosen (`time_total_tokens`)
    # stop "cost": the cost model's file, whether it was measured now, its key and times (`cost.describe`)
    cost_model: dict[str, Any] | None = None
    path_choice: PathChoice | None = None  # use_msd=auto: chooses each request's path (`decode_requests`)


def build_tree(settings: TreeSettings, decoder: Decoder) -> TreeSetup:
    """The builder of `settings` for the decoder's pair: a calibrator file is loaded and scores OPT-Tree's
    nodes; EAGLE-2's total_tokens auto is chosen by timing the decoder's runtime; stop "cost" reads the
    cost model of the decoder's runtime and the tree's scorer from the cache, or measures and caches it."""
    builder = tree_builder(settings)
    if settings.kind == "eagle2" and settings.total_tokens is None:
        auto = time_total_tokens(decoder)
        setup = TreeSetup(EagleTree(auto["chosen"], settings.depth, settings.top_k), track_visual=False, total_tokens_auto=auto)
    else:
        setup = TreeSetup(builder, track_visual=False) if settings.calibrator is None else calibrated_setup(settings, decoder, builder)
    if settings.stop == "cost":
        setup = with_cost_model(setup, decoder, settings.cost_cache)
    return with_path_choice(setup, decoder, settings.cost_cache) if settings.choose_path else setup


def with_cost_model(setup: TreeSetup, decoder: Decoder, folder: str | None) -> TreeSetup:
    """OPT-Tree `setup` with stop "cost" on its cost model for the decoder's runtime (`cached_cost_model`:
    read from `folder`, or measured now and saved there); online calibration keeps the raw scorer's."""
    model, path, measured = cached_cost_model(decoder.runtime, setup.builder, setup.track_visual, None if folder is None else Path(folder))
    log.info("stop=cost, cost model %s (%s): %s", "measured now" if measured else "read", path, summary_line(model))
    builder = OptTree(**(setup.builder.settings() | {"stop": "cost", "cost": model}))
    meta = {"file": str(path), "measured_now": measured, **describe(model)}
    return replace(setup, builder=builder, cost_model=meta)


def with_path_choice(setup: TreeSetup, decoder: Decoder, folder: str | None) -> TreeSetup:
    """`setup` choosing each request's path (use_msd=auto, `PathChoice`) by the cost model of its tree on
    the decoder's runtime: stop "cost"'s own, else the cached or measured one of the OPT-Tree that grows
    as the tree does (EAGLE-2: variant "frontier", every proposal stored, to its depth)."""
    spec = setup.builder
    if spec.cost is not None:
        model = spec.cost
    else:
        timed = spec if spec.kind == "opt" else OptTree(node_budget=spec.node_budget, max_depth=spec.max_depth, top_k=spec.top_k)
        model, path, measured = cached_cost_model(decoder.runtime, timed, setup.track_visual, None if folder is None else Path(folder))
        log.info("use_msd=auto, cost model %s (%s): %s", "measured now" if measured else "read", path, summary_line(model))
    choice = PathChoice(model, spec.max_depth, spec.budget)
    log.info("use_msd=auto: plain steps %.1f tokens/s; the best any tree could commit %.1f tokens/s (%s)", choice.plain_rate,
             choice.ceiling_rate, "plain decoding" if choice.plain_only else "speculative decoding first")  # fmt: skip
    return replace(setup, path_choice=choice)


def drop_unused_draft(decoder: Decoder, tree: TreeSetup | None, settings: RuntimeSettings) -> Decoder:
    """The decoder to decode `tree`'s requests with: when use_msd=auto decodes every request plainly (the
    ceiling rule, `PathChoice.plain_only`), the target alone on the runtime use_msd=false builds
    (`build_decoder(Pair(target, None), settings)`), so that the run holds and runs nothing use_msd=false
    does not (the draft, its runtime's draft state) once the caller drops `decoder`; else `decoder`.
    Online calibration observes every request speculatively, whatever the path choice: a caller that
    may calibrate online keeps its decoder.

    Example: the bundled pair on a CPU, whose draft level costs more than a plain step: `decode_requests`
    then calls `plain_generate` on an `EagerRuntime(target)` for every request, as with use_msd=false.
    """
    if tree is None or tree.path_choice is None or not tree.path_choice.plain_only or decoder.draft is None:
        return decoder
    log.info("use_msd=auto: every request decodes plainly; the draft is dropped")
    return build_decoder(Pair(decoder.target, None), settings)


def calibrated_setup(settings: TreeSettings, decoder: Decoder, builder: TreeSpec) -> TreeSetup:
    """OPT-Tree `builder` scored by the calibrator file of `settings`."""
    # the calibrator's modules import scikit-learn (seconds), which only calibrated trees need: the
    # commands import this module to build their --help
    from lmms_msd.calibration.isotonic import GroupedIsotonicCalibrator
    from lmms_msd.calibration.scorer import calibrated_tree

    calibrator = GroupedIsotonicCalibrator.load(settings.calibrator)
    types = token_type_table(decoder.target.tokenizer, decoder.target.vocab_size)
    builder = calibrated_tree(builder, calibrator, types, decoder.target.device, settings.calibrator_mode)
    return TreeSetup(builder, builder.needs_visual, calibrator)


@torch.inference_mode()
def time_total_tokens(decoder: Decoder, repeats: int = 20) -> dict[str, Any]:
    """total_tokens=auto as MSD's total_token=-1: time the target's forward over each candidate count of
    tree tokens (`AUTO_TOTAL_TOKENS`) on the decoder's runtime and keep the one `choose_total_tokens` picks.

    Each forward is a verification as decoding runs it (`Runtime.verify`): n random tokens in a chain
    after a one-token prompt, timed alone between device synchronisations, `repeats` times per
    candidate after one untimed warm-up (which upstream does not do: its first candidate pays it).
    returns {"candidates": AUTO_TOTAL_TOKENS as a list, "seconds": the summed time per candidate, "chosen": n}
    """
    target, runtime = decoder.target, decoder.runtime
    device = target.device
    generator = torch.Generator().manual_seed(0)
    start_id = torch.zeros(1, dtype=torch.long, device=device)  # [1]
    prompt = EmbeddedPrompt(start_id, target.embed_tokens(start_id), torch.zeros(1, dtype=torch.bool, device=device))
    seconds = []
    for n in AUTO_TOTAL_TOKENS:
        tokens = torch.randint(0, target.vocab_size, (n,), generator=generator).to(device)  # [n]
        chain = Tree(tokens, parents=torch.arange(-1, n - 1, device=device), depths=torch.arange(n, device=device),
                     scores=torch.zeros(n, device=device))  # fmt: skip
        ancestors = chain.ancestor_mask(n - 1)  # [n, n], lower triangular
        total = 0.0
        for repeat in range(repeats + 1):
            sequence, _, _ = runtime.prefill(prompt, n)
            _synchronize(device)
            start = time.perf_counter()
            runtime.verify(sequence, chain, ancestors)
            _synchronize(device)
            total += (time.perf_counter() - start) if repeat else 0.0
            runtime.release(sequence)
        seconds.append(total)
    return {"candidates": list(AUTO_TOTAL_TOKENS), "seconds": seconds, "chosen": choose_total_tokens(seconds)}


def online_calibration(
    n_requests: int, train_ratio: float, tree: TreeSetup, target: Target, *, seed: int, label: str, mode: str,
    attention_bins: int, min_group_size: int, depth_edges: tuple[int, ...] = (),
) -> OnlineCalibration:  # fmt: skip
    """Online calibration over a run's `n_requests` (`lmms_msd.calibration.online`): observe the first
    `train_ratio` of them in a seeded order with `tree`'s raw confidence, then fit a fresh calibrator
    on `label` and score `tree`'s nodes with it in `mode`."""
    # scikit-learn, as in `build_tree`
    from lmms_msd.calibration.isotonic import GroupedIsotonicCalibrator
    from lmms_msd.calibration.online import OnlineCalibration

    calibrator = GroupedIsotonicCalibrator(attention_bins=attention_bins, min_group_size=min_group_size, depth_edges=depth_edges)
    types = token_type_table(target.tokenizer, target.vocab_size)
    return OnlineCalibration(
        n_requests, train_ratio, tree.builder, types, calibrator, seed=seed, device=target.device, label=label, mode=mode
    )


# ---- 5. decoding ---------------------------------------------------------------------------------------------
def decode(
    decoder: Decoder,
    prompt: EmbeddedPrompt,
    config: GenerationConfig,
    generator: torch.Generator | None = None,
    tree: TreeSpec | None = None,
    observer: StepObserver | None = None,
    track_visual: bool = False,
    profile: bool = False,
) -> GenerationResult:
    """The one call of the decoding loops (`lmms_msd.speculative.decoding`), on the decoder's runtime:
    plain decoding without a tree (the baseline; observer and track_visual unused), speculative decoding
    with one. The arguments are the loops' own."""
    if tree is None:
        return plain_generate(decoder.runtime, prompt, config, generator, profile=profile)
    if decoder.draft is None:
        raise ValueError("speculative decoding needs a draft; this decoder was built without one (plain decoding only)")
    return speculative_generate(decoder.runtime, prompt, config, tree, generator, observer, track_visual, profile)


def request_generator(config: GenerationConfig, seed: int, device: torch.device | str) -> torch.Generator | None:
    """The generator a sampling request draws from, seeded with `seed`; None when decoding is greedy."""
    return None if config.greedy else torch.Generator(device).manual_seed(seed)


@dataclass(frozen=True)
class Request:
    """One request of a run. Its prompt is built only when its turn comes: an embedded prompt holds
    device memory, and a run may hold thousands of requests.

    With `load`, it comes in two stages: `load`, the CPU stage (reading images, the image processor:
    `Target.preprocess`), which `decode_requests` may run ahead on a background thread, so it must not
    touch the device or the tokenizer; then, on the main thread at its turn, `prepare(what load
    returned)`, the device stage (`Target.embed_inputs`). Without `load`, `prepare()` does it all.
    """

    name: str  # names the request in errors, e.g. "llava_msd_calibrated: request 3 (task 'chartqa', doc_id 7)"
    prepare: Callable[..., tuple[EmbeddedPrompt, GenerationConfig]]  # its prompt and settings; may raise ValueError
    seed: int  # seeds its generator when its settings sample (`request_generator`)
    load: Callable[[], Any] | None = None  # its CPU stage, whose result `prepare` takes; may raise ValueError


def decode_requests(
    decoder: Decoder,
    requests: Sequence[Request],
    tree: TreeSetup | None,
    online: OnlineCalibration | None = None,
    *,
    max_batch: int = 1,
    schedule: TreeSchedule = same_tree,
    prefetch: int = PREFETCH,
    progress: bool = True,
    desc: str = "decoding",
) -> list[GenerationResult]:
    """Decode every request; the results come back in the requests' order.

    tree: None decodes plainly; with a `path_choice` (use_msd=auto) each request goes the way it chooses
    (`PathChoice.choose`), except under online calibration, which observes every request speculatively.
    online: the requests go in its seeded order; it observes the first share with `tree`'s raw
    confidence and scores later requests' trees with the calibrator it fits.
    max_batch: requests in flight at once. 1 runs the one-request loops (`decode`); more runs the
    batched loop (`lmms_msd.speculative.batching.generate_batched`: continuous batching, one target
    forward per step for all rows), whose tokens are the same at T=0 and, sampling, drawn from each
    request's own seeded generator. Online calibration observes its share one request at a time
    (its observer follows one request at a time) and batches the rest, once fitted. With a path choice,
    a batched request's path is chosen when it joins, from the ceiling rule and the estimate of the
    requests decoded one at a time before it: batched steps do not update the estimate (the cost model
    times batch-1 steps).
    schedule: the batched loop's tree per batch size (`TreeSchedule`); unused at max_batch 1
    prefetch: requests whose CPU stage (`Request.load`) may run ahead of their turn, in decoding order, on
    one background thread (`lmms_msd.prefetch.Prefetcher`), while this thread prepares and decodes; 0: each
    at its turn, on this thread. The same results either way.
    A request whose preparation (either stage) or decoding fails raises ValueError starting with its name,
    at its turn.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    results: list[GenerationResult | None] = [None] * len(requests)
    order = list(online.order if online is not None else range(len(requests)))
    alone = order if max_batch == 1 else order[: online.n_observe if online is not None else 0]
    prefetcher = Prefetcher([request.load for request in requests], order, prefetch)
    with tqdm(total=len(requests), desc=desc, disable=not progress) as bar, prefetcher as loads:
        for index in alone:
            results[index] = _decode_one(decoder, requests[index], tree, online, index, loads)
            bar.update()
        batched = order[len(alone) :]
        if batched:
            runtime = decoder.runtime
            if not isinstance(runtime, BatchedRuntime):
                raise ValueError(f"max_batch={max_batch}: this {type(runtime).__name__} decodes one request at a time; use max_batch 1")
            joining = _batch_requests(decoder, requests, batched, tree, online, loads)
            for position, result in generate_batched(runtime, joining, max_batch, schedule):
                results[batched[position]] = result
                if online is not None:
                    online.done()
                bar.update()
    return results


def _speculative(tree: TreeSetup, online: OnlineCalibration | None) -> bool:
    """Whether the next request decodes speculatively: always under online calibration (it observes
    every request) or without a path choice; else as use_msd=auto chooses it (`PathChoice.choose`,
    which records the decision)."""
    if online is not None or tree.path_choice is None:
        return True
    return tree.path_choice.choose().path == "speculative"


def _prepare(request: Request, index: int, loads: Prefetcher) -> tuple[EmbeddedPrompt, GenerationConfig]:
    """The request's prompt and settings, at its turn: its device stage over its CPU stage's result
    (computed ahead by `loads`, or now), or its one `prepare`."""
    loaded = loads.take(index)
    return request.prepare() if request.load is None else request.prepare(loaded)


def _decode_one(
    decoder: Decoder, request: Request, tree: TreeSetup | None, online: OnlineCalibration | None, index: int, loads: Prefetcher
) -> GenerationResult:
    """One request through the one-request loops, with online calibration's plan when there is one."""
    try:
        prompt, config = _prepare(request, index, loads)
        generator = request_generator(config, request.seed, decoder.target.device)
        if tree is None or not _speculative(tree, online):
            return decode(decoder, prompt, config, generator)  # use_msd=false's own call
        choice = None if online is not None else tree.path_choice
        if online is None:
            builder, observer, track_visual = tree.builder, None if choice is None else choice.observer, tree.track_visual
        else:
            plan = online.plan(index, config)
            builder, observer, track_visual = plan.tree, plan.observer, plan.track_visual
        result = decode(decoder, prompt, config, generator, builder, observer, track_visual)
        if choice is not None:
            choice.record(result.stats.steps, result.stats.accepted)
        if online is not None:
            online.done()
        return result
    except (ValueError, TypeError, OSError) as error:
        raise ValueError(f"{request.name}: {error}") from error


def _batch_requests(
    decoder: Decoder, requests: Sequence[Request], indices: list[int], tree: TreeSetup | None, online: OnlineCalibration | None,
    loads: Prefetcher,
) -> Iterator[BatchRequest]:  # fmt: skip
    """The batched loop's requests, each prepared only when it joins (a prompt holds device memory); their
    CPU stage may have run ahead (`loads`)."""
    for index in indices:
        request = requests[index]
        try:
            prompt, config = _prepare(request, index, loads)
        except (ValueError, TypeError, OSError) as error:
            raise ValueError(f"{request.name}: {error}") from error
        generator = request_generator(config, request.seed, decoder.target.device)
        if tree is None or not _speculative(tree, online):
            yield BatchRequest(prompt, config, generator, name=request.name)
            continue
        if decoder.draft is None:
            raise ValueError("speculative decoding needs a draft; this decoder was built without one (plain decoding only)")
        if online is None:
            builder, track_visual = tree.builder, tree.track_visual
        else:
            plan = online.plan(index, config)  # past the observed share: no observer
            builder, track_visual = plan.tree, plan.track_visual
        yield BatchRequest(prompt, config, generator, name=request.name, tree=builder, track_visual=track_visual)
