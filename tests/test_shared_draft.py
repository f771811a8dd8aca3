"""The draft head over many rows at once (`MSDDraft` with [R, T, H] inputs, a cache row per sequence) and
drafters on the rows of one `SharedDraftCache` (`lmms_msd.speculative.drafting.run_shared`).

Claims: an R-row forward gives each row what a one-row forward over that row's own cache gives (up to the
rounding of reductions a few slots wider, bounded by `float_bounds.chain_gap`), writes exactly the slots
each row names and leaves every other slot of every row as it was (padding writes only the scratch slot);
and trees grown for many rows on a shared cache, one forward per level, are the trees `grow_tree` grows
for each row alone on a cache of its own, with the same draft advance after every step.
"""

from __future__ import annotations

import pytest
import torch
from decoding_fixtures import random_draft, random_prompt, tiny_target
from float_bounds import chain_gap
from test_batched_drafting import TOLERANCE, ForwardCounter

from lmms_msd.speculative.drafting import Drafter, SharedDraftCache, advance_rows
from lmms_msd.speculative.tree import EagleTree, OptTree, grow_tree, grow_trees

CAPACITY = 48
PREFIXES = [9, 4, 13]  # committed slots of rows 0..2; row 3 takes no part (padding)
NEW = [3, 1, 2]  # new inputs per row (ragged: the rest of T = 3 is padding)


def draft_reductions(draft, width: int) -> list[int]:
    """The reductions on the head's longest path: fc, a projection, attention logits, the softmax sum and
    the weighted sum over the slots, o_proj, the norm, gate/up, down."""
    c = draft.config
    d, h = c.resolved_head_dim, c.hidden_size
    return [2 * h, h, d, width, width, c.num_attention_heads * d, h, h, c.intermediate_size]


@pytest.mark.parametrize("visual", [False, True])
@torch.inference_mode()
def test_rows_forward_equals_one_row_forwards(visual):
    target = tiny_target(3)
    draft = random_draft(target, 5)
    h = draft.config.hidden_size
    g = torch.Generator().manual_seed(0)
    rows, t = 4, max(NEW)
    shared = draft.new_cache(CAPACITY, rows)
    alone = [draft.new_cache(CAPACITY) for _ in PREFIXES]
    # committed prefixes: the same random keys and values in both layouts; row 3 holds values too
    for layer in range(len(shared)):
        for cache in (shared[layer].keys, shared[layer].values):
            cache.copy_(torch.randn(cache.shape, generator=g))
        for b, own in enumerate(alone):
            own[layer].keys.copy_(shared[layer].keys[b : b + 1])
            own[layer].values.copy_(shared[layer].values[b : b + 1])
    before = [(c.keys.clone(), c.values.clone()) for c in shared]
    image = torch.rand(rows, CAPACITY, generator=g) < 0.3
    width = max(p + n for p, n in zip(PREFIXES, NEW))
    x = torch.zeros(rows, t, h)
    positions = torch.zeros(rows, t, dtype=torch.long)
    slots = torch.full((rows, t), CAPACITY - 1)
    visible = torch.zeros(rows, t, width, dtype=torch.bool)
    visible[:, :, 0] = True
    inputs = []
    for b, (p, n) in enumerate(zip(PREFIXES, NEW)):
        x_b = torch.randn(n, h, generator=g)
        slots_b = torch.arange(p, p + n)
        visible_b = torch.arange(p + n)[None] <= slots_b[:, None]  # causal over the prefix
        x[b, :n], positions[b, :n], slots[b, :n], visible[b, :n] = x_b, slots_b + 5, slots_b, False
        visible[b, :n, : p + n] = visible_b
        inputs.append((x_b, slots_b + 5, slots_b, visible_b))
    if visual:
        out, mass = draft.forward_with_visual(x, positions, shared, slots, visible, image[:, :width])
    else:
        out, mass = draft(x, positions, shared, slots, visible), None
    for b, (x_b, positions_b, slots_b, visible_b) in enumerate(inputs):
        n, used = x_b.shape[0], visible_b.shape[1]
        if visual:
            expected, expected_mass = draft.forward_with_visual(x_b[None], positions_b, alone[b], slots_b, visible_b, image[b, :used])
        else:
            expected, expected_mass = draft(x_b[None], positions_b, alone[b], slots_b, visible_b), None
        gap = chain_gap(draft_reductions(draft, width), expected.abs().max().item(), torch.float32)
        torch.testing.assert_close(out[b, :n], expected[0], rtol=0, atol=gap, msg=f"row {b}")
        if visual:  # shares in [0, 1]: the bound at scale 1
            torch.testing.assert_close(mass[b, :n], expected_mass, rtol=0, atol=chain_gap(draft_reductions(draft, width), 1.0, torch.float32))
        for layer, (keys, values) in enumerate(before):
            written = shared[layer].keys[b, :, slots_b]
            torch.testing.assert_close(written, alone[b][layer].keys[0, :, slots_b], rtol=0, atol=gap, msg=f"row {b} keys")
            untouched = torch.ones(CAPACITY, dtype=torch.bool)
            untouched[slots_b] = False
            untouched[CAPACITY - 1] = False  # the scratch slot, which padding writes
            assert torch.equal(shared[layer].keys[b, :, untouched], keys[b, :, untouched]), f"row {b}: other slots changed"
            assert torch.equal(shared[layer].values[b, :, untouched], values[b, :, untouched]), f"row {b}: other slots changed"
    for layer, (keys, values) in enumerate(before):  # row 3, padding only: all but its scratch slot as before
        assert torch.equal(shared[layer].keys[3, :, : CAPACITY - 1], keys[3, :, : CAPACITY - 1])
        assert torch.equal(shared[layer].values[3, :, : CAPACITY - 1], values[3, :, : CAPACITY - 1])


