"""Batched decoding (`lmms_msd.speculative.batching`) decodes every request as its one-request loop does.

Ten requests of mixed prompt lengths (with and without an image), token budgets and stop strings, so
that they finish at different steps and waiting ones join mid-run, decoded three at a time and all at
once. At T=0 each request's tokens (and its per-step accepted counts: the same trees) equal the
one-request loop's, plain and speculative (EAGLE-2, OPT-Tree both variants), with a draft that
follows the target and with a random one. Sampling: each request draws from its own seeded generator,
so its tokens equal its batch-1 tokens with the same seed whatever the other rows sample.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from decoding_fixtures import (
    CharTokenizer,
    following_draft,
    random_draft,
    random_prompt,
    tiny_target,
)

from lmms_msd.speculative.batching import BatchRequest, NodeBudgets, generate_batched
from lmms_msd.speculative.decoding import plain_generate, speculative_generate
from lmms_msd.speculative.runtime import EagerRuntime
from lmms_msd.speculative.sampling import GenerationConfig
from lmms_msd.speculative.tree import EagleTree, OptTree

N_REQUESTS = 10
TREES = {
    "plain": None,
    "eagle2": EagleTree(),
    "opt_upstream": OptTree(variant="upstream", stop_delta=0.1),
    "opt_frontier": OptTree(variant="frontier"),
}


def pair(draft_kind: str):
    target = tiny_target(3, context_scale=0.05 if draft_kind == "following" else 1.0)
    # EOS: a token the random target emits now and then, so some requests end by it
    target = dataclasses.replace(target, tokenizer=CharTokenizer(target.tokenizer.vocab_size, eos_token_id=7))
    draft = following_draft(target) if draft_kind == "following" else random_draft(target, 5)
    return target, draft


def mixed_requests(target, configs):
    """Prompts of 4 to 13 text tokens, an image in every other one."""
    return [random_prompt(target, 100 + i, with_image=i % 2 == 0) for i in range(len(configs))]


def greedy_configs():
    g = torch.Generator().manual_seed(0)
    budgets = torch.randint(3, 40, (N_REQUESTS,), generator=g).tolist()
    return [GenerationConfig(max_new_tokens=b, until=("e",) if i % 3 == 1 else ()) for i, b in enumerate(budgets)]


def one_at_a_time(runtime, prompt, config, tree, generator=None):
    if tree is None:
        return plain_generate(runtime, prompt, config, generator)
    return speculative_generate(runtime, prompt, config, tree, generator)


@pytest.mark.parametrize("tree_name", list(TREES))
@pytest.mark.parametrize("draft_kind", ["following", "random"])
def test_batched_greedy_equals_one_at_a_time(tree_name, draft_kind):
    target, draft = pair(draft_kind)
    runtime = EagerRuntime(target, draft)
    tree = TREES[tree_name]
    configs = greedy_configs()
    prompts = mixed_requests(target, configs)
    alone = [one_at_a_time(runtime, p, c, tree) for p, c in zip(prompts, configs)]
    lengths = {len(r.token_ids) for r in alone}
    assert len(lengths) > 3, f"the requests must finish at different steps, got lengths {sorted(lengths)}"
    for max_batch in (3, N_REQUESTS):
        requests = [BatchRequest(p, c, tree=tree) for p, c in zip(prompts, configs)]
        finished = list(generate_batched(runtime, requests, max_batch))
        assert sorted(i for i, _ in finished) == list(range(N_REQUESTS))
        for index, result in finished:
            assert result.token_ids == alone[index].token_ids, f"request {index}, max_batch {max_batch}"
            assert result.text == alone[index].text
            assert result.stats.accepted == alone[index].stats.accepted, f"request {index}: other trees than alone"
        if max_batch == 3:  # rows leave as they finish, not in order
            assert [i for i, _ in finished] != list(range(N_REQUESTS))


@pytest.mark.parametrize("tree_name", ["plain", "eagle2", "opt_upstream"])
def test_batched_sampling_draws_each_request_from_its_own_generator(tree_name):
    target, draft = pair("following")
    runtime = EagerRuntime(target, draft)
    tree = TREES[tree_name]
    configs = [
        GenerationConfig(max_new_tokens=8 + 3 * i, do_sample=True, temperature=(0.7, 1.0, 1.3)[i % 3],
                         top_p=0.9 if i % 2 else 1.0, top_k=5 if i % 4 == 3 else 0)
        for i in range(N_REQUESTS)
    ]  # fmt: skip
    configs[4] = GenerationConfig(max_new_tokens=20)  # a greedy request among sampled ones
    prompts = mixed_requests(target, configs)

    def generator(i):
        return None if configs[i].greedy else torch.Generator().manual_seed(1000 + i)

    alone = [one_at_a_time(runtime, p, c, tree, generator(i)) for i, (p, c) in enumerate(zip(prompts, configs))]
    requests = [BatchRequest(p, c, generator(i), tree=tree) for i, (p, c) in enumerate(zip(prompts, configs))]
    for index, result in generate_batched(runtime, requests, max_batch=4):
        assert result.token_ids == alone[index].token_ids, f"request {index}"
    # and the seeds matter: other seeds give other samples (the comparison above can fail)
    reseeded = [BatchRequest(p, c, None if c.greedy else torch.Generator().manual_seed(i), tree=tree)
                for i, (p, c) in enumerate(zip(prompts, configs))]  # fmt: skip
    other = dict(generate_batched(runtime, reseeded, max_batch=4))
    assert any(other[i].token_ids != alone[i].token_ids for i in range(N_REQUESTS))


def test_node_budgets_shrink_trees_losslessly():
    target, draft = pair("following")
    runtime = EagerRuntime(target, draft)
    configs = greedy_configs()
    prompts = mixed_requests(target, configs)
    plain = [plain_generate(runtime, p, c) for p, c in zip(prompts, configs)]
    tree = EagleTree()
    # 4 rows in flight at first: plain steps (budget 0); as rows leave, 3 rows: 5 nodes; 1 row: the full tree
    schedule = NodeBudgets.parse("1:58,2:5,4:0")
    requests = [BatchRequest(p, c, tree=tree) for p, c in zip(prompts, configs)]
    advanced: list[int] = []  # tokens per draft advance: plain steps leave the draft behind, a tree catches it up
    real = runtime.advance_batch
    runtime.advance_batch = lambda seqs, tokens, hidden: advanced.extend(t.shape[0] for t in tokens) or real(seqs, tokens, hidden)
    results = dict(generate_batched(runtime, requests, max_batch=4, schedule=schedule))
    for index, result in results.items():
        assert result.token_ids == plain[index].token_ids, f"request {index}"
    assert max(advanced) > tree.max_depth + 1  # more than one step commits: a catch-up over plain steps
    first = results[0].stats  # request 0 starts with 4 rows in flight: its first steps are plain
    assert first.accepted[0] == 0
    assert max(a for r in results.values() for a in r.stats.accepted) > 1  # trees grow once rows leave
    assert schedule(tree, 1) is tree and schedule(tree, 3).node_budget == 5 and schedule(tree, 64) is None


def test_a_row_runs_its_draft_once_it_grows_a_tree_and_not_before():
    """Under a schedule of plain steps at large batches, a request whose every step is plain never runs the
    draft (no prompt read, no advance), and one that grows trees later reads its prompt just before its first
    tree: its tokens are still plain decoding's."""
    target, draft = pair("following")
    runtime = EagerRuntime(target, draft)
    configs = greedy_configs()
    prompts = mixed_requests(target, configs)
    plain = [plain_generate(runtime, p, c) for p, c in zip(prompts, configs)]
    requests = [BatchRequest(p, c, tree=EagleTree()) for p, c in zip(prompts, configs)]
    started, drafted = [], set()  # sequences whose draft read its prompt (in order), sequences that grew a tree
    real_prefill, real_draft = runtime.prefill_draft, runtime.draft_trees

    def prefill_draft(sequence, *args):
        assert id(sequence) not in drafted, "the draft read the prompt after the row's first tree"
        started.append(id(sequence))
        return real_prefill(sequence, *args)

    def draft_trees(sequences, *args):
        assert all(id(s) in started for s in sequences), "a tree grown before its draft read the prompt"
        drafted.update(id(s) for s in sequences)
        return real_draft(sequences, *args)

    runtime.prefill_draft, runtime.draft_trees = prefill_draft, draft_trees
    results = dict(generate_batched(runtime, requests, max_batch=4, schedule=NodeBudgets.parse("1:58,3:0")))
    for index, result in results.items():
        assert result.token_ids == plain[index].token_ids, f"request {index}"
    assert len(started) == len(set(started)) and set(started) == drafted  # each at most once, and only if it drafts
    assert 0 < len(drafted) < N_REQUESTS  # trees once fewer than 3 rows are left; the rest never ran their draft


