"""Tree, mask, acceptance and cache bookkeeping against literal expected tensors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lmms_msd.speculative.drafting import DraftRows
from lmms_msd.speculative.runtime import keep_path
from lmms_msd.speculative.tree import (
    EagleTree,
    NodeScorer,
    OptTree,
    Tree,
    TreeSpec,
    choose_total_tokens,
    draft_confidence,
    grow_tree,
    select_nodes,
)
from lmms_msd.speculative.verify import accept_greedy, tree_attention_mask


def small_tree() -> Tree:
    # root(5) -> node 1 (token 1) -> node 3 (token 3); root -> node 2 (token 2)
    return Tree(
        tokens=torch.tensor([5, 1, 2, 3]),
        parents=torch.tensor([-1, 0, 0, 1]),
        depths=torch.tensor([0, 1, 1, 2]),
        scores=torch.tensor([0.0, -0.1, -0.2, -0.3]),
    )


def test_ancestor_mask():
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(small_tree().ancestor_mask(max_depth=2), expected)


def test_tree_attention_mask_sees_prefix_and_ancestors_only():
    mask = tree_attention_mask(small_tree().ancestor_mask(max_depth=2), prefix_len=2, dtype=torch.float32)
    visible = torch.tensor(
        [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 1, 0], [1, 1, 1, 1, 0, 1]], dtype=torch.bool
    )
    assert mask.shape == (1, 1, 4, 6)
    assert torch.equal(mask[0, 0] == 0, visible)
    assert (mask[0, 0][~visible] == torch.finfo(torch.float32).min).all()


def test_accept_greedy_follows_the_argmax():
    logits = torch.full((4, 8), -1.0)
    for node, best in enumerate([1, 3, 0, 7]):  # root's argmax 1 -> node 1; node 1's argmax 3 -> node 3
        logits[node, best] = 1.0
    result = accept_greedy(small_tree(), logits, small_tree().ancestor_mask(max_depth=2))
    assert result.path == [0, 1, 3] and result.bonus == 7 and result.accepted == 2 and result.path_tokens == [1, 3]


def test_accept_greedy_rejects_at_the_root():
    logits = torch.zeros(4, 8)
    logits[0, 6] = 1.0
    result = accept_greedy(small_tree(), logits, small_tree().ancestor_mask(max_depth=2))
    assert result.path == [0] and result.bonus == 6


def test_keep_path_keeps_prefix_then_path_nodes():
    # Slots hold their own index: prefix 0..1, tree nodes at slots 2..5; path [0, 2, 3] keeps 2, 4, 5.
    keys = torch.arange(6.0).view(1, 1, 6, 1)
    layer = SimpleNamespace(keys=keys.clone(), values=-keys.clone())
    keep_path(SimpleNamespace(layers=[layer]), prefix_len=2, path=torch.tensor([0, 2, 3]))
    assert layer.keys.flatten().tolist() == [0, 1, 2, 4, 5]
    assert layer.values.flatten().tolist() == [0, -1, -2, -4, -5]


def test_select_nodes_keeps_best_and_stays_ancestor_closed():
    # pool: 1 (parent root, -0.1), 2 (parent root, -0.5), 3 (parent 1, -0.1: ties its parent)
    tree = select_nodes(
        root_token=9,
        tokens=torch.tensor([4, 5, 6]),
        parents=torch.tensor([0, 0, 1]),
        depths=torch.tensor([1, 1, 2]),
        scores=torch.tensor([-0.1, -0.5, -0.1]),
        budget=2,
    )
    assert tree.tokens.tolist() == [9, 4, 6]
    assert tree.parents.tolist() == [-1, 0, 1]
    assert tree.depths.tolist() == [0, 1, 2]


class MarkovDrafter:
    """A stand-in drafter whose hidden state is the one-hot of the node's token and whose next-token
    distribution is a fixed table, so the EAGLE-2 tree can be worked out by hand."""

    def __init__(self, table: list[list[float]]) -> None:
        self.logtable = torch.tensor(table).log()
        self.tree_used = 0

    def logprobs(self, hidden):
        return hidden @ self.logtable

    def expand(self, tokens, parent_hidden, depth, ancestors):
        assert ancestors.shape == (tokens.shape[0], self.tree_used)
        self.tree_used += tokens.shape[0]
        return DraftRows(torch.nn.functional.one_hot(tokens, self.logtable.shape[0]).float(), None)


OPT_TABLE = [
    [0.05, 0.6, 0.3, 0.05],
    [0.45, 0.1, 0.35, 0.1],
    [0.1, 0.05, 0.05, 0.8],
    [0.1, 0.2, 0.3, 0.4],
]


def test_eagle_tree_by_hand():
    # depth 1: one forward after the root's children. From root token 0: children 1 (0.6), 2 (0.3).
    # Then 1 -> 0 (0.6*0.45=0.27), 1 -> 2 (0.21); 2 -> 3 (0.3*0.8=0.24), 2 -> 0 (0.03).
    # total_tokens 5 counts the root: the 4 best of the 6 candidates, 1, 2, 1->0, 2->3.
    table = [
        [0.05, 0.6, 0.3, 0.05],
        [0.45, 0.1, 0.35, 0.1],
        [0.1, 0.05, 0.05, 0.8],
        [0.25, 0.25, 0.25, 0.25],
    ]
    drafter = MarkovDrafter(table)
    root_hidden = torch.nn.functional.one_hot(torch.tensor(0), 4).float()
    tree = grow_tree(drafter, EagleTree(total_tokens=5, depth=1, top_k=2), root_token=0, root_hidden=root_hidden)
    assert tree.tokens.tolist() == [0, 1, 2, 0, 3]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 2]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2]
    expected = [0.0, math.log(0.6), math.log(0.3), math.log(0.27), math.log(0.24)]
    assert torch.allclose(tree.scores, torch.tensor(expected), atol=1e-6)
    assert drafter.tree_used == 2  # depth 1: only the first level was fed to the draft


def test_eagle_tree_worked_example():
    """EagleTree's docstring example: depth 2 reaches depth 3; total_tokens 7 keeps 6 draft nodes."""
    drafter = MarkovDrafter(OPT_TABLE)
    root_hidden = torch.nn.functional.one_hot(torch.tensor(0), 4).float()
    tree = grow_tree(drafter, EagleTree(total_tokens=7, depth=2, top_k=2), root_token=0, root_hidden=root_hidden)
    assert tree.tokens.tolist() == [0, 1, 2, 0, 2, 3, 1]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 2, 3]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 2, 3]
    expected = [0.0, math.log(0.6), math.log(0.3), math.log(0.27), math.log(0.21), math.log(0.24), math.log(0.162)]
    assert torch.allclose(tree.scores, torch.tensor(expected), atol=1e-6)  # float32 sums of 3 logs: ~1e-7
    assert drafter.tree_used == 4  # two forwards of the 2-node frontier


