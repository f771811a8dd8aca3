"""Draft trees: the `Tree` that joins drafting to verification, and the tree builders.

A builder takes a `Drafter` positioned after the committed prefix, the root token and the draft's
hidden state at the root, and returns a `Tree`. Builders differ only in how they score and choose
nodes; the verifier reads nothing but the `Tree`, so a new builder (OPT-Tree) or a new node scorer
(the calibrator) never touches verification.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from lmms_msd.drafting import Drafter


@dataclass
class Tree:
    """One step's proposal. Node 0 is the root (the last committed token); parents precede children."""

    tokens: torch.Tensor  # [N] long
    parents: torch.Tensor  # [N] long; parents[0] = -1, otherwise parents[i] < i
    depths: torch.Tensor  # [N] long; depths[0] = 0, depths[i] = depths[parents[i]] + 1
    scores: torch.Tensor  # [N] float32; the builder's score of each node (root 0)
    # The calibrator's features (lmms_msd.drafting's docstring says which row they come from):
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
        """[N, N] bool: row i is True at i and at every ancestor of i.

        Example: parents [-1, 0, 0, 1] (node 3 under node 1 under the root) gives rows
        [1,0,0,0], [1,1,0,0], [1,0,1,0], [1,1,0,1].
        """
        n = len(self)
        rows = torch.arange(n, device=self.tokens.device)
        mask = torch.eye(n, dtype=torch.bool, device=self.tokens.device)
        node = rows
        true = torch.ones((), dtype=torch.bool, device=self.tokens.device)  # a device scalar: CUDA-graph safe
        for _ in range(max_depth):
            node = self.parents[node].clamp(min=0)  # the root is its own parent from here on
            mask[rows, node] = true
        return mask


# (draft log-probabilities of the proposed children [n, k], their tokens [n, k], their depth,
#  the visual attention intensity of the row that produced each parent's distribution [n] or None)
#   -> log of each child's acceptance estimate [n, k]
# Row i of the inputs holds the k children of one parent: they share its row's visual intensity.
NodeScorer = Callable[[torch.Tensor, torch.Tensor, int, "torch.Tensor | None"], torch.Tensor]


class Growth(NamedTuple):
    """How a builder grows its tree (`grow_tree`'s settings); a builder's `growth` says it."""

    top_k: int
    max_depth: int
    budget: int  # draft nodes kept (the root not counted)
    node_score: "NodeScorer"
    stop_delta: float | None  # None: always grow to max_depth


def draft_confidence(logprobs: torch.Tensor, tokens: torch.Tensor, depth: int, visual: torch.Tensor | None) -> torch.Tensor:
    """The uncalibrated estimate: the draft's own probability."""
    return logprobs


@dataclass(frozen=True)
class EagleTree:
    """The EAGLE-2 dynamic tree (the "MSD baseline" row).

    The root's top-k children form the first frontier; at each further level every frontier node
    proposes its top-k children, scored by cumulative draft log-probability, and the global top-k of
    those become the next frontier. Of all nodes proposed, the `total_tokens - 1` best by score form
    the tree (`total_tokens` counts the root). `depth` is the deepest a node can be, so one step runs
    the draft `depth - 1` times beyond the forward that produced the root's hidden state.
    """

    total_tokens: int = 59
    depth: int = 5
    top_k: int = 10

    def __post_init__(self) -> None:
        if self.total_tokens < 2 or self.depth < 1 or self.top_k < 1:
            raise ValueError(
                f"EAGLE-2 tree needs total_tokens >= 2, depth >= 1, top_k >= 1; got "
                f"total_tokens={self.total_tokens}, depth={self.depth}, top_k={self.top_k}"
            )

    @property
    def max_depth(self) -> int:
        return self.depth

    @property
    def growth(self) -> Growth:
        return Growth(self.top_k, self.depth, self.total_tokens - 1, draft_confidence, None)

    def build(self, drafter: Drafter, root_token: int, root_hidden: torch.Tensor, root_visual: torch.Tensor | None = None) -> Tree:
        """root_hidden: [H], the draft output whose logits predict the root's children; root_visual: [],
        that row's visual attention intensity (None when the drafter does not track it)."""
        return grow_tree(drafter, root_token, root_hidden, root_visual, *self.growth)


