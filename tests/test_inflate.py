"""Inflation (DESIGN 4.5): the bundled miniature pair embedded into a bigger shape computes the same function,
and the miniature's shapes inflated to SEVEN_B have LLaVA-1.5-7B's parameter count.

The text shape's width ratio is 4 (the bundled width h -> 4h), a power of four like 256 -> 4096's 16, so
every rescaling is exact and the two pairs differ only in how their kernels round: a wider, zero-padded
matrix can be summed in another order (on some CPUs bit for bit the same, on others up to 7e-6 apart in
the projector output). The vision tower's copy repeats its widths twice (k = 2: the division by k is
exact) and adds two identity layers. Float results are compared within the bounds of `float_bounds`
(stated at each comparison); decoding, greedy and speculative, must agree token for token and step for step.
"""

from __future__ import annotations

import dataclasses
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
from lmms_msd.testbed.inflate import (
    SEVEN_B,
    TextShape,
    VisionShape,
    inflate_pair,
    inflate_target,
)


def bundled_config() -> dict:
    import json

    return json.loads((bundled_paths()[0] / "config.json").read_text())


TEXT = bundled_config()["text_config"]
VISION = bundled_config()["vision_config"]
H, LAYERS, HEADS, INTERMEDIATE = TEXT["hidden_size"], TEXT["num_hidden_layers"], TEXT["num_attention_heads"], TEXT["intermediate_size"]
# 4 times as wide, 2 more layers; head_dim 128 kept (hidden 4h holds 4h / 128 heads)
SHAPE = TextShape(
    hidden_size=4 * H, num_hidden_layers=LAYERS + 2, num_attention_heads=4 * H // 128, num_key_value_heads=4 * H // 128,
    intermediate_size=4 * INTERMEDIATE,
)
# the vision tower twice as wide (twice the heads: head_dim kept), 2 more layers
VISION_SHAPE = VisionShape(
    hidden_size=2 * VISION["hidden_size"], num_hidden_layers=VISION["num_hidden_layers"] + 2,
    num_attention_heads=2 * VISION["num_attention_heads"], intermediate_size=2 * VISION["intermediate_size"],
)


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
    assert sizes == (4 * H, LAYERS + 2, 4 * H // 128, 4 * INTERMEDIATE)
    assert text.head_dim == 128 and text.rms_norm_eps == target.model.config.text_config.rms_norm_eps / 4
    assert big_target.vocab_size == target.vocab_size and big_draft.config.hidden_size == 4 * H
    assert big_target.model.config.vision_config.to_dict() == target.model.config.vision_config.to_dict()  # no vision shape
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
    shape = TextShape(hidden_size=2 * H, num_hidden_layers=LAYERS + 1, num_attention_heads=2 * H // 128,
                      num_key_value_heads=2 * H // 128, intermediate_size=2 * INTERMEDIATE)  # fmt: skip
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


def test_draft_visual_attention_is_the_miniatures(pairs):
    """The calibrator's visual feature (each row's attention share on image slots) of the inflated head is
    the small head's: it averages the copied heads only (`DraftConfig.visual_heads`); the added zero heads
    attend uniformly and, averaged in, diluted it (the H200's calibrated trees differed from the CPU's)."""
    (target, draft), (big_target, big_draft) = pairs
    h, big_h = target.hidden_size, big_target.hidden_size
    assert big_draft.config.visual_heads == draft.config.num_attention_heads < big_draft.config.num_attention_heads
    question, images = QUESTIONS[0]
    prompt = target.prepare(question, images)
    length = prompt.input_ids.shape[0]
    positions = torch.arange(length)
    features, _ = target.forward(prompt.inputs_embeds, target.new_cache(), positions)
    next_ids = torch.cat([prompt.input_ids[1:], prompt.input_ids[:1]])
    visible = torch.ones(length, length, dtype=torch.bool).tril()
    with torch.inference_mode():
        x = draft.fuse(draft.embed_tokens(next_ids)[None], features[None])
        big_x = torch.nn.functional.pad(x, (0, big_h - h))  # the inflated fc's output on the padded inputs
        _, mass = draft.forward_with_visual(x, positions, draft.new_cache(length), positions, visible, prompt.image_mask)
        _, big_mass = big_draft.forward_with_visual(big_x, positions, big_draft.new_cache(length), positions, visible, prompt.image_mask)
    assert prompt.image_mask.any() and mass.max() > 0.1  # a real feature, not all zeros
    # input RMSNorm (h), q and k (h), scores (head_dim), softmax and the image sum (length each); shares are at most 1
    reductions = [h, h, draft.config.resolved_head_dim, length, length]
    assert (big_mass - mass).abs().max().item() <= chain_gap(reductions, 1.0, torch.float32)


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
    shape = TextShape(hidden_size=2 * H, num_hidden_layers=LAYERS, num_attention_heads=2 * H // 128,
                      num_key_value_heads=2 * H // 128, intermediate_size=INTERMEDIATE)  # fmt: skip
    big_target, big_draft = inflate_pair(target, draft, shape, dtype=torch.bfloat16)
    assert big_target.dtype == torch.bfloat16 and big_draft.fc.weight.dtype == torch.bfloat16
    assert big_target.model.model.language_model.rotary_emb.inv_freq.dtype == torch.float32
    assert big_draft.layers[0].self_attn.inv_freq.dtype == torch.bfloat16


WIDE = 4 * H // 128  # heads of SHAPE


@pytest.mark.parametrize(
    "shape, message",
    [
        (TextShape(H // 2, 6, 1, 1, 4 * INTERMEDIATE), f"hidden_size {H // 2} < {H}"),
        (TextShape(4 * H, 6, WIDE, WIDE, INTERMEDIATE // 2), f"intermediate_size {INTERMEDIATE // 2} < {INTERMEDIATE}"),
        (TextShape(4 * H, 6, WIDE // 2, WIDE // 2, 4 * INTERMEDIATE), "head_dim is 128"),
        (TextShape(4 * H, 6, WIDE, WIDE // 2, 4 * INTERMEDIATE), "2 query heads per key/value head"),
        (TextShape(4 * H, LAYERS - 1, WIDE, WIDE, 4 * INTERMEDIATE), f"to {LAYERS - 1} layers: it has {LAYERS}"),
        (
            TextShape(4 * H, LAYERS, WIDE, WIDE, 4 * INTERMEDIATE, vision=dataclasses.replace(VISION_SHAPE, num_attention_heads=VISION["num_attention_heads"])),
            f"num_attention_heads {VISION['num_attention_heads']} != 2 x {VISION['num_attention_heads']}",
        ),
        (
            TextShape(4 * H, LAYERS, WIDE, WIDE, 4 * INTERMEDIATE, vision=dataclasses.replace(VISION_SHAPE, hidden_size=VISION["hidden_size"] + 64)),
            "every width must be the same whole multiple k",
        ),
        (
            TextShape(4 * H, LAYERS, WIDE, WIDE, 4 * INTERMEDIATE, vision=dataclasses.replace(VISION_SHAPE, num_hidden_layers=1)),
            f"vision tower to 1 layers: it has {VISION['num_hidden_layers']}",
        ),
    ],
)
def test_bad_shapes_name_the_sizes(pairs, shape, message):
    (target, draft), _ = pairs
    with pytest.raises(ValueError, match=message):
        inflate_pair(target, draft, shape)



# ---- the vision tower ------------------------------------------------------------------------------------
def vision_reductions(target, vision: VisionShape) -> list[int]:
    """The reductions on the longest path through the inflated tower to the feature layer it reads (the
    second-to-last), in the big tower's sizes (k copies of each small term are summed): the patch
    convolution (3 x patch^2), pre-LayerNorm (mean and variance: D each), then per small layer but the
    last (the identity layers add exact zeros): LayerNorm (D, D), q/k/v (D), scores (head_dim), softmax
    sum and attention-weighted values (positions each), out_proj (D), LayerNorm (D, D), fc1 (D), fc2
    (intermediate)."""
    config = target.model.config.vision_config
    d, head_dim, positions = vision.hidden_size, config.hidden_size // config.num_attention_heads, (config.image_size // config.patch_size) ** 2 + 1
    layer = [d, d, d, head_dim, positions, positions, d, d, d, d, vision.intermediate_size]
    return [3 * config.patch_size**2, d, d] + layer * (config.num_hidden_layers - 1)


def test_vision_tower_copy_gives_the_miniatures_features_and_answers(pairs):
    """The tower repeated twice as wide with two identity layers: its second-to-last layer holds the small
    tower's features twice over, the projector turns them into the small one's image embeddings (zero
    padded), and the pair answers as the miniature does."""
    (target, draft), _ = pairs
    shape = dataclasses.replace(SHAPE, vision=VISION_SHAPE)
    big_target, big_draft = inflate_pair(target, draft, shape)
    vision = big_target.model.config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.intermediate_size) == (
        VISION_SHAPE.hidden_size, VISION_SHAPE.num_hidden_layers, VISION_SHAPE.num_attention_heads, VISION_SHAPE.intermediate_size,
    )
    d, h = VISION["hidden_size"], H
    question, images = QUESTIONS[0]
    pixels = target.image_processor(images[0])
    with torch.inference_mode():
        small = target.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]  # [1, P + 1, d]
        big = big_target.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]  # [1, P + 1, 2d]
    feature_bound = chain_gap(vision_reductions(target, VISION_SHAPE), small.abs().max().item(), torch.float32)
    assert (big[..., :d] - small).abs().max().item() <= feature_bound
    assert (big[..., d:] - small).abs().max().item() <= feature_bound  # the second copy
    prompt, big_prompt = target.prepare(question, images), big_target.prepare(question, images)
    image = prompt.image_mask
    embed_bound = chain_gap(vision_reductions(target, VISION_SHAPE) + [2 * d, h], prompt.inputs_embeds.abs().max().item(), torch.float32)
    assert (big_prompt.inputs_embeds[0, image, :h] - prompt.inputs_embeds[0, image]).abs().max().item() <= embed_bound
    assert not big_prompt.inputs_embeds[..., h:].any()
    config = GenerationConfig(max_new_tokens=40)
    assert plain_generate(EagerRuntime(big_target), big_prompt, config).token_ids == plain_generate(EagerRuntime(target), prompt, config).token_ids
    tree = EagleTree(total_tokens=30, depth=5, top_k=6)
    small_run = speculative_generate(EagerRuntime(target, draft), target.prepare(question, images), config, tree)
    big_run = speculative_generate(EagerRuntime(big_target, big_draft), big_target.prepare(question, images), config, tree)
    assert big_run.token_ids == small_run.token_ids and big_run.stats.accepted == small_run.stats.accepted


def test_float64_vision_copy_is_tight():
    """The float32 bounds above are loose (~1e4 x what is observed), so a small error in the copy (a
    LayerNorm eps or a divisor slightly off) could hide in them; in float64 they shrink by 2**29, far
    below any such error."""
    from lmms_msd.models.loading import load_target

    target = load_target(str(bundled_paths()[0]), dtype=torch.float64)
    big_target = inflate_target(target, dataclasses.replace(SHAPE, vision=VISION_SHAPE))
    pixels = target.image_processor(QUESTIONS[0][1][0]).double()
    with torch.inference_mode():
        small = target.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
        big = big_target.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
        features, big_features = target.image_features(pixels), big_target.image_features(pixels)
    d = VISION["hidden_size"]
    bound = chain_gap(vision_reductions(target, VISION_SHAPE), small.abs().max().item(), torch.float64)
    assert (big[..., :d] - small).abs().max().item() <= bound and (big[..., d:] - small).abs().max().item() <= bound
    bound = chain_gap(vision_reductions(target, VISION_SHAPE) + [2 * d, H], features.abs().max().item(), torch.float64)
    assert (big_features[..., :H] - features).abs().max().item() <= bound and not big_features[..., H:].any()


# ---- LLaVA-1.5-7B's parameter count ----------------------------------------------------------------------
def clip_vision_parameters(hidden: int, intermediate: int, layers: int, patch: int, image: int) -> int:
    """transformers' CLIPVisionModel: patch convolution (no bias), class embedding, one position per patch
    and the class token, pre- and post-LayerNorm; per layer q/k/v/out (with biases), two LayerNorms, fc1, fc2."""
    positions = (image // patch) ** 2 + 1
    embeddings = 3 * patch * patch * hidden + hidden + positions * hidden
    layer = 4 * (hidden * hidden + hidden) + 2 * 2 * hidden + (hidden * intermediate + intermediate) + (intermediate * hidden + hidden)
    return embeddings + 2 * 2 * hidden + layers * layer


def llama_parameters(hidden: int, intermediate: int, layers: int, vocab: int) -> int:
    """LlamaForCausalLM (untied): embeddings, per layer q/k/v/o, gate/up/down and two RMSNorms, the final
    norm, lm_head."""
    layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    return vocab * hidden + layers * layer + hidden + vocab * hidden


# The official configs' numbers: openai/clip-vit-large-patch14-336 (vision: hidden 1024, intermediate 4096,
# 24 layers, patch 14, image 336), LLaVA-1.5's mm_projector "mlp2x_gelu" (1024 -> 4096 -> 4096, with
# biases), lmsys/vicuna-7b-v1.5 (LLaMA-7B: hidden 4096, intermediate 11008, 32 layers, vocabulary 32000).
LLAVA_1_5_7B = (
    clip_vision_parameters(1024, 4096, 24, 14, 336) + (1024 * 4096 + 4096) + (4096 * 4096 + 4096) + llama_parameters(4096, 11008, 32, 32000)
)
# An MSD head for it (DESIGN 4.1): embed_tokens, fc (2H -> H, with bias), one LLaMA-7B layer without its input norm.
MSD_7B = 32000 * 4096 + (2 * 4096 * 4096 + 4096) + (4 * 4096 * 4096 + 3 * 4096 * 11008 + 4096)


def test_reference_counts():
    """303,507,456 (CLIP ViT-L/14-336) + 20,979,712 (projector) + 6,738,415,616 (Vicuna-7B)."""
    assert clip_vision_parameters(1024, 4096, 24, 14, 336) == 303_507_456
    assert llama_parameters(4096, 11008, 32, 32000) == 6_738_415_616
    assert LLAVA_1_5_7B == 7_062_902_784 and MSD_7B == 367_009_792


def test_miniature_shapes_inflate_to_llava_7b_parameter_count(tmp_path):
    """The default miniature (576 image positions, 32000 entries) and its draft, inflated to SEVEN_B on the
    meta device (no memory), have LLaVA-1.5-7B's parameter count and its MSD head's within 1% (exactly, in fact)."""
    from lmms_msd.models.target import Target
    from lmms_msd.testbed.draft_training import new_draft_for
    from lmms_msd.testbed.target_training import (
        PROMPT_FORMAT,
        TargetSizes,
        build_target_model,
        train_tokenizer,
    )
    from lmms_msd.testbed.tiny import CORPUS

    sizes = TargetSizes()
    tokenizer = train_tokenizer(CORPUS, tmp_path, sizes.vocab_size, sizes.max_position_embeddings)
    target = Target(build_target_model(sizes, tokenizer, seed=0).eval(), tokenizer, None, PROMPT_FORMAT, "hf")
    big_target, big_draft = inflate_pair(target, new_draft_for(target, seed=0), SEVEN_B, device="meta")
    n_target = sum(p.numel() for p in big_target.model.parameters())
    n_draft = sum(p.numel() for p in big_draft.parameters())
    assert abs(n_target - LLAVA_1_5_7B) <= 0.01 * LLAVA_1_5_7B and abs(n_draft - MSD_7B) <= 0.01 * MSD_7B
    assert (n_target, n_draft) == (LLAVA_1_5_7B, MSD_7B)
    assert big_target.model.config.image_seq_length == 576 and big_target.vocab_size == 32000