SPECS = [EagleTree(), OptTree(variant="upstream", stop_delta=0.1), EagleTree(), OptTree(variant="frontier"), EagleTree(total_tokens=20, depth=3, top_k=4)]
ROWS = [0, 1, 3, 4, 6]  # rows of a 7-row cache: 2 and 5 take no part
TRACK = [False, True, False, True, False]


@torch.inference_mode()
def test_trees_on_a_shared_cache_equal_trees_alone():
    """Five drafters on rows of one shared cache (ragged prompts, mixed specs, some tracking visual
    attention) against five drafters with caches of their own: each level of all trees is one forward,
    each tree is the row's own (tokens, parents, depths exact; scores, confidences, visual intensities up
    to float32 rounding), and the draft's advance over ragged committed runs is one forward with the
    same roots; three steps. Rows of the cache that no drafter holds are padding in every forward."""
    target = tiny_target(3, context_scale=0.05)
    draft = random_draft(target, 5)
    lm_head = target.lm_head
    shared = SharedDraftCache(draft, rows=7, capacity=256)
    counter = ForwardCounter(draft)
    prompts = [random_prompt(target, 400 + b, with_image=b % 2 == 0) for b in range(len(SPECS))]
    alone = [Drafter(draft, lm_head, 256, track_visual=v) for v in TRACK]
    rows = [Drafter(draft, lm_head, 256, track_visual=v, shared=shared, row=r) for v, r in zip(TRACK, ROWS)]
    g = torch.Generator().manual_seed(1)
    tokens, alone_roots, row_roots = [], [], []
    for prompt, one, row in zip(prompts, alone, rows):
        length = prompt.input_ids.shape[0]
        hidden = torch.randn(length, draft.config.hidden_size, generator=g)
        alone_roots.append(one.prefill(prompt, hidden, first_token=5))
        row_roots.append(row.prefill(prompt, hidden, first_token=5))
        tokens.append(5)
    for step in range(3):
        forwards = []
        trees_alone = []
        for one, spec, token, root in zip(alone, SPECS, tokens, alone_roots):
            counter.take()
            trees_alone.append(grow_tree(one, spec, token, root.hidden, root.visual))
            forwards.append(counter.take())
        trees = grow_trees(rows, SPECS, tokens, [r.hidden for r in row_roots], [r.visual for r in row_roots])
        assert counter.take() == max(forwards), f"step {step}: one forward per level, alone {forwards}"
        for b, (tree, other) in enumerate(zip(trees_alone, trees)):
            where = f"step {step}, row {b}"
            assert tree.tokens.tolist() == other.tokens.tolist(), where
            assert tree.parents.tolist() == other.parents.tolist(), where
            assert tree.depths.tolist() == other.depths.tolist(), where
            torch.testing.assert_close(other.scores, tree.scores, **TOLERANCE, msg=where)
            torch.testing.assert_close(other.confidence, tree.confidence, **TOLERANCE, msg=where)
            assert (other.visual is None) == (not TRACK[b]), where
            if TRACK[b]:
                torch.testing.assert_close(other.visual, tree.visual, **TOLERANCE, msg=where)
        # commit a ragged run per row: the first 1 + (b + step) % 3 nodes of the tree's first path
        next_tokens = [tree.tokens[: 1 + (b + step) % 3] for b, tree in enumerate(trees_alone)]
        hidden = [torch.randn(t.shape[0], draft.config.hidden_size, generator=g) for t in next_tokens]
        alone_roots = [one.advance(t, h_) for one, t, h_ in zip(alone, next_tokens, hidden)]
        counter.take()
        row_roots = advance_rows(rows, next_tokens, hidden)
        assert counter.take() == 1, "the draft advances every row in one forward"
        for b, (root, other) in enumerate(zip(alone_roots, row_roots)):
            torch.testing.assert_close(other.hidden, root.hidden, **TOLERANCE, msg=f"step {step}, row {b}")
            assert rows[b].committed == alone[b].committed
        tokens = [int(t[-1]) for t in next_tokens]
    for layer_cache in shared.cache:  # rows 2 and 5 only ever fed padding: all but their scratch slot untouched
        for cache in (layer_cache.keys, layer_cache.values):
            assert not cache[[2, 5], :, : shared.scratch].any(), "padding wrote a slot other than the scratch slot"


def test_a_row_outside_the_shared_cache_is_named():
    target = tiny_target(3)
    draft = random_draft(target, 5)
    shared = SharedDraftCache(draft, rows=2, capacity=32)
    with pytest.raises(ValueError, match="row 2 of a shared draft cache of 2 rows x 32 slots"):
        Drafter(draft, target.lm_head, 32, shared=shared, row=2)
    drafter = Drafter(draft, target.lm_head, 32, shared=shared, row=1)
    with pytest.raises(ValueError, match="needs 32 cache slots but a row of the shared cache holds 31"):
        drafter.reserve(32)
