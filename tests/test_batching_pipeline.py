"""`lmms_msd.pipeline.decode_requests` with many requests in flight (`max_batch`): the same answers, in
the requests' order, as one at a time; online calibration observes alone and batches the rest."""

from __future__ import annotations

import pytest
from conftest import random_image

from lmms_msd.pipeline import (
    Request,
    RuntimeSettings,
    TreeSettings,
    build_decoder,
    build_tree,
    decode_requests,
    online_calibration,
)
from lmms_msd.speculative.batching import NodeBudgets
from lmms_msd.speculative.sampling import GenerationConfig


@pytest.fixture(scope="module")
def decoders(tiny_pair):
    return build_decoder(tiny_pair, RuntimeSettings()), build_decoder(tiny_pair, RuntimeSettings("static"))


def requests(target, n: int, config_of) -> list[Request]:
    prompts = [target.prepare("What is shown" + " in the chart" * (i % 3) + "?", [random_image(40, 30, seed=i)]) for i in range(n)]
    return [Request(f"request {i}", lambda i=i: (prompts[i], config_of(i)), seed=i) for i in range(n)]


def greedy(i: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=4 + 3 * i)


def sampled(i: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=4 + 3 * i, do_sample=True, temperature=1.0 if i % 2 else 0.7)


@pytest.mark.parametrize("tree_kind", [None, "eagle2", "opt"])
@pytest.mark.parametrize("config_of", [greedy, sampled])
def test_batched_decode_requests_equals_one_at_a_time(decoders, tree_kind, config_of):
    eager, _ = decoders
    tree = None if tree_kind is None else build_tree(TreeSettings(tree_kind, node_budget=8, top_k=3, max_depth=3), eager)
    alone = decode_requests(eager, requests(eager.target, 5, config_of), tree, progress=False)
    batched = decode_requests(eager, requests(eager.target, 5, config_of), tree, max_batch=3, progress=False)
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    scheduled = decode_requests(eager, requests(eager.target, 5, greedy), tree, max_batch=3,
                                schedule=NodeBudgets.parse("1:8,2:0"), progress=False)  # fmt: skip
    if config_of is greedy:
        assert [r.token_ids for r in scheduled] == [r.token_ids for r in alone]


def test_online_calibration_observes_alone_then_batches(decoders):
    eager, _ = decoders
    tree = build_tree(TreeSettings("opt", node_budget=8, top_k=3, max_depth=3), eager)
    expected = [r.token_ids for r in decode_requests(eager, requests(eager.target, 6, greedy), tree, progress=False)]
    online = online_calibration(6, 0.5, tree, eager.target, seed=0, label="hard", mode="weight", attention_bins=1,
                                min_group_size=3)  # fmt: skip
    results = decode_requests(eager, requests(eager.target, 6, greedy), tree, online, max_batch=4, progress=False)
    assert [r.token_ids for r in results] == expected and online.finished == 6


def test_a_runtime_without_batches_is_refused(decoders):
    _, static = decoders  # the one-sequence StaticEngine (max_batch 1)
    with pytest.raises(ValueError, match="max_batch=2: this StaticEngine decodes one request at a time"):
        decode_requests(static, requests(static.target, 2, greedy), None, max_batch=2, progress=False)


def test_a_failing_request_is_named_in_a_batch(decoders):
    eager, _ = decoders
    good = requests(eager.target, 2, greedy)

    def broken():
        raise ValueError("the image is missing")

    with pytest.raises(ValueError, match=r"^request 1 \(doc 7\): the image is missing$"):
        decode_requests(eager, [good[0], Request("request 1 (doc 7)", broken, 1), good[1]], None, max_batch=2, progress=False)
