"""Inflation (DESIGN 4.5): the bundled miniature pair embedded into a bigger shape computes the same function.

The shape's width ratio is 4 (256 -> 1024), a power of four like 7B's 16, so every rescaling is exact
and the two pairs differ only in how their kernels round: a wider, zero-padded matrix can be summed in
another order (on some CPUs bit for bit the same, on others up to 7e-6 apart in the projector output).
Float results are compared within the bounds of `float_bounds` (stated at each comparison); decoding,
greedy and speculative, must agree token for token and step for step.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from float_bounds import chain_gap, linear_gap, unit_roundoff
from PIL import Image

from lmms_msd.models.draft import load_draft
from lmms_msd.speculative.decoding import plain_generate, speculative_generate
from lmms_msd.speculative.runtime import EagerRuntime
from lmms_msd.speculative.sampling import GenerationConfig
from lmms_msd.speculative.tree import EagleTree
from lmms_msd.testbed.bundled import bundled_paths
from lmms_msd.testbed.charts import (
    LONG_INSTRUCTION,
    SHORT_INSTRUCTION,
    draw_chart,
    make_qa,
    random_chart,
)
from lmms_msd.testbed.inflate import TextShape, inflate_pair, inflate_target

SHAPE = TextShape(hidden_size=1024, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, intermediate_size=2048)


@pytest.fixture(scope="module")
def pairs():
    """(small target, small draft), (inflated target, inflated draft), fp32 on CPU."""
    from lmms_msd.models.loading import load_target

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


GELU_LIPSCHITZ = 1.13  # max_z |d gelu(z) / dz| = 1.1289 (at z = 1.4): how much GELU can grow an input error
ELEMENTWISE_ULPS = 4  # a vectorised erf/exp is within a few units of roundoff of the exact value, per side


def projector_gap(target, image_features: torch.Tensor, big_hidden_size: int) -> torch.Tensor:
    """Element-wise bound on |big - small| for the projector output linear_2(gelu(linear_1(x))).

    image_features: [n, P, Hv] the vision tower's selected features (the same in both: the tower is not
    inflated); returns [n, P, h]. linear_1 sums Hv terms in both models; linear_2 sums h terms in the
    small one and the same h terms plus zeros in the big one (K = big_hidden_size counted, conservatively).
    """
    projector = target.model.model.multi_modal_projector
    w1, b1, w2, b2 = projector.linear_1.weight, projector.linear_1.bias, projector.linear_2.weight, projector.linear_2.bias
    with torch.inference_mode():
        g = torch.nn.functional.gelu(torch.nn.functional.linear(image_features, w1, b1))  # [n, P, h]
        gelu_gap = GELU_LIPSCHITZ * linear_gap(image_features, w1, b1) + 2 * ELEMENTWISE_ULPS * unit_roundoff(g.dtype) * g.abs()
        return gelu_gap @ w2.abs().T + linear_gap(g, w2, b2, k=big_hidden_size)


def text_reductions(target, length: int, with_lm_head: bool) -> list[int]:
    """The reductions on the longest path through the small text model over a `length`-token prompt, in
    order: the projector (Hv, h), then per layer RMSNorm (h), q/k/v (h), scores (head_dim), softmax sum and
    attention-weighted values (length each), o_proj (heads * head_dim), RMSNorm (h), gate/up (h), down
    (intermediate); then the final RMSNorm (h) and lm_head (h). The inflated model sums the same nonzero
    terms plus zeros (adding an exact zero rounds nothing), and its extra layers add exact zeros, so the
    small model's sizes bound both."""
    text, vision = target.model.config.text_config, target.model.config.vision_config
    h, head_dim = text.hidden_size, text.head_dim
    layer = [h, h, head_dim, length, length, text.num_attention_heads * head_dim, h, h, text.intermediate_size]
    return [vision.hidden_size, h] + layer * text.num_hidden_layers + [h] + ([h] if with_lm_head else [])


def test_logits_and_hidden_states_are_the_miniatures(pairs):
    (target, _), (big_target, _) = pairs
    h = target.hidden_size
    features = []
    hook = target.model.model.multi_modal_projector.register_forward_hook(lambda module, args, out: features.append(args[0]))
    try:
        for question, images in QUESTIONS[:3]:
            features.clear()
            prompt, big_prompt = target.prepare(question, images), big_target.prepare(question, images)
            # text positions are embedding rows, copied: exact; image positions within the projector's bound
            gap = torch.zeros_like(prompt.inputs_embeds)  # [1, L, h]
            gap[0, prompt.image_mask] = projector_gap(target, features[0], big_target.hidden_size).reshape(-1, h)
            assert ((big_prompt.inputs_embeds[..., :h] - prompt.inputs_embeds).abs() <= gap).all()
            assert not big_prompt.inputs_embeds[..., h:].any()  # zero rows and columns: exactly zero
            length = prompt.input_ids.shape[0]
            positions = torch.arange(length)
            hidden, logits = target.forward(prompt.inputs_embeds, target.new_cache(), positions)
            big_hidden, big_logits = big_target.forward(big_prompt.inputs_embeds, big_target.new_cache(), positions)
            hidden_bound = chain_gap(text_reductions(target, length, with_lm_head=False), hidden.abs().max().item(), torch.float32)
            logit_bound = chain_gap(text_reductions(target, length, with_lm_head=True), logits.abs().max().item(), torch.float32)
            assert (big_hidden[:, :h] - hidden).abs().max().item() <= hidden_bound
            assert not big_hidden[:, h:].any()
            assert (big_logits - logits).abs().max().item() <= logit_bound
    finally:
        hook.remove()


