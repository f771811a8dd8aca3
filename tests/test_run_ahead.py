"""The graphed grower one level ahead (`GraphedTreeGrower(run_ahead=True)`, on by default on CUDA): each level is
launched before the host reads the last one's stop value, so a tree that stops early has had one more level
grown than it keeps. That level must change nothing: not the trees, not the outputs, not the next steps."""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import torch
from decoding_fixtures import following_draft, random_draft, random_prompt, tiny_target
from test_batched_drafting import ForwardCounter
from test_cost import COSTS, KEY, literal_cost, record_trees
from test_fast_engine import capture_rules, with_eos  # noqa: F401  (capture_rules: autouse, graphed code under CaptureRules)

from lmms_msd.speculative.decoding import speculative_generate
from lmms_msd.speculative.fast import StaticEngine
from lmms_msd.speculative.fast import engine as engine_module
from lmms_msd.speculative.fast.tree_growth import GraphedTreeGrower
from lmms_msd.speculative.sampling import GenerationConfig
from lmms_msd.speculative.transfer import QueuedReads
from lmms_msd.speculative.tree import EagleTree, OptTree

COST = literal_cost(key=dataclasses.replace(KEY, top_k=4, frontier_only=False), **COSTS["trees"])
TREES = {
    "delta": OptTree(node_budget=24, stop_delta=0.2, max_depth=7, top_k=4, variant="frontier"),
    "delta_upstream": OptTree(node_budget=12, stop_delta=0.5, max_depth=6, top_k=4, variant="upstream"),
    "cost": OptTree(node_budget=12, max_depth=6, top_k=4, stop="cost", cost=COST),
    "eagle2": EagleTree(total_tokens=20, depth=5, top_k=4),
}


def run(monkeypatch, target, draft, tree, run_ahead: bool, sampling: bool):
    """Trees, outputs and draft forwards per step of four requests on an engine whose growers run ahead or not."""
    monkeypatch.setattr(engine_module, "GraphedTreeGrower", partial(GraphedTreeGrower, run_ahead=run_ahead))
    engine = StaticEngine(target, draft, max_length=256)
    counter = ForwardCounter(draft)
    trees, forwards, outputs = [], [], []
    for i in range(4):
        prompt = random_prompt(target, 400 + i, with_image=i % 2 == 0)
        config = GenerationConfig(max_new_tokens=30, do_sample=sampling, temperature=1.0)
        generator = torch.Generator().manual_seed(i) if sampling else None
        record = record_trees(trees)

        def observer(*args):
            record(*args)
            forwards.append(counter.take())  # this step's levels and the last step's advance (the first: the prefill's)

        outputs.append(speculative_generate(engine, prompt, config, tree, generator, observer=observer).token_ids)
        counter.take()  # the last step's advance
    return trees, forwards, outputs


@pytest.mark.parametrize("sampling", [False, True])
@pytest.mark.parametrize("name", sorted(TREES))
def test_a_level_grown_ahead_changes_nothing(monkeypatch, name, sampling):
    target = with_eos(tiny_target(3, context_scale=0.05), 10_000)
    draft = following_draft(target) if name != "delta_upstream" else random_draft(target, 11)
    tree = TREES[name]
    trees, forwards, outputs = run(monkeypatch, target, draft, tree, run_ahead=False, sampling=sampling)
    ahead_trees, ahead_forwards, ahead_outputs = run(monkeypatch, target, draft, tree, run_ahead=True, sampling=sampling)
    assert ahead_outputs == outputs and ahead_trees == trees
    extra = [a - b for a, b in zip(ahead_forwards, forwards)]
    if name == "eagle2":  # no stop rule: every level is grown, none ahead of a read
        assert extra == [0] * len(trees)
    else:
        # at most one level past the stop, and some trees stopped early (so the ignored level ran)
        assert set(extra) <= {0, 1} and sum(extra) > 0, extra


def test_queued_reads_give_the_values_at_the_time_they_were_queued():
    values = torch.tensor([1.0, 2.0])
    reads = QueuedReads(3, 2, values.device)
    reads.queue(1, values)
    values.add_(10)  # work queued after the read does not change it
    reads.queue(2, values)
    assert reads.get(1) == [1.0, 2.0] and reads.get(2) == [11.0, 12.0]
    reads.queue(1, values.flip(0))  # a slot read again holds the later read
    assert reads.get(1) == [12.0, 11.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="asynchronous reads need CUDA")
def test_queued_reads_wait_for_their_own_copy_only():
    device = torch.device("cuda")
    values = torch.arange(2, dtype=torch.float32, device=device)
    reads = QueuedReads(2, 2, device)
    reads.queue(0, values)
    big = torch.randn(4096, 4096, device=device)
    for _ in range(20):  # work queued after the read
        big = big @ big / 64
    assert reads.get(0) == [0.0, 1.0]
    assert reads.host.is_pinned()