@dataclass(frozen=True)
class OptTree:
    """OPT-Tree with early stopping.

    A node's weight is the product along its path of per-node acceptance estimates (the draft's
    probability, or a calibrator's prediction through `scorer`); a tree's expected accepted length
    is the sum of its weights. Levels grow as in EAGLE-2 (frontier = the best `top_k` of the
    candidates) until a level adds at most `stop_delta` to the expected length of the best
    `node_budget` nodes, or `max_depth` is reached; the tree is those `node_budget` nodes plus the root.
    """

    node_budget: int = 60
    stop_delta: float = 0.3
    max_depth: int = 10
    top_k: int = 10
    scorer: NodeScorer = draft_confidence

    def __post_init__(self) -> None:
        if self.node_budget < 1 or self.max_depth < 1 or self.top_k < 1 or self.stop_delta < 0:
            raise ValueError(
                f"OPT-Tree needs node_budget >= 1, max_depth >= 1, top_k >= 1, stop_delta >= 0; got "
                f"node_budget={self.node_budget}, max_depth={self.max_depth}, top_k={self.top_k}, "
                f"stop_delta={self.stop_delta}"
            )

    @property
    def growth(self) -> Growth:
        return Growth(self.top_k, self.max_depth, self.node_budget, self.scorer, self.stop_delta)

    def build(self, drafter: Drafter, root_token: int, root_hidden: torch.Tensor, root_visual: torch.Tensor | None = None) -> Tree:
        """root_hidden: [H], the draft output whose logits predict the root's children; root_visual: [],
        that row's visual attention intensity (None when the drafter does not track it)."""
        return grow_tree(drafter, root_token, root_hidden, root_visual, *self.growth)


@torch.inference_mode()
def grow_tree(
    drafter: Drafter,
    root_token: int,
    root_hidden: torch.Tensor,
    root_visual: torch.Tensor | None,
    top_k: int,
    max_depth: int,
    budget: int,
    node_score: NodeScorer,
    stop_delta: float | None,
) -> Tree:
    """Grow a tree level by level with cumulative log-scores; keep the `budget` best nodes.

    stop_delta None: grow to max_depth (EAGLE-2). Otherwise stop once a level raises the expected
    accepted length (the sum of the best `budget` weights, weight = exp(score)) by at most stop_delta.
    Every proposed node also carries its draft probability and the visual intensity of the row that
    produced it (its parent's row: `lmms_msd.drafting`), which end up in the Tree for the calibrator.
    root_hidden: [H]; root_visual: [] or None
    """
    k = top_k
    device = root_hidden.device
    top = drafter.logprobs(root_hidden[None]).topk(k)  # [1, k]
    visual = None if root_visual is None else root_visual.reshape(1).float()  # [1]
    scores = node_score(top.values, top.indices, 1, visual)[0]
    # The pool holds every proposed node; pool index 0 is the root, node i of the pool is at i + 1.
    pool = NodePool(device, tracked=visual is not None)
    pool.add(top.indices[0], torch.zeros(k, dtype=torch.long, device=device), 1, scores, top.values[0], visual, k)
    frontier = torch.arange(1, k + 1, device=device)  # pool indices
    frontier_tokens, frontier_scores = top.indices[0], scores
    parent_hidden = root_hidden[None].expand(k, -1)
    ancestors = torch.zeros(k, 0, dtype=torch.bool, device=device)  # over tree slots fed so far
    expected = expected_length(pool.scores, budget) if stop_delta is not None else 0.0
    for depth in range(1, max_depth):
        # 1. feed the frontier, 2. propose k children each, 3. keep the global top-k as the frontier.
        hidden, visual = drafter.expand(frontier_tokens, parent_hidden, depth, ancestors)
        children = drafter.logprobs(hidden).topk(k)  # [k, k]
        scores = (frontier_scores[:, None] + node_score(children.values, children.indices, depth + 1, visual)).flatten()
        tokens = children.indices.flatten()
        first = pool.size
        pool.add(tokens, frontier.repeat_interleave(k), depth + 1, scores, children.values.flatten(), visual, k)
        if stop_delta is not None:
            # 4. early stop: this level added too little to the expected accepted length.
            grown = expected_length(pool.scores, budget)
            gained, expected = grown - expected, grown
            if gained <= stop_delta:
                break
        best = scores.topk(k).indices
        parent_row = best // k
        own_slot = torch.nn.functional.one_hot(parent_row, k).bool()
        ancestors = torch.cat([ancestors[parent_row], own_slot], dim=1)
        frontier = first + best
        frontier_tokens, frontier_scores = tokens[best], scores[best]
        parent_hidden = hidden[parent_row]
    tokens, parents, depths, scores, confidence, visual = pool.fields()
    return select_nodes(root_token, tokens, parents, depths, scores, budget, confidence=confidence, visual=visual)