def test_float64_inflation_is_tight():
    """The worst-case float32 bounds above are loose (the projector's is ~2000x what is observed), so a
    small inflation bug (a norm eps rescaled wrongly: a relative error near 1e-6) could hide in them. In
    float64 the same bounds shrink by 2**29 (~1e-11 of the largest value here), far below any such bug,
    and they still hold on every CPU. Logits come back in float32: each side is rounded once more to
    float32 (at most one unit of roundoff of |logit| per side)."""
    from lmms_msd.models.loading import load_target

    target_dir, draft_dir = bundled_paths()
    target = load_target(str(target_dir), dtype=torch.float64)
    big_target, _ = inflate_pair(target, load_draft(str(draft_dir)).double(), SHAPE)
    h = target.hidden_size
    for question, images in QUESTIONS[:2]:
        prompt, big_prompt = target.prepare(question, images), big_target.prepare(question, images)
        assert prompt.inputs_embeds.dtype == torch.float64
        length = prompt.input_ids.shape[0]
        embed_bound = chain_gap([target.model.config.vision_config.hidden_size, h], prompt.inputs_embeds.abs().max().item(), torch.float64)
        assert (big_prompt.inputs_embeds[..., :h] - prompt.inputs_embeds).abs().max().item() <= embed_bound
        positions = torch.arange(length)
        hidden, logits = target.forward(prompt.inputs_embeds, target.new_cache(), positions)
        big_hidden, big_logits = big_target.forward(big_prompt.inputs_embeds, big_target.new_cache(), positions)
        hidden_bound = chain_gap(text_reductions(target, length, with_lm_head=False), hidden.abs().max().item(), torch.float64)
        assert (big_hidden[:, :h].double() - hidden.double()).abs().max().item() <= hidden_bound
        logit_bound = chain_gap(text_reductions(target, length, with_lm_head=True), logits.abs().max().item(), torch.float64)
        logit_bound += 2 * unit_roundoff(logits.dtype) * logits.abs().max().item()
        assert (big_logits.double() - logits.double()).abs().max().item() <= logit_bound


def test_non_power_of_four_ratio_is_within_float_tolerance(pairs):
    """Ratio 2: sqrt(h/H) is rounded once per RMSNorm weight (relative u), one more rounding per norm
    on the chain; the chain bound with an extra h per layer covers it."""
    (target, _), _ = pairs
    shape = TextShape(hidden_size=512, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=4, intermediate_size=1376)
    big_target = inflate_target(target, shape)
    question, images = QUESTIONS[0]
    prompt, big_prompt = target.prepare(question, images), big_target.prepare(question, images)
    length = prompt.input_ids.shape[0]
    positions = torch.arange(length)
    _, logits = target.forward(prompt.inputs_embeds, target.new_cache(), positions)
    _, big_logits = big_target.forward(big_prompt.inputs_embeds, big_target.new_cache(), positions)
    reductions = text_reductions(target, length, with_lm_head=True) + [target.hidden_size] * (2 * shape.num_hidden_layers + 1)
    assert (big_logits - logits).abs().max().item() <= chain_gap(reductions, logits.abs().max().item(), torch.float32)


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
        # fc sums the 2h terms of [embed; feature]; the big fc the same terms, zeros between them (2 * big_h)
        fused_gap = linear_gap(torch.cat([draft.embed_tokens(next_ids)[None], features[None]], dim=-1), draft.fc.weight, draft.fc.bias, k=2 * big_h)
        assert ((big_fused[..., :h] - fused).abs() <= fused_gap).all() and not big_fused[..., h:].any()
        image = prompt.image_mask[None, :, None]
        x = torch.where(image, prompt.inputs_embeds, fused)
        big_x = torch.where(image, torch.nn.functional.pad(prompt.inputs_embeds, (0, big_h - h)), big_fused)
        visible = torch.ones(length, length, dtype=torch.bool).tril()
        out = draft(x, positions, draft.new_cache(length), positions, visible)
        big_out = big_draft(big_x, positions, big_draft.new_cache(length), positions, visible)
    # the path: fc (2h), then the layer: q/k/v (h), scores (head_dim), softmax sum and values (length each),
    # o_proj (heads * head_dim), RMSNorm (h), gate/up (h), down (intermediate)
    c = draft.config
    reductions = [2 * h, h, c.resolved_head_dim, length, length, c.num_attention_heads * c.resolved_head_dim, h, h, c.intermediate_size]
    assert (big_out[..., :h] - out).abs().max().item() <= chain_gap(reductions, out.abs().max().item(), torch.float32)
    assert not big_out[..., h:].any()


@pytest.mark.parametrize("question, images", QUESTIONS[1:])
def test_greedy_decoding_is_the_miniatures(pairs, question, images):
    (target, _), (big_target, _) = pairs
    config = GenerationConfig(max_new_tokens=40)
    small = plain_generate(EagerRuntime(target), target.prepare(question, images), config)
    big = plain_generate(EagerRuntime(big_target), big_target.prepare(question, images), config)
    assert big.token_ids == small.token_ids


@pytest.mark.parametrize("question, images", QUESTIONS[0:3:2])  # the long answers
def test_speculative_decoding_accepts_what_the_miniature_accepts(pairs, question, images):
    (target, draft), (big_target, big_draft) = pairs
    config = GenerationConfig(max_new_tokens=60)
    tree = EagleTree(total_tokens=30, depth=5, top_k=6)
    small = speculative_generate(EagerRuntime(target, draft), target.prepare(question, images), config, tree)
    big = speculative_generate(EagerRuntime(big_target, big_draft), big_target.prepare(question, images), config, tree)
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

