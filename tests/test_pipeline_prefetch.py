"""`lmms_msd.pipeline.decode_requests` with the requests' CPU stage run ahead (`prefetch`,
`lmms_msd.prefetch.Prefetcher`): the same tokens as without, loads on another thread in decoding order and
at most `prefetch` ahead, a failing load named at its request's turn, and no wait for a load on the way out.

The thread tests synchronise on events, never on time: a request's device stage waits until the load
that must run ahead of it has started (a guard of 30 s turns a missing load into a failure, not a hang).
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import random_image

from lmms_msd import pipeline
from lmms_msd.pipeline import (
    Request,
    RuntimeSettings,
    TreeSettings,
    build_decoder,
    build_tree,
    decode_requests,
    online_calibration,
)
from lmms_msd.prefetch import THREAD_NAME, Prefetcher
from lmms_msd.speculative.sampling import GenerationConfig

GUARD_S = 30  # how long a wait for what must happen may take before the test fails


@pytest.fixture(scope="module")
def eager(tiny_pair):
    return build_decoder(tiny_pair, RuntimeSettings())


@pytest.fixture(scope="module")
def questions():
    return [("What is shown" + " in the chart" * (i % 3) + "?", [random_image(40 + 3 * i, 30, seed=i)]) for i in range(5)]


def greedy(i: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=4 + 2 * i)


def sampled(i: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=4 + 2 * i, do_sample=True, temperature=1.0 if i % 2 else 0.7)


def one_stage(target, questions, config_of) -> list[Request]:
    """The requests as the commands build them: `Target.prepare` at each turn."""
    return [Request(f"request {i}", lambda q=q, i=i: (target.prepare(*q), config_of(i)), seed=i) for i, q in enumerate(questions)]


def two_stage(target, questions, config_of, prompts: list | None = None) -> list[Request]:
    """The requests as the plugin builds them: `Target.preprocess` may run ahead, `Target.embed_inputs` at the turn."""

    def prepare(i, inputs):
        prompt = target.embed_inputs(inputs)
        if prompts is not None:
            prompts.append(prompt)
        return prompt, config_of(i)

    return [Request(f"request {i}", lambda inputs, i=i: prepare(i, inputs), seed=i, load=lambda q=q: target.preprocess(*q))
            for i, q in enumerate(questions)]  # fmt: skip


# ---- the same tokens ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tree_kind", [None, "eagle2"])
@pytest.mark.parametrize("max_batch", [1, 3])
@pytest.mark.parametrize("config_of", [greedy, sampled])
def test_prefetching_gives_the_same_tokens(eager, questions, tree_kind, max_batch, config_of):
    tree = None if tree_kind is None else build_tree(TreeSettings(tree_kind, total_tokens=8, depth=2, top_k=3), eager)
    expected = [r.token_ids for r in decode_requests(eager, one_stage(eager.target, questions, config_of), tree, progress=False)]
    for prefetch in (0, 2, 5):
        requests = two_stage(eager.target, questions, config_of)
        results = decode_requests(eager, requests, tree, max_batch=max_batch, prefetch=prefetch, progress=False)
        assert [r.token_ids for r in results] == expected, f"prefetch={prefetch}"


def assert_same_prompt(prompt, direct) -> None:
    assert torch.equal(prompt.input_ids, direct.input_ids) and torch.equal(prompt.image_mask, direct.image_mask)
    assert torch.equal(prompt.inputs_embeds, direct.inputs_embeds)


def test_a_prefetched_prompt_is_the_prepared_one_bit_for_bit(eager, questions):
    prompts: list = []
    decode_requests(eager, two_stage(eager.target, questions, greedy, prompts), None, prefetch=3, progress=False)
    for (question, images), prompt in zip(questions, prompts, strict=True):
        assert_same_prompt(prompt, eager.target.prepare(question, images))


def test_the_original_layouts_preprocessing_on_the_worker_is_the_same(tiny_original_target, questions):
    """The original layout's PIL image processor and padding to a square, run on the prefetch thread."""
    target = tiny_original_target
    with Prefetcher([lambda q=q: target.preprocess(*q) for q in questions], range(len(questions)), ahead=2) as loads:
        for i, (question, images) in enumerate(questions):
            assert_same_prompt(target.embed_inputs(loads.take(i)), target.prepare(question, images))


