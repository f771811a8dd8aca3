"""Batched greedy acceptance (`accept_greedy_rows` over `pad_trees`) is `accept_greedy` row by row, and a
batched greedy step reads the device once and runs a fixed number of device operations whatever B."""

from __future__ import annotations

import torch

from lmms_msd.speculative.tree import Tree
from lmms_msd.speculative.verify import accept_greedy, accept_greedy_rows, pad_trees


def random_tree(g: torch.Generator, vocab: int, distinct: bool) -> Tree:
    """1 to 30 nodes; siblings carry distinct tokens when `distinct`, else repeats are likely (a small
    vocabulary), so that equally deep accepted nodes occur and the tie rule is exercised."""
    n = int(torch.randint(1, 30, (1,), generator=g))
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
    depths = [0] * n
    for i in range(1, n):
        depths[i] = depths[parents[i]] + 1
    tokens, used = [int(torch.randint(0, vocab, (1,), generator=g))], {}
    for i in range(1, n):
        taken = used.setdefault(parents[i], set())
        free = [t for t in range(vocab) if t not in taken or not distinct] or [0]
        token = free[int(torch.randint(0, len(free), (1,), generator=g))]
        taken.add(token)
        tokens.append(token)
    return Tree(tokens=torch.tensor(tokens), parents=torch.tensor(parents), depths=torch.tensor(depths), scores=torch.zeros(n))


def test_batched_greedy_acceptance_is_accept_greedy_row_by_row():
    g = torch.Generator().manual_seed(0)
    vocab = 4
    root_only = ties = 0
    for trial in range(150):
        batch = int(torch.randint(1, 7, (1,), generator=g))
        trees = [random_tree(g, vocab, distinct=trial % 2 == 0) for _ in range(batch)]
        ancestors = [tree.ancestor_mask(int(tree.depths.max()) + 1) for tree in trees]
        # integer logits in 0..2: the argmax is often a tie, which both take as the first maximal token
        logits = [torch.randint(0, 3, (len(tree), vocab), generator=g).float() for tree in trees]
        padded = pad_trees(trees, ancestors)
        width = padded.tokens.shape[1]
        best = torch.stack([torch.cat([x.argmax(dim=-1), torch.full((width - x.shape[0],), 3)]) for x in logits])
        rows = accept_greedy_rows(padded, best)
        for b, (tree, mask, x) in enumerate(zip(trees, ancestors, logits)):
            expected = accept_greedy(tree, x, mask)
            result = rows.results[b]
            where = f"trial {trial}, row {b}"
            assert (result.path, result.path_tokens, result.bonus) == (expected.path, expected.path_tokens, expected.bonus), where
            assert rows.path(b).tolist() == expected.path, where
            assert rows.committed(b).tolist() == expected.path_tokens + [expected.bonus], where
            root_only += len(tree) == 1
            ties += int((x == x.max(dim=-1, keepdim=True).values).sum(dim=-1).gt(1).any())
    assert root_only > 10 and ties > 100  # both cases were met


def test_padded_trees_hold_each_row_in_place():
    g = torch.Generator().manual_seed(1)
    trees = [random_tree(g, 6, distinct=True) for _ in range(5)]
    ancestors = [tree.ancestor_mask(int(tree.depths.max()) + 1) for tree in trees]
    padded = pad_trees(trees, ancestors)
    width = max(len(tree) for tree in trees)
    assert padded.tokens.shape == (5, width) and padded.ancestors.shape == (5, width, width)
    for b, (tree, mask) in enumerate(zip(trees, ancestors)):
        n = len(tree)
        assert padded.counts[b] == n and padded.valid[b].tolist() == [True] * n + [False] * (width - n)
        assert padded.tokens[b, :n].tolist() == tree.tokens.tolist() and not padded.tokens[b, n:].any()
        assert padded.parents[b, :n].tolist() == tree.parents.tolist() and (padded.parents[b, n:] == -1).all()
        assert padded.depths[b, :n].tolist() == tree.depths.tolist() and not padded.depths[b, n:].any()
        assert torch.equal(padded.ancestors[b, :n, :n], mask) and padded.ancestors[b].sum() == mask.sum()
