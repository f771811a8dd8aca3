"""Inflation: a big-shaped copy of a small LLaVA target and its MSD draft that computes the small pair's
function (DESIGN 4.5): a run costs about what a LLaVA-1.5-7B pair costs per forward while the
acceptance behaviour stays the trained miniature's.

The language model and the projector's output: every weight of the small model goes into the leading
slice of the bigger matrix and the rest is zero:

- the residual stream of width H carries the small model's h values in [0, h) and zeros in [h, H);
- RMSNorm over the padded vector sees a mean square h/H times the small one, so every text RMSNorm
  weight is multiplied by sqrt(h/H) and its eps by h/H: rsqrt((ms + eps) * h/H) * sqrt(h/H) = rsqrt(ms + eps);
- extra attention heads and MLP units have zero weights and add exactly zero; head_dim is kept, so the
  attention scale and RoPE are unchanged;
- extra layers (appended after the small ones) have all q/k/v/o and MLP weights zero: their attention
  and MLP outputs are zero and the residual passes through them unchanged;
- the multimodal projector's output is zero-padded (linear_1 rows and bias, linear_2 rows and columns),
  so image features come out as the small ones followed by zeros.

The vision tower, when the shape names one (`VisionShape`; SEVEN_B names CLIP ViT-L/14-336's), is
inflated by repetition instead, since its LayerNorms subtract the mean, which zero padding would change:

- its residual stream of width D = k d carries k copies of the small one, [x, x, ..., x]; a LayerNorm
  sees the same mean and variance, so its weight and bias are repeated k times and its eps kept;
- every width (attention heads, MLP units) is repeated k times, so heads are copies of the small ones
  (head_dim kept) and GELU acts on copies; a linear map reading a repeated input has its weight
  repeated k x k times and divided by k (k copies of each term sum to the small sum), biases repeated;
- the patch embedding, class and position embeddings are repeated along the width;
- extra layers have all weights and biases zero, so attention and MLP add exactly zero; they are put
  before the small tower's last layer, so the second-to-last layer that LLaVA reads
  (vision_feature_layer=-2) still gives the small tower's features, k times over;
- the projector's linear_1 reads those copies: its columns are repeated k times and divided by k.

The vocabulary is NOT inflated: embeddings and the LM head keep the source's rows (the miniature has
LLaVA-1.5's 32,000), and an image gives the source's number of positions (576 for the miniature at
336 px, as LLaVA-1.5-7B's). With both, the miniature inflated to SEVEN_B has exactly LLaVA-1.5-7B's
parameter count, 7,062,902,784 (`tests/test_inflate.py` derives it from the official configs), and
its MSD head exactly an MSD head for LLaVA-1.5-7B (DESIGN 4.1: embed_tokens, fc, one LLaMA-7B layer
without input norm), 367,009,792.

The draft head is inflated the same way as the language model; its `fc` reads [embed; feature] of width
2H, so the small weight's two input halves go to columns [0, h) and [H, H + h).

Exactness: when the width ratio H/h is a power of four (256 -> 4096 is 16), sqrt(h/H) and h/H are powers
of two and every rescaling is exact, and so is the vision tower's division by a power-of-two k; the
big pair then computes the small one's function up to the order in which its kernels sum: zero terms
add nothing, but a wider matrix (or k copies of each term) may be summed in another order. On some CPUs
fp32 logits come out bit for bit the same; on others (AVX-512 ones here) the projector output differs
by up to 7e-6 and the logits by up to 4e-5. Other ratios (the miniature's 128 -> 4096 is 32, a power
of two but not of four: sqrt(1/32) is rounded) and GPUs agree within float tolerance too. The draft's
fc is within float tolerance even then (about 1e-6): its two input halves lie H apart, so the matrix
product sums them in a different order. `tests/test_inflate.py` states the bounds.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from lmms_msd.models.draft import MSDDraft, RMSNorm, check_draft_fits
from lmms_msd.models.target import Target


@dataclass(frozen=True)
class VisionShape:
    """The sizes of a CLIP vision tower that inflation sets: each width the same multiple k of the
    source's (head_dim kept), at least as many layers. Patch and image size stay the source's."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class TextShape:
    """The sizes inflation sets: the LLaMA text model's (head_dim and vocabulary stay the source's) and,
    when `vision` is given, the vision tower's (None keeps the source's tower)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vision: VisionShape | None = None


TEXT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
# LLaVA-1.5-7B's vision tower, openai/clip-vit-large-patch14-336 (head_dim 1024 / 16 = 64)
VIT_L_336 = VisionShape(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
# LLaVA-1.5-7B: its language model (Vicuna-7B; head_dim 4096 / 32 = 128) and its vision tower. The
# vocabulary is not part of a shape: an inflated model keeps its source's.
SEVEN_B = TextShape(
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008,
    vision=VIT_L_336,
)


def shape_from_name(name: str) -> TextShape:
    """A shape by name: "7b" is SEVEN_B (vision tower included); "HIDDENxLAYERS" (e.g. "512x6") is a text
    shape with SEVEN_B's proportions: head_dim 128 (heads = HIDDEN / 128, as many key/value heads) and
    intermediate_size = HIDDEN * 11008 / 4096, rounded; it keeps the source's vision tower."""
    text = name.strip().lower()
    if text == "7b":
        return SEVEN_B
    head_dim = SEVEN_B.hidden_size // SEVEN_B.num_attention_heads
    hidden, x, layers = text.partition("x")
    if not (x and hidden.isdigit() and layers.isdigit() and int(hidden) % head_dim == 0 and int(hidden) > 0 and int(layers) > 0):
        raise ValueError(
            f"unknown shape {name!r}: use \"7b\" or HIDDENxLAYERS such as \"512x6\", HIDDEN a positive multiple of {head_dim}"
        )
    hidden_size, heads = int(hidden), int(hidden) // head_dim
    intermediate = round(hidden_size * SEVEN_B.intermediate_size / SEVEN_B.hidden_size)
    return TextShape(hidden_size, int(layers), heads, heads, intermediate)


