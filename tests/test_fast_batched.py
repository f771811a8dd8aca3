"""`BatchedStaticEngine` (static caches with a row per sequence) gives the eager batched loop's outputs.

On CPU without CUDA graphs, every graphed function under `CaptureRules` (as in test_fast_engine.py).
The requests and trees are test_batching.py's: mixed prompt lengths, budgets and stop strings, so
rows leave at different steps and later requests take the freed rows.
"""

from __future__ import annotations

import pytest
import torch
from decoding_fixtures import random_prompt
from test_batching import (
    N_REQUESTS,
    TREES,
    greedy_configs,
    mixed_requests,
    one_at_a_time,
    pair,
)
from test_fast_engine import capture_rules  # noqa: F401  (autouse fixture)

from lmms_msd.speculative.batching import BatchRequest, NodeBudgets, generate_batched
from lmms_msd.speculative.fast.batched_engine import BatchedStaticEngine
from lmms_msd.speculative.fast.batched_target import row_buckets
from lmms_msd.speculative.runtime import BatchedRuntime, EagerRuntime
from lmms_msd.speculative.sampling import GenerationConfig


@pytest.mark.parametrize("tree_name", list(TREES))
@pytest.mark.parametrize("draft_kind", ["following", "random"])
def test_batched_static_engine_equals_eager(tree_name, draft_kind):
    target, draft = pair(draft_kind)
    tree = TREES[tree_name]
    configs = greedy_configs()
    prompts = mixed_requests(target, configs)
    eager = EagerRuntime(target, draft)
    alone = [one_at_a_time(eager, p, c, tree) for p, c in zip(prompts, configs)]
    engine = BatchedStaticEngine(target, draft, max_batch=4, max_length=256)
    assert isinstance(engine, BatchedRuntime) and not engine.cuda_graphs
    for max_batch in (3, 4):
        requests = [BatchRequest(p, c, tree=tree) for p, c in zip(prompts, configs)]
        for index, result in generate_batched(engine, requests, max_batch):
            assert result.token_ids == alone[index].token_ids, f"request {index}, max_batch {max_batch}"
            assert result.stats.accepted == alone[index].stats.accepted
    assert sorted(engine._free) == [0, 1, 2, 3]  # every row given back
    # one request at a time on the same engine: the one-request loops run on it too
    assert one_at_a_time(engine, prompts[1], configs[1], tree).token_ids == alone[1].token_ids


@pytest.mark.parametrize("tree_name", ["plain", "eagle2"])
def test_batched_static_engine_samples_each_request_with_its_own_generator(tree_name):
    target, draft = pair("following")
    tree = TREES[tree_name]
    configs = [GenerationConfig(max_new_tokens=6 + 2 * i, do_sample=True, temperature=(0.7, 1.0)[i % 2]) for i in range(N_REQUESTS)]
    prompts = mixed_requests(target, configs)
    eager = EagerRuntime(target, draft)
    alone = [one_at_a_time(eager, p, c, tree, torch.Generator().manual_seed(i)) for i, (p, c) in enumerate(zip(prompts, configs))]
    requests = [BatchRequest(p, c, torch.Generator().manual_seed(i), tree=tree) for i, (p, c) in enumerate(zip(prompts, configs))]
    for index, result in generate_batched(BatchedStaticEngine(target, draft, max_batch=4, max_length=256), requests, 4):
        assert result.token_ids == alone[index].token_ids, f"request {index}"


def test_plain_steps_of_a_schedule_on_the_static_engine():
    """Budget 0 from 2 rows on: while 2 or more rows are in flight every step is plain (the root alone,
    through the plain forward), the drafts fall behind and catch up once a row is alone."""
    target, draft = pair("following")
    configs = greedy_configs()
    prompts = mixed_requests(target, configs)
    plain = [one_at_a_time(EagerRuntime(target), p, c, None) for p, c in zip(prompts, configs)]
    engine = BatchedStaticEngine(target, draft, max_batch=4, max_length=256)
    requests = [BatchRequest(p, c, tree=TREES["eagle2"]) for p, c in zip(prompts, configs)]
    results = dict(generate_batched(engine, requests, 4, NodeBudgets.parse("1:58,2:0")))
    assert [results[i].token_ids for i in range(N_REQUESTS)] == [r.token_ids for r in plain]
    assert max(a for r in results.values() for a in r.stats.accepted) > 1  # the last row alone grew trees