@pytest.mark.parametrize("text", ["", "2:5", "1:5,1:6", "1:-1", "1-5"])
def test_node_budgets_name_a_bad_table(text):
    with pytest.raises(ValueError, match="batch"):
        NodeBudgets.parse(text)


def test_plain_and_speculative_requests_do_not_mix():
    target, draft = pair("following")
    prompts = mixed_requests(target, [None, None])
    config = GenerationConfig(max_new_tokens=5)
    requests = [BatchRequest(prompts[0], config, tree=EagleTree()), BatchRequest(prompts[1], config)]
    with pytest.raises(ValueError, match="request 1 decodes plainly"):
        list(generate_batched(EagerRuntime(target, draft), requests, max_batch=2))


def test_one_token_requests_finish_at_their_prefill():
    target, draft = pair("following")
    prompts = mixed_requests(target, [None] * 3)
    requests = [BatchRequest(p, GenerationConfig(max_new_tokens=1), tree=EagleTree()) for p in prompts]
    results = dict(generate_batched(EagerRuntime(target, draft), requests, max_batch=2))
    assert [len(results[i].token_ids) for i in range(3)] == [1, 1, 1]
    assert all(results[i].stats.steps == 0 for i in range(3))


@pytest.mark.parametrize("draft_kind", ["following", "random"])
@pytest.mark.parametrize("name", ["eagle2", "opt_upstream", "opt_frontier"])
@pytest.mark.parametrize("budget", [1, 2, 4, 9])
def test_narrowed_trees_are_the_wide_ones(draft_kind, name, budget):
    """A budget's tree grown narrow (top_k and max_depth at most the budget: `narrowed`) is the tree the
    full-width growth keeps at that budget: the same tokens, parents and depths."""
    from lmms_msd.speculative.runtime import drafter_of
    from lmms_msd.speculative.tree import grow_tree, narrowed

    target, draft = pair(draft_kind)
    runtime = EagerRuntime(target, draft)
    wide = dataclasses.replace(TREES[name], node_budget=budget)
    narrow = narrowed(TREES[name], budget)
    assert narrow.top_k == min(10, budget) and narrow.max_depth <= max(budget, 2)
    for i in range(3):
        prompt = random_prompt(target, 200 + i, with_image=i != 1)
        sequence, hidden, logits = runtime.prefill(prompt, 64)
        token = int(logits[-1].argmax())
        root = runtime.prefill_draft(sequence, prompt, hidden, token, False)
        drafter = drafter_of(sequence)
        trees = []
        for spec in (wide, narrow):
            drafter.tree_used = 0  # grow both from the same committed prefix
            trees.append(grow_tree(drafter, spec, token, root.hidden))
        for field in ("tokens", "parents", "depths"):
            assert getattr(trees[0], field).tolist() == getattr(trees[1], field).tolist(), f"prompt {i}: {field}"


def test_plain_from_grows_trees_below_its_batch_size_only():
    from lmms_msd.speculative.batching import PlainFrom

    tree = EagleTree()
    assert PlainFrom(4)(tree, 1) is tree and PlainFrom(4)(tree, 3) is tree
    assert PlainFrom(4)(tree, 4) is None and PlainFrom(4)(tree, 64) is None
    with pytest.raises(ValueError, match="PlainFrom needs a batch size >= 2"):
        PlainFrom(1)
