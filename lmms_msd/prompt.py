"""Prompt format: a user question and its images -> the conversation prompt -> token ids.

The token ids hold exactly ONE image placeholder id per `<image>` in the prompt; `Target.embed`
expands each placeholder into as many positions as the vision tower returns features, so no image
token count appears here.

Two tokenisation styles, one per checkpoint layout, each reproducing the code the checkpoint was
released with:

- "llava" (original layout, liuhaotian/...): LLaVA's `tokenizer_image_token` — split the prompt on
  "<image>", tokenise each chunk on its own (each gets a BOS), keep the first chunk's BOS, drop the
  BOS of later chunks and put the placeholder id between chunks.
- "hf" (HF layout, llava-hf/...): tokenise the whole string; the tokenizer knows `<image>` as an
  added special token, as the HF processor does (before it repeats the token per feature).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IMAGE_PLACEHOLDER = "<image>"

# LLaVA's `llava.conversation.conv_vicuna_v1` (the mode LLaVA-1.5's evaluation scripts use) says
# "user"; its `conv_llava_v1` says "human". Both are kept, word for word.
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# template name -> its default system prompt (None: no system prompt unless one is given)
TEMPLATE_SYSTEM_PROMPTS: dict[str, str | None] = {
    "vicuna_v1": VICUNA_V1_SYSTEM,
    "llava_v1": LLAVA_V1_SYSTEM,
    "llava_hf": None,
}
TOKENIZATION_STYLES = ("llava", "hf")


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes the target's input ids.

    conv_template: "vicuna_v1" (LLaVA-1.5's evaluation conversation), "llava_v1" (the same turns with
        LLaVA's "human" system prompt) or "llava_hf" (the llava-hf model cards': no system prompt)
    system_prompt: overrides the template's default; None keeps the default
    tokenization: "llava" (LLaVA's per-chunk `tokenizer_image_token`) or "hf" (whole string)
    """

    conv_template: str = "vicuna_v1"
    system_prompt: str | None = None
    tokenization: str = "llava"

    def __post_init__(self) -> None:
        if self.conv_template not in TEMPLATE_SYSTEM_PROMPTS:
            raise ValueError(
                f"unknown conv_template {self.conv_template!r}; valid ones: {sorted(TEMPLATE_SYSTEM_PROMPTS)}"
            )
        if self.tokenization not in TOKENIZATION_STYLES:
            raise ValueError(f"unknown tokenization {self.tokenization!r}; valid ones: {list(TOKENIZATION_STYLES)}")

    @property
    def system(self) -> str | None:
        """The system prompt in use: the override, else the template's default."""
        if self.system_prompt is not None:
            return self.system_prompt
        return TEMPLATE_SYSTEM_PROMPTS[self.conv_template]

    def build(self, question: str, n_images: int) -> str:
        """The conversation prompt, ending where the assistant's answer starts.

        "{system} USER: <image>\\n{question} ASSISTANT:" — LLaVA's SeparatorStyle.TWO conversation
        (conv_vicuna_v1 / conv_llava_v1) with one `<image>\\n` per image in front of the question, as
        LLaVA's evaluation scripts put it; "llava_hf" drops the system prompt (unless one is given).
        """
        if n_images < 0:
            raise ValueError(f"n_images must be >= 0, got {n_images}")
        if IMAGE_PLACEHOLDER in question:
            raise ValueError(
                f"the question already contains {IMAGE_PLACEHOLDER!r}; pass the question without it "
                "and the images separately (the prompt format places one placeholder per image)"
            )
        user = (IMAGE_PLACEHOLDER + "\n") * n_images + question
        turns = f"USER: {user} ASSISTANT:"
        system = self.system
        return turns if not system else f"{system} {turns}"

    def tokenize(self, tokenizer: Any, prompt: str, image_token_id: int) -> torch.Tensor:
        """prompt (with `<image>` placeholders) -> input ids [L0] long, one `image_token_id` per `<image>`."""
        if self.tokenization == "llava":
            ids = _tokenize_llava(tokenizer, prompt, image_token_id)
        else:
            ids = list(tokenizer(prompt, add_special_tokens=True).input_ids)
        n_expected = prompt.count(IMAGE_PLACEHOLDER)
        n_found = ids.count(image_token_id)
        if n_found != n_expected:
            raise ValueError(
                f"the prompt has {n_expected} {IMAGE_PLACEHOLDER!r} but its token ids hold {n_found} "
                f"image_token_id={image_token_id}; the tokenizer must know {IMAGE_PLACEHOLDER!r} as an added "
                f"special token with that id (tokenizer gives {tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)})"
            )
        return torch.tensor(ids, dtype=torch.long)


def _tokenize_llava(tokenizer: Any, prompt: str, image_token_id: int) -> list[int]:
    """LLaVA's `llava.mm_utils.tokenizer_image_token`, step for step.

    Each chunk is tokenised with special tokens (a LLaMA tokenizer prepends BOS). When the first
    chunk starts with BOS, the BOS is kept once and the first id of every later chunk (its BOS) is
    dropped. Example, chunks [[1, 5, 6], [1, 7]] -> [1, 5, 6, image_token_id, 7].
    """
    chunks = [list(tokenizer(chunk).input_ids) for chunk in prompt.split(IMAGE_PLACEHOLDER)]
    offset = 1 if chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids = chunks[0][:1] if offset else []
    for index, chunk in enumerate(chunks):
        if index > 0:
            ids.append(image_token_id)
        ids.extend(chunk[offset:])
    return ids
