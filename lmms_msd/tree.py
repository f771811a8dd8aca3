"""Draft trees: the `Tree` that joins drafting to verification, and the tree builders.

A builder takes a `Drafter` positioned after the committed prefix, the root token and the draft's
hidden state at the root, and returns a `Tree`. Builders differ only in how they score and choose
nodes; the verifier reads nothing but the `Tree`, so a new builder (OPT-Tree) or a new node scorer
(the calibrator) never touches verification.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lmms_msd.drafting import Drafter


@dataclass
class Tree:
    """One step's proposal. Node 0 is the root (the last committed token); parents precede children."""

    tokens: torch.Tensor  # [N] long
    parents: torch.Tensor  # [N] long; parents[0] = -1, otherwise parents[i] < i
    depths: torch.Tensor  # [N] long; depths[0] = 0, depths[i] = depths[parents[i]] + 1
    scores: torch.Tensor  # [N] float32; the builder's score of each node (root 0)

    def __post_init__(self) -> None:
        n = self.tokens.shape[0]
        for name in ("parents", "depths", "scores"):
            shape = tuple(getattr(self, name).shape)
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
        for _ in range(max_depth):
            node = self.parents[node].clamp(min=0)  # the root is its own parent from here on
            mask[rows, node] = True
        return mask


# (draft log-probabilities of the proposed children [n, k], their tokens [n, k], their depth)
#   -> log of each child's acceptance estimate [n, k]
NodeScorer = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def draft_confidence(logprobs: torch.Tensor, tokens: torch.Tensor, depth: int) -> torch.Tensor:
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

    def build(self, drafter: Drafter, root_token: int, root_hidden: torch.Tensor) -> Tree:
        """root_hidden: [H], the draft output whose logits predict the root's children."""
        return grow_tree(
            drafter, root_token, root_hidden, top_k=self.top_k, max_depth=self.depth,
            budget=self.total_tokens - 1, node_score=draft_confidence, stop_delta=None,
        )


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

    def build(self, drafter: Drafter, root_token: int, root_hidden: torch.Tensor) -> Tree:
        """root_hidden: [H], the draft output whose logits predict the root's children."""
        return grow_tree(
            drafter, root_token, root_hidden, top_k=self.top_k, max_depth=self.max_depth,
            budget=self.node_budget, node_score=self.scorer, stop_delta=self.stop_delta,
        )


@torch.inference_mode()
def grow_tree(
    drafter: Drafter,
    root_token: int,
    root_hidden: torch.Tensor,
    *,
    top_k: int,
    max_depth: int,
    budget: int,
    node_score: NodeScorer,
    stop_delta: float | None,
) -> Tree:
    """Grow a tree level by level with cumulative log-scores; keep the `budget` best nodes.

    stop_delta None: grow to max_depth (EAGLE-2). Otherwise stop once a level raises the expected
    accepted length (the sum of the best `budget` weights, weight = exp(score)) by at most stop_delta.
    """
    k = top_k
    device = root_hidden.device
    top = drafter.logprobs(root_hidden[None]).topk(k)  # [1, k]
    scores = node_score(top.values, top.indices, 1)[0]
    # The pool holds every proposed node; pool index 0 is the root, node i of the pool is at i + 1.
    pool_tokens, pool_scores = [top.indices[0]], [scores]
    pool_parents = [torch.zeros(k, dtype=torch.long, device=device)]
    pool_depths = [torch.ones(k, dtype=torch.long, device=device)]
    frontier = torch.arange(1, k + 1, device=device)  # pool indices
    frontier_tokens, frontier_scores = top.indices[0], scores
    parent_hidden = root_hidden[None].expand(k, -1)
    ancestors = torch.zeros(k, 0, dtype=torch.bool, device=device)  # over tree slots fed so far
    n_pool = 1 + k
    expected = expected_length(pool_scores, budget) if stop_delta is not None else 0.0
    for depth in range(1, max_depth):
        # 1. feed the frontier, 2. propose k children each, 3. keep the global top-k as the frontier.
        hidden = drafter.expand(frontier_tokens, parent_hidden, depth, ancestors)
        children = drafter.logprobs(hidden).topk(k)  # [k, k]
        scores = (frontier_scores[:, None] + node_score(children.values, children.indices, depth + 1)).flatten()
        tokens = children.indices.flatten()
        pool_tokens.append(tokens)
        pool_scores.append(scores)
        pool_parents.append(frontier.repeat_interleave(k))
        pool_depths.append(torch.full((k * k,), depth + 1, device=device))
        n_pool += k * k
        if stop_delta is not None:
            # 4. early stop: this level added too little to the expected accepted length.
            grown = expected_length(pool_scores, budget)
            gained, expected = grown - expected, grown
            if gained <= stop_delta:
                break
        best = scores.topk(k).indices
        parent_row = best // k
        own_slot = torch.nn.functional.one_hot(parent_row, k).bool()
        ancestors = torch.cat([ancestors[parent_row], own_slot], dim=1)
        frontier = n_pool - k * k + best
        frontier_tokens, frontier_scores = tokens[best], scores[best]
        parent_hidden = hidden[parent_row]
    return select_nodes(
        root_token,
        torch.cat(pool_tokens),
        torch.cat(pool_parents),
        torch.cat(pool_depths),
        torch.cat(pool_scores),
        budget,
    )


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
) -> Tree:
    """Keep the `budget` best-scored pool nodes as a tree.

    tokens, parents, depths, scores: [M] over pool indices 1..M (index 0 is the root), in the
    order proposed, so a parent always precedes its children. Scores never grow along a path; a
    stable sort puts a parent before a child of equal score, so the kept set contains every kept
    node's parent. Example: scores [-0.1, -0.5, -0.1] with parents [0, 0, 1] and budget 2 keep pool
    nodes 1 and 3 (3's parent is 1): tree parents [-1, 0, 1].
    """
    m = tokens.shape[0]
    assert parents.shape == depths.shape == scores.shape == (m,), "pool fields must all be [M]"
    order = torch.sort(scores, descending=True, stable=True).indices[:budget]
    kept = torch.sort(order).values + 1  # pool indices, ascending: parents before children
    remap = torch.full((m + 1,), -1, dtype=torch.long, device=tokens.device)
    remap[0] = 0
    remap[kept] = torch.arange(1, kept.shape[0] + 1, device=tokens.device)
    root = torch.tensor([root_token], device=tokens.device)
    return Tree(
        tokens=torch.cat([root, tokens[kept - 1]]),
        parents=torch.cat([root.new_full((1,), -1), remap[parents[kept - 1]]]),
        depths=torch.cat([root.new_zeros(1), depths[kept - 1]]),
        scores=torch.cat([scores.new_zeros(1), scores[kept - 1]]),
    )
