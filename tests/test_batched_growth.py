"""Graphed batched tree growth (`lmms_msd.speculative.fast.batched_growth.BatchedTreeGrower`): the EAGLE-2
trees of many rows of one shared draft cache, each level one (graphed) forward over the rows.

On CPU the grower runs the code its graphs capture, eagerly and under `CaptureRules` (test_fast_engine.py).
Claims: each row's tree is the one `grow_tree` grows for it alone on a cache of its own (tokens, parents,
depths and ancestor masks exact; scores, draft probabilities and visual intensities up to the float32
rounding test_batched_drafting.py bounds), with ragged prefixes and padding rows, which write nothing
but their scratch slot; `BatchedStaticEngine(batched_drafting=True)` takes this path for batches of one
EAGLE-2 spec and decodes each request as it decodes alone; with CUDA, the replayed graphs give the trees
of the eager run.
"""

from __future__ import annotations

import pytest
import torch
from decoding_fixtures import random_draft, random_prompt, tiny_target
from test_batched_drafting import TOLERANCE, ForwardCounter
from test_batching import greedy_configs, mixed_requests, one_at_a_time, pair
from test_fast_engine import capture_rules  # noqa: F401  (autouse fixture)

from lmms_msd.speculative.batching import BatchRequest, generate_batched
from lmms_msd.speculative.drafting import Drafter, SharedDraftCache, advance_rows
from lmms_msd.speculative.fast import batched_engine
from lmms_msd.speculative.fast.batched_engine import BatchedStaticEngine
from lmms_msd.speculative.fast.batched_growth import BatchedTreeGrower
from lmms_msd.speculative.fast.static_drafter import StaticDrafter
from lmms_msd.speculative.runtime import EagerRuntime
from lmms_msd.speculative.tree import EagleTree, OptTree, grow_tree

CAPACITY = 256
CACHE_ROWS = 7  # row buckets 1, 2, 4, 7
SPECS = {"default": EagleTree(), "small": EagleTree(total_tokens=20, depth=3, top_k=4)}


def assert_same_tree(tree, ancestors, other, other_ancestors, where):
    assert tree.tokens.tolist() == other.tokens.tolist(), where
    assert tree.parents.tolist() == other.parents.tolist(), where
    assert tree.depths.tolist() == other.depths.tolist(), where
    assert torch.equal(ancestors, other_ancestors), where
    torch.testing.assert_close(other.scores, tree.scores, **TOLERANCE, msg=where)
    torch.testing.assert_close(other.confidence, tree.confidence, **TOLERANCE, msg=where)
    assert (tree.visual is None) == (other.visual is None), where
    if tree.visual is not None:
        torch.testing.assert_close(other.visual, tree.visual, **TOLERANCE, msg=where)


def step_side_by_side(draft, lm_head, shared, prompts, rows, track_visual, spec, steps, cuda_graphs=False):
    """Drafters on `rows` of `shared` grow their trees with one `BatchedTreeGrower`, drafters with caches of
    their own with `grow_tree`; both commit the same ragged runs after each step. Yields each step's
    (trees alone with their masks, trees batched with theirs, draft forwards of the batched growth)."""
    counter = ForwardCounter(draft)
    h, device = draft.config.hidden_size, draft.fc.weight.device
    alone = [Drafter(draft, lm_head, CAPACITY, track_visual=track_visual) for _ in rows]
    on_rows = [StaticDrafter(draft, lm_head, CAPACITY, track_visual, cuda_graphs, shared, r) for r in rows]
    grower = BatchedTreeGrower(shared, lm_head, spec, track_visual, cuda_graphs)
    g = torch.Generator().manual_seed(1)
    tokens, alone_roots, row_roots = [], [], []
    for prompt, one, row in zip(prompts, alone, on_rows):
        length = prompt.input_ids.shape[0]
        hidden = torch.randn(length, h, generator=g).to(device)
        alone_roots.append(one.prefill(prompt, hidden, first_token=5))
        row_roots.append(row.prefill(prompt, hidden, first_token=5))
        tokens.append(5)
    assert len({d.committed for d in on_rows}) > 1, "the rows' prefixes must differ"
    for step in range(steps):
        trees_alone = []
        for one, token, root in zip(alone, tokens, alone_roots):
            tree = grow_tree(one, spec, token, root.hidden, root.visual)
            trees_alone.append((tree, tree.ancestor_mask(spec.max_depth)))
        counter.take()
        trees = grower.build(on_rows, tokens, [r.hidden for r in row_roots], [r.visual for r in row_roots])
        yield trees_alone, trees, counter.take()
        # commit a ragged run per row: the first 1 + (b + step) % 3 nodes of the tree's first path
        next_tokens = [tree.tokens[: 1 + (b + step) % 3] for b, (tree, _) in enumerate(trees_alone)]
        hidden = [torch.randn(t.shape[0], h, generator=g).to(device) for t in next_tokens]
        alone_roots = [one.advance(t, h_) for one, t, h_ in zip(alone, next_tokens, hidden)]
        row_roots = advance_rows(on_rows, next_tokens, hidden)
        tokens = [int(t[-1]) for t in next_tokens]


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("rows", [[0, 2, 4], [1, 2]], ids=["R7", "R4"])
@pytest.mark.parametrize("track_visual", [False, True])
@torch.inference_mode()
def test_batched_growth_equals_grow_tree_per_row(spec_name, rows, track_visual):
    """Rows [0, 2, 4] run as R = 7 (rows 1, 3, 5, 6 padding), rows [1, 2] as R = 4 (rows 0 and 3 padding,
    4..6 outside the forward): no bucket is the number of rows. One forward per level, none at the root."""
    target = tiny_target(3, context_scale=0.05)
    draft = random_draft(target, 5)
    spec = SPECS[spec_name]
    shared = SharedDraftCache(draft, rows=CACHE_ROWS, capacity=CAPACITY)
    prompts = [random_prompt(target, 400 + b, with_image=b % 2 == 0) for b in range(len(rows))]
    steps = step_side_by_side(draft, target.lm_head, shared, prompts, rows, track_visual, spec, 3)
    for step, (trees_alone, trees, forwards) in enumerate(steps):
        assert forwards == spec.max_depth - 1, f"step {step}: {forwards} draft forwards"
        for b, ((tree, ancestors), (other, other_ancestors)) in enumerate(zip(trees_alone, trees)):
            assert_same_tree(tree, ancestors, other, other_ancestors, f"step {step}, row {rows[b]}")
            assert len(tree) == spec.total_tokens
    forward_rows = 7 if max(rows) == 4 else 4
    padding = [r for r in range(forward_rows) if r not in rows]
    for layer_cache in shared.cache:
        for cache in (layer_cache.keys, layer_cache.values):
            assert cache[padding, :, shared.scratch].any(), "padding rows in the forward write their scratch slot"
            assert not cache[padding, :, : shared.scratch].any(), "padding wrote a slot other than the scratch slot"
            assert not cache[forward_rows:].any(), "rows outside the forward changed"


