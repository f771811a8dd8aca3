"""Load an original-layout LLaVA-1.5 checkpoint (liuhaotian/llava-v1.5-7b) into transformers' Llava.

The original layout is a LLaMA checkpoint plus LLaVA keys:

- config.json: LLaMA keys plus `mm_vision_tower` (the CLIP folder or hub id), `mm_vision_select_layer`,
  `mm_vision_select_feature`, `mm_projector_type`, `mm_hidden_size`, `image_aspect_ratio`. Its
  `model_type` may say "llava", so it is read as plain JSON, never through AutoConfig.
- weights (`model.safetensors`, `pytorch_model.bin`, or shards with an `*.index.json`):
  `model.embed_tokens`, `model.layers.*`, `model.norm`, `lm_head`, `model.mm_projector.{0,2}`; the
  CLIP tower is NOT inside (unless it was saved with `model.vision_tower.vision_tower.*` keys): its
  weights come from the `mm_vision_tower` folder (a CLIPModel or CLIPVisionModel checkpoint).

The result is a `LlavaForConditionalGeneration` whose text vocabulary keeps the checkpoint's size
(32000 for the real one). `<image>` and `<pad>` are added to the tokenizer only (ids 32000 and 32001
on the real one): `Target.embed` never embeds the placeholder, so lm_head stays the original's.
Weights are loaded strictly: every key of the model must come from a file, every key of the files
must land in the model, shapes must agree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmms_msd.models.checkpoints import (
    find_weight_files,
    llava_from_pretrained,
    load_tokenizer,
    load_weight_file,
    read_json,
)
from lmms_msd.models.image import ImagePreprocessor, load_image_preprocessor
from lmms_msd.models.prompt import IMAGE_PLACEHOLDER

log = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
SELECT_STRATEGIES = {"patch": "default", "cls_patch": "full"}  # mm_vision_select_feature -> HF strategy
VISION_PREFIX_IN_LLAVA = "model.vision_tower.vision_tower.vision_model."  # a tower saved inside LLaVA
# (original prefix, transformers prefix); the vision tower's transformers prefix is read from the model
TEXT_PREFIXES = (
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("lm_head.", "lm_head."),
)
# keys that carry no weights (buffers recomputed at init) or belong to CLIP's text side
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".position_ids")
IGNORED_CLIP_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
# the keys of an original config.json that describe the LLaMA text model (the rest is LLaVA's or bookkeeping)
LLAMA_KEYS = frozenset((
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "pretraining_tp", "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters",
    "attention_bias", "attention_dropout", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache",
))


@dataclass
class Weight:
    """A checkpoint tensor and where it came from (for error messages)."""

    tensor: torch.Tensor
    file: Path
    name: str  # the key in that file


# ---- config -----------------------------------------------------------------------------------------
def text_config_from_original(config: dict[str, Any]) -> Any:
    """The LLaMA part of an original config.json -> LlamaConfig (mm_* and bookkeeping keys dropped)."""
    from transformers import LlamaConfig

    keys = {k: v for k, v in config.items() if k in LLAMA_KEYS and v is not None}
    return LlamaConfig(**keys)


def vision_config_from_folder(clip_folder: Path) -> Any:
    """CLIPVisionConfig from the tower's config.json (a full CLIPConfig or a plain CLIPVisionConfig)."""
    from transformers import CLIPVisionConfig

    read_json(clip_folder / "config.json")  # a clear error when it is absent
    return CLIPVisionConfig.from_pretrained(str(clip_folder))


