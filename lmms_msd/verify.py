"""Verification: the target checks a whole tree in one forward and keeps what plain decoding would.

Words: of a tree's draft nodes, the *accepted* ones are the path the target agrees with; the *bonus*
is the one token the target adds after the last accepted node. A step commits accepted + 1 tokens.

- Greedy: follow the child equal to the target's argmax; the bonus is the argmax where the path ends.
- Sampling: at each node, with p the target's processed distribution there, try the children in
  order and accept child x with probability p(x) / sum(p); on rejection set p(x) = 0 and go on. If
  no child is accepted, the bonus is drawn from what is left of p. Each emitted token is then
  distributed exactly as p (the draft is deterministic given its inputs), so sampling is lossless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmms_msd.sampling import GenerationConfig, processed_probs
from lmms_msd.target import Target
from lmms_msd.tree import Tree


@dataclass
class Acceptance:
    path: list[int]  # tree node indices from the root to the last accepted node, root included
    bonus: int  # the target's own token after the path

    @property
    def accepted(self) -> int:
        return len(self.path) - 1


def tree_attention_mask(tree: Tree, prefix_len: int, max_depth: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask for the target over [prefix | tree]: all of the prefix, and each node's ancestors and itself.

    returns [1, 1, N, prefix_len + N]; 0 where visible, the dtype's minimum elsewhere
    """
    n = len(tree)
    visible = torch.ones(n, prefix_len + n, dtype=torch.bool, device=tree.tokens.device)
    visible[:, prefix_len:] = tree.ancestor_mask(max_depth)
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill(~visible, torch.finfo(dtype).min)[None, None]


def verify_tree(target: Target, tree: Tree, cache: Any, max_depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One target forward over the tree, appended to `cache` after its P committed positions.

    returns hidden [N, H] and logits [N, V]
    """
    prefix_len = cache.get_seq_length()
    mask = tree_attention_mask(tree, prefix_len, max_depth, target.dtype)
    return target.forward(target.embed_tokens(tree.tokens), cache, prefix_len + tree.depths, mask)


def children_lists(parents: list[int]) -> list[list[int]]:
    children: list[list[int]] = [[] for _ in parents]
    for node, parent in enumerate(parents[1:], start=1):
        children[parent].append(node)
    return children


def accept_greedy(tree: Tree, logits: torch.Tensor) -> Acceptance:
    """logits: [N, V], the target's at every tree node."""
    assert logits.shape[0] == len(tree), f"logits {tuple(logits.shape)} for a tree of {len(tree)} nodes"
    best = logits.argmax(dim=-1).tolist()
    tokens = tree.tokens.tolist()
    children = children_lists(tree.parents.tolist())
    path = [0]
    while True:
        node = path[-1]
        match = [c for c in children[node] if tokens[c] == best[node]]
        if not match:
            return Acceptance(path, best[node])
        path.append(match[0])


def accept_sampling(
    tree: Tree, logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None
) -> Acceptance:
    """logits: [N, V], the target's at every tree node; uses `config`'s processors as plain decoding does."""
    assert logits.shape[0] == len(tree), f"logits {tuple(logits.shape)} for a tree of {len(tree)} nodes"
    tokens = tree.tokens.tolist()
    children = children_lists(tree.parents.tolist())
    path = [0]
    while True:
        node = path[-1]
        residual = processed_probs(logits[node : node + 1], config)[0]
        accepted = None
        for child in children[node]:
            x = tokens[child]
            total = residual.sum()
            u = torch.rand((), generator=generator, device=residual.device)
            if u * total < residual[x]:
                accepted = child
                break
            residual[x] = 0.0
        if accepted is None:
            bonus = int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
            return Acceptance(path, bonus)
        path.append(accepted)
