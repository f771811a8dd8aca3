"""Train the testbed's target: a tokenizer and a small LLaVA-1.5-architecture model on the chart data.

    lmms-msd train-target --data data/charts --out target --device cuda

reads `llava_train.json` / `llava_test.json` and the images that `lmms_msd.testbed.charts` wrote, and
writes an HF-layout checkpoint folder that `lmms_msd.models.loading.load_target` loads:

    config.json, model.safetensors         LlavaForConditionalGeneration (saved in float16 by default)
    tokenizer.json, tokenizer_config.json  byte-level BPE trained on the conversations; digits split one
                                           by one; <unk> <s> </s>, then <image> and <pad> added
    preprocessor_config.json               CLIP image processor at the charts' size
    processor_config.json, chat_template.jinja
                                           the LlavaProcessor (the same image settings, patch size, feature
                                           strategy) and the llava-hf chat template, for transformers'
                                           AutoProcessor and lmms-eval's llava_hf model
    train_metrics.json                     loss curve, held-out loss, sizes, timings, greedy samples

The model is LLaVA-1.5's architecture at miniature size (`TargetSizes`): a CLIP vision tower read at
its second-to-last layer without the CLS token, a 2-layer GELU projector, a Llama text model whose
head_dim is 128 like LLaVA-1.5-7B's (so a 7B-shaped copy, DESIGN 4.5, only adds zero heads).

Training is LLaVA's instruction tuning on one-turn conversations: the prompt is the one
`Target.prepare` builds (vicuna_v1 conversation, `<image>` expanded to as many positions as the vision
tower returns features, the count read from the tower's output), the reply is " " + answer + "</s>",
and the loss is the cross-entropy on the reply tokens only. Every weight is trained from scratch.
AdamW, linear warm-up then cosine decay, bf16 autocast on CUDA, all data held on the device.
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

from lmms_msd.models.prompt import (
    IMAGE_PLACEHOLDER,
    TEMPLATE_SYSTEM_PROMPTS,
    PromptFormat,
)
from lmms_msd.testbed.charts import IMAGE_PREFIX, read_conversations

log = logging.getLogger(__name__)

PROMPT_FORMAT = PromptFormat(conv_template="vicuna_v1", system_prompt=None, tokenization="hf")
IGNORE_INDEX = -100  # labels of positions outside the reply
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAVE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
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
    """Sizes of the miniature target. The vision tower gives (image_size // patch_size) ** 2 features."""

    vocab_size: int = 1024  # BPE budget before <image> / <pad>; the trained vocabulary may be smaller
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_layers: int = 4
    num_heads: int = 2  # head_dim = hidden_size // num_heads = 128, as LLaVA-1.5-7B's
    max_position_embeddings: int = 1024
    vision_hidden_size: int = 256
    vision_intermediate_size: int = 1024
    vision_layers: int = 4  # the last one is not read (vision_feature_layer=-2), as in LLaVA-1.5
    vision_heads: int = 4
    patch_size: int = 16


SIZE_PRESETS = {
    "default": TargetSizes(),
    # seconds on a CPU: tests and smoke runs
    "tiny": TargetSizes(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=1, num_heads=1,
        vision_hidden_size=32, vision_intermediate_size=64, vision_layers=2, vision_heads=2, patch_size=16,
    ),
}


# ---- tokenizer ---------------------------------------------------------------------------------------
def train_tokenizer(texts: Iterable[str], folder: str | Path, vocab_size: int, model_max_length: int) -> Any:
    """A byte-level BPE trained on `texts` (any text still encodes, byte by byte), digits split one by
    one (a number is a few digit tokens, as in LLaMA's tokenizer), `<s>` prepended; `<unk>`, `<s>`,
    `</s>` first, then `<image>` and `<pad>` added as LLaVA's HF conversion adds them. Saved to
    `folder` (AutoTokenizer loads it) and returned."""
    from lmms_msd.testbed.tiny import add_image_and_pad_tokens, train_byte_bpe

    tokenizer = train_byte_bpe(texts, folder, vocab_size, split_digits=True, model_max_length=model_max_length)
    add_image_and_pad_tokens(tokenizer)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


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
def target_config(sizes: TargetSizes, tokenizer: Any, image_size: int) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if sizes.hidden_size % sizes.num_heads:
        raise ValueError(f"hidden_size {sizes.hidden_size} is not a multiple of num_heads {sizes.num_heads}")
    if image_size % sizes.patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {sizes.patch_size}")
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.num_layers,
        num_attention_heads=sizes.num_heads,
        num_key_value_heads=sizes.num_heads,
        head_dim=sizes.hidden_size // sizes.num_heads,
        max_position_embeddings=sizes.max_position_embeddings,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=sizes.vision_hidden_size,
        intermediate_size=sizes.vision_intermediate_size,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
        image_size=image_size,
        patch_size=sizes.patch_size,
        projection_dim=sizes.vision_hidden_size,
    )
    return LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        image_seq_length=(image_size // sizes.patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


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


def build_target_model(sizes: TargetSizes, tokenizer: Any, image_size: int, seed: int) -> Any:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration._from_config(target_config(sizes, tokenizer, image_size), attn_implementation="sdpa")
    init_weights_(model, seed)
    embed, head = model.get_input_embeddings().weight, model.lm_head.weight
    assert embed.data_ptr() != head.data_ptr(), "lm_head must not be tied to the input embeddings (LLaVA's are not)"
    return model


def save_image_processor(folder: str | Path, image_size: int) -> None:
    """A CLIP preprocessor_config.json at the charts' size (resize shortest edge, centre crop, CLIP mean/std)."""
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    ).save_pretrained(str(folder))


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
class ConversationSet:
    """Tokenised conversations, padded, with their images; all tensors on one device but `lengths_cpu`."""

    input_ids: torch.Tensor  # [N, L] long; prompt (placeholder expanded) + reply + </s>, right-padded with <pad>
    labels: torch.Tensor  # [N, L] long; the input id on reply tokens, IGNORE_INDEX elsewhere
    lengths_cpu: torch.Tensor  # [N] long, on the CPU: unpadded lengths (batch shapes without a device sync)
    image_index: torch.Tensor  # [N] long; row of `pixels`
    pixels: torch.Tensor  # [n_images, 3, S, S] preprocessed pixel values (float16: half the memory)

    def __post_init__(self) -> None:
        n, length = self.input_ids.shape
        assert self.labels.shape == (n, length), f"labels {tuple(self.labels.shape)} != {(n, length)}"
        assert self.lengths_cpu.shape == (n,) and self.image_index.shape == (n,)
        assert self.lengths_cpu.device.type == "cpu", "lengths_cpu must stay on the CPU"
        assert self.pixels.dim() == 4, f"pixels must be [n_images, 3, S, S], got {tuple(self.pixels.shape)}"

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
            "pixel_values": self.pixels[self.image_index[index]],
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
    """Chunks of image paths -> pixel values [n, 3, S, S] float16, through `ImagePreprocessor`, the path
    `Target.prepare` takes (a torch Dataset, so a DataLoader's worker processes can share the work)."""

    def __init__(self, paths: list[str], processor_folder: str | Path, chunk: int) -> None:
        self.chunks = [paths[start : start + chunk] for start in range(0, len(paths), chunk)]
        self.processor_folder = str(processor_folder)
        self.preprocessor: Any = None  # loaded in each worker on first use

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        from lmms_msd.models.image import load_image_preprocessor

        if self.preprocessor is None:
            self.preprocessor = load_image_preprocessor(self.processor_folder, pad_to_square=False)
        pixels = []
        for path in self.chunks[index]:
            with Image.open(path) as image:
                pixels.append(self.preprocessor(image).to(torch.float16))
        return torch.cat(pixels)


