"""Batched drafting (`lmms_msd.speculative.tree.grow_trees`, `lmms_msd.speculative.drafting.advance_rows`):
every tree level of all rows is one draft forward, and so is the draft's advance, and each row's tree
is the one it grows alone; on `EagerRuntime` (the rows' caches packed, `run_packed`) and on
`BatchedStaticEngine(batched_drafting=True)` (rows of one shared draft cache, `run_shared`).

Eight rows of ragged prompts (with and without an image), each with its own tree (EAGLE-2 and OPT-Tree,
both variants, different sizes; some rows share one), some tracking visual attention and some not, are stepped side by
side twice: once row by row (`Runtime.draft_tree`, `verify`, `commit`) and once batched
(`draft_trees`, `verify_batch`, `keep_batch`, `advance_batch`). At every step each row's tree has the
same tokens, parents and depths in both, and the same scores, draft probabilities and visual
intensities up to float32 rounding (the packed forward's reductions are longer: their masked terms
are exact zeros, but the summation order may differ). Greedy and sampled (each row its own seeded
generator, one copy per side), the accepted tokens are the same.
"""

from __future__ import annotations

import pytest
import torch
from decoding_fixtures import following_draft, random_draft, random_prompt, tiny_target
from test_batching import (
    TREES,
    greedy_configs,
    mixed_requests,
    one_at_a_time,
    pair,
)
from test_fast_engine import capture_rules  # noqa: F401  (autouse fixture)

from lmms_msd.speculative import drafting
from lmms_msd.speculative.batching import BatchRequest, generate_batched
from lmms_msd.speculative.decoding import accept, path_on_device
from lmms_msd.speculative.fast.batched_engine import BatchedStaticEngine
from lmms_msd.speculative.runtime import EagerRuntime
from lmms_msd.speculative.sampling import GenerationConfig
from lmms_msd.speculative.tree import EagleTree, OptTree

SPECS = [
    EagleTree(),
    OptTree(variant="upstream", stop_delta=0.1),
    OptTree(variant="frontier"),
    EagleTree(total_tokens=20, depth=3, top_k=4),
    OptTree(variant="upstream", stop_delta=0.02, node_budget=20, top_k=5, max_depth=4),
]
SPECS += SPECS[:3]  # rows 5, 6, 7 share the specs of rows 0, 1, 2 and grow with them (`TreeGrowth`)
TRACK = [False, True, False, True, False, False, True, False]  # visual attention, alike within those pairs
STEPS = 4
# float32 scores are sums of a few log-softmaxes over 48 logits, each a dot product of 64 terms: a few
# hundred roundings of relative size 2**-24 at most, so 1e-4 absolute on values of order 10 bounds them.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-4}


def assert_same_tree(tree, ancestors, other, other_ancestors, where):
    """Two growths of one tree: the same nodes and ancestor mask exactly, the same scores, confidences and
    visual intensities within TOLERANCE (the rounding of wider products)."""
    assert tree.tokens.tolist() == other.tokens.tolist(), where
    assert tree.parents.tolist() == other.parents.tolist(), where
    assert tree.depths.tolist() == other.depths.tolist(), where
    assert torch.equal(ancestors, other_ancestors), where
    torch.testing.assert_close(other.scores, tree.scores, **TOLERANCE, msg=where)
    torch.testing.assert_close(other.confidence, tree.confidence, **TOLERANCE, msg=where)
    assert (tree.visual is None) == (other.visual is None), where
    if tree.visual is not None:
        torch.testing.assert_close(other.visual, tree.visual, **TOLERANCE, msg=where)


class ForwardCounter:
    """Counts the draft head's forwards (each call of MSDDraft._run)."""

    def __init__(self, draft) -> None:
        self.calls = 0
        run = draft._run

        def counted(*args):
            self.calls += 1
            return run(*args)

        draft._run = counted

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


def start(runtime, prompts, track):
    sequences, tokens, roots = [], [], []
    for prompt, spec, track_visual in zip(prompts, SPECS, track):
        sequence, hidden, logits = runtime.prefill(prompt, 64 + spec.slots)
        token = int(logits[-1].argmax())
        roots.append(runtime.prefill_draft(sequence, prompt, hidden, token, track_visual))
        sequences.append(sequence)
        tokens.append(token)
    return sequences, tokens, roots


