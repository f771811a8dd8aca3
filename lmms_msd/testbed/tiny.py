"""Tiny LLaVA checkpoints in both layouts, written from a seed (tests and demos; seconds on a CPU).

- `save_tiny_hf_target`: an HF-layout folder (llava-hf style): LlavaForConditionalGeneration with a
  tiny Llama and a tiny CLIP tower, tokenizer with `<image>`/`<pad>`, CLIP image processor.
- `save_tiny_original_target`: an original-layout folder (liuhaotian style): LLaMA-style config.json
  with mm_* keys, `pytorch_model.bin` under the original key names, a tokenizer without `<image>`,
  and a separate CLIP folder (a CLIPModel checkpoint plus preprocessor_config.json) that
  `mm_vision_tower` points at.

The tokenizer is a byte-level BPE trained here on a few sentences (no downloads): any text encodes.
Weights are random from an explicit seeded generator, scaled so logits are spread (not degenerate).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch

from lmms_msd.models.original_llava import PAD_TOKEN, TEXT_PREFIXES
from lmms_msd.models.prompt import IMAGE_PLACEHOLDER, VICUNA_V1_SYSTEM

CORPUS = (
    VICUNA_V1_SYSTEM,
    "USER: What is the value of the largest bar? ASSISTANT: The largest bar is 42.",
    "USER: How many points are above 10.5? Answer with a number. ASSISTANT: 3",
    "The chart shows sales in 2019, 2020 and 2021: 1,250; 3,400 and 7,890 (in %).",
    "Which colour is the line? Red, green or blue! Answer: blue.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 - + = ( ) [ ] : ; , . ? ! ' \"",
)
LM_HEAD_GAIN = 3.0
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TinySizes:
    """Sizes of a tiny LLaVA; the vision tower gives (image_size // patch_size) ** 2 image features."""

    vocab_size: int = 320  # BPE vocabulary before `<image>` / `<pad>`
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4  # head_dim = hidden_size // num_heads = 16
    num_kv_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_heads
    max_position_embeddings: int = 512
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    image_size: int = 42
    patch_size: int = 14


# ---- tokenizer --------------------------------------------------------------------------------------
def train_byte_bpe(
    texts: Iterable[str], folder: str | Path, vocab_size: int, split_digits: bool = False, model_max_length: int | None = None
) -> Any:
    """Train a byte-level BPE (any text encodes; `<unk>`, `<s>`, `</s>` first; `<s>` prepended), save it
    to `folder` so that AutoTokenizer loads it, and return the transformers tokenizer.

    split_digits: one token per digit, as LLaMA's tokenizer splits numbers
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) if split_digits else byte_level
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(texts), trainer)
    bos = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **extra)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def make_tiny_tokenizer(folder: str | Path, vocab_size: int = TinySizes.vocab_size) -> Any:
    """The tiny checkpoints' tokenizer: a byte-level BPE trained on a few chart sentences."""
    return train_byte_bpe(CORPUS, folder, vocab_size)


def add_image_and_pad_tokens(tokenizer: Any) -> tuple[int, int]:
    """Add `<image>` then `<pad>` (as LLaVA's HF conversion does); returns their ids."""
    tokenizer.add_tokens([IMAGE_PLACEHOLDER], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER), tokenizer.pad_token_id


# ---- configs ----------------------------------------------------------------------------------------
class LlavaShape(Protocol):
    """The sizes a LLaVA config is built from (`TinySizes`; the testbed's `target_training.TargetSizes`)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None  # None: hidden_size // num_heads (LlamaConfig's default)
    max_position_embeddings: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int


def llava_text_config(sizes: LlavaShape, vocab_size: int, tokenizer: Any) -> Any:
    """LLaMA's text config at `sizes`, with the tokenizer's special ids and an untied lm_head (LLaVA's)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.num_layers,
        num_attention_heads=sizes.num_heads,
        num_key_value_heads=sizes.num_kv_heads,
        head_dim=sizes.head_dim,
        max_position_embeddings=sizes.max_position_embeddings,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def clip_vision_config(sizes: LlavaShape) -> Any:
    """CLIP's vision config at `sizes`: (image_size // patch_size) ** 2 patches."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=sizes.vision_hidden_size,
        intermediate_size=sizes.vision_intermediate_size,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        projection_dim=sizes.vision_hidden_size,
    )


def llava_config(sizes: LlavaShape, vocab_size: int, tokenizer: Any, image_token_id: int) -> Any:
    """LLaVA-1.5's config at `sizes`: the CLIP tower's second-to-last layer without the CLS token
    (vision_feature_layer=-2, strategy "default"), a 2-layer GELU projector, image_seq_length the patch count."""
    from transformers import LlavaConfig

    return LlavaConfig(
        text_config=llava_text_config(sizes, vocab_size, tokenizer),
        vision_config=clip_vision_config(sizes),
        image_token_index=image_token_id,
        image_seq_length=(sizes.image_size // sizes.patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def save_clip_image_processor(folder: str | Path, image_size: int) -> None:
    """A CLIP preprocessor_config.json at `image_size`, as LLaVA-1.5's (resize the shortest edge to
    image_size, centre crop, CLIP mean/std)."""
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    ).save_pretrained(str(folder))


# ---- weights ----------------------------------------------------------------------------------------
@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter from a generator seeded with `seed` (same seed, same weights).

    Matrices (and the patch convolution) get std 1/sqrt(fan_in), so activations keep their scale
    through the layers; embedding tables std 1, norm weights 1 +- 0.1, biases std 0.1; lm_head gets
    LM_HEAD_GAIN on top, so logits have a std of about 3 and next-token distributions are peaked, as
    a trained model's are, not flat.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        noise = torch.randn(param.shape, generator=generator)
        if "norm" in name and name.endswith("weight"):
            param.copy_(1.0 + 0.1 * noise)
        elif param.dim() <= 1:
            param.copy_(0.1 * noise)
        elif param.dim() == 2 and "embed" in name:
            param.copy_(noise)
        else:
            gain = LM_HEAD_GAIN if name.endswith("lm_head.weight") else 1.0
            param.copy_(gain * noise * param[0].numel() ** -0.5)
    return model


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---- checkpoints ------------------------------------------------------------------------------------
def save_tiny_hf_target(folder: str | Path, seed: int = 0, sizes: TinySizes = TinySizes()) -> Path:
    """Write an HF-layout tiny LLaVA (model, tokenizer with `<image>`/`<pad>`, image processor) to `folder`."""
    from transformers import LlavaForConditionalGeneration

    folder = Path(folder)
    tokenizer = make_tiny_tokenizer(folder, sizes.vocab_size)
    image_token_id, _ = add_image_and_pad_tokens(tokenizer)
    tokenizer.save_pretrained(str(folder))
    config = llava_config(sizes, len(tokenizer), tokenizer, image_token_id)
    model = randomize_(LlavaForConditionalGeneration(config), seed)
    model.save_pretrained(str(folder))
    save_clip_image_processor(folder, sizes.image_size)
    return folder


def save_tiny_clip(clip_folder: str | Path, seed: int, sizes: TinySizes = TinySizes()) -> Path:
    """Write a tiny CLIPModel checkpoint (both towers, as openai/clip-vit-* ships) and its image processor."""
    from transformers import CLIPConfig, CLIPModel

    clip_folder = Path(clip_folder)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    config = CLIPConfig(text_config=text, vision_config=clip_vision_config(sizes).to_dict(),
                        projection_dim=sizes.vision_hidden_size)
    randomize_(CLIPModel(config), seed).save_pretrained(str(clip_folder))
    save_clip_image_processor(clip_folder, sizes.image_size)
    return clip_folder


def save_tiny_original_target(
    folder: str | Path, seed: int, clip_folder: str | Path, sizes: TinySizes = TinySizes()
) -> Path:
    """Write an original-layout tiny LLaVA to `folder` and its CLIP vision tower to `clip_folder`.

    The text model and projector are a seeded tiny Llava's, saved under LLaVA's key names
    (`model.layers.*`, `model.mm_projector.{0,2}.*`, ...) in pytorch_model.bin; config.json is
    LLaMA's plus LLaVA-1.5's mm_* keys, with `model_type: "llava"` as the released files say.
    """
    from transformers import LlavaForConditionalGeneration

    folder, clip_folder = Path(folder), Path(clip_folder)
    save_tiny_clip(clip_folder, seed + 1, sizes)
    tokenizer = make_tiny_tokenizer(folder, sizes.vocab_size)
    vocab_size = len(tokenizer)  # `<image>` lies past the vocabulary, as in LLaVA-1.5
    config = llava_config(sizes, vocab_size, tokenizer, image_token_id=vocab_size)
    model = randomize_(LlavaForConditionalGeneration(config), seed)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(_original_state_dict(model.state_dict()), folder / "pytorch_model.bin")
    _write_json(folder / "config.json", _original_config(config.text_config, sizes, clip_folder))
    return folder


def _original_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers Llava keys -> original LLaVA keys, without the vision tower (it lives in CLIP's folder)."""
    renamed = {}
    for key, tensor in state.items():
        for original, hf in TEXT_PREFIXES:
            if key.startswith(hf):
                renamed[original + key[len(hf):]] = tensor.clone()
    return renamed


def _original_config(text_config: Any, sizes: TinySizes, clip_folder: Path) -> dict[str, Any]:
    return {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "bos_token_id": text_config.bos_token_id,
        "eos_token_id": text_config.eos_token_id,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": text_config.hidden_size,
        "intermediate_size": text_config.intermediate_size,
        "initializer_range": 0.02,
        "max_position_embeddings": text_config.max_position_embeddings,
        "num_attention_heads": text_config.num_attention_heads,
        "num_hidden_layers": text_config.num_hidden_layers,
        "num_key_value_heads": text_config.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": text_config.rms_norm_eps,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": text_config.vocab_size,
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": sizes.vision_hidden_size,
        "mm_patch_merge_type": "flat",
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": str(clip_folder),
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }


# ---- a draft that follows ---------------------------------------------------------------------------
@torch.no_grad()
def dampen_context_(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """Scale every attention and MLP output of the language model by `scale` (< 1): the next token
    then depends mostly on the current one, a target an MSD head can follow closely."""
    for name, param in model.named_parameters():
        if "language_model" in name and name.endswith(("o_proj.weight", "down_proj.weight")):
            param.mul_(scale)
    return model


@torch.no_grad()
def following_draft(target: Any) -> Any:
    """An MSD head that predicts the target's next hidden state from the next token's embedding
    alone: fc passes embed(x_{t+1}) through the target's final-norm weight and the layer adds
    nothing (RMSNorm's scaling does not change an argmax). On a target dampened by
    `dampen_context_` it agrees with nearly every greedy choice; on any other it is still a valid
    (lossless) draft, only a weaker one."""
    from lmms_msd.models.draft import DraftConfig, new_random_draft

    config = DraftConfig.like_target(target.model.config.text_config, target.vocab_size)
    draft = new_random_draft(config, seed=0).to(target.dtype)
    h = config.hidden_size
    draft.embed_tokens.weight.copy_(target.model.get_input_embeddings().weight[: config.vocab_size])
    draft.fc.weight.zero_()
    draft.fc.weight[:, :h] = torch.diag(target.model.model.language_model.norm.weight)
    draft.fc.bias.zero_()
    draft.layers[0].self_attn.o_proj.weight.zero_()
    draft.layers[0].mlp.down_proj.weight.zero_()
    return draft.to(target.device)