# ---- ahead, on another thread, bounded ------------------------------------------------------------------------
class Recorder:
    """Fake two-stage requests over ready prompts: each load notes its thread and order; each device stage
    notes its thread and checks, while it runs, that the load `ahead` places later in `order` has started
    and the one after it has not."""

    def __init__(self, prompts, order: list[int], ahead: int) -> None:
        self.prompts, self.order, self.ahead = prompts, order, ahead
        self.started = {i: threading.Event() for i in order}
        self.loaded: list[tuple[int, str]] = []  # (index, thread name), in the order the loads ran
        self.prepared: list[tuple[int, str]] = []

    def requests(self) -> list[Request]:
        return [Request(f"request {i}", lambda inputs, i=i: self.prepare(i, inputs), seed=i, load=lambda i=i: self.load(i))
                for i in range(len(self.prompts))]  # fmt: skip

    def load(self, index: int) -> int:
        self.loaded.append((index, threading.current_thread().name))
        self.started[index].set()
        return index

    def prepare(self, index: int, loaded: int):
        assert loaded == index
        self.prepared.append((index, threading.current_thread().name))
        position = self.order.index(index)
        if position + self.ahead < len(self.order):  # the load `ahead` places on runs while this request prepares
            assert self.started[self.order[position + self.ahead]].wait(GUARD_S)
        if position + self.ahead + 1 < len(self.order):  # and no further one was given
            assert not self.started[self.order[position + self.ahead + 1]].is_set()
        return self.prompts[index], greedy(0)


@pytest.mark.parametrize("max_batch", [1, 3])
@pytest.mark.parametrize("ahead", [1, 2])
def test_loads_run_ahead_on_another_thread_at_most_prefetch_ahead(eager, questions, max_batch, ahead):
    prompts = [eager.target.prepare(*q) for q in questions]
    recorder = Recorder(prompts, list(range(len(prompts))), ahead)
    results = decode_requests(eager, recorder.requests(), None, max_batch=max_batch, prefetch=ahead, progress=False)
    assert len(results) == len(prompts)
    main = threading.current_thread().name
    assert [i for i, _ in recorder.loaded] == [i for i, _ in recorder.prepared] == list(range(len(prompts)))
    assert all(name.startswith(THREAD_NAME) for _, name in recorder.loaded) and all(name == main for _, name in recorder.prepared)


def test_loads_follow_online_calibrations_order(eager, questions):
    prompts = [eager.target.prepare(*q) for q in questions]
    tree = build_tree(TreeSettings("opt", node_budget=8, top_k=3, max_depth=3), eager)
    online = online_calibration(len(prompts), 0.4, tree, eager.target, seed=0, label="hard", mode="weight", attention_bins=1,
                                min_group_size=3)  # fmt: skip
    assert online.order != sorted(online.order)  # a seeded shuffle, so the order is tested
    recorder = Recorder(prompts, online.order, ahead=2)
    decode_requests(eager, recorder.requests(), tree, online, max_batch=2, prefetch=2, progress=False)
    assert [i for i, _ in recorder.loaded] == [i for i, _ in recorder.prepared] == online.order


def test_prefetch_zero_loads_on_the_main_thread_at_the_turn(eager, questions):
    prompts = [eager.target.prepare(*q) for q in questions[:3]]
    recorder = Recorder(prompts, [0, 1, 2], ahead=0)
    decode_requests(eager, recorder.requests(), None, prefetch=0, progress=False)
    main = threading.current_thread().name
    assert recorder.loaded == recorder.prepared == [(0, main), (1, main), (2, main)]


