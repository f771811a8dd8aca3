"""Speculative greedy decoding equals plain greedy decoding token for token (DESIGN 6).

20 prompts x 3 tiny-target seeds x {a draft that follows the target, a random draft}; for every
prompt the stop lands by the token budget, by EOS and by a stop string, chosen from the plain output
so that they fall inside accepted paths.
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

from lmms_msd.speculative.decoding import (
    DecodeStats,
    plain_generate,
    speculative_generate,
)
from lmms_msd.speculative.runtime import EagerRuntime
from lmms_msd.speculative.sampling import GenerationConfig
from lmms_msd.speculative.tree import EagleTree, OptTree

N_PROMPTS = 20


def committed_beyond_output(stats: DecodeStats) -> bool:
    """True when the last step verified tokens past the stop, i.e. the stop fell inside a path."""
    assert 1 + sum(a + 1 for a in stats.accepted) == stats.new_tokens, "tau must count committed tokens only"
    return stats.discarded > 0


def with_eos(target, eos_token_id):
    return dataclasses.replace(target, tokenizer=CharTokenizer(target.tokenizer.vocab_size, eos_token_id))


def check_equal(target, draft, prompt, config):
    plain = plain_generate(EagerRuntime(target), prompt, config)
    spec = speculative_generate(EagerRuntime(target, draft), prompt, config, EagleTree())
    assert spec.token_ids == plain.token_ids
    assert spec.text == plain.text
    return plain, spec


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("draft_kind", ["following", "random"])
def test_speculative_greedy_equals_plain(seed, draft_kind):
    # The following draft needs a target whose next token depends mostly on the current one.
    target = tiny_target(seed, context_scale=0.05 if draft_kind == "following" else 1.0)
    draft = following_draft(target) if draft_kind == "following" else random_draft(target, seed + 100)
    g = torch.Generator().manual_seed(seed)
    mid_path = {"max_new_tokens": 0, "eos": 0, "until": 0}
    taus = []
    for i in range(N_PROMPTS):
        prompt = random_prompt(target, seed * 1000 + i, with_image=i % 2 == 0)
        budget = int(torch.randint(7, 40, (1,), generator=g))
        no_eos = with_eos(target, eos_token_id=10_000)  # never generated: the budget decides
        plain, spec = check_equal(no_eos, draft, prompt, GenerationConfig(max_new_tokens=budget))
        assert len(plain.token_ids) == budget
        mid_path["max_new_tokens"] += committed_beyond_output(spec.stats)
        taus.append(spec.stats.tau)

        # EOS: a token of the plain output, at its first occurrence past the first few tokens.
        j = next((j for j in range(3, budget) if plain.token_ids[j] not in plain.token_ids[:j]), None)
        if j is not None:
            eos = plain.token_ids[j]
            _, spec = check_equal(with_eos(target, eos), draft, prompt, GenerationConfig(max_new_tokens=budget))
            assert spec.token_ids[-1] == eos and len(spec.token_ids) == j + 1
            mid_path["eos"] += committed_beyond_output(spec.stats)

        # A stop string: two characters of the plain text, first seen past its start.
        text = plain.text
        k = next((k for k in range(3, len(text) - 2) if text[k : k + 2] not in text[: k + 1]), None)
        if k is not None:
            stop = text[k : k + 2]
            plain_stop, spec = check_equal(no_eos, draft, prompt, GenerationConfig(max_new_tokens=budget, until=(stop,)))
            assert plain_stop.text == text[:k] and stop not in spec.text
            mid_path["until"] += committed_beyond_output(spec.stats)
    if draft_kind == "following":
        assert sum(taus) / len(taus) >= 3.0, f"mean tau {sum(taus) / len(taus):.2f}: the tree did not accept deep paths"
        assert all(n > 0 for n in mid_path.values()), f"no stop fell inside an accepted path for some kind: {mid_path}"


def test_prompt_longer_than_max_length_is_refused():
    target = tiny_target(0)
    ids = torch.zeros(target.max_length + 1, dtype=torch.long)
    prompt = target.embed(ids, None)
    with pytest.raises(ValueError, match="maximum length is 512"):
        plain_generate(EagerRuntime(target), prompt, GenerationConfig())
    with pytest.raises(ValueError, match="maximum length"):
        speculative_generate(EagerRuntime(target, random_draft(target, 0)), prompt, GenerationConfig(), EagleTree())


def test_stats_add_up():
    target = tiny_target(0, context_scale=0.05)
    prompt = random_prompt(target, 5)
    config = GenerationConfig(max_new_tokens=30)
    spec = speculative_generate(EagerRuntime(with_eos(target, 10_000), following_draft(target)), prompt, config, EagleTree())
    stats = spec.stats
    assert stats.new_tokens == 30 and stats.steps == len(stats.accepted)
    assert stats.tau == pytest.approx(1 + sum(stats.accepted) / stats.steps)
    assert stats.alpha == pytest.approx(stats.tau - 1)
    assert 0 < stats.prefill_s < stats.wall_s
    row = stats.to_dict()
    assert row["tau"] == stats.tau and row["tokens_per_s"] > 0


# upstream's variant stores 5 nodes per level, not 25, and stops a level earlier: a lower stop_delta
# gives it trees deep enough for the tau check below
@pytest.mark.parametrize("variant, stop_delta", [("frontier", 0.3), ("upstream", 0.1)])
@pytest.mark.parametrize("draft_kind", ["following", "random"])
def test_opt_tree_greedy_equals_plain(draft_kind, variant, stop_delta):
    target = tiny_target(4, context_scale=0.05 if draft_kind == "following" else 1.0)
    target = with_eos(target, eos_token_id=10_000)
    draft = following_draft(target) if draft_kind == "following" else random_draft(target, 7)
    tree = OptTree(node_budget=30, stop_delta=stop_delta, max_depth=8, top_k=5, variant=variant)
    taus = []
    for i in range(10):
        prompt = random_prompt(target, 500 + i, with_image=i % 2 == 0)
        config = GenerationConfig(max_new_tokens=20 + i)
        plain = plain_generate(EagerRuntime(target), prompt, config)
        spec = speculative_generate(EagerRuntime(target, draft), prompt, config, tree)
        assert spec.token_ids == plain.token_ids
        taus.append(spec.stats.tau)
    if draft_kind == "following":
        assert sum(taus) / len(taus) >= 3.0


def test_eager_runtime_holds_two_sequences_at_once():
    """Each sequence owns its caches: two generations stepped in turn give each its own tokens."""
    target = with_eos(tiny_target(1), 10_000)
    runtime = EagerRuntime(target, random_draft(target, 0))
    prompts = [random_prompt(target, 21), random_prompt(target, 22, with_image=False)]
    config = GenerationConfig(max_new_tokens=9)
    want = [plain_generate(runtime, prompt, config).token_ids for prompt in prompts]
    running = []
    for prompt in prompts:
        sequence, hidden, logits = runtime.prefill(prompt, config.max_new_tokens)
        token = int(logits[-1].argmax())
        runtime.prefill_draft(sequence, prompt, hidden, token, track_visual=False)
        running.append((sequence, [token]))
    for _ in range(config.max_new_tokens - 1):
        for sequence, tokens in running:
            tokens.append(int(runtime.forward_next(sequence, torch.tensor([tokens[-1]]))[-1].argmax()))
    assert [tokens for _, tokens in running] == want
    assert running[0][0].drafter is not running[1][0].drafter
