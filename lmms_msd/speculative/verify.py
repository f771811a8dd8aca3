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

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lmms_msd.speculative.sampling import GenerationConfig, processed_probs
from lmms_msd.speculative.transfer import to_device
from lmms_msd.speculative.tree import Tree


@dataclass
class Acceptance:
    path: list[int]  # tree node indices from the root to the last accepted node, root included
    bonus: int  # the target's own token after the path
    path_tokens: list[int] = field(default_factory=list)  # the accepted nodes' tokens (root excluded)

    @property
    def accepted(self) -> int:
        return len(self.path) - 1


@dataclass
class Verified:
    """A verified step, ready to commit: the target's outputs over the tree, the acceptance, and what
    `Runtime.commit` takes, on the device (valid until the runtime's next call)."""

    hidden: torch.Tensor  # [N, H] the target's hidden at every node
    logits: torch.Tensor  # [N, V]
    acceptance: Acceptance
    path: torch.Tensor  # [a + 1] long: the accepted path's node indices, root first
    next_tokens: torch.Tensor  # [a + 1] long: the committed tokens (the accepted ones, then the bonus)
    path_hidden: torch.Tensor  # [a + 1, H]: hidden at the path's nodes


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
    outcome = greedy_outcome(tree.tokens, tree.parents, tree.depths, ancestors, logits.argmax(dim=-1))
    return unpack_greedy(outcome.tolist())  # the one read


def greedy_outcome(
    tokens: torch.Tensor, parents: torch.Tensor, depths: torch.Tensor, ancestors: torch.Tensor, best: torch.Tensor
) -> torch.Tensor:
    """`accept_greedy`'s rule on the device, with no host read (a CUDA graph may hold it): over T nodes, the
    root first; tokens, parents (-1 at the root), depths [T] long, ancestors [T, T] bool, best [T] the target's
    argmax at each node. Rows past a tree's nodes may pad it: with no ancestors and a negative depth they are
    never on the path (a padded verification: depth = position - prefix).
    -> [2 + 2T] long: the path's length a + 1, the bonus, the path's nodes (T places, 0 past a + 1), then the
    committed tokens (the accepted ones, then the bonus; T places, padding past a + 1), what `unpack_greedy`
    reads and `Runtime.commit` takes (the nodes and the tokens as device slices of it).
    Example: tokens [r, x, y] with parents [-1, 0, 1], best [x, y, z]: [3, z, 0, 1, 2, x, y, z].
    """
    t = tokens.shape[0]
    matches = tokens == best[parents.clamp(min=0)]
    matches[:1].fill_(True)  # the root is committed already (fill_: no host tensor, so a graph may hold it)
    accepted = ~(ancestors & ~matches[None, :]).any(dim=1)  # [T]
    # [1], not a 0-dim tensor: indexing with a 0-dim tensor reads it to the host (`.item()`), a wait for the device
    deepest = torch.where(accepted, depths, -1).argmax(dim=0, keepdim=True)
    on_path = ancestors.index_select(0, deepest)[0]  # [T]
    place = torch.where(on_path, depths, t)  # a node's place on the path is its depth; others past the end
    path = torch.zeros(t + 1, dtype=torch.long, device=tokens.device)
    path.scatter_(0, place, torch.arange(t, device=tokens.device))
    length = depths.index_select(0, deepest) + 1
    bonus = best.index_select(0, deepest)
    committed = tokens[path[1:]].scatter_(0, length - 1, bonus)  # the accepted nodes' tokens, then the bonus
    return torch.cat([length, bonus, path[:t], committed])


def unpack_greedy(outcome: list[int]) -> Acceptance:
    """`greedy_outcome`'s [2 + 2T] values, read to the host -> the step's `Acceptance`."""
    t = (len(outcome) - 2) // 2
    a1, bonus = outcome[0], outcome[1]
    return Acceptance(outcome[2 : 2 + a1], bonus, outcome[2 + t : 1 + t + a1])


