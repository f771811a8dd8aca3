"""Graphed batched tree growth (`lmms_msd.speculative.fast.batched_growth.BatchedTreeGrower`): the trees of
many rows of one shared draft cache, each level one (graphed) forward over the rows.

On CPU the grower runs the code its graphs capture, eagerly and under `CaptureRules` (test_fast_engine.py).
Claims: each row's tree is the one `grow_tree` grows for it alone on a cache of its own (tokens, parents,
depths and ancestor masks exact; scores, draft probabilities and visual intensities up to the float32
rounding test_batched_drafting.py bounds), for EAGLE-2 and for OPT-Tree whose rows stop at levels of their
own, with ragged prefixes and padding rows, which write nothing but their scratch slot, and each row
writes the draft slots it writes alone; `BatchedStaticEngine(batched_drafting=True)` takes this path for
batches of one spec and decodes each request as it decodes alone; with CUDA, the replayed graphs give
the trees of the eager run.
"""

from __future__ import annotations

import pytest
import torch
from decoding_fixtures import random_draft, random_prompt, tiny_target
from test_batched_drafting import TOLERANCE, ForwardCounter, assert_same_tree
from test_batching import greedy_configs, mixed_requests, one_at_a_time, pair
from test_cost import literal_cost
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
SPECS = {
    "eagle2": EagleTree(),
    "eagle2_small": EagleTree(total_tokens=20, depth=3, top_k=4),
    "opt_upstream": OptTree(variant="upstream", stop_delta=0.1),
    "opt_frontier": OptTree(variant="frontier"),
    # some rows' first level gains too little: no forward for them, while others grow
    "opt_upstream_stop1": OptTree(node_budget=12, stop_delta=0.8, max_depth=6, top_k=4, variant="upstream"),
    # rows stop at levels of their own, keep as many nodes as their own costs say, or none
    "opt_cost": OptTree(
        node_budget=20, max_depth=5, top_k=4, variant="upstream", stop="cost", cost=literal_cost((1.0, 1.0, 1.3), widths=(1, 8, 32))
    ),
    # any tree costs three plain steps: every row's tree is its root alone, with no forward
    "opt_cost_plain": OptTree(node_budget=7, max_depth=4, top_k=3, stop="cost", cost=literal_cost((1.0, 3.0, 3.0))),
}


def step_side_by_side(draft, lm_head, shared, prompts, rows, track_visual, spec, steps, cuda_graphs=False):
    """Drafters on `rows` of `shared` grow their trees with one `BatchedTreeGrower`, drafters with caches of
    their own with `grow_tree`; both commit the same ragged runs after each step. Yields each step's
    (trees alone with their masks, trees batched with theirs, draft forwards of each row's growth alone,
    draft forwards of the batched growth)."""
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
        trees_alone, forwards = [], []
        for one, token, root in zip(alone, tokens, alone_roots):
            counter.take()
            tree = grow_tree(one, spec, token, root.hidden, root.visual)
            trees_alone.append((tree, tree.ancestor_mask(spec.max_depth)))
            forwards.append(counter.take())
        trees = grower.build(on_rows, tokens, [r.hidden for r in row_roots], [r.visual for r in row_roots])
        for one, row in zip(alone, rows):  # each row wrote the slots its tree wrote alone, no others
            for layer, own in zip(shared.cache, one.cache):
                for cache, expected in ((layer.keys, own.keys), (layer.values, own.values)):
                    torch.testing.assert_close(cache[row, :, : shared.scratch], expected[0, :, : shared.scratch], **TOLERANCE)
        yield trees_alone, trees, forwards, counter.take()
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
    ragged = False  # whether the rows' trees took different numbers of draft forwards alone in some step
    first_level_stops = False  # whether some row grew no level in a step where others grew
    for step, (trees_alone, trees, alone_forwards, forwards) in enumerate(steps):
        assert forwards == max(alone_forwards), f"step {step}: {forwards} draft forwards, alone {alone_forwards}"
        for b, ((tree, ancestors), (other, other_ancestors)) in enumerate(zip(trees_alone, trees)):
            where = f"step {step}, row {rows[b]}"
            assert_same_tree(tree, ancestors, other, other_ancestors, where)
            if spec_name == "opt_cost_plain":
                assert len(other) == 1, where
        ragged |= len(set(alone_forwards)) > 1
        first_level_stops |= 0 in alone_forwards and max(alone_forwards) > 0
    assert ragged == (spec.kind == "opt" and spec_name != "opt_cost_plain"), "OPT-Tree's rows must stop at levels of their own"
    assert first_level_stops == (spec_name == "opt_upstream_stop1")
    forward_rows = 7 if max(rows) == 4 else 4
    padding = [r for r in range(forward_rows) if r not in rows]
    for layer_cache in shared.cache:
        for cache in (layer_cache.keys, layer_cache.values):
            if spec_name != "opt_cost_plain":  # (that one grows no level: no forward)
                assert cache[padding, :, shared.scratch].any(), "padding rows in the forward write their scratch slot"
            assert not cache[padding, :, : shared.scratch].any(), "padding wrote a slot other than the scratch slot"
            assert not cache[forward_rows:].any(), "rows outside the forward changed"


ENGINE_TREES = {
    "eagle2": EagleTree(total_tokens=20, depth=4, top_k=4),
    "opt_upstream": OptTree(node_budget=20, stop_delta=0.1, max_depth=6, top_k=4, variant="upstream"),
    "opt_frontier": OptTree(node_budget=20, stop_delta=0.2, max_depth=6, top_k=4, variant="frontier"),
}


@pytest.mark.parametrize("tree_name", list(ENGINE_TREES))
@pytest.mark.parametrize("track_visual", [False, True])
def test_static_engine_grows_batches_with_the_graphed_grower(tree_name, track_visual, monkeypatch):
    """`BatchedStaticEngine(batched_drafting=True)` on rows of one spec never calls `grow_trees` (the eager
    batched growth) and decodes each request as it decodes alone at T=0."""
    target, draft = pair("following")
    tree = ENGINE_TREES[tree_name]
    configs = greedy_configs()
    prompts = mixed_requests(target, configs)
    eager = EagerRuntime(target, draft)
    alone = [one_at_a_time(eager, p, c, tree) for p, c in zip(prompts, configs)]
    engine = BatchedStaticEngine(target, draft, max_batch=4, max_length=256, batched_drafting=True)
    monkeypatch.setattr(batched_engine, "grow_trees", lambda *args: pytest.fail("the engine grew a batch eagerly"))
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
        steps = step_side_by_side(draft, target.lm_head, shared, prompts, [0, 2, 4], True, SPECS["opt_cost"], 3, cuda_graphs)
        runs[cuda_graphs] = [trees for _, trees, _, _ in steps]
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
