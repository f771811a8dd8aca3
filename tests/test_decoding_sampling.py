"""Speculative sampling is lossless: the first two generated tokens follow the target's distribution.

A vocabulary-16 target, 20,000 seeded runs per setting (temperature 0.7 and 1.0 with top_p 0.9).
The exact joint distribution p(t1) p(t2 | t1) comes from the target's own logits. Each of the 256
cells must lie within z standard errors of it, z set by a Bonferroni bound over the cells so that a
correct sampler fails with probability below 1e-3; the same check must reject random reference
distributions, so it has the power to catch a wrong one. The last test runs the same check through the
batched loop, each test request in flight with other requests (rows must not leak into each other).
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from decoding_fixtures import following_draft, tiny_target

from lmms_msd.speculative.batching import BatchRequest, generate_batched
from lmms_msd.speculative.decoding import speculative_generate
from lmms_msd.speculative.runtime import EagerRuntime
from lmms_msd.speculative.sampling import GenerationConfig, processed_probs
from lmms_msd.speculative.tree import EagleTree

VOCAB = 16
RUNS = 20_000
FAMILY_ERROR = 1e-3


def z_bound(cells: int) -> float:
    """Two-sided normal quantile at FAMILY_ERROR / cells (Bonferroni)."""
    return statistics.NormalDist().inv_cdf(1 - FAMILY_ERROR / (2 * cells))


def exact_joint(target, prompt, config) -> torch.Tensor:
    """[V, V]: p(t1) * p(t2 | t1) from the target's own logits."""
    cache = target.new_cache()
    length = prompt.input_ids.shape[0]
    _, logits = target.forward(prompt.inputs_embeds, cache, torch.arange(length))
    p1 = processed_probs(logits[-1:], config)[0]
    joint = torch.zeros(VOCAB, VOCAB)
    for t1 in range(VOCAB):
        if p1[t1] == 0:
            continue
        c = target.new_cache()
        embeds = torch.cat([prompt.inputs_embeds, target.embed_tokens(torch.tensor([t1]))], dim=1)
        _, logits = target.forward(embeds, c, torch.arange(length + 1))
        joint[t1] = p1[t1] * processed_probs(logits[-1:], config)[0]
    return joint


def within_bounds(counts: torch.Tensor, reference: torch.Tensor) -> bool:
    n = counts.sum()
    freq = counts / n
    se = torch.sqrt(reference * (1 - reference) / n).clamp(min=1 / n)
    return bool(((freq - reference).abs() <= z_bound(reference.numel()) * se).all())


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_first_two_tokens_follow_the_target(temperature):
    # A draft that agrees often but not always, so both acceptance and rejection paths run.
    target = tiny_target(3, vocab_size=VOCAB, hidden=32, context_scale=0.3, eos_token_id=10_000)
    draft = following_draft(target)
    prompt = target.embed(torch.tensor([1, 2, 3, 4]), None)
    config = GenerationConfig(max_new_tokens=2, do_sample=True, temperature=temperature, top_p=0.9)
    tree = EagleTree(total_tokens=4, depth=1, top_k=2)  # small (nodes to depth 2), so 20,000 runs take about a minute
    generator = torch.Generator().manual_seed(int(temperature * 10))
    counts = torch.zeros(VOCAB, VOCAB)
    accepted = 0
    for _ in range(RUNS):
        verified = []  # the step's acceptance before the budget cut it (observers draw no randomness)
        result = speculative_generate(EagerRuntime(target, draft), prompt, config, tree, generator, lambda tree, logits, a: verified.append(a))
        t1, t2 = result.token_ids
        counts[t1, t2] += 1
        accepted += verified[0].accepted > 0
    reference = exact_joint(target, prompt, config)
    assert 0.1 < accepted / RUNS < 0.9, f"draft accepted in {accepted / RUNS:.0%} of runs: rejection or acceptance untested"
    assert reference.sum() == pytest.approx(1.0, abs=1e-5)
    assert (counts[reference == 0] == 0).all(), "a token outside top-p was generated"
    assert within_bounds(counts, reference)
    tv = 0.5 * (counts / RUNS - reference).abs().sum()
    assert tv < 3 * math.sqrt(reference.numel() / RUNS)
    # The same check rejects other distributions: it can fail.
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        wrong = torch.softmax(torch.randn(VOCAB * VOCAB, generator=g), 0).view(VOCAB, VOCAB)
        assert not within_bounds(counts, wrong)
    assert not within_bounds(counts, exact_joint(target, prompt, GenerationConfig(max_new_tokens=2, do_sample=True, temperature=temperature * 1.3, top_p=0.9)))


def test_first_two_tokens_follow_the_target_in_a_mixed_batch():
    """The same check through the batched loop: each test request shares its steps with others (other
    prompts, temperatures, top-k, a greedy one, longer answers), up to 8 rows verified in one padded
    forward, every request with its own generator. A row that read another row's logits, cache or
    draws would move the test request's distribution off the target's."""
    temperature = 1.0
    target = tiny_target(3, vocab_size=VOCAB, hidden=32, context_scale=0.3, eos_token_id=10_000)
    draft = following_draft(target)
    prompt = target.embed(torch.tensor([1, 2, 3, 4]), None)
    config = GenerationConfig(max_new_tokens=2, do_sample=True, temperature=temperature, top_p=0.9)
    tree = EagleTree(total_tokens=4, depth=1, top_k=2)
    others = [
        (target.embed(torch.tensor([5, 6]), None), GenerationConfig(max_new_tokens=5, do_sample=True, temperature=0.7, top_k=5)),
        (target.embed(torch.tensor([7, 1, 9]), None), GenerationConfig(max_new_tokens=3)),  # greedy
        (target.embed(torch.tensor([2, 2, 2, 8, 11]), None), GenerationConfig(max_new_tokens=4, do_sample=True, temperature=1.3)),
    ]
    requests, tested = [], []
    for i in range(RUNS):
        tested.append(len(requests))
        requests.append(BatchRequest(prompt, config, torch.Generator().manual_seed(50_000 + i), tree=tree))
        if i % 2 == 0:  # one other request for every two test requests
            other_prompt, other_config = others[(i // 2) % len(others)]
            generator = None if other_config.greedy else torch.Generator().manual_seed(90_000 + i)
            requests.append(BatchRequest(other_prompt, other_config, generator, tree=tree))
    results = dict(generate_batched(EagerRuntime(target, draft), requests, max_batch=8))
    counts = torch.zeros(VOCAB, VOCAB)
    for index in tested:
        t1, t2 = results[index].token_ids
        counts[t1, t2] += 1
    reference = exact_joint(target, prompt, config)
    assert (counts[reference == 0] == 0).all(), "a token outside top-p was generated"
    assert within_bounds(counts, reference)
    # the check can fail: the next temperature's distribution is rejected
    assert not within_bounds(counts, exact_joint(target, prompt, GenerationConfig(max_new_tokens=2, do_sample=True, temperature=1.3, top_p=0.9)))
