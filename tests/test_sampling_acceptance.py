"""Sampling acceptance on the device (`lmms_msd.speculative.verify.sample_tree`) is the walk its rule describes.

The walk, read literally (as `accept_sampling` did it before it moved to the device): from the root,
try the children in index order, accept child j with probability p(x_j) / sum(p) over what is left
of p, else set p(x_j) = 0 and try the next; with no child accepted, draw the bonus from what is left.
Both take node j's uniform from the same N + 1 draws, so on random trees (random shapes, tokens shared
between cousins, temperature and top-p) both give the same path and bonus. That the rule itself is
lossless is tests/test_decoding_sampling.py's check of the output distribution.
"""

from __future__ import annotations

import torch
from decoding_fixtures import children_lists
from torch.utils._python_dispatch import TorchDispatchMode

from lmms_msd.speculative.sampling import GenerationConfig, processed_probs
from lmms_msd.speculative.tree import Tree
from lmms_msd.speculative.verify import accept_sampling, read_sampled, sample_tree

VOCAB = 12


def walk(tree: Tree, probs: torch.Tensor, uniforms: torch.Tensor) -> tuple[list[int], int]:
    n = len(tree)
    tokens, children = tree.tokens.tolist(), children_lists(tree.parents.tolist())
    path = [0]
    while True:
        node = path[-1]
        residual = probs[node].clone()
        for child in children[node]:
            if uniforms[child] * residual.sum() < residual[tokens[child]]:
                path.append(child)
                break
            residual[tokens[child]] = 0.0
        else:
            cdf = residual.cumsum(0)
            return path, int(torch.searchsorted(cdf, (uniforms[n] * cdf[-1])[None], right=True))


def random_tree(g: torch.Generator) -> Tree:
    """Up to 24 nodes, parents before children; siblings carry distinct tokens, cousins may share."""
    n = int(torch.randint(1, 25, (1,), generator=g))
    parents, tokens = [-1], [int(torch.randint(0, VOCAB, (1,), generator=g))]
    for i in range(1, n):
        parent = int(torch.randint(0, i, (1,), generator=g))
        taken = {tokens[j] for j in range(1, i) if parents[j] == parent}
        free = [t for t in range(VOCAB) if t not in taken]
        parents.append(parent)
        tokens.append(free[int(torch.randint(0, len(free), (1,), generator=g))])
    depths = [0] * n
    for i in range(1, n):
        depths[i] = depths[parents[i]] + 1
    return Tree(torch.tensor(tokens), torch.tensor(parents), torch.tensor(depths), torch.zeros(n))


def test_device_sampling_is_the_walk():
    g = torch.Generator().manual_seed(0)
    accepted = 0
    for trial in range(400):
        tree = random_tree(g)
        config = GenerationConfig(do_sample=True, temperature=(0.6, 1.0, 1.5)[trial % 3], top_p=(1.0, 0.9)[trial % 2])
        logits = torch.randn(len(tree), VOCAB, generator=g) * 2
        ancestors = tree.ancestor_mask(int(tree.depths.max()))
        draws = torch.Generator().manual_seed(trial)
        result = accept_sampling(tree, logits, ancestors, config, draws)
        uniforms = torch.rand(len(tree) + 1, generator=torch.Generator().manual_seed(trial))
        path, bonus = walk(tree, processed_probs(logits, config), uniforms)
        assert (result.path, result.bonus) == (path, bonus), f"trial {trial}"
        assert result.path_tokens == [int(tree.tokens[j]) for j in path[1:]]
        accepted += len(path) > 1
    assert 100 < accepted < 390  # both accepting and rejecting paths ran


def test_one_read_holds_path_tokens_and_bonus():
    tree = Tree(torch.tensor([5, 4, 7, 2]), torch.tensor([-1, 0, 0, 2]), torch.tensor([0, 1, 1, 2]), torch.zeros(4))
    logits = torch.full((4, VOCAB), -30.0)
    logits[0, 7] = logits[2, 2] = logits[3, 9] = 0.0  # the target is sure: root -> 7 (node 2) -> 2 (node 3), bonus 9
    config = GenerationConfig(do_sample=True, temperature=1.0)
    out = sample_tree(tree, logits, tree.ancestor_mask(2), config, torch.Generator().manual_seed(0))
    assert out.tolist() == [0, 2, 3, -1, 5, 7, 2, -1, 9]
    assert read_sampled(out.tolist()).path == [0, 2, 3] and read_sampled(out.tolist()).path_tokens == [7, 2]


class ScalarReads(TorchDispatchMode):
    """Counts the reads of single values to the host (`aten._local_scalar_dense`: `.item()`, and indexing
    with a 0-dim tensor, which PyTorch reads to an int first). On a GPU each one waits for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_the_acceptances_read_nothing_before_their_one_read():
    """sample_tree returns its outcome on the device and accept_greedy reads it once (`tolist`): neither reads a
    single value on the way, so on a GPU their operations queue behind the verification instead of waiting for it."""
    from lmms_msd.speculative.verify import accept_greedy

    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        tree = random_tree(g)
        logits = torch.randn(len(tree), VOCAB, generator=g)
        ancestors = tree.ancestor_mask(int(tree.depths.max()))
        config = GenerationConfig(do_sample=True, temperature=1.0)
        with ScalarReads() as reads:
            sample_tree(tree, logits, ancestors, config, torch.Generator().manual_seed(0))
            accept_greedy(tree, logits, ancestors)
        assert reads.count == 0
