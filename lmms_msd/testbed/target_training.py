"""Train the testbed's target: a tokenizer and a small LLaVA-1.5-architecture model on the task data.

    lmms-msd train-target --data data/tasks --out target --device cuda

reads `llava_train.json` / `llava_test.json` and the images they name (LLaVA conversation files, as
`lmms-msd make-charts` writes them), and writes an HF-layout checkpoint folder that
`lmms_msd.models.loading.load_target` loads:

    config.json, model.safetensors         LlavaForConditionalGeneration (saved in float16 by default), in
      (or model-0000i-of-0000n.safetensors shards of at most --max-shard-size, 15 MB by default, with
       model.safetensors.index.json)
    tokenizer.json, tokenizer_config.json  the 32000-entry vocabulary (`train_tokenizer`, below)
    preprocessor_config.json               CLIP image processor at LLaVA-1.5's 336 px
    processor_config.json, chat_template.jinja
                                           the LlavaProcessor (the same image settings, patch size, feature
                                           strategy) and the llava-hf chat template, for transformers'
                                           AutoProcessor and lmms-eval's llava_hf model
    train_metrics.json                     loss curve, held-out loss, sizes, timings, greedy samples

The model is LLaVA-1.5's architecture at LLaVA-1.5-7B's shapes where cost or behaviour depends on them,
and small elsewhere (`TargetSizes`):

- images: 336 x 336 pixels in 14-pixel patches, so 576 image positions; the features are the CLIP
  tower's second-to-last layer without the CLS token (vision_feature_layer=-2, strategy "default"),
  through a 2-layer GELU projector;
- vocabulary: 32000 entries, as LLaMA's (see `train_tokenizer`);
- head_dim 128 and 4096 positions, as LLaMA-7B's, so a 7B-shaped copy (`lmms_msd.testbed.inflate`)
  only adds zero heads; the CLIP heads are 64 wide, as ViT-L/14's, so its copy of the tower only
  repeats them;
- widths and depths small: the default pair (target, draft, tokenizer) takes about 30 MB on disk in
  float16, almost all of it the three 32000-row tables (target embeddings and lm_head, the draft's
  embedding copy).

Training is LLaVA's instruction tuning on one-turn conversations: the prompt is the one
`Target.prepare` builds (vicuna_v1 conversation, `<image>` expanded to as many positions as the vision
tower returns features, the count read from the tower's output), the reply is " " + answer + "</s>",
and the loss is the cross-entropy on the reply tokens only (lm_head runs on those positions alone).
Every weight is trained from scratch. AdamW, linear warm-up then cosine decay, bf16 autocast on CUDA,
all data held on the device: token ids, and each image once as its resized and cropped uint8 pixels
(normalised per batch, as the image processor normalises them), 0.34 MB per 336-pixel image.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from lmms_msd.models.checkpoints import shard_size
from lmms_msd.models.loading import DTYPES
from lmms_msd.models.prompt import (
    IMAGE_PLACEHOLDER,
    TEMPLATE_SYSTEM_PROMPTS,
    PromptFormat,
)
from lmms_msd.testbed.charts import IMAGE_PREFIX, read_conversations
from lmms_msd.testbed.tiny import (
    add_image_and_pad_tokens,
    llava_config,
    save_clip_image_processor,
    train_byte_bpe,
)

log = logging.getLogger(__name__)

PROMPT_FORMAT = PromptFormat(conv_template="vicuna_v1", system_prompt=None, tokenization="hf")
IGNORE_INDEX = -100  # labels of positions outside the reply
# The llava-hf LLaVA-1.5 model cards' chat template (llava-hf/llava-1.5-7b-hf, chat_template.json: images
# first, then the text, roles upper-cased, "ASSISTANT:" to generate), plus one branch: a message whose
# content is a plain string (as lmms-eval's llava_hf model passes "<image>\n{question}") is written as is.
# Either way one user turn becomes conv_template=llava_hf's prompt, "USER: <image>\n{question} ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class TargetSizes:
    """Sizes of the miniature target. The vision tower gives (image_size // patch_size) ** 2 features.

    The default's parameters (`parameter_counts`; 20.6 MB in float16, the draft for it 8.8 MB):
    text embeddings and lm_head 32000 x 128 each (4,096,000 apiece), 4 text layers of 278,784
    (attention 2 heads x 128 = 256 wide: q/k/v/o 131,072; MLP 128 -> 384 -> 128: 147,456; norms 256),
    vision tower 942,848 (patches 75,264, class and 577 positions 73,984, 4 layers of 198,272, two
    LayerNorms 512), projector 33,024; 10,283,136 in all.
    """

    vocab_size: int = 32000  # entries in all, <image> and <pad> included (LLaMA's 32000); see train_tokenizer
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 2  # attention is num_heads * head_dim = 256 wide, twice the residual stream
    head_dim: int = 128  # LLaVA-1.5-7B's
    max_position_embeddings: int = 4096  # LLaVA-1.5's
    image_size: int = 336  # LLaVA-1.5's CLIP ViT-L/14-336 input
    patch_size: int = 14  # (336 / 14) ** 2 = 576 image positions
    vision_hidden_size: int = 128
    vision_intermediate_size: int = 512
    vision_layers: int = 4  # the last one is not read (vision_feature_layer=-2), as in LLaVA-1.5
    vision_heads: int = 2  # head_dim 64, CLIP ViT-L's

    @property
    def num_kv_heads(self) -> int:
        """As many key/value heads as query heads (LLaMA-7B's multi-head attention)."""
        return self.num_heads


SIZE_PRESETS = {
    "default": TargetSizes(),
    # seconds on a CPU: tests and smoke runs (4 image positions, a 1024-entry vocabulary)
    "tiny": TargetSizes(
        vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=1, num_heads=1, image_size=28,
        vision_hidden_size=32, vision_intermediate_size=64, vision_layers=2, vision_heads=2,
    ),
}


# ---- tokenizer ---------------------------------------------------------------------------------------
UNUSED_TOKEN = "<unused{}>"  # the padding entries' names: <unused0>, <unused1>, ...
N_ADDED = 2  # <image> and <pad>, added after the BPE vocabulary


def train_tokenizer(texts: Iterable[str], folder: str | Path, vocab_size: int, model_max_length: int) -> Any:
    """The target's vocabulary of exactly `vocab_size` entries, saved to `folder` (AutoTokenizer loads
    it) and returned.

    A byte-level BPE (the `tokenizers` library) trained on `texts` with a budget of vocab_size - 2
    entries: any text encodes (byte by byte at worst) and decodes back to itself; digits are split one
    by one (a number is a few digit tokens, as in LLaMA's tokenizer); `<s>` is prepended. When the text
    has fewer distinct pieces than the budget (the task text fills a few thousand), the BPE vocabulary
    is padded with entries named `<unused0>`, `<unused1>`, ...: they are in the BPE model's vocabulary
    but no merge produces them, so no text ever encodes to them (typed in a text, "<unused5>" is
    encoded as its characters), and they decode to their names. Then `<image>` and `<pad>` are added
    as LLaVA's HF conversion adds them. The ids:

        0 <unk>, 1 <s>, 2 </s>                       LLaMA's special tokens, at LLaMA's ids
        3 .. n - 1                                   the trained BPE: the 256 byte symbols, then merges
        n .. vocab_size - 3                          <unused0> .. (padding, never produced by encoding)
        vocab_size - 2 <image>, vocab_size - 1 <pad> added special tokens (31998 and 31999 by default)
    """
    budget = vocab_size - N_ADDED
    if budget < 3 + 256:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for the 3 special tokens, 256 byte symbols, <image> and <pad>; use at least {3 + 256 + N_ADDED}")
    tokenizer = train_byte_bpe(texts, folder, budget, split_digits=True, model_max_length=model_max_length)
    tokenizer = pad_vocabulary(tokenizer, budget, model_max_length)
    add_image_and_pad_tokens(tokenizer)
    assert len(tokenizer) == vocab_size, f"the tokenizer has {len(tokenizer)} entries, {vocab_size} were asked"
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def pad_vocabulary(tokenizer: Any, size: int, model_max_length: int) -> Any:
    """A copy of the trained byte-level BPE `tokenizer` whose model vocabulary has `size` entries, the
    ones past the trained vocabulary named UNUSED_TOKEN (see `train_tokenizer`); ids of trained entries
    are unchanged."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    assert model["type"] == "BPE" and not model.get("ignore_merges"), (
        "padding entries are unreachable only in a BPE model that encodes through its merges"
    )
    vocab = model["vocab"]
    n = len(vocab)
    if n > size:
        raise ValueError(f"the trained BPE has {n} entries, more than the {size} asked")
    for index in range(size - n):
        name = UNUSED_TOKEN.format(index)
        assert name not in vocab, f"{name} is already a trained token"
        vocab[name] = n + index
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=model_max_length,
    )


def tokenizer_corpus(records: list[dict[str, Any]], max_texts: int = 20_000) -> list[str]:
    """The conversations as the target reads them (prompt + reply, `<image>` left out) and the system
    prompts, so prompt words and reply words become whole tokens. Past `max_texts` distinct
    conversations an evenly spaced subset is kept (the templates repeat; BPE needs word counts, not
    every chart)."""
    conversations = set()
    for record in records:
        question, reply = split_conversation(record)
        conversations.add(PROMPT_FORMAT.build(question, n_images=0) + " " + reply)
    texts = sorted(conversations)
    texts = texts[:: max(1, math.ceil(len(texts) / max_texts))]
    return sorted({system for system in TEMPLATE_SYSTEM_PROMPTS.values() if system}) + texts


def split_conversation(record: dict[str, Any]) -> tuple[str, str]:
    """A one-turn LLaVA record -> (question without `<image>`, reply)."""
    turns = record.get("conversations", [])
    if len(turns) != 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
        raise ValueError(
            f"record {record.get('id')!r}: expected one human turn then one gpt turn, got "
            f"{[turn.get('from') for turn in turns]}; the testbed trains on one-turn conversations"
        )
    human = turns[0]["value"]
    if not human.startswith(IMAGE_PREFIX) or IMAGE_PLACEHOLDER in human[len(IMAGE_PREFIX):]:
        raise ValueError(
            f"record {record.get('id')!r}: the human turn must start with {IMAGE_PREFIX!r} and hold no other "
            f"{IMAGE_PLACEHOLDER!r}; it starts with {human[:40]!r}"
        )
    return human[len(IMAGE_PREFIX):], turns[1]["value"]


# ---- model -------------------------------------------------------------------------------------------
def target_config(sizes: TargetSizes, tokenizer: Any) -> Any:
    """The target's LlavaConfig (`lmms_msd.testbed.tiny.llava_config`), its sizes checked against each other
    and against the tokenizer."""
    if sizes.image_size % sizes.patch_size:
        raise ValueError(f"image_size {sizes.image_size} is not a multiple of patch_size {sizes.patch_size}")
    if sizes.vision_hidden_size % sizes.vision_heads:
        raise ValueError(f"vision_hidden_size {sizes.vision_hidden_size} is not a multiple of vision_heads {sizes.vision_heads}")
    if len(tokenizer) != sizes.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} entries but the sizes say vocab_size={sizes.vocab_size}")
    return llava_config(sizes, sizes.vocab_size, tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER))


@torch.no_grad()
def init_weights_(model: torch.nn.Module, seed: int, std: float = 0.02) -> torch.nn.Module:
    """GPT-2-style initialisation from an explicit seeded generator: matrices, embeddings and the
    class embedding N(0, std), residual output projections scaled down by sqrt(2 * layers) of their
    tower, norm weights 1, biases 0."""
    generator = torch.Generator().manual_seed(seed)
    text_layers = model.config.text_config.num_hidden_layers
    vision_layers = model.config.vision_config.num_hidden_layers
    for name, param in sorted(model.named_parameters()):
        if param.dim() == 1 and name.endswith("bias"):
            param.zero_()
        elif param.dim() == 1 and "norm" in name:
            param.fill_(1.0)
        else:
            scale = std
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                scale /= math.sqrt(2 * text_layers)
            elif name.endswith(("out_proj.weight", "fc2.weight")) and "vision_tower" in name:
                scale /= math.sqrt(2 * vision_layers)
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model


def build_target_model(sizes: TargetSizes, tokenizer: Any, seed: int) -> Any:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration._from_config(target_config(sizes, tokenizer), attn_implementation="sdpa")
    init_weights_(model, seed)
    embed, head = model.get_input_embeddings().weight, model.lm_head.weight
    assert embed.data_ptr() != head.data_ptr(), "lm_head must not be tied to the input embeddings (LLaVA's are not)"
    return model


def save_processor(folder: str | Path, tokenizer: Any, config: Any) -> None:
    """Save the LlavaProcessor that transformers' `AutoProcessor` and lmms-eval's `llava_hf` model load:
    the tokenizer files, processor_config.json (the image processor settings of `folder`'s
    preprocessor_config.json, patch_size, vision_feature_select_strategy, num_additional_image_tokens)
    and chat_template.jinja (CHAT_TEMPLATE).

    The processor repeats `<image>` (patch count + num_additional_image_tokens - (strategy == "default"))
    times; the CLIP tower's class token is the one additional token, so with the "default" strategy
    that is the vision tower's patch count, the number of features `Target.embed` puts there.
    """
    from transformers import AutoImageProcessor, LlavaProcessor

    LlavaProcessor(
        image_processor=AutoImageProcessor.from_pretrained(str(folder)),
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's class token
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(str(folder))


def parameter_counts(model: Any) -> dict[str, int]:
    parts = {
        "vision_tower": model.model.vision_tower,
        "projector": model.model.multi_modal_projector,
        "language_model": model.model.language_model,
        "lm_head": model.lm_head,
    }
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


# ---- data --------------------------------------------------------------------------------------------
def expand_image_placeholder(input_ids: torch.Tensor, image_token_id: int, n_image_tokens: int) -> torch.Tensor:
    """[L0] with one placeholder -> [L0 - 1 + n_image_tokens]: the ids `Target.embed` returns."""
    assert input_ids.dim() == 1, f"input_ids must be [L0], got {tuple(input_ids.shape)}"
    (where,) = (input_ids == image_token_id).nonzero(as_tuple=True)
    assert where.numel() == 1, f"expected one image placeholder, found {where.numel()}"
    pos = int(where)
    image = input_ids.new_full((n_image_tokens,), image_token_id)
    return torch.cat([input_ids[:pos], image, input_ids[pos + 1:]])


@dataclass
class PixelNormalizer:
    """Resized and cropped uint8 pixels -> the pixel values the image processor returns for them.

    Rescaling and normalising are fused as transformers' image processors fuse them:
    (x - mean / rescale_factor) / (std / rescale_factor), x in 0..255. Worked example, CLIP's red
    channel (mean 0.48145466, std 0.26862954, rescale 1/255): x = 255 gives
    (255 - 122.770943) / 68.500534 = 1.930336, x = 0 gives -1.792263.
    """

    mean: torch.Tensor  # [3, 1, 1] float32, in 0..255 units
    std: torch.Tensor  # [3, 1, 1] float32, in 0..255 units

    @classmethod
    def of(cls, processor: Any, device: torch.device) -> PixelNormalizer:
        """From a transformers image processor that rescales and normalises (CLIP's)."""
        if not (processor.do_rescale and processor.do_normalize):
            raise ValueError(
                f"the image processor has do_rescale={processor.do_rescale}, do_normalize={processor.do_normalize}; "
                "training keeps uint8 pixels and needs both to normalise them as the processor does"
            )
        scale = 1.0 / processor.rescale_factor
        mean = torch.tensor(processor.image_mean, dtype=torch.float32) * scale
        std = torch.tensor(processor.image_std, dtype=torch.float32) * scale
        return cls(mean.view(3, 1, 1).to(device), std.view(3, 1, 1).to(device))

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: [B, 3, S, S] uint8 -> [B, 3, S, S] float32"""
        assert pixels.dtype == torch.uint8 and pixels.dim() == 4, f"expected uint8 [B, 3, S, S], got {pixels.dtype} {tuple(pixels.shape)}"
        return (pixels.float() - self.mean) / self.std


@dataclass
class ConversationSet:
    """Tokenised conversations, padded, with their images; all tensors on one device but `lengths_cpu`."""

    input_ids: torch.Tensor  # [N, L] long; prompt (placeholder expanded) + reply + </s>, right-padded with <pad>
    labels: torch.Tensor  # [N, L] long; the input id on reply tokens, IGNORE_INDEX elsewhere
    lengths_cpu: torch.Tensor  # [N] long, on the CPU: unpadded lengths (batch shapes without a device sync)
    image_index: torch.Tensor  # [N] long; row of `pixels`
    pixels: torch.Tensor  # [n_images, 3, S, S] uint8: resized and cropped, not yet normalised
    normalize: PixelNormalizer

    def __post_init__(self) -> None:
        n, length = self.input_ids.shape
        assert self.labels.shape == (n, length), f"labels {tuple(self.labels.shape)} != {(n, length)}"
        assert self.lengths_cpu.shape == (n,) and self.image_index.shape == (n,)
        assert self.lengths_cpu.device.type == "cpu", "lengths_cpu must stay on the CPU"
        assert self.pixels.dim() == 4 and self.pixels.dtype == torch.uint8, (
            f"pixels must be uint8 [n_images, 3, S, S], got {self.pixels.dtype} {tuple(self.pixels.shape)}"
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, index: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
        """Rows `index` [B] (on the device) cut to `length`, the longest of them (computed on the CPU).

        No attention mask: the padding is on the right, so under the causal mask no real token sees
        a pad, and pad positions carry no label.
        """
        return {
            "input_ids": self.input_ids[index, :length],
            "labels": self.labels[index, :length],
            "pixel_values": self.normalize(self.pixels[self.image_index[index]]),
        }


def encode_conversations(
    records: list[dict[str, Any]], tokenizer: Any, image_token_id: int, n_image_tokens: int, max_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Records -> (input_ids [N, L], labels [N, L], lengths [N]) on the CPU."""
    questions, replies = zip(*(split_conversation(record) for record in records))
    prompt_ids: dict[str, torch.Tensor] = {}  # questions repeat: tokenise each once
    for question in sorted(set(questions)):
        ids = PROMPT_FORMAT.tokenize(tokenizer, PROMPT_FORMAT.build(question, n_images=1), image_token_id)
        prompt_ids[question] = expand_image_placeholder(ids, image_token_id, n_image_tokens)
    reply_ids = tokenizer([" " + reply for reply in replies], add_special_tokens=False).input_ids
    if any(image_token_id in ids for ids in reply_ids):  # each row then holds exactly n_image_tokens placeholders
        raise ValueError(f"a reply contains {IMAGE_PLACEHOLDER!r}; replies must be text only")
    rows = []
    for question, reply in zip(questions, reply_ids):
        prompt = prompt_ids[question]
        reply_t = torch.tensor([*reply, tokenizer.eos_token_id], dtype=torch.long)
        rows.append((torch.cat([prompt, reply_t]), prompt.shape[0]))
    longest = max(ids.shape[0] for ids, _ in rows)
    if longest > max_length:
        raise ValueError(
            f"a conversation is {longest} tokens long, past the target's {max_length} positions; "
            "raise max_position_embeddings"
        )
    input_ids = torch.full((len(rows), longest), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    lengths = torch.empty(len(rows), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(rows):
        input_ids[row, : ids.shape[0]] = ids
        labels[row, n_prompt : ids.shape[0]] = ids[n_prompt:]
        lengths[row] = ids.shape[0]
    return input_ids, labels, lengths


class _ImageChunks(torch.utils.data.Dataset):
    """Chunks of image paths -> uint8 pixels [n, 3, S, S]: decoded to RGB, then resized and cropped by the
    checkpoint's own image processor with rescaling and normalising left to `PixelNormalizer` (the path
    `Target.prepare` takes, in two parts). A torch Dataset, so a DataLoader's worker processes can share
    the work."""

    def __init__(self, paths: list[str], processor_folder: str | Path, chunk: int) -> None:
        self.chunks = [paths[start : start + chunk] for start in range(0, len(paths), chunk)]
        self.processor_folder = str(processor_folder)
        self.processor: Any = None  # loaded in each worker on first use

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        from lmms_msd.models.image import load_image_preprocessor

        if self.processor is None:
            self.processor = load_image_preprocessor(self.processor_folder, pad_to_square=False).processor
        pixels = []
        for path in self.chunks[index]:
            with Image.open(path) as image:
                cropped = self.processor(image.convert("RGB"), do_rescale=False, do_normalize=False, return_tensors="pt")
            values = cropped["pixel_values"]  # [1, 3, S, S], 0..255
            assert torch.equal(values, values.round()) and values.min() >= 0 and values.max() <= 255, (
                f"the image processor's resize of {path} gave values that are not uint8 pixels"
            )
            pixels.append(values.to(torch.uint8))
        return torch.cat(pixels)


def load_pixels(
    paths: list[str], processor_folder: str | Path, workers: int, device: torch.device | str = "cpu", progress: bool = True
) -> torch.Tensor:
    """Images -> uint8 pixels [N, 3, S, S] on `device` (resized and cropped by the image processor saved
    in `processor_folder`; `PixelNormalizer` finishes the preprocessing), decoded in `workers` DataLoader
    worker processes and written chunk by chunk into one tensor (no second copy on the host)."""
    from tqdm.auto import tqdm

    chunks = _ImageChunks(paths, processor_folder, chunk=256)
    loader = torch.utils.data.DataLoader(chunks, batch_size=None, num_workers=workers if workers > 1 else 0)
    pixels, start = None, 0
    with tqdm(total=len(paths), desc="images", mininterval=2, disable=not progress) as bar:
        for chunk in loader:
            if pixels is None:
                pixels = torch.empty((len(paths), *chunk.shape[1:]), dtype=torch.uint8, device=device)
                log.info("%d images: %.1f GB of uint8 pixels on %s", len(paths), pixels.numel() / 1e9, device)
            pixels[start : start + chunk.shape[0]] = chunk.to(device)
            start += chunk.shape[0]
            bar.update(chunk.shape[0])
    assert pixels is not None and start == len(paths), f"read {start} of {len(paths)} images"
    return pixels


def load_conversation_set(
    data_dir: Path, split: str, tokenizer: Any, processor_folder: Path, n_image_tokens: int, max_length: int,
    device: torch.device, workers: int, limit: int | None = None, progress: bool = True,
) -> ConversationSet:
    from lmms_msd.models.image import load_image_preprocessor

    records = read_conversations(data_dir, split)[:limit]
    image_paths = sorted({record["image"] for record in records})
    row_of = {path: row for row, path in enumerate(image_paths)}
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    input_ids, labels, lengths = encode_conversations(records, tokenizer, image_token_id, n_image_tokens, max_length)
    pixels = load_pixels([str(data_dir / path) for path in image_paths], processor_folder, workers, device, progress)
    image_index = torch.tensor([row_of[record["image"]] for record in records], dtype=torch.long)
    normalize = PixelNormalizer.of(load_image_preprocessor(processor_folder, pad_to_square=False).processor, device)
    return ConversationSet(input_ids.to(device), labels.to(device), lengths, image_index.to(device), pixels, normalize)


# ---- training ----------------------------------------------------------------------------------------
def reply_hidden(target: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The language model's last hidden states [B, L, H] (after the final norm), computed the way
    `Target.embed` + `Target.forward` run the model: image features replace the placeholder positions,
    then the language model."""
    input_ids = batch["input_ids"]  # [B, L]
    model = target.model
    features = target.image_features(batch["pixel_values"])  # [B, n_image_tokens, H]
    embeds = model.get_input_embeddings()(input_ids)  # [B, L, H]
    image_mask = (input_ids == target.image_token_id)[..., None]  # [B, L, 1]; counts checked when encoding
    embeds = embeds.masked_scatter(image_mask, features.to(embeds.dtype))
    return model.model.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state


def reply_logits(target: Any, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits at the positions whose next token is a reply token, and those tokens.

    Position t predicts the token at t + 1, whose label is labels[:, t + 1]; lm_head runs on those n
    positions only (with 32000 entries, logits over every position of a 700-token batch would take
    gigabytes). hidden: [B, L, H], labels: [B, L] -> logits [n, V] float32, gold [n] long.
    """
    assert hidden.shape[:2] == labels.shape, f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree"
    gold = labels[:, 1:]  # [B, L - 1]
    scored = gold != IGNORE_INDEX
    return target.model.lm_head(hidden[:, :-1][scored]).float(), gold[scored]


def lr_schedule(steps: int, warmup: int, final_fraction: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up over `warmup` steps, then cosine decay to `final_fraction` of the peak."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def evaluate(target: Any, data: ConversationSet, batch_size: int, digit_ids: torch.Tensor, autocast: Any) -> dict[str, float]:
    """Teacher-forced loss and next-token accuracy on reply tokens (digits apart: they carry the values)."""
    target.model.eval()
    total, count, correct, digit_correct, digit_count = 0.0, 0, 0, 0, 0
    for start in range(0, len(data), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(data)))
        batch = data.batch(rows.to(data.input_ids.device), int(data.lengths_cpu[rows].max()))
        with autocast():
            logits, gold = reply_logits(target, reply_hidden(target, batch), batch["labels"])  # [n, V], [n]
        total += float(F.cross_entropy(logits, gold, reduction="sum"))
        count += gold.numel()
        hit = logits.argmax(-1) == gold
        correct += int(hit.sum())
        is_digit = torch.isin(gold, digit_ids)
        digit_count += int(is_digit.sum())
        digit_correct += int((hit & is_digit).sum())
    target.model.train()
    return {
        "loss": total / max(1, count),
        "token_accuracy": correct / max(1, count),
        "digit_accuracy": digit_correct / max(1, digit_count),
    }


def digit_token_ids(tokenizer: Any, device: torch.device) -> torch.Tensor:
    ids = [i for token, i in tokenizer.get_vocab().items() if tokenizer.convert_tokens_to_string([token]).strip().isdigit()]
    return torch.tensor(sorted(ids), dtype=torch.long, device=device)


def batch_schedule(n: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """Row indices [steps, batch_size]: epochs of seeded permutations of range(n), back to back."""
    generator = torch.Generator().manual_seed(seed)
    epochs = math.ceil(steps * batch_size / n)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(epochs)])
    return order[: steps * batch_size].view(steps, batch_size)


def train_loop(
    target: Any, train: ConversationSet, held_out: ConversationSet | None, *, steps: int, batch_size: int, lr: float,
    warmup: int, weight_decay: float, seed: int, eval_every: int, progress: bool, time_limit_s: float | None = None,
) -> dict[str, Any]:
    """AdamW over epochs of seeded permutations; returns the loss curve and held-out evaluations.

    time_limit_s: a safety net for machines that kill long commands. The schedule's clock is then
    the further along of step / steps and elapsed / time_limit_s, so when time runs out first the
    learning rate still decays to its end, and training stops at the limit (logged; `stopped_at_step`
    says where) with an annealed model. When the steps finish first, time plays no part and the run
    is reproducible from the seed.
    """
    from tqdm.auto import tqdm

    model, device = target.model, target.device
    cuda = device.type == "cuda"
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), fused=cuda,
    )
    lr_factor = lr_schedule(steps, warmup)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else (lambda: torch.autocast("cpu", enabled=False))
    digits = digit_token_ids(target.tokenizer, device)
    schedule = batch_schedule(len(train), steps, batch_size, seed)  # [steps, B] on the CPU
    batch_lengths = train.lengths_cpu[schedule].amax(dim=1).tolist()
    schedule = schedule.to(device)
    curve, evaluations, running, running_n = [], [], torch.zeros((), device=device), 0
    stopped_at_step = None
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(1, steps + 1), desc="target", disable=not progress, mininterval=1)
    for step in bar:
        clock = step - 1
        if time_limit_s is not None:
            clock = max(clock, int(steps * (time.perf_counter() - start) / time_limit_s))
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(min(clock, steps - 1))
        batch = train.batch(schedule[step - 1], batch_lengths[step - 1])
        with autocast():
            logits, gold = reply_logits(target, reply_hidden(target, batch), batch["labels"])
            loss = F.cross_entropy(logits, gold)  # the mean over the batch's reply tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.detach()
        running_n += 1
        if step % max(1, steps // 100) == 0 or step == steps:  # ~100 points on the curve; one sync each
            curve.append((step, float(running) / running_n))
            running.zero_()
            running_n = 0
            bar.set_postfix(loss=f"{curve[-1][1]:.3f}", refresh=False)
        if held_out is not None and (step % eval_every == 0 or step == steps):
            evaluations.append({"step": step, **evaluate(target, held_out, batch_size, digits, autocast)})
            log.info("step %d: train loss %.4f, held-out %s", step, curve[-1][1], evaluations[-1])
        if time_limit_s is not None and step < steps and time.perf_counter() - start > time_limit_s:
            stopped_at_step = step
            log.warning("time limit of %.0f s reached: training stops at step %d of %d", time_limit_s, step, steps)
            if held_out is not None:
                evaluations.append({"step": step, **evaluate(target, held_out, batch_size, digits, autocast)})
            break
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model.eval()
    done = stopped_at_step or steps
    return {
        "loss_curve": curve, "held_out": evaluations, "train_seconds": seconds, "steps_per_s": done / seconds,
        "stopped_at_step": stopped_at_step, "final_lr": optimizer.param_groups[0]["lr"],
    }


# ---- the whole run -----------------------------------------------------------------------------------
def train_target(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    steps: int = 8000,
    batch_size: int = 256,
    lr: float = 1e-3,
    device: str = "cpu",
    seed: int = 0,
    sizes: TargetSizes = TargetSizes(),
    warmup: int | None = None,
    weight_decay: float = 0.05,
    eval_every: int | None = None,
    held_out_limit: int = 512,
    save_dtype: str = "float16",
    max_shard_size: str | int = "15MB",
    n_samples: int = 12,
    workers: int = 1,
    time_limit_s: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the tokenizer and the target on `data_dir` (LLaVA conversation files and their images) and
    save both to `out_dir`.

    warmup: default min(500, steps // 10); eval_every: default steps // 5 (held-out loss on the
    first `held_out_limit` test conversations); max_shard_size: the largest weight file written
    (transformers' save_pretrained: "15MB" is 15 * 10**6 bytes; a bigger model is split into shards
    with model.safetensors.index.json); n_samples: greedy answers to log at the end (test set);
    time_limit_s: stop training early past this many seconds of training (see `train_loop`).
    Returns the metrics also written to out_dir/train_metrics.json.
    """
    from lmms_msd.models.image import load_image_preprocessor
    from lmms_msd.models.target import Target

    if save_dtype not in DTYPES:
        raise ValueError(f"save_dtype {save_dtype!r} is not one of {sorted(DTYPES)}")
    if time_limit_s is not None and time_limit_s <= 0:
        raise ValueError(f"time_limit_s must be positive, got {time_limit_s}: no time is left for training")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    torch_device = torch.device(device)
    started = time.perf_counter()
    image_size = sizes.image_size
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. tokenizer, model, image processor
    train_records = read_conversations(data_dir, "train")
    tokenizer = train_tokenizer(tokenizer_corpus(train_records), out_dir, sizes.vocab_size, sizes.max_position_embeddings)
    model = build_target_model(sizes, tokenizer, seed).to(torch_device)
    save_clip_image_processor(out_dir, image_size)
    preprocessor = load_image_preprocessor(out_dir, pad_to_square=False)
    target = Target(model, tokenizer, preprocessor, PROMPT_FORMAT, "hf")
    counts = parameter_counts(model)
    log.info("tokenizer: %d tokens; parameters: %s", len(tokenizer), counts)

    # 2. data on the device; the image token count is the vision tower's
    probe = torch.zeros(1, 3, image_size, image_size, device=torch_device)
    with torch.no_grad():
        n_image_tokens = target.image_features(probe).shape[1]
    load = {
        "tokenizer": tokenizer, "processor_folder": out_dir, "n_image_tokens": n_image_tokens,
        "max_length": target.max_length, "device": torch_device, "workers": workers, "progress": progress,
    }
    train = load_conversation_set(data_dir, "train", **load)
    has_test = (data_dir / "llava_test.json").is_file()
    held_out = load_conversation_set(data_dir, "test", **{**load, "workers": 1}, limit=held_out_limit) if has_test else None
    log.info("%d training conversations (%d images), up to %d tokens; %d image tokens each",
             len(train), train.pixels.shape[0], train.input_ids.shape[1], n_image_tokens)

    # 3. train
    metrics = train_loop(
        target, train, held_out, steps=steps, batch_size=batch_size, lr=lr,
        warmup=min(500, max(1, steps // 10)) if warmup is None else warmup, weight_decay=weight_decay,
        seed=seed, eval_every=eval_every or max(1, steps // 5), progress=progress, time_limit_s=time_limit_s,
    )

    # 4. save, reload through the loader, greedy samples
    model.to(DTYPES[save_dtype]).save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    save_processor(out_dir, tokenizer, model.config)
    metrics.update(
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device, save_dtype=save_dtype,
        sizes=asdict(sizes), image_size=image_size, n_image_tokens=n_image_tokens, vocab_size=len(tokenizer),
        parameters=counts, train_conversations=len(train), train_images=int(train.pixels.shape[0]),
        checkpoint_mb=sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file()) / 1e6,
        largest_file_mb=max(f.stat().st_size for f in out_dir.iterdir() if f.is_file()) / 1e6,
    )
    metrics["samples"] = greedy_samples(out_dir, data_dir, device, n_samples) if n_samples else []
    metrics["total_seconds"] = time.perf_counter() - started
    (out_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    log.info("saved %s (%.1f MB) after %.0f s", out_dir, metrics["checkpoint_mb"], metrics["total_seconds"])
    return metrics


def final_answer(text: str) -> str:
    """The reply's answer: after the last "Answer:" for a long reply, else the reply itself."""
    _, sep, tail = text.rpartition("Answer:")
    return (tail if sep else text).strip()


def greedy_samples(out_dir: Path, data_dir: Path, device: str, n: int) -> list[dict[str, Any]]:
    """Reload the saved checkpoint with `load_target` and answer the first n test conversations greedily."""
    from PIL import Image

    from lmms_msd.models.loading import load_target
    from lmms_msd.pipeline import Pair, RuntimeSettings, build_decoder, decode
    from lmms_msd.speculative.sampling import GenerationConfig

    target = load_target(str(out_dir), device=device, dtype=torch.float32)
    decoder = build_decoder(Pair(target, None), RuntimeSettings())
    samples = []
    for record in read_conversations(data_dir, "test")[:n]:
        question, reference = split_conversation(record)
        with Image.open(data_dir / record["image"]) as image:
            prompt = target.prepare(question, [image.convert("RGB")])
        result = decode(decoder, prompt, GenerationConfig(max_new_tokens=192))
        sample = {
            "id": record["id"], "question": question.split("\n")[0], "reference": reference, "reply": result.text,
            "tokens": len(result.token_ids),
            "match": final_answer(result.text).lower() == final_answer(reference).lower(),
        }
        samples.append(sample)
        log.info("%s | %s\n  reference: %r\n  reply:     %r", sample["id"], sample["question"], reference, result.text)
    log.info("greedy samples: %d of %d final answers match", sum(s["match"] for s in samples), len(samples))
    return samples


# ---- command line ------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    parser.add_argument("--data", required=True, help="the data folder: llava_train.json, llava_test.json and their images (lmms-msd make-charts --out ...)")
    parser.add_argument("--out", required=True, help="checkpoint folder to write (HF layout)")
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default min(500, steps // 10))")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(SIZE_PRESETS), default="default", help="model size preset")
    parser.add_argument("--save-dtype", choices=sorted(DTYPES), default="float16")
    parser.add_argument(
        "--max-shard-size", default="15MB", type=shard_size,
        help="largest weight file to write (transformers' save_pretrained; 15MB = 15 * 10**6 bytes); bigger models are sharded",
    )
    parser.add_argument("--samples", type=int, default=12, help="greedy test answers to log at the end (12: every question type, short and long)")
    parser.add_argument("--workers", type=int, default=1, help="processes decoding images")
    parser.add_argument(
        "--time-limit-minutes", type=float, default=None,
        help="stop training early (and still save) past this many minutes of training: a safety net, not the plan",
    )
    return _run


def _run(args: argparse.Namespace) -> int:
    train_target(
        args.data, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
        weight_decay=args.weight_decay, device=args.device, seed=args.seed, sizes=SIZE_PRESETS[args.size],
        save_dtype=args.save_dtype, max_shard_size=args.max_shard_size, n_samples=args.samples, workers=args.workers,
        time_limit_s=None if args.time_limit_minutes is None else 60 * args.time_limit_minutes,
    )
    return 0

