"""Load a LLaVA-1.5 target from either checkpoint layout.

- HF layout (llava-hf/llava-1.5-7b-hf): config.json has `text_config` / architectures
  `LlavaForConditionalGeneration`; loaded with transformers as is, its tokenizer knows `<image>`.
- original layout (liuhaotian/llava-v1.5-7b): config.json has `mm_vision_tower`; converted by
  `lmms_msd.models.original_llava`.

`pretrained` (and the vision tower) may be a local folder or a hub id; hub ids go through
`huggingface_hub.snapshot_download`, which also finds them in the local cache when offline.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from lmms_msd.models.checkpoints import (
    check_json_files,
    llava_from_pretrained,
    load_tokenizer,
    read_json,
    resolve_folder,
)
from lmms_msd.models.image import load_image_preprocessor
from lmms_msd.models.original_llava import load_original_llava
from lmms_msd.models.prompt import IMAGE_PLACEHOLDER, PromptFormat
from lmms_msd.models.target import Target

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def load_target(
    pretrained: str,
    *,
    vision_tower: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str | None = "sdpa",
    conv_template: str | None = None,
    system_prompt: str | None = None,
) -> Target:
    """A LLaVA-1.5 checkpoint (folder or hub id, either layout) -> a `Target` in eval mode.

    vision_tower: original layout only; overrides config.json's `mm_vision_tower` (folder or hub id)
    dtype: a torch dtype or "float16" / "bfloat16" / "float32" / "auto" (the checkpoint's own)
    conv_template, system_prompt: the prompt format (default "vicuna_v1", LLaVA-1.5's conversation)
    """
    folder = resolve_folder(pretrained, "checkpoint")
    config = read_json(folder / "config.json")
    check_json_files(folder)
    layout = detect_layout(config, folder)
    prompt_format = PromptFormat(
        conv_template=conv_template or "vicuna_v1",
        system_prompt=system_prompt,
        tokenization="hf" if layout == "hf" else "llava",
    )
    torch_dtype = resolve_dtype(dtype, config)
    if layout == "hf":
        if vision_tower is not None:
            raise ValueError(
                f"vision_tower={vision_tower!r} applies to original-layout checkpoints only; {folder} is in "
                "the HF layout, whose vision tower is inside the checkpoint"
            )
        model, tokenizer, image_processor = load_hf_llava(folder, torch_dtype, device, attn_implementation)
    else:
        clip_name = vision_tower or config["mm_vision_tower"]
        clip_folder = resolve_folder(clip_name, f"vision tower (mm_vision_tower in {folder / 'config.json'})")
        check_json_files(clip_folder)
        model, tokenizer, image_processor = load_original_llava(
            folder, clip_folder, dtype=torch_dtype, device=device, attn_implementation=attn_implementation
        )
    log.info("loaded %s-layout target %s (%s, %s)", layout, pretrained, torch_dtype, device)
    return Target(model.eval(), tokenizer, image_processor, prompt_format, layout)


def detect_layout(config: dict[str, Any], folder: Path) -> str:
    """"hf" or "original", from config.json's keys."""
    is_hf = "text_config" in config or "LlavaForConditionalGeneration" in (config.get("architectures") or [])
    is_original = "mm_vision_tower" in config
    if is_hf == is_original:
        raise ValueError(
            f"cannot tell the layout of {folder / 'config.json'}: expected `text_config` (HF layout, "
            "llava-hf/...) or `mm_vision_tower` (original layout, liuhaotian/...), "
            f"found {'both' if is_hf else 'neither'}; keys seen: {sorted(config)}"
        )
    return "hf" if is_hf else "original"


def resolve_dtype(dtype: torch.dtype | str, config: dict[str, Any]) -> torch.dtype:
    """A torch dtype from a dtype or its name; "auto" takes the checkpoint's (float32 if it names none)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        text = config.get("text_config", {})
        named = [config.get("dtype"), config.get("torch_dtype"), text.get("dtype"), text.get("torch_dtype")]
        dtype = next((name for name in named if name), "float32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES) + ['auto']} or a torch.dtype")
    return DTYPES[dtype]


def load_hf_llava(
    folder: Path, dtype: torch.dtype, device: str | torch.device, attn_implementation: str | None
) -> tuple[Any, Any, Any]:
    """An HF-layout folder -> (LlavaForConditionalGeneration, tokenizer, image preprocessor), strictly."""
    model = llava_from_pretrained(
        str(folder),
        problem=f"the weights in {folder} do not match its config.json",
        dtype=dtype,
        device=device,
        attn_implementation=attn_implementation,
    )
    tokenizer = load_tokenizer(folder)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if image_token_id != model.config.image_token_id:
        raise ValueError(
            f"the tokenizer in {folder} gives {IMAGE_PLACEHOLDER!r} the id {image_token_id} but config.json says "
            f"image_token_index={model.config.image_token_id}; the tokenizer does not belong to this checkpoint"
        )
    return model, tokenizer, load_image_preprocessor(folder, pad_to_square=False)