# ---- public API ------------------------------------------------------------------------------------------
def inflate_target(
    target: Target, shape: TextShape, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> Target:
    """A `Target` whose language model (and vision tower, when shape.vision is given) has `shape` and
    computes what `target`'s does.

    The vocabulary is not inflated (see the module docstring). The new model is built without
    materialising it anywhere but on `device` (meta first, then allocated there), so a 7B fp16 copy
    takes seconds on a GPU; device="meta" builds it without memory (to count its parameters). The
    tokenizer, image preprocessing, prompt format and layout are shared.
    device, dtype: of the new model [the source's]
    """
    from transformers import LlavaForConditionalGeneration

    small = target.model
    text = small.config.text_config
    _check_shape("target", _text_shape(text), _head_dim(text), shape)
    if shape.num_hidden_layers < text.num_hidden_layers:
        raise ValueError(
            f"cannot inflate the target to {shape.num_hidden_layers} layers: it has {text.num_hidden_layers}"
        )
    repeats = None if shape.vision is None else _vision_repeats(small.config.vision_config, shape.vision)
    device, dtype = torch.device(device or target.device), dtype or target.dtype
    ratio = text.hidden_size / shape.hidden_size

    config = copy.deepcopy(small.config)
    big_text = config.text_config
    for name in TEXT_FIELDS:
        setattr(big_text, name, getattr(shape, name))
    if shape.vision is not None:
        for field in dataclasses.fields(VisionShape):
            setattr(config.vision_config, field.name, getattr(shape.vision, field.name))
    big_text.head_dim = _head_dim(text)
    big_text.rms_norm_eps = text.rms_norm_eps * ratio
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model = model.to(dtype).to_empty(device=device)

    norms = {f"model.language_model.{name}.weight" for name, m in small.model.language_model.named_modules() if _is_rms_norm(m)}
    assert norms, "found no RMSNorm in the language model: transformers changed its module names"
    eps = {m.variance_epsilon for m in model.model.language_model.modules() if _is_rms_norm(m)}
    assert eps == {big_text.rms_norm_eps}, f"the inflated RMSNorms have eps {eps}, {big_text.rms_norm_eps} was set"
    tiled = set()  # copied by repetition below
    if repeats is not None:
        tiled = {f"model.vision_tower.{name}" for name, _ in small.model.vision_tower.named_parameters()}
        tiled.add("model.multi_modal_projector.linear_1.weight")
    _copy_parameters(small, model, scales={name: math.sqrt(ratio) for name in norms}, skip=tiled)
    if repeats is not None:
        _repeat_vision(small, model, repeats)
    # non-persistent buffers (RoPE inv_freq, CLIP position ids) hold garbage after to_empty; they depend on
    # head_dim, rope_theta and the vision config only, so the source's are right (kept in their dtype, as
    # transformers keeps inv_freq in float32 whatever the model's dtype)
    _copy_buffers(small, model, dtype=None)
    model.generation_config = copy.deepcopy(small.generation_config)
    return Target(model.eval(), target.tokenizer, target.image_processor, target.prompt_format, target.layout)


def inflate_draft(
    draft: MSDDraft, shape: TextShape, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> MSDDraft:
    """An `MSDDraft` with width, heads and MLP of `shape` that computes what `draft` does.

    The draft keeps its own number of layers (one for MSD heads; shape.num_hidden_layers is the
    target's) and its vocabulary (see the module docstring).
    device, dtype: of the new head [the source's]
    """
    config = draft.config
    _check_shape("draft", _text_shape(config), config.resolved_head_dim, shape)
    p = draft.fc.weight
    device, dtype = torch.device(device or p.device), dtype or p.dtype
    h, big_h = config.hidden_size, shape.hidden_size
    ratio = h / big_h
    big_config = dataclasses.replace(
        config,
        hidden_size=big_h,
        intermediate_size=shape.intermediate_size,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=config.resolved_head_dim,
        rms_norm_eps=config.rms_norm_eps * ratio,
        visual_heads=config.visual_heads or config.num_attention_heads,  # the copied heads; the added ones attend uniformly
    )
    with torch.device("meta"):
        big = MSDDraft(big_config)
    big = big.to(dtype).to_empty(device=device)

    norms = {f"{name}.weight" for name, m in draft.named_modules() if isinstance(m, RMSNorm)}
    _copy_parameters(draft, big, scales={name: math.sqrt(ratio) for name in norms}, skip={"fc.weight"})
    with torch.no_grad():
        # fc: [h, 2h] over [embed; feature] -> [H, 2H]: the halves go to columns [0, h) and [H, H + h)
        small_fc = draft.fc.weight.to(device)  # [h, 2h]
        big.fc.weight[:h, :h].copy_(small_fc[:, :h])
        big.fc.weight[:h, big_h : big_h + h].copy_(small_fc[:, h:])
    # inv_freq depends on head_dim and rope_theta only: a fresh small head's, cast as load_draft casts it
    _copy_buffers(MSDDraft(config), big, dtype=dtype)
    return big.eval()


def inflate_pair(
    target: Target,
    draft: MSDDraft,
    shape: TextShape = SEVEN_B,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Target, MSDDraft]:
    """`inflate_target` and `inflate_draft` with the same shape, device and dtype [the target's]."""
    check_draft_fits(draft, target.hidden_size, target.vocab_size)
    _check_shape("draft", _text_shape(draft.config), draft.config.resolved_head_dim, shape)  # before the big build
    device, dtype = device or target.device, dtype or target.dtype
    big_target = inflate_target(target, shape, device, dtype)
    big_draft = inflate_draft(draft, shape, device, dtype)
    check_draft_fits(big_draft, big_target.hidden_size, big_target.vocab_size)
    return big_target, big_draft


# ---- checks ----------------------------------------------------------------------------------------------
def _text_shape(config) -> TextShape:
    """The text sizes of a LlamaConfig or a DraftConfig (no vision)."""
    return TextShape(**{name: getattr(config, name) for name in TEXT_FIELDS})


def _vision_repeats(config, shape: VisionShape) -> int:
    """k, the number of copies of the source tower's widths in `shape`; a shape that is not k times
    every width (so head_dim is kept) with at least as many layers is an error naming the sizes."""
    k, rest = divmod(shape.hidden_size, config.hidden_size)
    widths = {
        "hidden_size": (config.hidden_size, shape.hidden_size),
        "num_attention_heads": (config.num_attention_heads, shape.num_attention_heads),
        "intermediate_size": (config.intermediate_size, shape.intermediate_size),
    }
    wrong = [f"{name} {big} != {k} x {small}" for name, (small, big) in widths.items() if big != k * small]
    if rest or k < 1 or wrong:
        raise ValueError(
            f"cannot inflate the vision tower to {shape}: every width must be the same whole multiple k of the "
            f"tower's (hidden {config.hidden_size}, heads {config.num_attention_heads}, intermediate "
            f"{config.intermediate_size}), with k = hidden_size ratio = {shape.hidden_size / config.hidden_size:g}"
            + (f" ({'; '.join(wrong)})" if wrong and not rest else "")
        )
    if shape.num_hidden_layers < config.num_hidden_layers:
        raise ValueError(
            f"cannot inflate the vision tower to {shape.num_hidden_layers} layers: it has {config.num_hidden_layers}"
        )
    return k


def _head_dim(text_config) -> int:
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def _check_shape(what: str, source: TextShape, head_dim: int, shape: TextShape) -> None:
    """Every width at least the source's, the same head_dim and the same query heads per key/value head."""
    sizes = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    smaller = [f"{n} {getattr(shape, n)} < {getattr(source, n)}" for n in sizes if getattr(shape, n) < getattr(source, n)]
    if smaller:
        raise ValueError(
            f"cannot inflate the {what} to {shape}: smaller than the {what}'s own sizes ({'; '.join(smaller)})"
        )
    if shape.hidden_size != shape.num_attention_heads * head_dim:
        raise ValueError(
            f"cannot inflate the {what} to {shape}: its head_dim would be hidden_size / num_attention_heads = "
            f"{shape.hidden_size} / {shape.num_attention_heads}, but the {what}'s head_dim is {head_dim} and must stay; "
            f"use num_attention_heads = {shape.hidden_size // head_dim}"
        )
    group = source.num_attention_heads / source.num_key_value_heads
    big_group = shape.num_attention_heads / shape.num_key_value_heads
    if group != big_group:
        raise ValueError(
            f"cannot inflate the {what} to {shape}: {big_group:g} query heads per key/value head, the {what} has "
            f"{group:g} ({source.num_attention_heads} / {source.num_key_value_heads}); keep the ratio"
        )


def _is_rms_norm(module: nn.Module) -> bool:
    """transformers' LlamaRMSNorm (the vision tower's norms are LayerNorms and are not rescaled)."""
    return type(module).__name__.endswith("RMSNorm")


# ---- copying ---------------------------------------------------------------------------------------------
@torch.no_grad()
def _copy_parameters(small: nn.Module, big: nn.Module, scales: dict[str, float], skip: set[str] | None = None) -> None:
    """Zero every parameter of `big`, then copy each of `small`'s into the leading slice of its namesake.

    scales: parameter name -> factor applied (in float32) while copying
    skip: names copied by the caller
    """
    small_params = dict(small.named_parameters(remove_duplicate=False))
    big_params = dict(big.named_parameters(remove_duplicate=False))
    missing = sorted(small_params.keys() - big_params.keys())
    assert not missing, f"the inflated model lacks parameters {missing[:10]}"
    unknown = sorted(scales.keys() - small_params.keys())
    assert not unknown, f"rescaling names no parameter: {unknown[:10]}"
    for param in big_params.values():
        param.zero_()
    for name, value in small_params.items():
        if skip and name in skip:
            continue
        target = big_params[name]
        assert value.dim() == target.dim() and all(s <= b for s, b in zip(value.shape, target.shape)), (
            f"{name}: {tuple(value.shape)} does not fit into {tuple(target.shape)}"
        )
        value = value.to(target.device)
        if name in scales:
            value = value.float() * scales[name]
        target[tuple(slice(0, s) for s in value.shape)].copy_(value)


@torch.no_grad()
def _repeat_vision(small: nn.Module, big: nn.Module, k: int) -> None:
    """Copy the small LLaVA's vision tower into the big one's by repetition (module docstring), and the
    projector's linear_1 into the leading rows of the big one's, its columns repeated k times / k.

    Every dimension of a tower parameter is either the same in both (patch pixels, positions) or k
    times the small one's (a width): the small tensor is repeated k times along the latter (copies
    back to back, [x, x, ..., x]); an nn.Linear weight reads a repeated input and is divided by k.
    Small layer i < n - 1 goes to big layer i, the last small layer to the last big layer; the layers
    between keep their zeros (`_copy_parameters` zeroed them).
    """
    small_tower, big_tower = small.model.vision_tower, big.model.vision_tower
    n_small, n_big = small.config.vision_config.num_hidden_layers, big.config.vision_config.num_hidden_layers
    last, big_last = f"encoder.layers.{n_small - 1}.", f"encoder.layers.{n_big - 1}."
    for name, value in small_tower.named_parameters():
        big_name = name.replace(last, big_last)
        target = big_tower.get_parameter(big_name)
        assert all(b in (s, k * s) for s, b in zip(value.shape, target.shape)) and value.dim() == target.dim(), (
            f"vision tower {name}: {tuple(value.shape)} is not {tuple(target.shape)} divided by 1 or {k} along each dimension"
        )
        module = big_tower.get_submodule(big_name.rpartition(".")[0])
        divisor = k if isinstance(module, nn.Linear) and big_name.endswith(".weight") else 1
        repeated = value.to(target.device).float().repeat(*(b // s for s, b in zip(value.shape, target.shape)))
        target.copy_(repeated / divisor)
    linear_1 = small.model.multi_modal_projector.linear_1.weight  # [h, d]
    big_linear_1 = big.model.multi_modal_projector.linear_1.weight  # [H, k d]
    assert big_linear_1.shape[1] == k * linear_1.shape[1], f"projector linear_1 {tuple(big_linear_1.shape)} for k={k}"
    big_linear_1[: linear_1.shape[0]].copy_(linear_1.to(big_linear_1.device).float().repeat(1, k) / k)


def _copy_buffers(source: nn.Module, big: nn.Module, dtype: torch.dtype | None) -> None:
    """Replace each of `big`'s buffers with `source`'s namesake on big's device (cast to dtype, if given)."""
    source_buffers = dict(source.named_buffers())
    big_buffers = dict(big.named_buffers())
    if source_buffers.keys() != big_buffers.keys():
        raise AssertionError(f"buffers differ: source {sorted(source_buffers)}, inflated {sorted(big_buffers)}")
    for name, old in big_buffers.items():
        new = source_buffers[name]
        assert new.shape == old.shape, f"buffer {name}: {tuple(new.shape)} in the source, {tuple(old.shape)} inflated"
        if dtype is not None and new.is_floating_point():
            new = new.to(dtype)
        module_name, _, buffer_name = name.rpartition(".")
        setattr(big.get_submodule(module_name), buffer_name, new.to(old.device, copy=True))  # keeps it a buffer
