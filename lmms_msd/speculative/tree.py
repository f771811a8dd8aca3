"""Draft trees: the `Tree` that joins drafting to verification, the `TreeSpec` that says how one
grows (`EagleTree`, `OptTree`), its `NodeScorer`, and the eager grower `grow_tree`.

A grower takes a `Drafter` positioned after the committed prefix, a spec, the root token and the
draft's hidden state at the root, and returns a `Tree`. Specs differ only in how they score and
choose nodes; the verifier reads nothing but the `Tree`, so a new tree (OPT-Tree) or a new node
scorer (the calibrator) never touches verification.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from lmms_msd.speculative.cost import STOPS, CostModel, cost_aware_size
from lmms_msd.speculative.drafting import Drafter, expand_rows


@dataclass
class Tree:
    """One step's proposal. Node 0 is the root (the last committed token); parents precede children."""

    tokens: torch.Tensor  # [N] long
    parents: torch.Tensor  # [N] long; parents[0] = -1, otherwise parents[i] < i
    depths: torch.Tensor  # [N] long; depths[0] = 0, depths[i] = depths[parents[i]] + 1
    scores: torch.Tensor  # [N] float32; the builder's score of each node (root 0)
    # The calibrator's features (lmms_msd.speculative.drafting's docstring says which row they come from):
    confidence: torch.Tensor | None = None  # [N] float32; the draft's probability of each node (root 1)
    visual: torch.Tensor | None = None  # [N] float32; visual attention intensity of the row that produced
    #                                     each node's distribution (root 0); None when not tracked

    def __post_init__(self) -> None:
        n = self.tokens.shape[0]
        for name in ("parents", "depths", "scores", "confidence", "visual"):
            value = getattr(self, name)
            if value is None and name in ("confidence", "visual"):
                continue
            shape = tuple(value.shape)
            assert shape == (n,), f"Tree.{name} has shape {shape}, expected ({n},)"

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def ancestor_mask(self, max_depth: int) -> torch.Tensor:
        """[N, N] bool: row i is True at i and at every ancestor of i (`ancestor_masks` of this tree).

        Example: parents [-1, 0, 0, 1] (node 3 under node 1 under the root) gives rows
        [1,0,0,0], [1,1,0,0], [1,0,1,0], [1,1,0,1].
        """
        return ancestor_masks(self.parents[None], max_depth)[0]