def test_rows_are_given_out_lowest_first_and_released_sequences_refused():
    target, _ = pair("following")
    engine = BatchedStaticEngine(target, max_batch=2, max_length=64)
    prompt = random_prompt(target, 0, with_image=False)
    first, _, _ = engine.prefill(prompt, 8)
    second, _, _ = engine.prefill(prompt, 8)
    assert (first.row, second.row) == (0, 1)
    with pytest.raises(RuntimeError, match="all 2 rows are live"):
        engine.prefill(prompt, 8)
    engine.release(first)
    with pytest.raises(RuntimeError, match="row 0.*no longer live"):
        engine.forward_next(first, torch.zeros(1, dtype=torch.long))
    assert engine.prefill(prompt, 8)[0].row == 0
    with pytest.raises(ValueError, match="need 64 cache slots.*holds 63 per sequence"):
        engine.release(second) or engine.prefill(prompt, 64 - prompt.input_ids.shape[0])


def test_row_buckets():
    assert row_buckets(1) == (1,) and row_buckets(16) == (1, 2, 4, 8, 16) and row_buckets(24) == (1, 2, 4, 8, 16, 24)


def test_every_caller_gives_its_rows_back():
    """One-request loops release their sequence at the end; the batched loop releases the rows in flight
    when its caller stops early. On a 2-row engine, neither would get far otherwise."""
    target, draft = pair("following")
    engine = BatchedStaticEngine(target, draft, max_batch=2, max_length=128)
    eager = EagerRuntime(target, draft)
    configs = greedy_configs()[:5]
    prompts = mixed_requests(target, configs)
    for prompt, config in zip(prompts, configs):
        for tree in (None, TREES["eagle2"]):
            assert one_at_a_time(engine, prompt, config, tree).token_ids == one_at_a_time(eager, prompt, config, tree).token_ids
    batched = generate_batched(engine, [BatchRequest(p, c) for p, c in zip(prompts, configs)], max_batch=2)
    next(batched)
    batched.close()
    assert sorted(engine._free) == [0, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_change_nothing_in_batches():
    target, draft = pair("following")
    target.model.to("cuda")
    draft = draft.to("cuda")
    configs = greedy_configs()
    prompts = mixed_requests(target, configs)
    graphs = BatchedStaticEngine(target, draft, max_batch=4, max_length=256, cuda_graphs=True)
    eager = BatchedStaticEngine(target, draft, max_batch=4, max_length=256, cuda_graphs=False)
    for tree in TREES.values():
        replayed = dict(generate_batched(graphs, [BatchRequest(p, c, tree=tree) for p, c in zip(prompts, configs)], 4))
        direct = dict(generate_batched(eager, [BatchRequest(p, c, tree=tree) for p, c in zip(prompts, configs)], 4))
        for index in range(N_REQUESTS):
            assert replayed[index].token_ids == direct[index].token_ids, f"request {index}"
            assert replayed[index].stats.accepted == direct[index].stats.accepted
    target_graphs = graphs.static_target
    assert len(target_graphs._graphed_next_rows) > 0 and len(target_graphs._graphed_rows) > 0
    assert len(target_graphs._graphed_listed) > 0  # the last rows, spread over the cache, verified over their list


def test_a_cache_the_device_cannot_hold_is_refused(monkeypatch):
    """7B's shape (32 layers, 32 kv heads of 128) in float16: 0.5 MiB a slot, so 64 rows x 4096 slots = 128 GiB."""
    from types import SimpleNamespace

    from lmms_msd.speculative.fast.batched_target import check_cache_fits

    text = SimpleNamespace(num_hidden_layers=32, num_key_value_heads=32, head_dim=128, hidden_size=4096, num_attention_heads=32)
    target = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float16, model=SimpleNamespace(config=SimpleNamespace(text_config=text)))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (100 * 2**30, 141 * 2**30))
    check_cache_fits(target, 64, 1024)  # 32 GiB
    with pytest.raises(ValueError, match=r"64 rows x 4096 slots needs 128.0 GiB \(2.00 GiB a row\) but 100.0 GiB"):
        check_cache_fits(target, 64, 4096)