@dataclass
class PaddedTrees:
    """B rows' trees side by side, each padded to the largest (T nodes): row b's node i at [b, i] for
    i < counts[b], padding after. What a batched verification runs over and batched acceptance reads.
    Example: trees of 3 and 1 nodes: T = 3, tokens [[r0, x, y], [r1, 0, 0]], ancestors[1] = [[1,0,0], [0,0,0], [0,0,0]].
    """

    tokens: torch.Tensor  # [B, T] long; 0 past a row's nodes
    parents: torch.Tensor  # [B, T] long, row-local indices; -1 at the root and past a row's nodes
    depths: torch.Tensor  # [B, T] long; 0 past a row's nodes
    ancestors: torch.Tensor  # [B, T, T] bool (`Tree.ancestor_mask` per row); False past a row's nodes
    sizes: torch.Tensor  # [B] long on the device: counts
    counts: list[int]  # nodes per row

    @property
    def valid(self) -> torch.Tensor:
        """[B, T] bool: True at a row's own nodes."""
        return torch.arange(self.tokens.shape[1], device=self.tokens.device)[None, :] < self.sizes[:, None]


class GrownTrees(Sequence[tuple[Tree, torch.Tensor]]):
    """B rows' trees as a batched grower keeps them, side by side: row b's (tree, ancestor mask) is its first
    counts[b] places, made on demand (views; `Tree`'s fields and `Tree.ancestor_mask`), and `padded()` is
    the batch `pad_trees` would make of them, without going row by row.
    fields: `Tree`'s tokens, parents, depths, scores, confidence [B, T] and visual [B, T] or None;
    ancestors: [B, T, T] bool; what lies past a row's nodes is ignored."""

    def __init__(self, fields: tuple[torch.Tensor | None, ...], ancestors: torch.Tensor, counts: list[int]) -> None:
        assert len(fields) == 6 and ancestors.shape[0] == len(counts) and ancestors.shape[1] == max(counts), (
            f"{len(fields)} fields, ancestors {tuple(ancestors.shape)} for counts {counts}"
        )
        self.fields, self.ancestors, self.counts = fields, ancestors, counts

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, b: int) -> tuple[Tree, torch.Tensor]:  # type: ignore[override]
        if not -len(self) <= b < len(self):
            raise IndexError(f"row {b} of {len(self)} trees")
        n = self.counts[b]
        tokens, parents, depths, scores, confidence, visual = (None if f is None else f[b, :n] for f in self.fields)
        return Tree(tokens, parents, depths, scores, confidence, visual), self.ancestors[b, :n, :n]

    def padded(self) -> PaddedTrees:
        """As `pad_trees(*zip(*self))`: padding set to its values with a fixed number of device operations."""
        tokens, parents, depths = self.fields[:3]
        sizes = to_device(self.counts, tokens.device)
        valid = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < sizes[:, None]  # [B, T]
        return PaddedTrees(
            torch.where(valid, tokens, 0), torch.where(valid, parents, -1), torch.where(valid, depths, 0),
            self.ancestors & valid[:, :, None] & valid[:, None, :], sizes, list(self.counts),
        )  # fmt: skip