def test_a_negative_prefetch_is_refused(eager):
    with pytest.raises(ValueError, match=r"prefetch must be at least 0 \(0: each request loads at its turn\), got -1"):
        decode_requests(eager, [], None, prefetch=-1, progress=False)


# ---- errors and leaving early ------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_batch", [1, 2])
def test_a_failing_load_is_named_at_its_turn(eager, questions, monkeypatch, max_batch):
    """Request 1's load fails while request 0 prepares (its device stage waits for the failure): request 0
    still prepares and decodes; the error comes at request 1's turn, named as a failing `prepare` is."""
    prompts = [eager.target.prepare(*q) for q in questions[:4]]
    failed, prepared, decoded = threading.Event(), [], []
    real_decode = pipeline.decode

    def recording_decode(*args, **kwargs):
        decoded.append(real_decode(*args, **kwargs))
        return decoded[-1]

    monkeypatch.setattr(pipeline, "decode", recording_decode)
    missing = ValueError("the image is missing")

    def load(i):
        if i == 1:
            failed.set()
            raise missing
        return i

    def prepare(i, loaded):
        if i == 0:
            assert failed.wait(GUARD_S)
        prepared.append(i)
        return prompts[loaded], greedy(0)

    requests = [Request("request 1 (doc 7)" if i == 1 else f"request {i}", lambda x, i=i: prepare(i, x), seed=i, load=lambda i=i: load(i))
                for i in range(4)]  # fmt: skip
    with pytest.raises(ValueError, match=r"^request 1 \(doc 7\): the image is missing$") as raised:
        decode_requests(eager, requests, None, max_batch=max_batch, prefetch=2, progress=False)
    assert raised.value.__cause__ is missing and prepared == [0]
    if max_batch == 1:  # the one-request loop decoded request 0 before request 1's turn
        assert len(decoded) == 1 and decoded[0].token_ids


@pytest.mark.parametrize("max_batch", [1, 2])
def test_leaving_early_does_not_wait_for_a_running_load(eager, questions, max_batch):
    """Request 1's device stage fails once the load of request 3 has started and blocks: decode_requests
    raises while that load still blocks (leaving waits for no load), the queued load of request 4 never
    runs, and the worker ends once request 3's load is let go."""
    prompts = [eager.target.prepare(*q) for q in questions]
    started = {i: threading.Event() for i in range(5)}
    release, finished = threading.Event(), threading.Event()

    def load(i):
        started[i].set()
        if i == 3:
            release.wait(GUARD_S)
            finished.set()
        return i

    def prepare(i, loaded):
        if i == 1:
            assert started[3].wait(GUARD_S)
            raise ValueError("the prompt is too long")
        return prompts[loaded], greedy(0)

    requests = [Request(f"request {i}", lambda x, i=i: prepare(i, x), seed=i, load=lambda i=i: load(i)) for i in range(5)]
    try:
        with pytest.raises(ValueError, match=r"^request 1: the prompt is too long$"):
            decode_requests(eager, requests, None, max_batch=max_batch, prefetch=3, progress=False)
        assert not finished.is_set()  # decode_requests did not wait for request 3's load
    finally:
        release.set()
    for thread in [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]:
        thread.join(GUARD_S)
        assert not thread.is_alive()
    assert finished.is_set() and not started[4].is_set()  # request 4's load was queued, then cancelled


def test_prefetcher_gives_none_without_a_load_and_refuses_a_turn_out_of_order():
    with Prefetcher([lambda: "a", None, lambda: "c"], order=[2, 1, 0], ahead=1) as loads:
        assert loads.take(2) == "c" and loads.take(1) is None
        with pytest.raises(AssertionError, match="request 2 taken out of turn: the next in order is 0"):
            loads.take(2)
        assert loads.take(0) == "a"
