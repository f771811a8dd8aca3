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

from dataclasses import dataclass, field

import torch

from lmms_msd.speculative.sampling import GenerationConfig, processed_probs
from lmms_msd.speculative.tree import Tree


@dataclass
class Acceptance:
    path: list[int]  # tree node indices from the root to the last accepted node, root included
    bonus: int  # the target's own token after the path
    path_tokens: list[int] = field(default_factory=list)  # the accepted nodes' tokens (root excluded)

    @property
    def accepted(self) -> int:
        return len(self.path) - 1


def tree_attention_mask(ancestors: torch.Tensor, prefix_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask for the target over [prefix | tree]: all of the prefix, and each node's ancestors and itself.

    ancestors: [N, N] bool (`Tree.ancestor_mask`) -> [1, 1, N, prefix_len + N]; 0 where visible, the
    dtype's minimum elsewhere
    """
    n = ancestors.shape[0]
    visible = torch.ones(n, prefix_len + n, dtype=torch.bool, device=ancestors.device)
    visible[:, prefix_len:] = ancestors
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill(~visible, torch.finfo(dtype).min)[None, None]


def children_lists(parents: list[int]) -> list[list[int]]:
    children: list[list[int]] = [[] for _ in parents]
    for node, parent in enumerate(parents[1:], start=1):
        children[parent].append(node)
    return children


def accept_greedy(tree: Tree, logits: torch.Tensor, ancestors: torch.Tensor) -> Acceptance:
    """Follow the child equal to the target's argmax from the root; computed on the device, read once.

    A node is accepted when it and all its ancestors equal the target's argmax at their parents; the
    path ends at the deepest accepted node (a parent's children carry distinct tokens, so there is
    one), and the bonus is the argmax there.
    logits: [N, V], the target's at every tree node; ancestors: [N, N] bool (`Tree.ancestor_mask`)
    """
    n = len(tree)
    assert logits.shape[0] == n and ancestors.shape == (n, n), (
        f"logits {tuple(logits.shape)}, ancestors {tuple(ancestors.shape)} for a tree of {n} nodes"
    )
    best = logits.argmax(dim=-1)  # [N]
    matches = tree.tokens == best[tree.parents.clamp(min=0)]
    matches[:1] = True  # the root is committed already (a slice: no host scalar)
    accepted = ~(ancestors & ~matches[None, :]).any(dim=1)  # [N]
    deepest = torch.where(accepted, tree.depths, -1).argmax()
    on_path = ancestors[deepest]  # [N]
    place = torch.where(on_path, tree.depths, n)  # a node's place on the path is its depth; others past the end
    path = torch.full((n + 1,), 0, dtype=torch.long, device=logits.device)
    path.scatter_(0, place, torch.arange(n, device=logits.device))
    length = tree.depths[deepest] + 1
    packed = torch.cat([length[None], best[deepest][None], path[:n], tree.tokens[path[:n]]]).tolist()  # the one read
    a1, bonus = packed[0], packed[1]
    return Acceptance(packed[2 : 2 + a1], bonus, packed[2 + n + 1 : 2 + n + a1])


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
            return Acceptance(path, bonus, [tokens[node] for node in path[1:]])
        path.append(accepted)