@pytest.mark.parametrize("runtime_kind", ["eager", "static"])
@pytest.mark.parametrize("sampling", [False, True])
@pytest.mark.parametrize("draft_kind", ["following", "random"])
@torch.inference_mode()
def test_batched_trees_equal_row_by_row_trees(draft_kind, sampling, runtime_kind):
    """runtime_kind "static": `BatchedStaticEngine(batched_drafting=True)` without graphs, whose rows
    draft on one shared draft cache: a row alone grows its tree with its `GraphedTreeGrower`, the batch
    with one in-place forward per level over the cache's rows (`run_shared`)."""
    target = tiny_target(3, context_scale=0.05 if draft_kind == "following" else 1.0)
    draft = following_draft(target) if draft_kind == "following" else random_draft(target, 5)
    if runtime_kind == "eager":
        runtime = EagerRuntime(target, draft)
    else:
        runtime = BatchedStaticEngine(target, draft, max_batch=2 * len(SPECS), max_length=256, cuda_graphs=False, batched_drafting=True)
    counter = ForwardCounter(draft)
    prompts = [random_prompt(target, 200 + b, with_image=b % 2 == 0) for b in range(len(SPECS))]
    track = TRACK
    config = GenerationConfig(max_new_tokens=64, do_sample=sampling, temperature=1.0)

    def generators():
        return [torch.Generator().manual_seed(300 + b) if sampling else None for b in range(len(SPECS))]

    alone, alone_tokens, alone_roots = start(runtime, prompts, track)
    batch, batch_tokens, batch_roots = start(runtime, prompts, track)
    alone_gens, batch_gens = generators(), generators()
    counter.take()
    sizes = set()
    for step in range(STEPS):
        # row by row, counting each row's draft forwards
        drafted, forwards = [], []
        for row in zip(alone, SPECS, alone_tokens, alone_roots):
            drafted.append(runtime.draft_tree(*row))
            forwards.append(counter.take())
        # batched: one draft forward per level of the deepest-growing row
        batched = runtime.draft_trees(batch, SPECS, batch_tokens, batch_roots)
        assert counter.take() == max(forwards), f"step {step}: forwards alone {forwards}"
        for b, ((tree, ancestors), (other, other_ancestors)) in enumerate(zip(drafted, batched)):
            where = f"step {step}, row {b}"
            assert_same_tree(tree, ancestors, other, other_ancestors, where)
            assert (tree.visual is None) == (not track[b]), where
            sizes.add(len(tree))
        # verify and commit, each side on its own
        results = []
        for b, (sequence, (tree, ancestors)) in enumerate(zip(alone, drafted)):
            hidden, logits = runtime.verify(sequence, tree, ancestors)
            result = accept(tree, logits, ancestors, config, alone_gens[b])
            path, committed = path_on_device(result, target.device)
            alone_roots[b] = runtime.commit(sequence, path, committed, hidden[path])
            alone_tokens[b] = result.bonus
            results.append(result)
        outs = runtime.verify_batch(batch, [t for t, _ in batched], [a for _, a in batched])
        paths, next_tokens, path_hidden = [], [], []
        for b, ((tree, ancestors), (hidden, logits)) in enumerate(zip(batched, outs)):
            result = accept(tree, logits, ancestors, config, batch_gens[b])
            assert (result.path_tokens, result.bonus) == (results[b].path_tokens, results[b].bonus), f"step {step}, row {b}"
            path, committed = path_on_device(result, target.device)
            paths.append(path)
            next_tokens.append(committed)
            path_hidden.append(hidden[path])
            batch_tokens[b] = result.bonus
        runtime.keep_batch(batch, paths)
        counter.take()
        batch_roots = runtime.advance_batch(batch, next_tokens, path_hidden)
        assert counter.take() == 1, "the draft advances every row in one forward"
        for b, (root, other) in enumerate(zip(alone_roots, batch_roots)):
            torch.testing.assert_close(other.hidden, root.hidden, **TOLERANCE, msg=f"step {step}, row {b}")
            assert batch[b].drafter.committed == alone[b].drafter.committed
    assert len(sizes) > 2, f"the rows must grow trees of different sizes, got {sorted(sizes)}"


@pytest.mark.parametrize("tree_name", ["eagle2", "opt_upstream", "opt_frontier"])
def test_static_engine_with_batched_drafting_equals_one_at_a_time(tree_name, monkeypatch):
    """`BatchedStaticEngine(batched_drafting=True)` (CPU, no graphs) decodes each request as it decodes
    alone, with fewer draft forwards than the engine growing its rows' trees one after another, and
    never packs (copies) the rows' draft caches: they are rows of one shared cache."""
    target, draft = pair("following")
    tree = TREES[tree_name]
    configs = greedy_configs()
    prompts = mixed_requests(target, configs)
    alone = [one_at_a_time(EagerRuntime(target, draft), p, c, tree) for p, c in zip(prompts, configs)]
    counter = ForwardCounter(draft)
    forwards = {}
    monkeypatch.setattr(drafting, "run_packed", lambda *args: pytest.fail("the engine packed its rows' draft caches"))
    for batched_drafting in (False, True):
        engine = BatchedStaticEngine(target, draft, max_batch=4, max_length=256, batched_drafting=batched_drafting)
        requests = [BatchRequest(p, c, tree=tree) for p, c in zip(prompts, configs)]
        counter.take()
        for index, result in generate_batched(engine, requests, max_batch=4):
            assert result.token_ids == alone[index].token_ids, f"request {index}, batched_drafting {batched_drafting}"
            assert result.stats.accepted == alone[index].stats.accepted, f"request {index}: other trees than alone"
        forwards[batched_drafting] = counter.take()
    assert forwards[True] < forwards[False], f"draft forwards: {forwards}"