def test_choose_total_tokens_divides_by_upstreams_gains():
    # costs 1.0, 1/1.05 = .952, 1/1.07 = .935, 1.2/1.1 = 1.091, 1.3/1.13 = 1.150: 50 wins
    assert choose_total_tokens([1.0, 1.0, 1.0, 1.2, 1.3]) == 50
    # equal times: the largest gain, 60
    assert choose_total_tokens([1.0] * 5) == 60


def test_eagle_tree_defaults_are_upstreams():
    # upstream's defaults total_token 59, depth 5, top_k 10: 58 draft nodes, reaching depth 6
    tree = EagleTree()
    assert (tree.budget, tree.max_depth, tree.top_k) == (58, 6, 10)
    assert tree == TreeSpec(kind="eagle2", top_k=10, max_depth=6, node_budget=58) and tree.slots == 59
    assert tree.settings() == {"total_tokens": 59, "depth": 5, "top_k": 10} and EagleTree(**tree.settings()) == tree


def record_expansions(drafter) -> list:
    """Wraps drafter.expand; the returned list gets (tokens, ancestor rows) of every expansion, in order."""
    seen = []
    expand = drafter.expand

    def recording_expand(tokens, parent_hidden, depth, ancestors):
        seen.append((tokens.tolist(), ancestors.int().tolist()))
        return expand(tokens, parent_hidden, depth, ancestors)

    drafter.expand = recording_expand
    return seen