def test_prompts_joining_together_share_a_prefill_forward():
    """Prompts of different lengths prefilled in one forward (padded to the longest) leave in each row the
    keys and values, hidden states and last logits that prefilling each alone gives (float32; the padded
    product sums the same terms, so only the order of a few roundings may differ), whatever earlier
    sequences left in the rows' slots (the padded queries of a shorter prompt see them; its own do not)."""
    from lmms_msd.speculative.fast.batched_engine import prefill_groups

    target, _ = pair("following")
    prompts = [random_prompt(target, 300 + i, with_image=i != 1) for i in range(3)]
    assert len({p.input_ids.shape[0] for p in prompts}) == 3  # ragged
    alone = BatchedStaticEngine(target, max_batch=3, max_length=128)
    together = BatchedStaticEngine(target, max_batch=3, max_length=128)
    g = torch.Generator().manual_seed(3)
    for cache in (together.static_target.keys, together.static_target.values):  # what earlier sequences left
        cache.copy_(torch.randn(cache.shape, generator=g) * 10)
    calls = []
    real = together.static_target.prefill_rows
    together.static_target.prefill_rows = lambda rows, embeds: calls.append(rows) or real(rows, embeds)
    started = together.prefill_batch(prompts, [8, 8, 8])
    assert calls == [[0, 1, 2]]  # one forward
    for prompt, (sequence, hidden, last) in zip(prompts, started):
        reference, ref_hidden, ref_logits = alone.prefill(prompt, 8)
        n = prompt.input_ids.shape[0]
        assert sequence.row == reference.row and sequence.committed == reference.committed == n
        torch.testing.assert_close(hidden, ref_hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(last, ref_logits[-1], rtol=1e-5, atol=1e-4)
        for cache, ref in ((together.static_target.keys, alone.static_target.keys),
                           (together.static_target.values, alone.static_target.values)):  # fmt: skip
            torch.testing.assert_close(cache[:, sequence.row, :, :n], ref[:, sequence.row, :, :n], rtol=1e-5, atol=1e-5)
    assert prefill_groups([600, 620, 610, 3000], 2048) == [[0, 1, 2], [3]]
    assert prefill_groups([5, 5], 9) == [[0], [1]]


def test_a_prompt_that_cannot_join_is_named_and_nothing_starts():
    target, draft = pair("following")
    engine = BatchedStaticEngine(target, draft, max_batch=3, max_length=64)
    prompts = [random_prompt(target, 400 + i, with_image=False) for i in range(3)]
    config = GenerationConfig(max_new_tokens=8)
    too_long = GenerationConfig(max_new_tokens=64)
    requests = [BatchRequest(prompts[0], config, name="doc 7"), BatchRequest(prompts[1], too_long, name="doc 8"),
                BatchRequest(prompts[2], config, name="doc 9")]  # fmt: skip
    with pytest.raises(ValueError, match=r"^doc 8: .*cache slots"):
        list(generate_batched(engine, requests, 3))
    assert sorted(engine._free) == [0, 1, 2]


def test_batched_wall_times_are_shares_of_the_loop():
    """A request's wall_s under batching is its share of the loop's time (its prefill's, and each step's
    divided among the rows in flight), so the shares add up to at most the loop's time."""
    import time

    target, draft = pair("following")
    configs = greedy_configs()
    prompts = mixed_requests(target, configs)
    engine = BatchedStaticEngine(target, draft, max_batch=4, max_length=256)
    requests = [BatchRequest(p, c, tree=TREES["eagle2"]) for p, c in zip(prompts, configs)]
    start = time.perf_counter()
    results = dict(generate_batched(engine, requests, 4))
    elapsed = time.perf_counter() - start
    shares = [r.stats.wall_s for r in results.values()]
    assert all(0 < r.stats.prefill_s <= r.stats.wall_s for r in results.values())  # equal when a request stops at its first token
    assert sum(shares) <= elapsed
