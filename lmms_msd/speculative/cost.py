"""What a speculative step costs on the runtime in use, and OPT-Tree's cost-aware stop and size rule.

Words. A step drafts L *levels* of nodes (level 1: the root's children, scored from the root's draft
output; each further level: one draft forward of the frontier), verifies a tree of n draft nodes and
the root (n + 1 tokens) in one target forward, and commits the accepted nodes plus the bonus token.
A tree of the root alone (n = 0) is a *plain step*: its verification is a plain forward over the last
committed token and its bonus is plain decoding's next token.

`CostModel` holds the measured seconds of those parts on one runtime and device: verification by tree
size (with the greedy acceptance, as the loop's `verify_step` runs it), the first level and each further one, the
rest of a step (cache keeping, the draft's advance over the committed tokens), and one step of plain decoding (`use_msd=false`) for reference.
`measure_cost_model` times them with a few warm calls on the runtime that will decode (transformers'
forward on CPU; on a GPU the static engine's token buckets and graphed levels make it cheap);
`cached_cost_model` keeps them in a JSON file per `CostKey` (runtime, device, dtype, model shape,
frontier width), so a later run on the same machine and model skips the timing.

The rule (`stop=cost`, `best_size`): after each level, the tree of the best n stored nodes is expected
to commit 1 + (the sum of their weights) tokens (a weight is the product of acceptance estimates
along the node's path, so the sum is the expected accepted length, and the bonus adds one) in
`CostModel.step_seconds(L)[n]` seconds. The builder keeps the n that maximises tokens per second
(the smallest n on a tie), and grows another level only while that best rate rises; the rate before
level 1 is the plain step's, so when no tree of level 1 beats a plain step the step is a plain one.
`lmms_msd.speculative.tree.OptTree` gives the worked example; `OptTree(stop="cost", cost=model)` builds
such a tree (`lmms_msd.pipeline.build_tree` reads or measures its model on the runtime that decodes).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lmms_msd.models.target import Target
    from lmms_msd.speculative.runtime import Runtime
    from lmms_msd.speculative.tree import TreeSpec

STOPS = ("delta", "cost")  # OPT-Tree's stop rules: stop_delta's absolute gain, or this module's rate
# Tree sizes (root included) whose verification is timed: the static engine's token buckets
# (lmms_msd.speculative.fast.static_target.TOKEN_BUCKETS), up to the first that holds the largest tree.
WIDTHS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256)


@dataclass(frozen=True)
class CostKey:
    """What the timings depend on; a cached model is used only for an equal key."""

    runtime: str  # the runtime's class name (EagerRuntime, StaticEngine)
    device: str  # the GPU's name, or the CPU's with the thread count torch uses
    dtype: str
    hidden_size: int  # the target's text model
    layers: int
    vocab_size: int
    image_positions: int  # positions one image takes in the prompt (sets the measured prefix length)
    top_k: int  # the frontier width: rows fed per draft level
    frontier_only: bool  # OPT-Tree's variant: a level stores its frontier only (upstream) or every proposal
    scorer: str  # the node scorer's class (DraftConfidence, CalibratedScorer, TiltScorer): it runs every level
    track_visual: bool  # whether the draft measures its attention on the image (a calibrator's feature)

    def file_name(self) -> str:
        """A file name that says what the key is and differs between keys. Example:
        EagerRuntime-float32-h128x4-v32000-i576-k10-frontier-DraftConfidence-3f2a9c0d1e7b4a65.json"""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]
        variant = "upstream" if self.frontier_only else "frontier"
        return (
            f"{self.runtime}-{self.dtype}-h{self.hidden_size}x{self.layers}-v{self.vocab_size}-"
            f"i{self.image_positions}-k{self.top_k}-{variant}-{self.scorer}-{digest}.json"
        )


@dataclass(frozen=True)
class CostModel:
    """Seconds of a speculative step's parts on one runtime and device (module docstring for the words).

    widths: tree sizes (root included) whose verification was timed, ascending, widths[0] == 1
    verify_s: seconds of one verification over widths[i] tokens, after `prefix_len` committed ones, with its greedy
        acceptance (`decoding.verify_step`, as the loop runs it)
    bucketed: True when a verification costs what the smallest timed width holding it costs (the
        static engine pads every forward to a token bucket); False: linear between timed widths
    draft_root_s: the first level (scoring the root's children; no draft forward)
    draft_level_s: each further level (one draft forward of the frontier, its scoring and storing)
    step_s: the rest of a step (cache keeping, the draft's advance over the committed tokens)
    plain_step_s: one step of plain decoding (one target forward, choosing the token), for reference
    """

    key: CostKey
    prefix_len: int
    widths: tuple[int, ...]
    verify_s: tuple[float, ...]
    bucketed: bool
    draft_root_s: float
    draft_level_s: float
    step_s: float
    plain_step_s: float
    # [widths[-1] + 1] float32: verification seconds by tree size (index 0 unused), derived in __post_init__
    verify_table: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        widths = self.widths
        if not widths or widths[0] != 1 or list(widths) != sorted(set(widths)) or len(self.verify_s) != len(widths):
            raise ValueError(
                f"a cost model needs ascending distinct widths starting at 1 (the plain step) and one time per "
                f"width; got widths {widths}, {len(self.verify_s)} times"
            )
        sizes = range(1, widths[-1] + 1)
        object.__setattr__(self, "verify_table", torch.tensor([0.0] + [self._verify(n) for n in sizes], dtype=torch.float32))

    def _verify(self, size: int) -> float:
        """Seconds to verify a tree of `size` tokens (root included). Example: widths (1, 4, 8), verify_s
        (1.0, 1.0, 1.3): size 6 costs 1.3 bucketed, 1.15 otherwise."""
        upper = next(i for i, w in enumerate(self.widths) if w >= size)
        if self.bucketed or self.widths[upper] == size:
            return self.verify_s[upper]
        (w0, t0), (w1, t1) = (self.widths[upper - 1], self.verify_s[upper - 1]), (self.widths[upper], self.verify_s[upper])
        return t0 + (t1 - t0) * (size - w0) / (w1 - w0)

    def draft_seconds(self, levels: int) -> float:
        """Drafting `levels` levels: the first, then one draft forward each."""
        assert levels >= 1, f"a tree has at least one level, got {levels}"
        return self.draft_root_s + (levels - 1) * self.draft_level_s

    def step_seconds(self, levels: int, max_nodes: int) -> torch.Tensor:
        """[max_nodes + 1] float32: seconds of a step that drafted `levels` levels and verifies n draft
        nodes and the root, n = 0..max_nodes."""
        if max_nodes + 1 > self.widths[-1]:
            raise ValueError(
                f"the cost model timed verifications of at most {self.widths[-1]} tokens; a tree of {max_nodes} nodes "
                f"and the root needs {max_nodes + 1}: measure again with wider widths or lower node_budget"
            )
        return self.verify_table[1 : max_nodes + 2] + (self.draft_seconds(levels) + self.step_s)

    def __repr__(self) -> str:
        k = self.key
        return f"CostModel({k.runtime}, {k.device}, {k.dtype}, h{k.hidden_size}x{k.layers})"


# ---- the rule --------------------------------------------------------------------------------------------
def tree_rates(top_scores: torch.Tensor, seconds: torch.Tensor) -> torch.Tensor:
    """Expected committed tokens per second of the trees of the best n nodes, n = 0..m.

    top_scores: [..., m] the best m log-weights, descending (of one pool, or of each of several);
    seconds: [>= m + 1] (`CostModel.step_seconds`) -> [..., m + 1]: (1 + sum of the n best weights) / seconds[n]
    """
    m = top_scores.shape[-1]
    assert top_scores.dim() >= 1 and seconds.shape[0] >= m + 1, f"top_scores {tuple(top_scores.shape)}, seconds {tuple(seconds.shape)}"
    tokens = torch.cat([top_scores.new_ones(*top_scores.shape[:-1], 1), 1 + top_scores.exp().cumsum(-1)], dim=-1)  # [..., m + 1]
    return tokens / seconds[: m + 1].to(tokens)


def best_size(top_scores: torch.Tensor, seconds: torch.Tensor) -> torch.Tensor:
    """[..., 2] float32 on the device: the best rate of `tree_rates` and its n (the smallest n on a tie), of
    one pool's top_scores [m] or of each of several [..., m]. No host read, so it runs inside a CUDA graph.

    Example: weights .6, .3 (top_scores their logs) and seconds (1.1, 1.1, 1.1) give rates 1/1.1,
    1.6/1.1, 1.9/1.1: (1.7273, 2).
    """
    rates = tree_rates(top_scores, seconds)
    return torch.stack([rates.amax(-1), rates.argmax(-1).to(rates.dtype)], dim=-1)  # argmax: the first of equal maxima


def cost_aware_size(pool_scores: Sequence[torch.Tensor], levels: int, budget: int, cost: CostModel) -> tuple[float, int]:
    """(best rate, node count) of the trees in a pool of stored nodes, `levels` levels drafted; one host read.

    pool_scores: every stored node's log-weight, level by level (each [m_level])
    """
    scores = torch.cat(list(pool_scores))
    top = scores.topk(min(budget, scores.shape[0])).values
    rate, size = best_size(top, cost.step_seconds(levels, budget)).tolist()
    return rate, int(size)


# ---- measuring ---------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with torch's thread count (timings scale with it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def image_positions(target: Target) -> int:
    """Prompt positions one image takes: the vision tower's patches, and its class token with the "full"
    feature strategy. Example: LLaVA-1.5's CLIP at 336 px, patch 14, "default": 24 * 24 = 576."""
    config = target.model.config
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + int(config.vision_feature_select_strategy == "full")


def cost_key(runtime: Runtime, tree: TreeSpec, track_visual: bool) -> CostKey:
    """The key of OPT-Tree `tree`'s costs on `runtime` (its frontier width, variant and scorer)."""
    target = runtime.target
    cfg = target.model.config.text_config
    return CostKey(
        runtime=type(runtime).__name__, device=device_name(target.device), dtype=str(target.dtype).removeprefix("torch."),
        hidden_size=int(cfg.hidden_size), layers=int(cfg.num_hidden_layers), vocab_size=target.vocab_size,
        image_positions=image_positions(target), top_k=tree.top_k, frontier_only=tree.frontier_only,
        scorer=type(tree.scorer).__name__, track_visual=track_visual,
    )  # fmt: skip


def widths_for(max_nodes: int) -> tuple[int, ...]:
    """The timed widths for trees of up to max_nodes draft nodes. Example: widths_for(60) ends at 64."""
    last = next((i for i, w in enumerate(WIDTHS) if w >= max_nodes + 1), None)
    if last is None:
        raise ValueError(f"trees of {max_nodes} nodes exceed the largest timed width {WIDTHS[-1]}")
    return WIDTHS[: last + 1]


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.inference_mode()
def measure_cost_model(
    runtime: Runtime, tree: TreeSpec, *, track_visual: bool = False, repeats: int = 9, warmup: int = 3,
    text_positions: int = 96,
) -> CostModel:  # fmt: skip
    """Time the parts of a step on `runtime` for OPT-Tree `tree` (its top_k, variant, max_depth,
    node_budget and scorer; not its stop), the draft measuring its attention on the image when `track_visual`.

    A generation (`runtime.prefill`, `prefill_draft`) is started over a random text prompt as long as
    one image and `text_positions` tokens; then `warmup + repeats` rounds run one step of every setting
    each, as the decoding loop runs a step (`draft_tree`, `verify`, accept, `commit`), each phase between
    device synchronisations (rounds, so that a change of the machine's load falls on every setting
    alike); the median of the timed rounds counts. Verification is timed over trees of the root and
    n - 1 children for every width of `widths_for(node_budget)` (the time depends on the size, not the
    shape), and the medians are made non-decreasing in the width (isotonic regression: more tokens never
    cost less; on a busy machine single medians can dip). Drafting is timed with the tree grown to
    depth 1 and to max_depth (stop_delta 0; a level whose gain rounds to 0 in float32 stops it earlier,
    so each round's further levels are counted from the draft forwards it fed); the rest of the step
    over all steps; plain decoding's step (`forward_next`) at the same position, once a round (it
    commits its token to the target only: the draft falls one position behind, which times the same).
    """
    # scikit-learn for the isotonic fit (seconds to import: lazy, as in lmms_msd.pipeline); tree imports
    # this module (the rule), so its names come in here
    from sklearn.isotonic import isotonic_regression

    from lmms_msd.speculative.decoding import verify_step
    from lmms_msd.speculative.sampling import GenerationConfig
    from lmms_msd.speculative.tree import OptTree, Tree

    assert tree.kind == "opt", f"the cost model is measured for an OPT-Tree spec, got kind {tree.kind!r}"
    target = runtime.target
    device, k = target.device, tree.top_k
    widths = widths_for(tree.budget)
    prefix = image_positions(target) + text_positions
    # random text ids, never the image placeholder (ids at or above it shift up by one)
    ids = torch.randint(0, target.vocab_size - 1, (prefix,), generator=torch.Generator().manual_seed(0))
    ids += (ids >= target.image_token_id).long()
    prompt = target.embed(ids, None)
    depths = (1, tree.max_depth)
    rounds = warmup + repeats
    # each step commits at most 2 tokens (the star's root and one child), each plain step 1; then one tree
    extra = 2 * rounds * (len(widths) + len(depths)) + rounds + max(widths[-1], tree.max_depth * k)
    sequence, hidden, logits = runtime.prefill(prompt, extra)
    token = int(logits[-1].argmax())
    root = runtime.prefill_draft(sequence, prompt, hidden, token, track_visual)

    def unstopped(max_depth: int) -> TreeSpec:
        return OptTree(node_budget=tree.node_budget, stop_delta=0.0, max_depth=max_depth, top_k=k, scorer=tree.scorer,
                       variant=tree.opt_variant)  # fmt: skip

    def star(width: int) -> tuple[Tree, torch.Tensor]:
        assert width - 1 <= target.vocab_size, f"a star of {width} nodes needs distinct child tokens"
        tokens = torch.cat([torch.tensor([token]), torch.arange(width - 1)]).to(device)
        t = Tree(tokens, torch.tensor([-1] + [0] * (width - 1), device=device),
                 torch.tensor([0] + [1] * (width - 1), device=device), torch.zeros(width, device=device))  # fmt: skip
        return t, t.ancestor_mask(1)

    def step(builder: TreeSpec, width: int) -> tuple[float, int, float, float]:
        """One decoding step (draft, verify a star of `width`, accept, commit): (draft seconds, draft
        forwards fed, verification seconds, the rest's seconds)."""
        nonlocal token, root
        start = _sync(device)
        runtime.draft_tree(sequence, builder, token, root)
        drafted = _sync(device)
        forwards = sequence.drafter.tree_used // k
        verified_tree, ancestors = star(width)
        # as the greedy loop verifies and accepts (on a StaticEngine, in one graph): the verification's seconds
        result = verify_step(runtime, sequence, verified_tree, ancestors, GenerationConfig(temperature=0.0), None)
        verified = _sync(device)
        root = runtime.commit(sequence, result.path, result.next_tokens, result.path_hidden)
        token = result.acceptance.bonus
        return drafted - start, forwards, verified - drafted, _sync(device) - verified

    def plain_step() -> float:
        """Plain decoding's step: one forward of the last token, and its next token chosen."""
        start = _sync(device)
        runtime.forward_next(sequence, torch.full((1,), token, device=device))[-1].argmax()
        return _sync(device) - start

    shallow, deep = unstopped(1), unstopped(tree.max_depth)
    verify: dict[int, list[float]] = {w: [] for w in widths}
    root_s, level_s, rest, plain = [], [], [], []
    for round_ in range(rounds):
        timed = round_ >= warmup
        for w in widths:
            _, _, seconds, other = step(shallow, w)
            verify[w] += [seconds] if timed else []
            rest += [other] if timed else []
        first, _, _, other = step(shallow, 1)
        rest += [other] if timed else []
        deeper, forwards, _, other = step(deep, 1)
        rest += [other] if timed else []
        if timed:
            root_s.append(first)
            level_s += [max(0.0, (deeper - first) / forwards)] if forwards else []
        plain += [plain_step()] if timed else []
    runtime.release(sequence)
    verify_s = tuple(float(t) for t in isotonic_regression([statistics.median(verify[w]) for w in widths]))
    return CostModel(
        key=cost_key(runtime, tree, track_visual), prefix_len=prefix, widths=widths, verify_s=verify_s,
        bucketed=type(runtime).__name__ == "StaticEngine", draft_root_s=statistics.median(root_s),
        draft_level_s=statistics.median(level_s) if level_s else 0.0, step_s=statistics.median(rest),
        plain_step_s=statistics.median(plain),
    )  # fmt: skip


# ---- the JSON cache ----------------------------------------------------------------------------------------
def save_cost_model(model: CostModel, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {f.name: getattr(model, f.name) for f in fields(model) if f.init}
    data["key"] = asdict(model.key)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # renamed whole: processes never read half a file
    partial.write_text(json.dumps(data, indent=2) + "\n")
    partial.replace(path)


def load_cost_model(path: Path, key: CostKey | None = None) -> CostModel:
    """A saved model; with `key`, it must be that key's (an error names both otherwise)."""
    data = json.loads(Path(path).read_text())
    expected = {f.name for f in fields(CostModel) if f.init}
    if set(data) != expected:
        raise ValueError(f"{path} is not a cost model: keys {sorted(data)}, expected {sorted(expected)}; delete it to measure again")
    stored = CostKey(**data.pop("key"))
    if key is not None and stored != key:
        raise ValueError(f"{path} holds the cost model of {stored}, not of {key}; delete it to measure again")
    tuples = {name: tuple(data.pop(name)) for name in ("widths", "verify_s")}
    return CostModel(key=stored, **tuples, **data)


def default_cache() -> Path:
    """$XDG_CACHE_HOME/lmms_msd/cost_models, ~/.cache/lmms_msd/cost_models without it."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmms_msd" / "cost_models"


def cached_cost_model(
    runtime: Runtime, tree: TreeSpec, track_visual: bool = False, folder: Path | None = None
) -> tuple[CostModel, Path, bool]:
    """(model, its file, whether it was measured now): the cached model for this runtime, device, dtype,
    model shape and OPT-Tree frontier width, variant and scorer, measured and saved when there is none
    (or when the cached one did not time trees as wide as `tree`'s). folder: [default_cache()]"""
    key = cost_key(runtime, tree, track_visual)
    path = Path(folder or default_cache()) / key.file_name()
    if path.is_file():
        model = load_cost_model(path, key)
        if model.widths[-1] >= tree.budget + 1:
            return model, path, False
    model = measure_cost_model(runtime, tree, track_visual=track_visual)
    save_cost_model(model, path)
    return model, path, True


def describe(model: CostModel) -> dict[str, Any]:
    """The model for the statistics report: its key and its times in milliseconds."""
    ms = 1000.0
    return {
        "key": asdict(model.key),
        "prefix_len": model.prefix_len,
        "bucketed": model.bucketed,
        "verify_ms": {str(w): round(t * ms, 4) for w, t in zip(model.widths, model.verify_s)},
        "draft_root_ms": round(model.draft_root_s * ms, 4),
        "draft_level_ms": round(model.draft_level_s * ms, 4),
        "step_ms": round(model.step_s * ms, 4),
        "plain_step_ms": round(model.plain_step_s * ms, 4),
    }


def summary_line(model: CostModel) -> str:
    """One line for a log. Example: "verify 1/2/.../64 tokens 6.1/8.9/.../15.2 ms, first level 0.3 ms,
    each further level 1.2 ms, rest of a step 1.1 ms, plain step 5.8 ms (EagerRuntime, cpu ..., float32)"."""
    ms = 1000.0
    return (
        f"verify {'/'.join(map(str, model.widths))} tokens {'/'.join(f'{t * ms:.2f}' for t in model.verify_s)} ms, "
        f"first level {model.draft_root_s * ms:.2f} ms, each further level {model.draft_level_s * ms:.2f} ms, "
        f"rest of a step {model.step_s * ms:.2f} ms, plain step {model.plain_step_s * ms:.2f} ms "
        f"({model.key.runtime}, {model.key.device}, {model.key.dtype})"
    )


# ---- use_msd=auto: plain or speculative decoding, by the same costs -------------------------------------------
PATHS = ("plain", "speculative")


@dataclass(frozen=True)
class PathDecision:
    """Why a request decodes plainly or speculatively (`PathChoice.choose`); rates in tokens per second."""

    path: str  # PATHS
    reason: str  # "ceiling" (no speculative step can beat a plain one), "exploring" (no speculative step
    #              seen yet), "estimate" (the realised speculative steps against plain steps)
    plain_rate: float  # 1 / plain_step_s
    ceiling_rate: float  # the most tokens per second any tree of the spec could commit (`ceiling_rate`)
    estimated_rate: float | None  # the realised steps' committed tokens over their modelled seconds; None before any


def ceiling_rate(cost: CostModel, max_levels: int, budget: int) -> float:
    """The most tokens per second a speculative step could commit: a step that drafts L levels commits at
    most L + 1 tokens (a chain accepted whole, and the bonus) and verifies at least that chain, so no step
    beats max over L of (L + 1) / step_seconds(L)[L] (n = min(L, budget) nodes when the budget is smaller).

    Example (the bundled pair on this project's CPU, ms: verify 1/2/4/8/16 tokens 7.15/9.43/9.43/9.43/10.56,
    first level 3.17, each further one 7.25, rest of a step 2.75, not bucketed): L = 1: 2 / 15.35 ms =
    130.3 tokens/s; L = 2: 3 / 22.60 ms = 132.7; the best, L = 7: 8 / 58.87 ms = 135.9, is below a plain
    step's 1 / 6.64 ms = 150.5: plain decoding, whatever the draft accepts.
    """
    best = 0.0
    for levels in range(1, max_levels + 1):
        nodes = min(levels, budget)
        best = max(best, (nodes + 1) / float(cost.step_seconds(levels, nodes)[nodes]))
    return best


class PathChoice:
    """use_msd=auto: decode each request plainly (no draft at all, as use_msd=false) or speculatively,
    whichever commits more tokens per second by the runtime's measured costs (`CostModel`).

    Rule, before each request: a plain step commits 1 token in `plain_step_s`: plain_rate = 1 / plain_step_s.
    1. When no speculative step could beat that even if the draft were always right (`ceiling_rate`):
       plain ("ceiling"). On this project's CPU a draft level of the bundled pair costs more than a plain
       step, so this decides before any request, at no cost.
    2. Else, before any speculative step has been seen: speculative ("exploring").
    3. Else the running estimate over every speculative step decoded so far (`observer` records each
       step's tree; `record` each request's committed tokens): estimated_rate = committed tokens /
       modelled seconds, a step that verified n draft nodes and the root after drafting L levels (L the
       deepest node, at least 1) costing `step_seconds(L)[n]`; speculative iff it beats plain_rate
       ("estimate"). A run that turns plain stays plain (no step updates the estimate any more).
    Worked example (tests/test_cost.py, the H200 7B-shaped testbed's measured costs): plain step 5.33 ms
    (187.6 tokens/s); 58-node trees of 6 levels cost 6.86 + 0.39 + 5 x 0.56 + 1.31 = 11.36 ms and
    commit 3.9 tokens: 343 tokens/s, speculative.
    Both paths are lossless (plain decoding is the reference; speculative decoding equals it at T=0 and
    samples from the target at T > 0), so the choice, which reads only earlier requests, changes no
    output's distribution.
    """

    def __init__(self, cost: CostModel, max_levels: int, budget: int) -> None:
        self.cost = cost
        self.budget = budget
        self.plain_rate = 1.0 / cost.plain_step_s
        self.ceiling_rate = ceiling_rate(cost, max_levels, budget)
        self.tokens = 0  # committed by the speculative steps recorded so far
        self.seconds = 0.0  # their modelled seconds
        self.steps = 0
        self._verify_s = 0.0  # the current request's steps: verification seconds (host), levels beyond the first (device)
        self._extra_levels: torch.Tensor | float = 0.0
        self._request_steps = 0
        self.decisions: list[PathDecision] = []

    @property
    def estimated_rate(self) -> float | None:
        return self.tokens / self.seconds if self.steps else None

    @property
    def plain_only(self) -> bool:
        """Rule 1 holds: every request decodes plainly, whatever the draft would accept; known before any
        request, so a caller may decode without the draft at all (`lmms_msd.pipeline.drop_unused_draft`)."""
        return self.ceiling_rate <= self.plain_rate

    def choose(self) -> PathDecision:
        """The path of the next request, recorded in `decisions`."""
        plain, ceiling, estimate = self.plain_rate, self.ceiling_rate, self.estimated_rate
        if self.plain_only:
            path, reason = "plain", "ceiling"
        elif estimate is None:
            path, reason = "speculative", "exploring"
        else:
            path, reason = ("speculative" if estimate > plain else "plain"), "estimate"
        decision = PathDecision(path, reason, plain, ceiling, estimate)
        self.decisions.append(decision)
        return decision

    def observer(self, tree: Any, logits: torch.Tensor, acceptance: Any) -> None:
        """A `StepObserver`: the modelled seconds of the verified tree (no host read: the levels add up on
        the device until `record`)."""
        self._verify_s += float(self.cost.verify_table[len(tree)])
        self._extra_levels = self._extra_levels + (tree.depths.max().clamp(min=1) - 1)
        self._request_steps += 1

    def record(self, steps: int, accepted: Sequence[int]) -> None:
        """A speculative request's steps (`DecodeStats.steps`, `accepted`), after its observed steps."""
        assert steps == self._request_steps, f"{steps} steps decoded but {self._request_steps} observed"
        cost = self.cost
        extra_levels = float(self._extra_levels)
        self.seconds += self._verify_s + steps * (cost.draft_root_s + cost.step_s) + extra_levels * cost.draft_level_s
        self.tokens += steps + sum(accepted)
        self.steps += steps
        self._verify_s, self._extra_levels, self._request_steps = 0.0, 0.0, 0

    def describe(self) -> dict[str, Any]:
        """The report's block: the rates, the estimate's evidence and the requests per path and reason."""
        counts: dict[str, int] = {}
        for d in self.decisions:
            counts[f"{d.path} ({d.reason})"] = counts.get(f"{d.path} ({d.reason})", 0) + 1
        return {
            "plain_tok_s": round(self.plain_rate, 2),
            "ceiling_tok_s": round(self.ceiling_rate, 2),
            "estimated_tok_s": None if self.estimated_rate is None else round(self.estimated_rate, 2),
            "speculative_steps": self.steps,
            "committed_tokens": self.tokens,
            "requests": counts,
            "cost_model": describe(self.cost),
        }
