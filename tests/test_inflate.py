"""Inflation (DESIGN 4.5): the bundled miniature pair embedded into a bigger shape computes the same function.

The shape's width ratio is 4 (256 -> 1024), a power of four like 7B's 16, so in fp32 on CPU the
target's logits must agree bit for bit. The draft's fc sums its two input halves in a different order
once they lie H apart (about 1e-6 here); decoding, greedy and speculative, must still agree token for
token and step for step.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lmms_msd.decoding import plain_generate, speculative_generate
from lmms_msd.draft import load_draft
from lmms_msd.sampling import GenerationConfig
from lmms_msd.testbed.bundled import bundled_paths
from lmms_msd.testbed.charts import (
    LONG_INSTRUCTION,
    SHORT_INSTRUCTION,
    draw_chart,
    make_qa,
    random_chart,
)
from lmms_msd.testbed.inflate import TextShape, inflate_pair, inflate_target
from lmms_msd.tree import EagleTree

SHAPE = TextShape(hidden_size=1024, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, intermediate_size=2048)


@pytest.fixture(scope="module")
def pairs():
    """(small target, small draft), (inflated target, inflated draft), fp32 on CPU."""
    from lmms_msd.target_loading import load_target

    target_dir, draft_dir = bundled_paths()
    target, draft = load_target(str(target_dir)), load_draft(str(draft_dir))
    return (target, draft), inflate_pair(target, draft, SHAPE)


def chart_question(seed: int, question_type: str, instruction: str) -> tuple[str, list[Image.Image]]:
    rng = np.random.default_rng(seed)
    chart = random_chart(rng)
    image = Image.open(io.BytesIO(draw_chart(chart, image_size=128))).convert("RGB")
    return make_qa(chart, question_type, rng).question + instruction, [image]


QUESTIONS = [
    chart_question(0, "value", LONG_INSTRUCTION),
    chart_question(1, "largest", SHORT_INSTRUCTION),
    chart_question(2, "compare", LONG_INSTRUCTION),
    ("What type of chart is this?" + SHORT_INSTRUCTION, []),  # text only
]


def test_inflated_config_and_buffers(pairs):
    (target, draft), (big_target, big_draft) = pairs
    text = big_target.model.config.text_config
    sizes = (big_target.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size)
    assert sizes == (1024, 6, 8, 2048)
    assert text.head_dim == 128 and text.rms_norm_eps == target.model.config.text_config.rms_norm_eps / 4
    assert big_target.vocab_size == target.vocab_size and big_draft.config.hidden_size == 1024
    small_rope, big_rope = target.model.model.language_model.rotary_emb, big_target.model.model.language_model.rotary_emb
    assert torch.equal(big_rope.inv_freq, small_rope.inv_freq)
    assert torch.equal(big_rope.original_inv_freq, small_rope.original_inv_freq)
    assert torch.equal(big_draft.layers[0].self_attn.inv_freq, draft.layers[0].self_attn.inv_freq)


def test_logits_and_hidden_states_are_the_miniatures(pairs):
    (target, _), (big_target, _) = pairs
    h = target.hidden_size
    worst = 0.0
    for question, images in QUESTIONS[:3]:
        prompt, big_prompt = target.prepare(question, images), big_target.prepare(question, images)
        assert torch.equal(big_prompt.inputs_embeds[..., :h], prompt.inputs_embeds)  # projector output zero-padded
        assert not big_prompt.inputs_embeds[..., h:].any()
        positions = torch.arange(prompt.input_ids.shape[0])
        hidden, logits = target.forward(prompt.inputs_embeds, target.new_cache(), positions)
        big_hidden, big_logits = big_target.forward(big_prompt.inputs_embeds, big_target.new_cache(), positions)
        worst = max(worst, (big_logits - logits).abs().max().item())
        assert torch.equal(big_hidden[:, :h], hidden) and not big_hidden[:, h:].any()
    assert worst == 0.0, f"max abs logit difference {worst} (width ratio 4 is exact in fp32 on CPU)"


def test_non_power_of_four_ratio_is_within_float_tolerance(pairs):
    (target, _), _ = pairs
    shape = TextShape(hidden_size=512, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=4, intermediate_size=1376)
    big_target = inflate_target(target, shape)
    question, images = QUESTIONS[0]
    prompt, big_prompt = target.prepare(question, images), big_target.prepare(question, images)
    positions = torch.arange(prompt.input_ids.shape[0])
    _, logits = target.forward(prompt.inputs_embeds, target.new_cache(), positions)
    _, big_logits = big_target.forward(big_prompt.inputs_embeds, big_target.new_cache(), positions)
    assert (big_logits - logits).abs().max().item() < 1e-4


def test_draft_outputs_are_the_miniatures(pairs):
    (target, draft), (big_target, big_draft) = pairs
    h, big_h = target.hidden_size, big_target.hidden_size
    question, images = QUESTIONS[0]
    prompt = target.prepare(question, images)
    length = prompt.input_ids.shape[0]
    positions = torch.arange(length)
    features, _ = target.forward(prompt.inputs_embeds, target.new_cache(), positions)  # [L, h]
    next_ids = torch.cat([prompt.input_ids[1:], prompt.input_ids[:1]])  # x_{t+1} (the last one arbitrary)
    with torch.inference_mode():
        fused = draft.fuse(draft.embed_tokens(next_ids)[None], features[None])
        big_features = torch.nn.functional.pad(features, (0, big_h - h))
        big_fused = big_draft.fuse(big_draft.embed_tokens(next_ids)[None], big_features[None])
        fused_diff = (big_fused[..., :h] - fused).abs().max().item()
        assert fused_diff < 1e-5 and not big_fused[..., h:].any()
        image = prompt.image_mask[None, :, None]
        x = torch.where(image, prompt.inputs_embeds, fused)
        big_x = torch.where(image, torch.nn.functional.pad(prompt.inputs_embeds, (0, big_h - h)), big_fused)
        visible = torch.ones(length, length, dtype=torch.bool).tril()
        out = draft(x, positions, draft.new_cache(length), positions, visible)
        big_out = big_draft(big_x, positions, big_draft.new_cache(length), positions, visible)
    out_diff = (big_out[..., :h] - out).abs().max().item()
    assert out_diff < 1e-4 and not big_out[..., h:].any()


@pytest.mark.parametrize("question, images", QUESTIONS[1:])
def test_greedy_decoding_is_the_miniatures(pairs, question, images):
    (target, _), (big_target, _) = pairs
    config = GenerationConfig(max_new_tokens=40)
    small = plain_generate(target, target.prepare(question, images), config)
    big = plain_generate(big_target, big_target.prepare(question, images), config)
    assert big.token_ids == small.token_ids


@pytest.mark.parametrize("question, images", QUESTIONS[0:3:2])  # the long answers
def test_speculative_decoding_accepts_what_the_miniature_accepts(pairs, question, images):
    (target, draft), (big_target, big_draft) = pairs
    config = GenerationConfig(max_new_tokens=60)
    tree = EagleTree(total_tokens=30, depth=5, top_k=6)
    small = speculative_generate(target, draft, target.prepare(question, images), config, tree)
    big = speculative_generate(big_target, big_draft, big_target.prepare(question, images), config, tree)
    assert big.token_ids == small.token_ids
    assert big.stats.accepted == small.stats.accepted and sum(small.stats.accepted) > 0


def test_dtype_and_buffers_follow_loading_conventions(pairs):
    """Weights in the asked dtype; RoPE inv_freq kept in float32 in the target (as transformers loads
    it) and cast with the draft (as load_draft casts it)."""
    (target, draft), _ = pairs
    shape = TextShape(hidden_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, intermediate_size=1024)
    big_target, big_draft = inflate_pair(target, draft, shape, dtype=torch.bfloat16)
    assert big_target.dtype == torch.bfloat16 and big_draft.fc.weight.dtype == torch.bfloat16
    assert big_target.model.model.language_model.rotary_emb.inv_freq.dtype == torch.float32
    assert big_draft.layers[0].self_attn.inv_freq.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "shape, message",
    [
        (TextShape(128, 6, 1, 1, 2048), "hidden_size 128 < 256"),
        (TextShape(1024, 6, 8, 8, 512), "intermediate_size 512 < 1024"),
        (TextShape(1024, 6, 4, 4, 2048), "head_dim is 128"),
        (TextShape(1024, 6, 8, 4, 2048), "2 query heads per key/value head"),
        (TextShape(1024, 3, 8, 8, 2048), "to 3 layers: it has 4"),
    ],
)
def test_bad_shapes_name_the_sizes(pairs, shape, message):
    (target, draft), _ = pairs
    with pytest.raises(ValueError, match=message):
        inflate_pair(target, draft, shape)