def load_pixels(paths: list[str], processor_folder: str | Path, workers: int, progress: bool = True) -> torch.Tensor:
    """Images -> pixel values [N, 3, S, S] float16 on the CPU, preprocessed by the checkpoint's own
    image processor (saved in `processor_folder`), in `workers` DataLoader worker processes."""
    from tqdm.auto import tqdm

    chunks = _ImageChunks(paths, processor_folder, chunk=256)
    loader = torch.utils.data.DataLoader(chunks, batch_size=None, num_workers=workers if workers > 1 else 0)
    pixels = []
    with tqdm(total=len(paths), desc="images", mininterval=2, disable=not progress) as bar:
        for chunk in loader:
            pixels.append(chunk)
            bar.update(chunk.shape[0])
    return torch.cat(pixels)


def load_conversation_set(
    data_dir: Path, split: str, tokenizer: Any, processor_folder: Path, n_image_tokens: int, max_length: int,
    device: torch.device, workers: int, limit: int | None = None, progress: bool = True,
) -> ConversationSet:
    records = read_conversations(data_dir, split)[:limit]
    image_paths = sorted({record["image"] for record in records})
    row_of = {path: row for row, path in enumerate(image_paths)}
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    input_ids, labels, lengths = encode_conversations(records, tokenizer, image_token_id, n_image_tokens, max_length)
    pixels = load_pixels([str(data_dir / path) for path in image_paths], processor_folder, workers, progress).to(device)
    image_index = torch.tensor([row_of[record["image"]] for record in records], dtype=torch.long)
    return ConversationSet(input_ids.to(device), labels.to(device), lengths, image_index.to(device), pixels)


