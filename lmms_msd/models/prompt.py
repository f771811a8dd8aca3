"""Prompt format: a user question and its images -> the conversation prompt -> token ids.

The token ids hold exactly ONE image placeholder id per `<image>` in the prompt; `Target.embed`
expands each placeholder into as many positions as the vision tower returns features, so no image
token count appears here.

Two tokenisation styles, one per checkpoint layout, each reproducing the code the checkpoint was
released with:

- "llava" (original layout, liuhaotian/...): LLaVA's `tokenizer_image_token` (llava/mm_utils.py) with
  the tokenizer LLaVA loads, `AutoTokenizer.from_pretrained(path, use_fast=False)`: transformers
  4.37's slow sentencepiece `LlamaTokenizer` (`SlowLlamaTokenizer` below). Split the prompt on
  "<image>", tokenise each chunk on its own (each gets a BOS), keep the first chunk's BOS, drop the
  first id of later chunks and put the placeholder id between chunks.
- "hf" (HF layout, llava-hf/...): tokenise the whole string; the tokenizer knows `<image>` as an
  added special token, as the HF processor does (before it repeats the token per feature).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
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
    # MSD's: conv_templates["llava_v1"] with `conv.system = ""` (Lyn-Lucy/MSD
    # EAGLE/eagle/ge_data/ge_data_all_llava15.py, training) and conv_templates["vicuna_v1"] with
    # `conv.system=""` (lmms-eval/lmms_eval/models/llava_msd.py, evaluation): the same text.
    "msd": "",
    "llava_hf": None,
}
# LLaVA `Conversation`s with SeparatorStyle.TWO: get_prompt() starts with `self.system + self.sep` (sep " "),
# so the separator is there even when the system prompt is empty
LLAVA_CONVERSATIONS = ("vicuna_v1", "llava_v1", "msd")
TOKENIZATION_STYLES = ("llava", "hf")


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes the target's input ids.

    conv_template: "vicuna_v1" (LLaVA-1.5's evaluation conversation), "llava_v1" (the same turns with
        LLaVA's "human" system prompt), "msd" (MSD's: the same turns with an empty system prompt, what
        the released MSD heads were trained and evaluated on) or "llava_hf" (the llava-hf model
        cards': no system prompt)
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

        LLaVA's conversations (SeparatorStyle.TWO, llava/conversation.py) render
        `system + " " + "USER: " + message + " " + "ASSISTANT:"`, the separator kept when the system prompt
        is empty. The message is one "<image>\\n" per image, then the question, as LLaVA's evaluation
        scripts put it; "msd" joins the images with a space before one "\\n", as MSD's evaluation does
        (`" ".join(image_tokens)` in lmms-eval/lmms_eval/models/llava_msd.py). "llava_hf" has no
        separator before "USER:" unless a system prompt is given. Worked examples, question "What is
        shown?":

            vicuna_v1, 1 image  "A chat between ... user's questions. USER: <image>\\nWhat is shown? ASSISTANT:"
            msd, 1 image        " USER: <image>\\nWhat is shown? ASSISTANT:"
            msd, 2 images       " USER: <image> <image>\\nWhat is shown? ASSISTANT:"
            llava_hf, 1 image   "USER: <image>\\nWhat is shown? ASSISTANT:"
        """
        if n_images < 0:
            raise ValueError(f"n_images must be >= 0, got {n_images}")
        if IMAGE_PLACEHOLDER in question:
            raise ValueError(
                f"the question already contains {IMAGE_PLACEHOLDER!r}; pass the question without it "
                "and the images separately (the prompt format places one placeholder per image)"
            )
        if self.conv_template == "msd":
            user = " ".join([IMAGE_PLACEHOLDER] * n_images) + "\n" + question if n_images else question
        else:
            user = (IMAGE_PLACEHOLDER + "\n") * n_images + question
        turns = f"USER: {user} ASSISTANT:"
        system = self.system
        if self.conv_template in LLAVA_CONVERSATIONS:
            return f"{system} {turns}"
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
    """LLaVA's `llava.mm_utils.tokenizer_image_token`, step for step, with LLaVA's slow tokenizer.

    Each chunk is tokenised with special tokens (a LLaMA tokenizer prepends BOS). When the first
    chunk starts with BOS, the BOS is kept once and the first id of every later chunk (its BOS) is
    dropped. Example, chunks [[1, 5, 6], [1, 7]] -> [1, 5, 6, image_token_id, 7]. A tokenizer with a
    sentencepiece model (the original layout's tokenizer.model) encodes chunks as LLaVA's slow
    `LlamaTokenizer` does (`SlowLlamaTokenizer`); one without (a tokenizer.json only) is the tokenizer
    LLaVA would load too, and is called as is.
    """
    encode = SlowLlamaTokenizer.of(tokenizer) or (lambda chunk: list(tokenizer(chunk).input_ids))
    chunks = [encode(chunk) for chunk in prompt.split(IMAGE_PLACEHOLDER)]
    offset = 1 if chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids = chunks[0][:1] if offset else []
    for index, chunk in enumerate(chunks):
        if index > 0:
            ids.append(image_token_id)
        ids.extend(chunk[offset:])
    return ids


