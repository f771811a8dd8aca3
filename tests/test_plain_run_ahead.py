"""Plain decoding queues each forward before it reads the token that forward is fed (`plain_generate`).

The claims: the tokens are those of the loop that reads every token before the next forward (written out
here, `one_at_a_time`), greedy and sampled with the same generator; every read after the first has the
next forward queued ahead of it, except the read of the last token the budget allows; a stop by EOS
or a stop string leaves exactly one forward past it, a stop by the budget none (so the cache never
needs a slot past the prompt and `max_new_tokens`).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from decoding_fixtures import CharTokenizer, random_prompt, tiny_target

import lmms_msd.speculative.decoding as decoding
from lmms_msd.speculative.decoding import plain_generate
from lmms_msd.speculative.runtime import EagerRuntime
from lmms_msd.speculative.sampling import GenerationConfig, next_token
from lmms_msd.speculative.stopping import Stopper


def one_at_a_time(target, prompt, config, generator):
    """The reference: prefill, then read each token and check the stop before the next forward."""
    runtime = EagerRuntime(target)
    stopper = Stopper(target.tokenizer, target.eos_token_id, config.max_new_tokens, config.until)
    sequence, _, logits = runtime.prefill(prompt, config.max_new_tokens)
    tokens = [next_token(logits[-1], config, generator)]
    while stopper.first_stop(tokens, len(tokens) - 1) is None:
        logits = runtime.forward_next(sequence, torch.full((1,), tokens[-1]))
        tokens.append(next_token(logits[-1], config, generator))
    return tokens


class Recorded(EagerRuntime):
    """An `EagerRuntime` that logs its forwards into `events`."""

    def __init__(self, target, events):
        super().__init__(target)
        self.events = events

    def forward_next(self, sequence, token):
        self.events.append("forward")
        return super().forward_next(sequence, token)


@pytest.fixture
def events(monkeypatch):
    """The loop's forwards and reads in the order it made them."""
    log: list[str] = []

    class LoggedRead(decoding.PendingRead):
        def get(self):
            log.append("read")
            return super().get()

    monkeypatch.setattr(decoding, "PendingRead", LoggedRead)
    return log


def with_eos(target, eos):
    return dataclasses.replace(target, tokenizer=CharTokenizer(target.tokenizer.vocab_size, eos))


@pytest.mark.parametrize("sampled", [False, True])
def test_tokens_are_the_one_at_a_time_loops(sampled, events):
    target = tiny_target(3)
    for i in range(6):
        prompt = random_prompt(target, 70 + i, with_image=i % 2 == 0)
        config = GenerationConfig(max_new_tokens=5 + 4 * i, do_sample=sampled, temperature=0.9 if sampled else 1.0, top_k=20 if sampled else 0)
        seed = torch.Generator().manual_seed(i) if sampled else None
        want = one_at_a_time(target, prompt, config, seed)
        got = plain_generate(Recorded(target, events), prompt, config, torch.Generator().manual_seed(i) if sampled else None)
        assert got.token_ids == want
        assert got.stats.steps == len(want) - 1


def test_each_read_has_the_next_forward_queued_ahead_and_the_budget_stops_without_one(events):
    target = with_eos(tiny_target(4), 10_000)  # never generated: the budget decides
    prompt = random_prompt(target, 5)
    result = plain_generate(Recorded(target, events), prompt, GenerationConfig(max_new_tokens=6))
    assert len(result.token_ids) == 6
    # the first token is read after the prefill; forward k (feeding token k) is queued before token k is read,
    # token 5 (the budget's last) is read with none queued after it
    assert events == ["read", "forward"] + ["forward", "read"] * 4 + ["read"]


def test_a_stop_leaves_one_forward_past_it(events):
    target = tiny_target(5)
    prompt = random_prompt(target, 6)
    free = plain_generate(EagerRuntime(with_eos(target, 10_000)), prompt, GenerationConfig(max_new_tokens=30))
    j = next(j for j in range(3, 30) if free.token_ids[j] not in free.token_ids[:j])
    stopped = plain_generate(Recorded(with_eos(target, free.token_ids[j]), events), prompt, GenerationConfig(max_new_tokens=30))
    assert stopped.token_ids == free.token_ids[: j + 1]
    assert events.count("forward") == stopped.stats.steps + 1 == j + 1
    text = free.text
    k = next(k for k in range(3, len(text) - 2) if text[k : k + 2] not in text[: k + 1])
    events.clear()
    until = plain_generate(Recorded(with_eos(target, 10_000), events), prompt, GenerationConfig(max_new_tokens=30, until=(text[k : k + 2],)))
    assert until.text == text[:k]
    assert events.count("forward") == until.stats.steps + 1