def ancestor_masks(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """R trees' ancestor masks at once: parents [R, N] long (each row a tree's, root -1), nodes at most
    `max_depth` deep -> [R, N, N] bool, row i of tree r True at i and at every ancestor of i."""
    r, n = parents.shape
    device = parents.device
    mask = torch.eye(n, dtype=torch.bool, device=device).repeat(r, 1, 1)
    node = torch.arange(n, device=device).expand(r, n)
    for _ in range(max_depth):
        node = parents.gather(1, node).clamp(min=0)  # the root is its own parent from here on
        mask.scatter_(2, node[:, :, None], True)  # a scalar argument, no host tensor: CUDA-graph safe
    return mask


@runtime_checkable
class NodeScorer(Protocol):
    """How a tree scores the children a level proposes: the log of each child's acceptance estimate.

    Called with the draft's log-probabilities of the proposed children [n, k], their tokens [n, k], their
    depth, and the visual attention intensity of the row that produced each parent's distribution [n]
    (None when the drafter does not track it); returns [n, k]. Row i of the inputs holds the k children
    of one parent: they share its row's visual intensity. A child's score is its parent's plus this.
    Implementations: `draft_confidence` (here), `lmms_msd.calibration.scorer.CalibratedScorer` and
    `lmms_msd.calibration.scorer.TiltScorer`.
    """

    @property
    def needs_visual(self) -> bool:
        """Whether the scores read the visual intensity, so the drafter must track it (`track_visual=True`)."""
        ...

    def __call__(
        self, logprobs: torch.Tensor, tokens: torch.Tensor, depth: int, visual: torch.Tensor | None
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class DraftConfidence:
    """The uncalibrated `NodeScorer`: the draft's own probability (its log-probabilities, unchanged)."""

    @property
    def needs_visual(self) -> bool:
        return False

    def __call__(self, logprobs: torch.Tensor, tokens: torch.Tensor, depth: int, visual: torch.Tensor | None) -> torch.Tensor:
        return logprobs

    def __repr__(self) -> str:
        return "draft_confidence"  # the name it is imported by, which records (bench.json) show


draft_confidence = DraftConfidence()


def pool_capacity(top_k: int, max_depth: int, frontier_only: bool) -> int:
    """Nodes a tree grown to max_depth can store, the root excluded: top_k at depth 1, then top_k
    (frontier_only) or top_k * top_k per level. Example: pool_capacity(10, 10, True) == 100."""
    return top_k + (max_depth - 1) * (top_k if frontier_only else top_k * top_k)


TREE_KINDS = ("eagle2", "opt")
OPT_VARIANTS = ("upstream", "frontier")


@dataclass(frozen=True, kw_only=True)
class TreeSpec:
    """How a draft tree grows: the one contract every grower reads, `grow_tree` and `grow_trees` (here: level
    by level on any `Drafter`s), `lmms_msd.speculative.fast.tree_growth.GraphedTreeGrower` (each level replayed
    from a CUDA graph) and, for many rows of a shared draft cache, `lmms_msd.speculative.fast.batched_growth.
    BatchedTreeGrower`; they give the same trees. Build one with `EagleTree(...)` or `OptTree(...)`,
    which take upstream's settings in upstream's words and say how each kind grows.

    Both kinds: a node's score is its parent's plus the scorer's log acceptance estimate of the node
    (the draft's log-probability unless calibrated). The root's top_k children are depth 1 and the
    first frontier; each further level feeds the frontier to the draft, every frontier node proposes
    its top_k children, and the best top_k of those top_k * top_k are the next frontier. A level
    stores all its proposals, or only its frontier (`frontier_only`: OPT-Tree as upstream). The tree
    is the best `budget` stored nodes and the root. EAGLE-2 grows to max_depth; OPT-Tree stops early,
    by `stop`: "delta" once a level adds at most `stop_delta` to the expected accepted length, "cost"
    once the best expected committed tokens per second on `cost` stop rising (which also sets how many
    of the budget's nodes are kept: `OptTree`).
    Example: `EagleTree()` is TreeSpec(kind="eagle2", top_k=10, max_depth=6, node_budget=58).
    """

    kind: str  # "eagle2" (`EagleTree`) or "opt" (`OptTree`)
    top_k: int  # frontier width, and children proposed per frontier node
    max_depth: int  # the deepest a node can be, the root being depth 0 (EAGLE-2: its depth + 1)
    node_budget: int  # draft nodes kept, the root not counted (EAGLE-2: its total_tokens - 1)
    stop_delta: float | None = None  # OPT-Tree's stop "delta" (an absolute gain); None for EAGLE-2 and stop "cost"
    opt_variant: str | None = None  # OPT-Tree's "upstream" or "frontier" (`OptTree`); None for EAGLE-2
    scorer: NodeScorer = draft_confidence  # EAGLE-2 ranks by the draft's probability only, as upstream
    stop: str | None = None  # OPT-Tree's stop rule, "delta" or "cost" (`OptTree`); None for EAGLE-2
    cost: CostModel | None = None  # stop "cost": the runtime's measured costs (`lmms_msd.speculative.cost`)

    def __post_init__(self) -> None:
        if self.kind not in TREE_KINDS:
            raise ValueError(f"tree kind {self.kind!r}: valid ones are {list(TREE_KINDS)}")
        if self.kind == "eagle2":
            if self.node_budget < 1 or self.max_depth < 2 or self.top_k < 1:
                raise ValueError(
                    f"EAGLE-2 tree needs total_tokens >= 2 (it counts the root), depth >= 1, top_k >= 1; got "
                    f"total_tokens={self.total_tokens}, depth={self.depth}, top_k={self.top_k}"
                )
            opt_only = (self.stop_delta, self.opt_variant, self.stop, self.cost)
            if opt_only != (None,) * 4 or self.scorer != draft_confidence:
                raise ValueError(
                    "an EAGLE-2 tree grows to its depth and ranks by the draft's probability: stop_delta, "
                    f"opt_variant, stop, cost and scorer are OPT-Tree's (got {self.stop_delta!r}, {self.opt_variant!r}, "
                    f"{self.stop!r}, {self.cost!r}, {self.scorer!r}); use OptTree(...) for those"
                )
            return
        if self.node_budget < 1 or self.max_depth < 1 or self.top_k < 1 or (self.stop_delta or 0.0) < 0:
            raise ValueError(
                f"OPT-Tree needs node_budget >= 1, max_depth >= 1, top_k >= 1, stop_delta >= 0; got "
                f"node_budget={self.node_budget}, max_depth={self.max_depth}, top_k={self.top_k}, "
                f"stop_delta={self.stop_delta}"
            )
        by_delta = self.stop == "delta" and self.stop_delta is not None and self.cost is None
        by_cost = self.stop == "cost" and self.stop_delta is None and self.cost is not None
        if not (by_delta or by_cost):
            raise ValueError(
                f"OPT-Tree stop={self.stop!r} with stop_delta={self.stop_delta!r}, cost={self.cost!r}: stop is one of "
                f"{list(STOPS)}; 'delta' reads stop_delta, 'cost' a cost model "
                "(lmms_msd.speculative.cost.cached_cost_model) and no stop_delta"
            )
        if self.opt_variant not in OPT_VARIANTS:
            raise ValueError(f"OPT-Tree variant {self.opt_variant!r}: valid ones are {list(OPT_VARIANTS)}")
        if not isinstance(self.scorer, NodeScorer):
            raise TypeError(
                f"scorer must be a NodeScorer (lmms_msd.speculative.tree: callable, with a needs_visual property); "
                f"got {self.scorer!r}"
            )
        if self.cost is not None:
            self.cost.step_seconds(1, self.budget)  # raises when the model did not time trees this wide

    @property
    def total_tokens(self) -> int:
        """EAGLE-2's word for the size: nodes kept counting the root (node_budget + 1)."""
        return self.node_budget + 1

    @property
    def depth(self) -> int:
        """EAGLE-2's word for the height: draft forwards after the root's children (max_depth - 1)."""
        return self.max_depth - 1

    @property
    def frontier_only(self) -> bool:
        """Whether a level stores only its frontier (OPT-Tree as upstream) instead of every proposal."""
        return self.opt_variant == "upstream"

    @property
    def pool_capacity(self) -> int:
        """Nodes growth can store, the root excluded (`pool_capacity`)."""
        return pool_capacity(self.top_k, self.max_depth, self.frontier_only)

    @property
    def budget(self) -> int:
        """Draft nodes a tree keeps: node_budget, or fewer when growth cannot store that many."""
        return min(self.node_budget, self.pool_capacity)

    @property
    def slots(self) -> int:
        """Cache slots one tree takes in the target's cache: its kept nodes and the root."""
        return self.budget + 1

    @property
    def needs_visual(self) -> bool:
        """Whether the scorer reads the draft's visual attention: decode with track_visual=True."""
        return self.scorer.needs_visual

    def settings(self) -> dict[str, Any]:
        """The arguments that build this spec, by name (`EagleTree(**s)` or `OptTree(**s)`), for records.

        Example: EagleTree().settings() == {"total_tokens": 59, "depth": 5, "top_k": 10}.
        """
        if self.kind == "eagle2":
            return {"total_tokens": self.total_tokens, "depth": self.depth, "top_k": self.top_k}
        return {
            "node_budget": self.node_budget, "stop_delta": self.stop_delta, "max_depth": self.max_depth,
            "top_k": self.top_k, "scorer": self.scorer, "variant": self.opt_variant, "stop": self.stop, "cost": self.cost,
        }  # fmt: skip


def narrowed(spec: TreeSpec, budget: int) -> TreeSpec:
    """`spec` keeping `budget` nodes, grown no wider and no deeper than such a tree can reach: top_k at most
    `budget` and max_depth at most `budget` (EAGLE-2: at least 2, its smallest tree).

    Rule: scores only fall along a path (a node's score is its parent's plus a log acceptance estimate
    <= 0: the draft's log-probability, or a calibrated weight's log), so each of the best `budget`
    stored nodes has its ancestors among them too. Then at every level it is among that level's best
    `budget` proposals (so in a frontier of width >= budget), among its parent's best `budget` children
    (so proposed with top_k >= budget), and at most `budget` deep. So the narrowed spec grows the same
    tree (up to ties) with far fewer nodes per level and fewer levels. Example: EagleTree() (top_k 10,
    max_depth 6) narrowed to 4 nodes grows with top_k 4 and max_depth 4: 4 + 3 * 16 stored proposals
    instead of 10 + 5 * 100. A scorer whose estimates can exceed 1 (the thesis's tilt) breaks the rule's
    premise; the narrowed tree is then only close to the wide one's.
    """
    smallest = 2 if spec.kind == "eagle2" else 1
    return replace(spec, node_budget=budget, top_k=min(spec.top_k, budget), max_depth=min(spec.max_depth, max(budget, smallest)))


def EagleTree(total_tokens: int = 59, depth: int = 5, top_k: int = 10) -> TreeSpec:  # noqa: N802 (a spec's constructor)
    """The EAGLE-2 dynamic tree's `TreeSpec` (the "MSD baseline" row), as `topK_genrate` in SafeAILab/EAGLE
    `eagle/model/cnets.py` (EAGLE-2, commit bfeb532; MSD's copy `EAGLE/eagle/model/cnets.py` is the same).

    Rule: a node's score is its cumulative draft log-probability. The root's top_k children are depth 1
    and the first frontier. Then `depth` more draft forwards: each feeds the frontier, every frontier
    node proposes its top_k children (depth + 1 of the frontier's), and the top_k of those top_k * top_k
    children by score are the next frontier. So nodes reach depth `depth + 1`, and the candidates are the
    top_k root children plus top_k * top_k per forward. Of the candidates, the best `total_tokens - 1` by
    score form the tree with the root: `total_tokens` counts the root, as upstream's `Model.__init__`
    sets `self.total_tokens = total_tokens - 1` (59: the root and 58 draft nodes). Candidates are ranked
    in proposal order (depth 1, then each forward's children row by row: frontier node, then child
    rank), and a stable sort puts the earlier of equal scores first (upstream's `torch.topk` leaves
    ties unspecified); so a parent precedes a child of equal score and the kept set is ancestor-closed.

    Worked example (tests/test_tree_bookkeeping.py), top_k 2, depth 2, total_tokens 7, root token 0
    and draft probabilities p(next | token) t0: {1: .6, 2: .3}, t1: {0: .45, 2: .35}, t2: {3: .8, 0: .1},
    t3: {3: .4, 2: .3} (each token's top two):
      depth 1: 1 (.6), 2 (.3)                                     frontier 1, 2
      forward 1 feeds 1, 2 -> depth 2: 1>0 .27, 1>2 .21, 2>3 .24, 2>0 .03; frontier 1>0, 2>3
      forward 2 feeds 1>0, 2>3 -> depth 3: 1>0>1 .162, 1>0>2 .081, 2>3>3 .096, 2>3>2 .072
    10 candidates over depths 1-3; the best 6 (total_tokens - 1): .6, .3, .27, .24, .21, .162, i.e.
    tokens [root 0, 1, 2, 0, 2, 3, 1], parents [-1, 0, 0, 1, 1, 2, 3], depths [0, 1, 1, 2, 2, 2, 3];
    4 nodes fed to the draft (two forwards of 2).
    """
    return TreeSpec(kind="eagle2", top_k=top_k, max_depth=depth + 1, node_budget=total_tokens - 1)


# total_tokens=auto, as MSD's `total_token=-1` (`EaModel.from_pretrained`, EAGLE/eagle/model/ea_model.py;
# SafeAILab/EAGLE's is the same): the candidate sizes (root included) and the gain upstream credits each
AUTO_TOTAL_TOKENS = (40, 48, 50, 56, 60)
AUTO_GAINS = (1.0, 1.05, 1.07, 1.1, 1.13)


def choose_total_tokens(seconds: Sequence[float]) -> int:
    """Upstream's choice of total_tokens: the candidate with the least seconds / gain, where seconds[i]
    is the measured time of a target forward over AUTO_TOTAL_TOKENS[i] tokens (the first on a tie).

    Example: seconds (1.0, 1.0, 1.0, 1.2, 1.3) cost 1.0, .952, .935, 1.091, 1.150: 50 tokens.
    """
    assert len(seconds) == len(AUTO_TOTAL_TOKENS), f"{len(seconds)} timings for {len(AUTO_TOTAL_TOKENS)} candidates"
    costs = [s / gain for s, gain in zip(seconds, AUTO_GAINS)]
    return AUTO_TOTAL_TOKENS[costs.index(min(costs))]


def OptTree(  # noqa: N802 (a spec's constructor)
    node_budget: int = 60,
    stop_delta: float = 0.3,
    max_depth: int = 10,
    top_k: int = 10,
    scorer: NodeScorer = draft_confidence,
    variant: str = "frontier",
    stop: str = "delta",
    cost: CostModel | None = None,
) -> TreeSpec:
    """The `TreeSpec` of OPT-Tree with early stopping, in two variants (`variant`) and two stop rules (`stop`).

    Both: a node's weight is the product along its path of per-node acceptance estimates (the draft's
    probability, or a calibrator's prediction through `scorer`); kept here as its log, the score. A
    tree's expected accepted length is the sum of its weights; E(S) is the sum of the best
    `node_budget` weights in a set S. Each level's frontier (`top_k` nodes) is fed to the draft and
    every frontier node proposes its `top_k` children; the next frontier is the best `top_k` of those
    `top_k * top_k` children. The tree is the best `node_budget` stored nodes plus the root.
    `max_depth` is the deepest a node can be.

    "upstream": Jikai0Wang/OPT-Tree `opt_eagle/tree.py` (`Tree.update`, driven by `topK_genrate` in
    `opt_eagle/cnets.py`). A level stores only its frontier. Upstream feeds each new level, then checks
    the gain of the level before it: it continues while E(all stored levels but the newest) exceeds
    the previous such sum by more than `stop_delta` (absolute), and on stopping builds the tree from
    the stored levels without the newest. So level d is in the tree iff every level before it gained
    more than stop_delta, the first level included (its gain is over the empty tree), and the forward
    that produced the discarded newest level changes nothing: here the gain of the newest level is
    checked before feeding it, and growth stops without that forward (the same trees, one draft
    forward fewer per step).
    "frontier" (this project's earlier rule): a level stores all top_k * top_k proposals; growth stops
    once a level raises E by at most stop_delta (the first level is not checked) and that level stays.

    Worked example (tests/test_tree_bookkeeping.py), top_k 2, node_budget 5, stop_delta .2, root
    token 0, draft probabilities t0: {1: .6, 2: .3}, t1: {0: .45, 2: .35}, t2: {3: .8, 0: .1},
    t3: {3: .4, 2: .3}:
      level 1: 1 .6, 2 .3; E = .9, gain .9 > .2: feed it
      level 2 proposals: 1>0 .27, 1>2 .21, 2>3 .24, 2>0 .03; stored 1>0, 2>3; E = 1.41, gain .51: feed
      level 3 proposals: 1>0>1 .162, 1>0>2 .081, 2>3>3 .096, 2>3>2 .072; stored 1>0>1, 2>3>3;
        E = .6 + .3 + .27 + .24 + .162 = 1.572, gain .162 <= .2: stop (level 3 kept, not fed)
      tree: 1, 2, 1>0, 2>3, 1>0>1: tokens [0, 1, 2, 0, 3, 1], parents [-1, 0, 0, 1, 2, 3]
    "frontier" on the same settings keeps 1>2 (.21) instead of 1>0>1: tokens [0, 1, 2, 0, 2, 3]. With
    stop_delta 1, "upstream" stops at level 1 (gain .9) without a forward: tokens [0, 1, 2].

    stop "cost" (`lmms_msd.speculative.cost`; stop_delta is not read, and the spec holds None): after
    each level, the best n stored nodes are expected to commit 1 + (the sum of their weights) tokens in
    `cost.step_seconds(levels)[n]` seconds; the tree keeps the n (at most node_budget) with the most
    tokens per second, and another level is grown only while that best rate rises. The rate before
    level 1 is a plain step's (n = 0), so when no tree of level 1 beats it the tree is the root alone.
    Both variants check level 1 before any forward. Worked example (tests/test_cost.py), the draft
    above, variant "upstream", top_k 2, node_budget 6, max_depth 4; costs: first level .1, each
    further level .1, rest of a step 0, verifying widths 1, 4, 8 (root included) 1.0, 1.0, 1.3,
    bucketed (a tree of 5 to 8 tokens costs 1.3):
      level 1, .1 drafted: n = 0, 1, 2: 1/1.1, 1.6/1.1, 1.9/1.1 = .9091, 1.4545, 1.7273: best n 2 > 0: grow
      level 2, .2: weights .6 .3 .27 .24: n = 3: 2.17/1.2 = 1.8083; n = 4: 2.41/1.5 = 1.6067; best
        1.8083 > 1.7273: grow
      level 3, .3: with .162 .096: n = 3: 2.17/1.3 = 1.6692; n = 4, 5, 6: 2.41, 2.572, 2.668 over 1.6 =
        1.5063, 1.6075, 1.6675; best 1.6692 (n 3) <= 1.8083: stop, keep the best 3
      tree: 1, 2, 1>0: tokens [0, 1, 2, 0], parents [-1, 0, 0, 1]
    Verifying widths 1, 4, 8 at 1.0, 3.0, 3.0 instead: level 1 rates 1/1.1, 1.6/3.1, 1.9/3.1 = .9091,
    .5161, .6129: best n 0, a plain step without any forward: tokens [0].

    Upstream's own settings (`--nodes n --threshold t --max_depth M`, README: 60, 0.5, 10) are
    variant "upstream", node_budget = top_k = n, stop_delta = t, max_depth = M - 1: its deepest kept
    level is M - 1 (it stops when the level it adds reaches M). The thesis
    (ljc0359/Speculative-Decoding-For-Vision-Language-Model, `topK_genrate` in
    `EAGLE/eagle/model/cnets.py`: nodes 500, threshold .2, max_depth 10, top_k 10) implements the same
    rule with the frontier width top_k apart from the budget, which it takes as nodes - 1 (the root
    counted), and keeps the newest level when it reaches max_depth: variant "upstream", top_k 10,
    node_budget 499, stop_delta .2, max_depth 10 (at most 100 nodes are stored, so node_budget 500 or
    499 gives the same trees). Weights are products of float32 probabilities upstream and sums of
    log-probabilities here: the same order up to rounding.
    The draft's attention while growing follows each node's ancestors only (`grow_tree`); upstream's
    `kv_cache_mask` is never reset between levels, so its deeper levels also see non-ancestors: that is
    not reproduced.
    """
    return TreeSpec(
        kind="opt", top_k=top_k, max_depth=max_depth, node_budget=node_budget,
        stop_delta=stop_delta if stop == "delta" else None, opt_variant=variant, scorer=scorer, stop=stop, cost=cost,
    )  # fmt: skip


@torch.inference_mode()
def grow_tree(
    drafter: Drafter, spec: TreeSpec, root_token: int, root_hidden: torch.Tensor, root_visual: torch.Tensor | None = None
) -> Tree:
    """Grow a tree as `spec` says, level by level with cumulative log-scores; keep its `budget` best stored nodes.

    EAGLE-2 grows to max_depth. OPT-Tree's stop "delta" stops once a level raises the expected accepted
    length (the sum of the best `budget` weights, weight = exp(score)) by at most stop_delta; with
    frontier_only (upstream OPT-Tree, `OptTree`) a level stores only its frontier, and the first level
    is checked too (against 0), before any forward. Its stop "cost" (`OptTree`) checks every level,
    the first before any forward, and also sets how many of the budget's nodes are kept.
    The draft sees, for each fed node, the committed prefix, its ancestors' slots and its own.
    Every stored node also carries its draft probability and the visual intensity of the row that
    produced it (its parent's row: `lmms_msd.speculative.drafting`), which end up in the Tree for the calibrator.
    drafter: positioned after the committed prefix (`Drafter.prefill` / `advance`)
    root_hidden: [H], the draft output whose logits predict the root's children; root_visual: [], that
    row's visual attention intensity (None when the drafter does not track it)
    """
    return grow_trees([drafter], [spec], [root_token], [root_hidden], [root_visual])[0]


@torch.inference_mode()
def grow_trees(
    drafters: list[Drafter], specs: list[TreeSpec], root_tokens: list[int], root_hidden: list[torch.Tensor],
    root_visual: list[torch.Tensor | None],
) -> list[Tree]:  # fmt: skip
    """`grow_tree` for B rows at once (row b: its own drafter, spec, root token, root hidden [H] and visual
    []): every level feeds all growing rows' frontiers in one draft forward (`expand_rows`) and takes
    their log-probabilities in one lm_head product. Rows of one spec (and alike in tracking visual
    attention) grow as one `TreeGrowth`, the growth rule on a batch of rows; a row leaves its group
    when its spec stops it. Row b's tree is the one `grow_tree` grows for it alone (up to the rounding
    of the wider products). The drafters share one head and lm_head."""
    assert len(drafters) == len(specs) == len(root_tokens) == len(root_hidden) == len(root_visual), "one of each per row"
    logprobs = drafters[0].logprobs(torch.stack(root_hidden))  # [B, V]
    groups: list[list[int]] = []  # rows of one spec, tracked alike (specs are compared, not hashed)
    for b, spec in enumerate(specs):
        group = next((g for g in groups if specs[g[0]] == spec and (root_visual[g[0]] is None) == (root_visual[b] is None)), None)
        if group is None:
            groups.append([b])
        else:
            group.append(b)
    growths = [
        TreeGrowth(
            specs[g[0]], [root_tokens[b] for b in g], logprobs[g], torch.stack([root_hidden[b] for b in g]),
            None if root_visual[g[0]] is None else torch.stack([root_visual[b].reshape(()) for b in g]),
        )
        for g in groups
    ]  # fmt: skip
    while growing := [(group, growth) for group, growth in zip(groups, growths) if growth.growing]:
        depth = growing[0][1].depth  # every row grows one level per forward, so all are at one depth
        rows, tokens, parent_hidden, ancestors = [], [], [], []
        for group, growth in growing:
            for i, r in enumerate(growth.growing):  # the state tensors hold the growing rows only
                rows.append(group[r])
                tokens.append(growth.frontier_tokens[i])
                parent_hidden.append(growth.parent_hidden[i])
                ancestors.append(growth.ancestors[i])
        outs = expand_rows([drafters[b] for b in rows], tokens, parent_hidden, depth, ancestors)
        hidden = torch.cat([out.hidden for out in outs])  # [sum of the rows' k, H], group after group
        level_logprobs = drafters[0].logprobs(hidden)
        first, at = 0, 0  # in hidden's rows, in outs
        for _, growth in growing:
            n = len(growth.growing)
            part, visual = slice(first, first + n * growth.spec.top_k), [out.visual for out in outs[at : at + n]]
            growth.take(hidden[part], None if visual[0] is None else torch.cat(visual), level_logprobs[part])
            first, at = part.stop, at + n
    trees: list[Tree | None] = [None] * len(specs)
    for group, growth in zip(groups, growths):
        for r, b in enumerate(group):
            trees[b] = growth.tree(r)
    return trees


class TreeGrowth:
    """R trees of one spec while they grow: the growth rule of `grow_tree` (its docstring) on a batch of
    rows, a level per `take`; R = 1 is `grow_tree`.

    Made from the roots' log-probabilities [R, V], it holds the first level (each root's top_k
    children). Then, while `growing` lists rows, each of those feeds its frontier (`frontier_tokens`,
    `parent_hidden`, `ancestors` at its row) and `take` reads the drafter's output there. A row stops
    by its own early-stop rule; its tree is then fixed (`tree`). Every row stores levels of the same
    sizes, so pool indices mean the same in every row. `grow_trees` drives many at once.
    """

    def __init__(
        self, spec: TreeSpec, root_tokens: list[int], root_logprobs: torch.Tensor, root_hidden: torch.Tensor,
        root_visual: torch.Tensor | None,
    ) -> None:  # fmt: skip
        """root_logprobs: [R, V]; root_hidden: [R, H]; root_visual: [R] or None."""
        self.spec, self.root_tokens = spec, root_tokens
        rows, k, budget, device = len(root_tokens), spec.top_k, spec.budget, root_hidden.device
        top = root_logprobs.topk(k)  # [R, k]
        visual = None if root_visual is None else root_visual.float()  # [R]
        scores = spec.scorer(top.values, top.indices, 1, visual)  # [R, k]
        # The pool holds every stored node; pool index 0 is the root, node i of the pool is at i + 1.
        self.pool = NodePool(device, tracked=visual is not None)
        self.pool.add(top.indices, torch.zeros(rows, k, dtype=torch.long, device=device), 1, scores, top.values, visual, k)
        self.frontier = torch.arange(1, k + 1, device=device).expand(rows, k)  # [R, k] pool indices
        self.frontier_tokens, self.frontier_scores = top.indices, scores  # [R, k]
        self.parent_hidden = root_hidden[:, None].expand(-1, k, -1)  # [R, k, H]
        self.ancestors = torch.zeros(rows, k, 0, dtype=torch.bool, device=device)  # over tree slots fed so far
        self.size = [budget] * rows  # nodes kept per row
        self.growing = list(range(rows))  # rows still growing; the state tensors hold these rows only
        self.fields: list[tuple | None] = [None] * rows  # per row, its pool once it stopped
        self.depth = 1  # of the frontier
        self.expected = expected_lengths(self.pool.scores, budget) if spec.stop_delta is not None else [0.0] * rows
        stops = [False] * rows
        if spec.frontier_only and spec.stop_delta is not None:
            stops = [e <= spec.stop_delta for e in self.expected]
        if spec.cost is not None:  # stop "cost": the best tree so far; none beats a plain step: stop before any forward
            self.rate = [0.0] * rows
            for r in range(rows):
                self.rate[r], self.size[r] = cost_aware_size([s[r] for s in self.pool.scores], 1, budget, spec.cost)
            stops = [size == 0 for size in self.size]
        if spec.max_depth == 1:
            stops = [True] * rows
        self._stop(stops)

    def _stop(self, stops: list[bool]) -> None:
        """Fix the pools of the growing rows that stop now; keep the others' state only."""
        if not any(stops):
            return
        for i, r in enumerate(self.growing):
            if stops[i]:
                self.fields[r] = self.pool.fields(i)
        keep = [i for i, stop in enumerate(stops) if not stop]
        self.growing = [self.growing[i] for i in keep]
        index = torch.tensor(keep, dtype=torch.long, device=self.frontier.device)
        self.pool.keep(index)
        self.frontier, self.frontier_tokens = self.frontier[index], self.frontier_tokens[index]
        self.frontier_scores, self.parent_hidden, self.ancestors = (
            self.frontier_scores[index], self.parent_hidden[index], self.ancestors[index]
        )  # fmt: skip
        self.expected = [self.expected[i] for i in keep]
        if self.spec.cost is not None:
            self.rate = [self.rate[i] for i in keep]

    def take(self, hidden: torch.Tensor, visual: torch.Tensor | None, logprobs: torch.Tensor) -> None:
        """Read the fed frontiers' draft output, the growing rows' k nodes each, in order: hidden [R k, H],
        visual [R k] or None, log-probabilities [R k, V]."""
        spec, depth, pool, frontier = self.spec, self.depth, self.pool, self.frontier
        k, budget, rows = spec.top_k, spec.budget, len(self.growing)
        # 1. the frontier was fed, 2. each proposes k children, 3. the best k of them are the next frontier
        children = logprobs.topk(k)  # [R k, k]
        node_scores = spec.scorer(children.values, children.indices, depth + 1, visual)  # [R k, k]
        scores = (self.frontier_scores[:, :, None] + node_scores.view(rows, k, k)).view(rows, k * k)
        tokens, values = children.indices.view(rows, k * k), children.values.view(rows, k * k)
        best = scores.topk(k).indices  # [R, k]
        parent_row = best // k  # [R, k]
        row_visual = None if visual is None else visual.view(rows, k)
        first = pool.size
        if spec.frontier_only:
            row_visual = None if row_visual is None else row_visual.gather(1, parent_row)
            pool.add(tokens.gather(1, best), frontier.gather(1, parent_row), depth + 1, scores.gather(1, best),
                     values.gather(1, best), row_visual, 1)  # fmt: skip
            next_frontier = first + torch.arange(k, device=hidden.device).expand(rows, k)
        else:
            pool.add(tokens, frontier.repeat_interleave(k, dim=1), depth + 1, scores, values, row_visual, k)
            next_frontier = first + best
        stops = [False] * rows
        if spec.stop_delta is not None:
            # 4. early stop: this level added too little to the expected accepted length.
            grown = expected_lengths(pool.scores, budget)
            stops = [g - e <= spec.stop_delta for g, e in zip(grown, self.expected)]
            self.expected = grown
        if spec.cost is not None:  # stop "cost": stop once the best rate stops rising; size by this level's rate
            for i, r in enumerate(self.growing):
                if stops[i]:
                    continue
                grown_rate, self.size[r] = cost_aware_size([s[i] for s in pool.scores], depth + 1, budget, spec.cost)
                stops[i] = grown_rate <= self.rate[i]
                self.rate[i] = grown_rate
        fed = self.ancestors.shape[2]
        own_slot = torch.nn.functional.one_hot(parent_row, k).bool()
        self.ancestors = torch.cat([self.ancestors.gather(1, parent_row[:, :, None].expand(-1, -1, fed)), own_slot], dim=2)
        self.frontier = next_frontier
        self.frontier_tokens, self.frontier_scores = tokens.gather(1, best), scores.gather(1, best)
        hidden = hidden.view(rows, k, -1)
        self.parent_hidden = hidden.gather(1, parent_row[:, :, None].expand(-1, -1, hidden.shape[2]))
        self.depth = depth + 1
        if self.depth >= spec.max_depth:
            stops = [True] * rows
        self._stop(stops)

    def tree(self, row: int) -> Tree:
        """Row's tree once it stopped: its best `size` stored nodes and the root."""
        assert self.fields[row] is not None, f"row {row} is still growing"
        tokens, parents, depths, scores, confidence, visual = self.fields[row]
        return select_nodes(
            self.root_tokens[row], tokens, parents, depths, scores, self.size[row], confidence=confidence, visual=visual
        )  # fmt: skip


class NodePool:
    """Every node stored while growing R trees of one spec, level by level (pool index 0 is the root);
    every row stores as many nodes per level."""

    def __init__(self, device: torch.device, tracked: bool) -> None:
        self.device = device
        self.tracked = tracked  # whether nodes carry visual intensities
        self.tokens: list[torch.Tensor] = []  # per level [R, m] long
        self.parents: list[torch.Tensor] = []  # per level [R, m] long, pool indices
        self.depths: list[int] = []  # per level
        self.scores: list[torch.Tensor] = []  # per level [R, m] float32, cumulative log acceptance estimates
        self.logprobs: list[torch.Tensor] = []  # per level [R, m] float32, the draft's log-probability
        self.visual: list[torch.Tensor] = []  # per level [R, m] float32, when tracked
        self.size = 1  # the root

    def add(self, tokens, parents, depth: int, scores, logprobs, row_visual: torch.Tensor | None, k: int) -> None:
        """One level of m = n * k nodes per row, k consecutive nodes per producing draft row; row_visual:
        [R, n], the intensity of each producing row."""
        rows, m = tokens.shape
        assert parents.shape == scores.shape == logprobs.shape == (rows, m), "pool level fields must all be [R, m]"
        self.tokens.append(tokens)
        self.parents.append(parents)
        self.depths.append(depth)
        self.scores.append(scores)
        self.logprobs.append(logprobs)
        assert (row_visual is not None) == self.tracked, (
            "visual intensities come for every level or for none: a drafter built with track_visual=True "
            "needs the root's intensity (build(..., root_visual=...)), and only such a drafter gives one"
        )
        if row_visual is not None:
            row_visual = row_visual.reshape(rows, -1)
            assert row_visual.shape == (rows, m // k), f"row_visual {tuple(row_visual.shape)} for {m} nodes of {k} per row"
            self.visual.append(row_visual.float().repeat_interleave(k, dim=1))
        self.size += m

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the rows at index [R'] (the others stopped)."""
        for levels in (self.tokens, self.parents, self.scores, self.logprobs, self.visual):
            levels[:] = [level[index] for level in levels]

    def fields(self, row: int):
        """Row's tokens, parents, depths, scores, confidence (the draft's probability), visual: each [M]
        over pool indices 1..M (visual None when not tracked)."""
        cat = torch.cat
        depths = cat([torch.full((t.shape[1],), d, dtype=torch.long, device=self.device) for t, d in zip(self.tokens, self.depths)])
        visual = cat([v[row] for v in self.visual]) if self.tracked else None
        tokens, parents = cat([t[row] for t in self.tokens]), cat([p[row] for p in self.parents])
        return tokens, parents, depths, cat([s[row] for s in self.scores]), cat([p[row] for p in self.logprobs]).exp(), visual


def expected_lengths(pool_scores: list[torch.Tensor], budget: int) -> list[float]:
    """Expected accepted length of each row's best `budget` nodes: the sum of their weights exp(score);
    pool_scores: per level [R, m] -> R floats, in one host read."""
    scores = torch.cat(pool_scores, dim=1)
    return scores.topk(min(budget, scores.shape[1])).values.exp().sum(dim=1).tolist()


def select_nodes(
    root_token: int,
    tokens: torch.Tensor,
    parents: torch.Tensor,
    depths: torch.Tensor,
    scores: torch.Tensor,
    budget: int,
    *,
    confidence: torch.Tensor | None = None,
    visual: torch.Tensor | None = None,
) -> Tree:
    """Keep the `budget` best-scored pool nodes as a tree (`select_rows` for one pool).

    tokens, parents, depths, scores (and confidence, visual when given): [M] over pool indices 1..M
    (index 0 is the root), in the order proposed, so a parent always precedes its children. Example:
    scores [-0.1, -0.5, -0.1] with parents [0, 0, 1] and budget 2 keep pool nodes 1 and 3 (3's parent
    is 1): tree parents [-1, 0, 1].
    """
    m = tokens.shape[0]
    assert parents.shape == depths.shape == scores.shape == (m,), "pool fields must all be [M]"
    assert confidence is None or confidence.shape == (m,), f"confidence {tuple(confidence.shape)} != ({m},)"
    assert visual is None or visual.shape == (m,), f"visual {tuple(visual.shape)} != ({m},)"
    fields = select_rows(
        tokens.new_full((1,), root_token), tokens[None], parents[None], depths, scores[None], budget,
        confidence=None if confidence is None else confidence[None], visual=None if visual is None else visual[None],
    )  # fmt: skip
    return Tree(*(None if field is None else field[0] for field in fields))


def select_rows(
    root_tokens: torch.Tensor,
    tokens: torch.Tensor,
    parents: torch.Tensor,
    depths: torch.Tensor,
    scores: torch.Tensor,
    budget: int,
    *,
    confidence: torch.Tensor | None = None,
    visual: torch.Tensor | None = None,
    used: torch.Tensor | None = None,
    sizes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Keep each of R pools' `budget` best-scored nodes as a tree, in a few tensor operations for all.

    root_tokens: [R] long; tokens, parents, scores (and confidence, visual when given): [R, M] over pool
    indices 1..M (index 0 is the root), in the order proposed, so a parent always precedes its
    children; depths: [M], alike in every pool. Scores never grow along a path (every acceptance
    estimate is at most 1); a stable sort puts a parent before a child of equal score, so the kept set
    contains every kept node's parent. used: [R] long, pool r holds only its first used_r places (the
    rest is ignored); sizes: [R] long, pool r keeps only its best sizes_r <= min(budget, used_r) nodes.
    -> `Tree`'s fields in its order (tokens, parents, depths, scores, confidence, visual), each [R, n + 1]
    with n = min(budget, M) (confidence and visual None when not given); with sizes, row r's tree is
    its first 1 + sizes_r columns (the rest is padding).
    Example: scores [[-0.1, -0.5, -0.1], [-0.2, -0.1, -0.3]], parents [[0, 0, 1], [0, 0, 2]], budget 2,
    sizes [2, 1]: row 0 keeps places 0 and 2 (tree parents [-1, 0, 1]), row 1 place 1 (parents [-1, 0]).
    """
    r, m = tokens.shape
    assert parents.shape == scores.shape == (r, m) and depths.shape == (m,), "pool fields must all be [R, M] (depths [M])"
    assert root_tokens.shape == (r,), f"root_tokens {tuple(root_tokens.shape)} for {r} pools"
    if used is not None:
        scores = scores.masked_fill(torch.arange(m, device=scores.device)[None] >= used[:, None], float("-inf"))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :budget]
    n = order.shape[1]
    if sizes is not None:  # past a row's size: place m, which sorts last and is never read
        order = order.masked_fill(torch.arange(n, device=order.device)[None] >= sizes[:, None], m)
    kept = torch.sort(order, dim=1).values  # [R, n] pool places (index - 1), ascending: parents before children
    remap = torch.full((r, m + 2), -1, dtype=torch.long, device=tokens.device)  # column m + 1: place m's
    remap[:, :1].zero_()  # the root; no host scalar, so this runs inside a CUDA graph capture
    remap.scatter_(1, kept + 1, torch.arange(1, n + 1, device=tokens.device).expand(r, n))
    kept = kept.clamp(max=m - 1)  # place m (padding) reads the last place

    def with_root(root: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        return torch.cat([root, pool.gather(1, kept)], dim=1)

    return (
        with_root(root_tokens[:, None], tokens),
        torch.cat([tokens.new_full((r, 1), -1), remap.gather(1, parents.gather(1, kept))], dim=1),
        torch.cat([tokens.new_zeros(r, 1), depths[kept]], dim=1),
        with_root(scores.new_zeros(r, 1), scores),
        None if confidence is None else with_root(confidence.new_ones(r, 1), confidence),
        None if visual is None else with_root(visual.new_zeros(r, 1), visual),
    )
