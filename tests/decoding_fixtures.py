"""Tiny in-memory LLaVA targets, MSD drafts and a character tokenizer for the decoding tests.

Built in code in a second, with no files: the loop tests exercise decoding, not loading.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from lmms_msd.models.draft import DraftConfig, MSDDraft, new_random_draft
from lmms_msd.models.target import EmbeddedPrompt, Target
from lmms_msd.testbed.tiny import dampen_context_, following_draft  # noqa: F401  (following_draft: re-exported)

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,!?-"


class CharTokenizer:
    """One character per id; ids past the alphabet decode to '#'. Only what the loops use."""

    def __init__(self, vocab_size: int, eos_token_id: int) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out = []
        for i in ids:
            if skip_special_tokens and i == self.eos_token_id:
                continue
            out.append(ALPHABET[i] if i < len(ALPHABET) else "#")
        return "".join(out)


def tiny_target(seed: int, vocab_size: int = 48, hidden: int = 64, context_scale: float = 1.0, eos_token_id: int = 47) -> Target:
    """A random tiny LLaVA. context_scale < 1 shrinks every attention and MLP output, so the next
    token depends mostly on the current one (a target an MSD head can follow closely)."""
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14,
    )
    config = LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=vocab_size,  # past the vocabulary, as the original's
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5 if "embed_tokens" in name or "lm_head" in name else 0.15)
    dampen_context_(model, context_scale)
    return Target(model, CharTokenizer(vocab_size, eos_token_id), image_processor=None, prompt_format=None, layout="hf")


def random_draft(target: Target, seed: int) -> MSDDraft:
    cfg = target.model.config.text_config
    config = DraftConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, vocab_size=cfg.vocab_size, head_dim=cfg.head_dim,
    )
    draft = new_random_draft(config, seed, std=0.1)
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(target.model.get_input_embeddings().weight)
    return draft


def random_prompt(target: Target, seed: int, with_image: bool = True) -> EmbeddedPrompt:
    g = torch.Generator().manual_seed(seed)
    vocab = target.vocab_size
    ids = torch.randint(0, vocab - 1, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g)
    if not with_image:
        return target.embed(ids, None)
    ids = torch.cat([ids[:2], torch.tensor([target.image_token_id]), ids[2:]])
    pixels = torch.randn(1, 3, 28, 28, generator=g)
    return target.embed(ids, pixels)


def children_lists(parents: list[int]) -> list[list[int]]:
    """Each node's children in index order, from the parents list (the root's parent -1)."""
    children: list[list[int]] = [[] for _ in parents]
    for node, parent in enumerate(parents[1:], start=1):
        children[parent].append(node)
    return children