class SlowLlamaTokenizer:
    """`tokenizer(text).input_ids` of transformers 4.37's slow `LlamaTokenizer` (the version LLaVA pins;
    `use_fast=False` in llava/model/builder.py), on the checkpoint's own sentencepiece model.

    transformers 5 loads a tokenizer.model as a fast tokenizer whose Metaspace pre-tokenizer does not
    prepend "▁" to text that already starts with a space, where sentencepiece always adds its dummy
    prefix: " USER: " is ["<s>", "▁", "US", ...] there and ["<s>", "▁▁", "US", ...] in LLaVA's tokenizer.
    The rules (4.37 `LlamaTokenizer.tokenize` / `_tokenize` / `get_spm_processor`, add_bos_token=True,
    add_eos_token=False), with the model's <s>, </s>, <unk> as the special tokens (written in the text,
    they become their ids):

    - legacy (tokenizer_config.json says `"legacy": true`, or says nothing): each piece of text between
      special tokens is `sp.encode(piece)`, with the model's dummy prefix.
    - not legacy: the text becomes "▁" + text (its "▁" written as " "); the model is loaded without its
      dummy prefix; a piece starting with "▁" or " " is encoded as "<unk>" + piece and the unk's ids
      dropped, any other piece as is; a leading lone "▁" token before a special token is dropped.
    """

    def __init__(self, model_file: str, legacy: bool) -> None:
        import sentencepiece as spm

        proto = Path(model_file).read_bytes()
        if not legacy:
            from sentencepiece import sentencepiece_model_pb2

            model = sentencepiece_model_pb2.ModelProto.FromString(proto)
            model.normalizer_spec.add_dummy_prefix = False
            proto = model.SerializeToString()
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.legacy = legacy
        self.bos_token_id = self.sp.bos_id()
        self.unk_token = self.sp.id_to_piece(self.sp.unk_id())
        self.unk_length = len(self.sp.encode(self.unk_token))
        self.special = {self.sp.id_to_piece(i): i for i in (self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()) if i >= 0}
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(self.special, key=len, reverse=True))) + ")")

    @staticmethod
    def of(tokenizer: Any) -> SlowLlamaTokenizer | None:
        """LLaVA's slow tokenizer for `tokenizer`, or None when it has no sentencepiece model file."""
        model_file = getattr(tokenizer, "vocab_file", None)
        if not model_file or not str(model_file).endswith(".model") or not Path(model_file).is_file():
            return None
        config_file = Path(model_file).parent / "tokenizer_config.json"
        legacy = json.loads(config_file.read_text()).get("legacy") if config_file.is_file() else None
        return _slow_llama(str(model_file), True if legacy is None else bool(legacy))

    def __call__(self, text: str) -> list[int]:
        if not self.legacy and text:
            text = "▁" + text.replace("▁", " ")
        pieces = [piece for piece in self._split.split(text) if piece]
        ids = [[self.special[p]] if p in self.special else self._encode(p) for p in pieces]
        if not self.legacy and len(pieces) > 1 and pieces[1] in self.special and ids[0] == [self.sp.piece_to_id("▁")]:
            ids = ids[1:]
        return [self.bos_token_id] + [i for part in ids for i in part]

    def _encode(self, piece: str) -> list[int]:
        if self.legacy or not piece.startswith(("▁", " ")):
            return self.sp.encode(piece)
        return self.sp.encode(self.unk_token + piece)[self.unk_length :]


@functools.lru_cache(maxsize=8)
def _slow_llama(model_file: str, legacy: bool) -> SlowLlamaTokenizer:
    """One SlowLlamaTokenizer per model file: loading the model costs more than tokenising a prompt."""
    return SlowLlamaTokenizer(model_file, legacy)