def test_only_eagle2_trees_are_grown():
    target = tiny_target(3)
    draft = random_draft(target, 5)
    shared = SharedDraftCache(draft, rows=2, capacity=32)
    assert BatchedTreeGrower.supports(EagleTree()) and not BatchedTreeGrower.supports(OptTree())
    with pytest.raises(ValueError, match="EAGLE-2 trees only.*use grow_trees"):
        BatchedTreeGrower(shared, target.lm_head, OptTree(), False, False)


@pytest.mark.parametrize("track_visual", [False, True])
def test_static_engine_grows_eagle2_batches_with_the_graphed_grower(track_visual, monkeypatch):
    """`BatchedStaticEngine(batched_drafting=True)` on rows of one EAGLE-2 spec never calls `grow_trees`
    (the eager batched growth) and decodes each request as it decodes alone at T=0."""
    target, draft = pair("following")
    tree = EagleTree(total_tokens=20, depth=4, top_k=4)
    configs = greedy_configs()
    prompts = mixed_requests(target, configs)
    eager = EagerRuntime(target, draft)
    alone = [one_at_a_time(eager, p, c, tree) for p, c in zip(prompts, configs)]
    engine = BatchedStaticEngine(target, draft, max_batch=4, max_length=256, batched_drafting=True)
    monkeypatch.setattr(batched_engine, "grow_trees", lambda *args: pytest.fail("the engine grew an EAGLE-2 batch eagerly"))
    builds = []
    build = BatchedTreeGrower.build
    monkeypatch.setattr(BatchedTreeGrower, "build", lambda self, *args: builds.append(len(args[0])) or build(self, *args))
    requests = [BatchRequest(p, c, tree=tree, track_visual=track_visual) for p, c in zip(prompts, configs)]
    for index, result in generate_batched(engine, requests, max_batch=4):
        assert result.token_ids == alone[index].token_ids, f"request {index}"
        assert result.stats.accepted == alone[index].stats.accepted, f"request {index}: other trees than alone"
    assert max(builds) > 2 and list(engine._batch_growers) == [(track_visual, tree)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@torch.inference_mode()
def test_replayed_batched_growth_equals_the_eager_run():
    """The same steps with graphs (captured per row bucket and width) and without: the same trees, and
    the graphed engine decodes as the eager one."""
    target = tiny_target(3, context_scale=0.05)
    draft = random_draft(target, 5)
    prompts = [random_prompt(target, 400 + b, with_image=b % 2 == 0) for b in range(3)]
    target.model.to("cuda")
    draft = draft.to("cuda")
    runs = {}
    for cuda_graphs in (True, False):
        shared = SharedDraftCache(draft, rows=CACHE_ROWS, capacity=CAPACITY)
        steps = step_side_by_side(draft, target.lm_head, shared, prompts, [0, 2, 4], True, SPECS["default"], 3, cuda_graphs)
        runs[cuda_graphs] = [trees for _, trees, _ in steps]
    for step, (replayed, direct) in enumerate(zip(runs[True], runs[False])):
        for b, ((tree, ancestors), (other, other_ancestors)) in enumerate(zip(direct, replayed)):
            assert_same_tree(tree, ancestors, other, other_ancestors, f"step {step}, row {b}")
    target, draft = pair("following")
    target.model.to("cuda")
    draft = draft.to("cuda")
    configs = greedy_configs()
    prompts = mixed_requests(target, configs)
    tree = EagleTree()
    outs = {}
    for cuda_graphs in (True, False):
        engine = BatchedStaticEngine(target, draft, max_batch=4, max_length=256, cuda_graphs=cuda_graphs, batched_drafting=True)
        outs[cuda_graphs] = dict(generate_batched(engine, [BatchRequest(p, c, tree=tree) for p, c in zip(prompts, configs)], 4))
        if cuda_graphs:
            (grower,) = engine._batch_growers.values()
            assert len(grower._levels[1]) > 0, "no level graph was captured"
    for index in outs[True]:
        assert outs[True][index].token_ids == outs[False][index].token_ids, f"request {index}"