def test_eagle_tree_frontier_ancestors():
    # Three levels: the second expansion must see exactly the slot of each node's parent.
    table = [[0.7, 0.2, 0.05, 0.05], [0.1, 0.6, 0.2, 0.1], [0.3, 0.3, 0.3, 0.1], [0.1, 0.1, 0.1, 0.7]]
    drafter = MarkovDrafter(table)
    seen = record_expansions(drafter)
    root_hidden = torch.nn.functional.one_hot(torch.tensor(0), 4).float()
    tree = grow_tree(drafter, EagleTree(total_tokens=7, depth=2, top_k=2), 0, root_hidden)
    # level 1: tokens 0 (0.7), 1 (0.2); level-2 candidates 0->0 .49, 0->1 .14, 1->1 .12, 1->2 .04;
    # frontier 0->0 (slot 0's child), 0->1 (slot 0's child).
    assert seen[0] == ([0, 1], [[], []])
    assert seen[1] == ([0, 1], [[1, 0], [1, 0]])
    parents = tree.parents.tolist()
    assert all(parents[i] < i for i in range(1, len(parents)))
    assert all(tree.depths[i] == tree.depths[parents[i]] + 1 for i in range(1, len(parents)))


def test_opt_tree_stops_when_a_level_adds_little():
    # Weights: level 1 {1: .6, 2: .3} -> expected length (best 3) .9; level 2 adds 1->0 .27 (best 3:
    # .6 + .3 + .27 = 1.17, gain .27). stop_delta .3 stops there: only level 1 was fed to the draft.
    root_hidden = torch.nn.functional.one_hot(torch.tensor(0), 4).float()
    drafter = MarkovDrafter(OPT_TABLE)
    tree = grow_tree(drafter, OptTree(node_budget=3, stop_delta=0.3, max_depth=10, top_k=2), 0, root_hidden)
    assert drafter.tree_used == 2
    assert tree.tokens.tolist() == [0, 1, 2, 0] and tree.parents.tolist() == [-1, 0, 0, 1]
    # stop_delta .2 grows level 3 (frontier 1->0 .27 and 2->3 .24; children .162, .081, .096, .072),
    # which cannot enter the best 3: gain 0, stop. Same tree, two levels fed.
    drafter = MarkovDrafter(OPT_TABLE)
    tree = grow_tree(drafter, OptTree(node_budget=3, stop_delta=0.2, max_depth=10, top_k=2), 0, root_hidden)
    assert drafter.tree_used == 4
    assert tree.tokens.tolist() == [0, 1, 2, 0]


class TrustTokenTwo:
    """A scorer that trusts token 2 fully and distrusts everything else."""

    needs_visual = False

    def __call__(self, logprobs, tokens, depth, visual):
        return torch.where(tokens == 2, torch.zeros_like(logprobs), logprobs + math.log(0.1))


def test_opt_tree_scorer_replaces_draft_confidence():
    root_hidden = torch.nn.functional.one_hot(torch.tensor(0), 4).float()
    spec = OptTree(node_budget=2, stop_delta=0.0, max_depth=2, top_k=2, scorer=TrustTokenTwo())
    assert not spec.needs_visual
    tree = grow_tree(MarkovDrafter(OPT_TABLE), spec, 0, root_hidden)
    # weights: 2 -> 1.0, 1 -> .06; level 2: 2->3 .08, 2->0 .01, 1->0 .0027, 1->2 .021 -> best two: 2, 2->3
    assert tree.tokens.tolist() == [0, 2, 3] and tree.parents.tolist() == [-1, 0, 1]