# ---- training ----------------------------------------------------------------------------------------
def reply_logits(target: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token logits [B, L - 1, V] (float32), computed the way `Target.embed` + `Target.forward`
    run the model: image features replace the placeholder positions, then the language model.
    Position t predicts the token at t + 1, whose label is batch["labels"][:, t + 1].
    """
    input_ids = batch["input_ids"]  # [B, L]
    model = target.model
    features = target.image_features(batch["pixel_values"])  # [B, n_image_tokens, H]
    embeds = model.get_input_embeddings()(input_ids)  # [B, L, H]
    image_mask = (input_ids == target.image_token_id)[..., None]  # [B, L, 1]; counts checked when encoding
    embeds = embeds.masked_scatter(image_mask, features.to(embeds.dtype))
    hidden = model.model.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state  # [B, L, H]
    return model.lm_head(hidden[:, :-1]).float()


def reply_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over reply tokens. logits [B, L - 1, V], labels [B, L]."""
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


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
            logits = reply_logits(target, batch)
        gold = batch["labels"][:, 1:]
        scored = gold != IGNORE_INDEX
        total += float(reply_loss(logits, batch["labels"])) * int(scored.sum())
        count += int(scored.sum())
        hit = (logits.argmax(-1) == gold) & scored
        correct += int(hit.sum())
        is_digit = torch.isin(gold, digit_ids) & scored
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
            loss = reply_loss(reply_logits(target, batch), batch["labels"])
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
    n_samples: int = 12,
    workers: int = 1,
    time_limit_s: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the tokenizer and the target on `data_dir` (charts' output) and save both to `out_dir`.

    warmup: default min(500, steps // 10); eval_every: default steps // 5 (held-out loss on the
    first `held_out_limit` test conversations); n_samples: greedy answers to log at the end (test set);
    time_limit_s: stop training early past this many seconds of training (see `train_loop`).
    Returns the metrics also written to out_dir/train_metrics.json.
    """
    from lmms_msd.models.image import load_image_preprocessor
    from lmms_msd.models.target import Target

    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype {save_dtype!r} is not one of {sorted(SAVE_DTYPES)}")
    if time_limit_s is not None and time_limit_s <= 0:
        raise ValueError(f"time_limit_s must be positive, got {time_limit_s}: no time is left for training")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    torch_device = torch.device(device)
    started = time.perf_counter()
    meta = json.loads((data_dir / "meta.json").read_text())
    image_size = int(meta["image_size"])
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. tokenizer, model, image processor
    train_records = read_conversations(data_dir, "train")
    tokenizer = train_tokenizer(tokenizer_corpus(train_records), out_dir, sizes.vocab_size, sizes.max_position_embeddings)
    model = build_target_model(sizes, tokenizer, image_size, seed).to(torch_device)
    save_image_processor(out_dir, image_size)
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
    model.to(SAVE_DTYPES[save_dtype]).save_pretrained(str(out_dir))
    save_processor(out_dir, tokenizer, model.config)
    metrics.update(
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device, save_dtype=save_dtype,
        sizes=asdict(sizes), image_size=image_size, n_image_tokens=n_image_tokens, vocab_size=len(tokenizer),
        parameters=counts, train_conversations=len(train), train_images=int(train.pixels.shape[0]),
        checkpoint_mb=sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file()) / 2**20,
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
    from lmms_msd.speculative.decoding import plain_generate
    from lmms_msd.speculative.runtime import EagerRuntime
    from lmms_msd.speculative.sampling import GenerationConfig

    target = load_target(str(out_dir), device=device, dtype=torch.float32)
    samples = []
    for record in read_conversations(data_dir, "test")[:n]:
        question, reference = split_conversation(record)
        with Image.open(data_dir / record["image"]) as image:
            prompt = target.prepare(question, [image.convert("RGB")])
        result = plain_generate(EagerRuntime(target), prompt, GenerationConfig(max_new_tokens=192))
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
    parser.add_argument("--data", required=True, help="the charts folder (lmms-msd make-charts --out ...)")
    parser.add_argument("--out", required=True, help="checkpoint folder to write (HF layout)")
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default min(500, steps // 10))")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(SIZE_PRESETS), default="default", help="model size preset")
    parser.add_argument("--save-dtype", choices=sorted(SAVE_DTYPES), default="float16")
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
        save_dtype=args.save_dtype, n_samples=args.samples, workers=args.workers,
        time_limit_s=None if args.time_limit_minutes is None else 60 * args.time_limit_minutes,
    )
    return 0