def llava_config_from_original(config: dict[str, Any], clip_folder: Path, image_token_id: int) -> Any:
    """An original config.json + the CLIP folder -> transformers' LlavaConfig."""
    from transformers import LlavaConfig

    check_supported(config)
    vision_config = vision_config_from_folder(clip_folder)
    if config.get("mm_hidden_size", vision_config.hidden_size) != vision_config.hidden_size:
        raise ValueError(
            f"mm_hidden_size={config['mm_hidden_size']} in config.json but the vision tower in {clip_folder} "
            f"has hidden_size={vision_config.hidden_size}: the vision tower does not belong to this checkpoint"
        )
    strategy = SELECT_STRATEGIES[config.get("mm_vision_select_feature", "patch")]
    n_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return LlavaConfig(
        text_config=text_config_from_original(config),
        vision_config=vision_config,
        image_token_index=image_token_id,
        image_seq_length=n_patches + (strategy == "full"),
        projector_hidden_act="gelu",
        vision_feature_layer=int(config.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias=True,
    )


def check_supported(config: dict[str, Any]) -> None:
    """Refuse original-layout options transformers' Llava cannot reproduce (LLaVA-1.6, start/end tokens)."""
    checks = {
        "mm_projector_type": (config.get("mm_projector_type", "linear"), ("mlp2x_gelu",)),
        "mm_vision_select_feature": (config.get("mm_vision_select_feature", "patch"), tuple(SELECT_STRATEGIES)),
        "mm_patch_merge_type": (config.get("mm_patch_merge_type", "flat"), ("flat",)),
        "image_aspect_ratio": (config.get("image_aspect_ratio", "pad"), ("pad", "square", None)),
        "mm_use_im_start_end": (config.get("mm_use_im_start_end", False), (False,)),
    }
    for key, (value, allowed) in checks.items():
        if value not in allowed:
            raise ValueError(
                f"config.json has {key}={value!r}; only {list(allowed)} are supported (LLaVA-1.5 checkpoints)"
            )


# ---- tokenizer and images ---------------------------------------------------------------------------
def load_tokenizer_with_image_token(folder: Path) -> tuple[Any, int]:
    """The checkpoint's tokenizer with `<image>` then `<pad>` added; returns it and the `<image>` id."""
    tokenizer = load_tokenizer(folder)
    tokenizer.add_tokens([IMAGE_PLACEHOLDER], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer, int(tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER))


def original_image_preprocessor(config: dict[str, Any], clip_folder: Path) -> ImagePreprocessor:
    """LLaVA's `process_images`: pad to a square when image_aspect_ratio is "pad" (LLaVA-1.5's setting)."""
    return load_image_preprocessor(clip_folder, pad_to_square=config.get("image_aspect_ratio", "pad") == "pad")


# ---- weights ----------------------------------------------------------------------------------------
def load_weights(files: list[Path]) -> dict[str, Weight]:
    """All tensors of `files` by key, with provenance, minus the ignorable buffers."""
    weights: dict[str, Weight] = {}
    for path in files:
        for name, tensor in load_weight_file(path).items():
            if not name.endswith(IGNORED_SUFFIXES):
                weights[name] = Weight(tensor, path, name)
    return weights


def convert_llava_keys(weights: dict[str, Weight], vision_prefix: str) -> dict[str, Weight]:
    """Original LLaVA keys -> transformers Llava keys; keys no rule knows stay as they are (and are
    then reported as unexpected under their own name)."""
    prefixes = TEXT_PREFIXES + ((VISION_PREFIX_IN_LLAVA, vision_prefix),)
    converted = {}
    for key, weight in weights.items():
        new_key = next((new + key[len(old):] for old, new in prefixes if key.startswith(old)), key)
        converted[new_key] = weight
    return converted


def convert_clip_keys(weights: dict[str, Weight], vision_prefix: str) -> dict[str, Weight]:
    """CLIP checkpoint keys (`vision_model.*` from a CLIPModel or transformers-4 CLIPVisionModel, bare
    from a transformers-5 CLIPVisionModel) -> transformers Llava vision tower keys; the text side is dropped."""
    converted = {}
    for key, weight in weights.items():
        if key.startswith(IGNORED_CLIP_PREFIXES):
            continue
        converted[vision_prefix + key.removeprefix("vision_model.")] = weight
    return converted


def check_weights(
    weights: dict[str, Weight], expected: dict[str, torch.Tensor], looked_in: list[Path], vision_prefix: str
) -> None:
    """Strict load: the key sets must be equal and the shapes must agree; errors name keys and files."""
    missing = sorted(f"{original_key(k, vision_prefix)} (model key {k})" for k in set(expected) - set(weights))
    unexpected = sorted(f"{weights[k].name} (in {weights[k].file})" for k in set(weights) - set(expected))
    mismatched = sorted(
        f"{weights[k].name} (in {weights[k].file}): {tuple(weights[k].tensor.shape)}, model expects "
        f"{tuple(expected[k].shape)}"
        for k in set(weights) & set(expected)
        if tuple(weights[k].tensor.shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys (looked in {[str(p) for p in looked_in]}): {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_some(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_some(mismatched)}")
    if problems:
        raise ValueError("the checkpoint does not match the LLaVA model built from its config.json; " + "; ".join(problems))


def original_key(key: str, vision_prefix: str) -> str:
    """A transformers Llava key -> its name in the original files (CLIP's for the vision tower)."""
    if key.startswith(vision_prefix):
        return "vision_model." + key[len(vision_prefix):]
    return next((old + key[len(new):] for old, new in TEXT_PREFIXES if key.startswith(new)), key)


def _some(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... and {len(items) - limit} more"


def vision_tower_prefix(expected_keys: list[str]) -> str:
    """Where transformers puts CLIP's `vision_model.*` inside Llava (5.x flattens it away)."""
    nested = "model.vision_tower.vision_model."
    return nested if any(k.startswith(nested) for k in expected_keys) else "model.vision_tower."


# ---- the model --------------------------------------------------------------------------------------
def load_original_llava(
    folder: Path,
    clip_folder: Path,
    *,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = "sdpa",
) -> tuple[Any, Any, ImagePreprocessor]:
    """An original-layout folder and its CLIP folder -> (LlavaForConditionalGeneration in eval mode,
    tokenizer with `<image>`/`<pad>` added, image preprocessor)."""
    from transformers import LlavaForConditionalGeneration

    config = read_json(folder / "config.json")
    tokenizer, image_token_id = load_tokenizer_with_image_token(folder)
    llava_config = llava_config_from_original(config, clip_folder, image_token_id)

    # 1. the key set and shapes the model expects, from a weightless (meta) instance
    with torch.device("meta"):
        expected = LlavaForConditionalGeneration(llava_config).state_dict()
    vision_prefix = vision_tower_prefix(list(expected))

    # 2. the checkpoint's tensors under transformers names; the tower from CLIP unless saved inside
    llava_files = find_weight_files(folder)
    weights = convert_llava_keys(load_weights(llava_files), vision_prefix)
    looked_in = list(llava_files)
    if not any(k.startswith(vision_prefix) for k in weights):
        clip_files = find_weight_files(clip_folder)
        weights.update(convert_clip_keys(load_weights(clip_files), vision_prefix))
        looked_in += clip_files
    check_weights(weights, expected, looked_in, vision_prefix)

    # 3. build with the weights (transformers handles dtype, device and non-persistent buffers)
    model = llava_from_pretrained(
        None,
        config=llava_config,
        state_dict={k: w.tensor for k, w in weights.items()},
        problem=f"transformers reported problems loading {folder} after the key check passed",
        dtype=dtype,
        device=device,
        attn_implementation=attn_implementation,
    )
    log.info("loaded original-layout LLaVA from %s with the vision tower of %s", folder, clip_folder)
    return model.eval(), tokenizer, original_image_preprocessor(config, clip_folder)