def pad_trees(trees: list[Tree], ancestors: list[torch.Tensor]) -> PaddedTrees:
    """The trees in one padded batch, with a fixed number of device operations whatever B: the rows'
    tensors are concatenated and scattered to their places (one copy of the node counts to the device).
    ancestors[b]: [N_b, N_b] bool (`Tree.ancestor_mask`)"""
    assert trees and len(trees) == len(ancestors), f"{len(trees)} trees, {len(ancestors)} ancestor masks"
    counts = [len(tree) for tree in trees]
    for b, (n, mask) in enumerate(zip(counts, ancestors)):
        assert mask.shape == (n, n), f"row {b}: ancestors {tuple(mask.shape)} for a tree of {n} nodes"
    device = trees[0].tokens.device
    rows, width, total = len(trees), max(counts), sum(counts)
    sizes = to_device(counts, device)  # the one copy to the device
    row_ids = torch.arange(rows, device=device)
    # node k of the concatenation: row row_of[k], place column[k] in it
    row_of = torch.repeat_interleave(row_ids, sizes, output_size=total)
    column = torch.arange(total, device=device) - (sizes.cumsum(0) - sizes)[row_of]
    tokens = torch.zeros(rows, width, dtype=torch.long, device=device)
    tokens[row_of, column] = torch.cat([tree.tokens for tree in trees])
    parents = torch.full((rows, width), -1, dtype=torch.long, device=device)
    parents[row_of, column] = torch.cat([tree.parents for tree in trees])
    depths = torch.zeros(rows, width, dtype=torch.long, device=device)
    depths[row_of, column] = torch.cat([tree.depths for tree in trees])
    # entry k of the concatenated flattened masks: row pair_row[k], entry (local // n, local % n) of its mask
    squares = sizes * sizes
    pair_row = torch.repeat_interleave(row_ids, squares, output_size=sum(n * n for n in counts))
    local = torch.arange(pair_row.shape[0], device=device) - (squares.cumsum(0) - squares)[pair_row]
    n_of = sizes[pair_row]
    padded = torch.zeros(rows, width, width, dtype=torch.bool, device=device)
    padded[pair_row, local // n_of, local % n_of] = torch.cat([mask.reshape(-1) for mask in ancestors])
    return PaddedTrees(tokens, parents, depths, padded, sizes, counts)


@dataclass
class GreedyRows:
    """`accept_greedy` for every row of a padded batch: the outcomes on the host, and each row's path and
    committed tokens still on the device (row b's are the first len(results[b].path) entries)."""

    results: list[Acceptance]
    paths: torch.Tensor  # [B, T + 1] long: the path's node indices, root first
    next_tokens: torch.Tensor  # [B, T] long: the committed tokens that follow them (accepted tokens, then the bonus)

    def path(self, b: int) -> torch.Tensor:
        """Row b's path [a + 1] (a view: no copy)."""
        return self.paths[b, : len(self.results[b].path)]

    def committed(self, b: int) -> torch.Tensor:
        """Row b's committed tokens [a + 1] (a view: no copy)."""
        return self.next_tokens[b, : len(self.results[b].path)]


def accept_greedy_rows(trees: PaddedTrees, best: torch.Tensor) -> GreedyRows:
    """`accept_greedy` for every row at once, with one read from the device for all of them.

    The same rule and the same outcome, ties included: a node is accepted when it and all its ancestors
    equal the target's argmax at their parents; the path ends at the deepest accepted node (the first
    in node order among equally deep ones, as `accept_greedy`'s argmax picks), the bonus is the argmax
    there. best: [B, T] the target's argmax at every node (`TreeOutputs.argmax`); padding is ignored.
    Example: row b's tree [r, x, y] with parents [-1, 0, 1], argmax [x, y, z]: path [0, 1, 2], committed [x, y, z].
    """
    tokens, depths, ancestors = trees.tokens, trees.depths, trees.ancestors
    rows, width = tokens.shape
    assert best.shape == (rows, width), f"best {tuple(best.shape)} for padded trees {(rows, width)}"
    valid = trees.valid
    matches = tokens == best.gather(1, trees.parents.clamp(min=0))
    matches[:, :1] = True  # the roots are committed already
    accepted = ~(ancestors & ~matches[:, None, :]).any(dim=2) & valid  # [B, T]
    deepest = torch.where(accepted, depths, -1).argmax(dim=1, keepdim=True)  # [B, 1]
    on_path = ancestors.gather(1, deepest[:, :, None].expand(rows, 1, width))[:, 0]  # [B, T]
    place = torch.where(on_path, depths, width)  # a node's place on its path is its depth; others past the end
    order = torch.arange(width, device=tokens.device)
    paths = torch.zeros(rows, width + 1, dtype=torch.long, device=tokens.device)
    paths.scatter_(1, place, order.expand(rows, width))
    length = depths.gather(1, deepest) + 1  # [B, 1]: a + 1
    bonus = best.gather(1, deepest)  # [B, 1]
    # committed token k: the token of path node k + 1 while k < a, then the bonus (the rest repeats it)
    next_tokens = torch.where(order[None, :] < length - 1, tokens.gather(1, paths[:, 1:]), bonus)
    packed = torch.cat([length, paths[:, :width], next_tokens], dim=1).tolist()  # the one read, [B, 1 + 2T]
    results = []
    for row in packed:
        a1 = row[0]
        committed = row[1 + width : 1 + width + a1]
        results.append(Acceptance(row[1 : 1 + a1], committed[-1], committed[:-1]))
    return GreedyRows(results, paths, next_tokens)


def sample_tree(
    tree: Tree, logits: torch.Tensor, ancestors: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Lossless sampling acceptance (module docstring) computed on the device, for one read (`read_sampled`).

    The rule, as a walk: at node n with p = the target's processed distribution there, try n's children
    in index order; child j (token x_j) is accepted with probability p(x_j) / (sum(p) - the mass of the
    earlier, rejected siblings' tokens), which is "accept x with p(x) / sum(p), else set p(x) = 0 and
    go on"; if none is, the bonus is drawn from p with every child's token set to 0. Laid out without the
    walk: each node j gets its own uniform u_j, so whether j would be accepted once its parent is
    reached needs nothing else (`u_j * (sum(p_parent) - earlier siblings' mass) < p_parent(x_j)`); a
    parent's first such child is the one the walk takes; the path is the chain of nodes all of whose
    ancestors are so taken; the bonus comes from one more uniform by inverse CDF. The generator gives
    N + 1 uniforms per step whatever happens.
    Worked example: root with children 1 (token 4), 2 (token 7), p_root(4) = 0.2, p_root(7) = 0.5,
    u_1 = 0.9, u_2 = 0.3: node 1 is rejected (0.9 * 1 >= 0.2); node 2 is accepted (0.3 * (1 - 0.2) =
    0.24 < 0.5). logits: [N, V]; ancestors: [N, N] (`Tree.ancestor_mask`) -> [2N + 1] long: the path's
    node indices by depth then -1s, the path's tokens (the root's place holds its token) then -1s, the bonus
    """
    n = len(tree)
    assert logits.shape[0] == n and ancestors.shape == (n, n), f"logits {tuple(logits.shape)}, ancestors {tuple(ancestors.shape)} for {n} nodes"
    device = logits.device
    probs = processed_probs(logits, config)  # [N, V]
    uniforms = torch.rand(n + 1, generator=generator, device=device)
    nodes = torch.arange(n, device=device)
    parents, tokens = tree.parents, tree.tokens
    parent = parents.clamp(min=0)
    own = probs[parent, tokens]  # [N]: p at the parent of each node's token (the root's entry unused)
    earlier = (parents[None, :] == parents[:, None]) & (nodes[None, :] < nodes[:, None])  # [j, k]: k an earlier sibling of j
    rejected_mass = (earlier.float() * own[None, :]).sum(dim=1)
    taken_if_reached = (uniforms[:n] * (probs.sum(dim=-1)[parent] - rejected_mass) < own) & (parents >= 0)
    child_of = parents[None, :] == nodes[:, None]  # [parent, node]
    first = torch.where(child_of & taken_if_reached[None, :], nodes[None, :], n).amin(dim=1)  # [N]: n when none
    taken = (first[parent] == nodes) | (parents < 0)  # the root is always reached
    on_path = ~(ancestors & ~taken[None, :]).any(dim=1)  # every ancestor (and itself) taken
    depth = tree.depths
    last = torch.where(on_path, depth, -1).argmax(dim=0, keepdim=True)  # [1]: the deepest node on the path (no host read)
    path = torch.full((n + 1,), -1, dtype=torch.long, device=device).scatter_(0, torch.where(on_path, depth, n), nodes)[:n]
    residual = probs.index_select(0, last)[0]
    tried = torch.zeros_like(residual).scatter_add_(0, tokens, child_of.index_select(0, last)[0].float())  # the last node's children's tokens
    cdf = residual.masked_fill(tried > 0, 0.0).cumsum(dim=0)
    bonus = torch.searchsorted(cdf, (uniforms[n] * cdf[-1])[None], right=True).clamp(max=cdf.shape[0] - 1)
    path_tokens = torch.where(path >= 0, tokens[path.clamp(min=0)], -1)
    return torch.cat([path, path_tokens, bonus])


def read_sampled(sampled: list[int]) -> Acceptance:
    """A `sample_tree` result read to the host -> the step's `Acceptance`."""
    n = (len(sampled) - 1) // 2
    length = next((i for i, node in enumerate(sampled[:n]) if node < 0), n)
    return Acceptance(sampled[:length], sampled[-1], sampled[n + 1 : n + length])


def accept_sampling(
    tree: Tree, logits: torch.Tensor, ancestors: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None
) -> Acceptance:
    """Lossless sampling acceptance (`sample_tree`), read from the device once.
    logits: [N, V], the target's at every tree node; uses `config`'s processors as plain decoding does."""
    return read_sampled(sample_tree(tree, logits, ancestors, config, generator).tolist())