def test_opt_tree_upstream_worked_example():
    """OptTree's docstring example: upstream stores only each level's frontier; frontier stores all."""
    root_hidden = torch.nn.functional.one_hot(torch.tensor(0), 4).float()
    drafter = MarkovDrafter(OPT_TABLE)
    seen = record_expansions(drafter)
    settings = dict(node_budget=5, stop_delta=0.2, max_depth=10, top_k=2)
    tree = grow_tree(drafter, OptTree(**settings, variant="upstream"), 0, root_hidden)
    assert tree.tokens.tolist() == [0, 1, 2, 0, 3, 1]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 2, 3]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 3]
    # levels 1 and 2 fed (level 3 is kept unfed); level 2's frontier 1>0, 2>3 sees its parent's slot
    assert seen == [([1, 2], [[], []]), ([0, 3], [[1, 0], [0, 1]])]
    tree = grow_tree(MarkovDrafter(OPT_TABLE), OptTree(**settings, variant="frontier"), 0, root_hidden)
    assert tree.tokens.tolist() == [0, 1, 2, 0, 2, 3] and tree.parents.tolist() == [-1, 0, 0, 1, 1, 2]


def test_opt_tree_upstream_checks_the_first_level():
    # level 1 weighs .6 + .3 = .9: with stop_delta 1 upstream keeps it alone and runs no forward
    root_hidden = torch.nn.functional.one_hot(torch.tensor(0), 4).float()
    drafter = MarkovDrafter(OPT_TABLE)
    tree = grow_tree(drafter, OptTree(node_budget=5, stop_delta=1.0, max_depth=10, top_k=2, variant="upstream"), 0, root_hidden)
    assert tree.tokens.tolist() == [0, 1, 2] and drafter.tree_used == 0
    drafter = MarkovDrafter(OPT_TABLE)
    grow_tree(drafter, OptTree(node_budget=5, stop_delta=1.0, max_depth=10, top_k=2, variant="frontier"), 0, root_hidden)
    assert drafter.tree_used == 2


def test_opt_tree_budget_is_clipped_to_what_can_be_stored():
    # the thesis's settings: 10 levels of 10 stored nodes at most, so a budget of 500 keeps them all
    spec = OptTree(node_budget=500, stop_delta=0.2, max_depth=10, top_k=10, variant="upstream")
    assert spec.budget == 100 and spec.frontier_only and spec.slots == 101
    assert OptTree(node_budget=500, max_depth=2, top_k=3).budget == 3 + 9


def test_tree_spec_holds_what_both_kinds_may_set():
    spec = OptTree(node_budget=20, stop_delta=0.5, max_depth=4, top_k=3, variant="upstream")
    assert spec == TreeSpec(kind="opt", top_k=3, max_depth=4, node_budget=20, stop_delta=0.5, opt_variant="upstream", stop="delta")
    assert spec.settings() == {
        "node_budget": 20, "stop_delta": 0.5, "max_depth": 4, "top_k": 3, "scorer": draft_confidence, "variant": "upstream",
        "stop": "delta", "cost": None,
    }  # fmt: skip
    assert OptTree(**spec.settings()) == spec
    assert isinstance(draft_confidence, NodeScorer) and not draft_confidence.needs_visual
    with pytest.raises(ValueError, match="total_tokens >= 2"):
        EagleTree(total_tokens=1)
    with pytest.raises(ValueError, match="OPT-Tree's"):
        TreeSpec(kind="eagle2", top_k=2, max_depth=3, node_budget=4, stop_delta=0.1)
    with pytest.raises(ValueError, match="OPT-Tree's"):
        TreeSpec(kind="eagle2", top_k=2, max_depth=3, node_budget=4, stop="delta")
    with pytest.raises(ValueError, match="stop=None"):
        TreeSpec(kind="opt", top_k=2, max_depth=3, node_budget=4, stop_delta=0.1, opt_variant="frontier")  # no stop rule
    with pytest.raises(ValueError, match="variant 'wide'"):
        OptTree(variant="wide")
    with pytest.raises(TypeError, match="needs_visual"):
        OptTree(scorer=lambda logprobs, tokens, depth, visual: logprobs)  # a bare function does not say
    with pytest.raises(TypeError, match="positional"):
        TreeSpec("opt", 3, 4, 20)  # keyword fields only