class NodePool:
    """Every node proposed while growing one tree, level by level (pool index 0 is the root)."""

    def __init__(self, device: torch.device, tracked: bool) -> None:
        self.device = device
        self.tracked = tracked  # whether nodes carry visual intensities
        self.tokens: list[torch.Tensor] = []  # per level [m] long
        self.parents: list[torch.Tensor] = []  # per level [m] long, pool indices
        self.depths: list[torch.Tensor] = []  # per level [m] long
        self.scores: list[torch.Tensor] = []  # per level [m] float32, cumulative log acceptance estimates
        self.logprobs: list[torch.Tensor] = []  # per level [m] float32, the draft's log-probability
        self.visual: list[torch.Tensor] = []  # per level [m] float32, when tracked
        self.size = 1  # the root

    def add(self, tokens, parents, depth: int, scores, logprobs, row_visual: torch.Tensor | None, k: int) -> None:
        """One level of m = rows * k nodes; row_visual: [rows], the intensity of each producing row."""
        m = tokens.shape[0]
        assert parents.shape == scores.shape == logprobs.shape == (m,), "pool level fields must all be [m]"
        self.tokens.append(tokens)
        self.parents.append(parents)
        self.depths.append(torch.full((m,), depth, dtype=torch.long, device=self.device))
        self.scores.append(scores)
        self.logprobs.append(logprobs)
        assert (row_visual is not None) == self.tracked, (
            "visual intensities come for every level or for none: a drafter built with track_visual=True "
            "needs the root's intensity (build(..., root_visual=...)), and only such a drafter gives one"
        )
        if row_visual is not None:
            assert row_visual.shape == (m // k,), f"row_visual {tuple(row_visual.shape)} for {m} nodes of {k} per row"
            self.visual.append(row_visual.float().repeat_interleave(k))
        self.size += m

    def fields(self):
        """tokens, parents, depths, scores, confidence (the draft's probability), visual: each [M] over
        pool indices 1..M (visual None when not tracked)."""
        cat = torch.cat
        visual = cat(self.visual) if self.tracked else None
        return cat(self.tokens), cat(self.parents), cat(self.depths), cat(self.scores), cat(self.logprobs).exp(), visual


def expected_length(pool_scores: list[torch.Tensor], budget: int) -> float:
    """Expected accepted length of the best `budget` nodes: the sum of their weights exp(score)."""
    scores = torch.cat(pool_scores)
    return float(scores.topk(min(budget, scores.shape[0])).values.exp().sum())


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
    """Keep the `budget` best-scored pool nodes as a tree.

    tokens, parents, depths, scores (and confidence, visual when given): [M] over pool indices 1..M
    (index 0 is the root), in the order proposed, so a parent always precedes its children. Scores
    never grow along a path (every acceptance estimate is at most 1); a stable sort puts a parent
    before a child of equal score, so the kept set contains every kept node's parent. Example: scores [-0.1, -0.5, -0.1] with parents [0, 0, 1] and budget 2 keep pool
    nodes 1 and 3 (3's parent is 1): tree parents [-1, 0, 1].
    """
    m = tokens.shape[0]
    assert parents.shape == depths.shape == scores.shape == (m,), "pool fields must all be [M]"
    assert confidence is None or confidence.shape == (m,), f"confidence {tuple(confidence.shape)} != ({m},)"
    assert visual is None or visual.shape == (m,), f"visual {tuple(visual.shape)} != ({m},)"
    order = torch.sort(scores, descending=True, stable=True).indices[:budget]
    kept = torch.sort(order).values + 1  # pool indices, ascending: parents before children
    remap = torch.full((m + 1,), -1, dtype=torch.long, device=tokens.device)
    remap[:1].zero_()  # the root; no host scalar, so this runs inside a CUDA graph capture
    remap[kept] = torch.arange(1, kept.shape[0] + 1, device=tokens.device)
    root = tokens.new_full((1,), root_token)
    return Tree(
        tokens=torch.cat([root, tokens[kept - 1]]),
        parents=torch.cat([root.new_full((1,), -1), remap[parents[kept - 1]]]),
        depths=torch.cat([root.new_zeros(1), depths[kept - 1]]),
        scores=torch.cat([scores.new_zeros(1), scores[kept - 1]]),
        confidence=None if confidence is None else torch.cat([confidence.new_ones(1), confidence[kept - 1]]),
        visual=None if visual is None else torch.cat([visual.new_zeros(1), visual[kept - 1]]),
    )
