"""`lmms-msd train-draft`: train an MSD draft head against any target the loaders accept (DESIGN 4.1).

The recipe: the head reads the target's last hidden states f_t (plus uniform noise) and predicts
f_{t+1}; the loss is SmoothL1(h_t, f_{t+1}) + ce_weight * cross-entropy between the target's
distribution softmax(lm_head(f_{t+1})) and the head's lm_head(h_t), on the positions whose predicted
token belongs to an assistant answer. The head's inputs are MSD's shifted frame, built by the function
inference uses (`lmms_msd.speculative.drafting.prefill_inputs`): the projected image features at the positions one
before the target's image positions, fc([embed(x_{t+1}); f_t]) everywhere else, so a head trained here
and a released MSD head are interchangeable. Two stages: text-only samples first, then a linearly
rising share of image samples.

Data: LLaVA conversation JSON (the format of llava_v1_5_mix665k.json: a list of {"id", "image"
(optional, relative to the image folder), "conversations": [{"from": "human", "value": ...},
{"from": "gpt", "value": ...}, ...]}) and an image folder. Checkpoints (draft in the MSD format plus
`trainer_state.pt` with the optimizer, read back with weights_only=True) go to
`<output_dir>/checkpoint` every `save_every` steps; a run started again on the same output folder
resumes from there. The finished head goes to `<output_dir>` in `save_dtype` (float32 by default; the
checkpoint stays float32 so a resumed run is exact), as one model.safetensors or, with
`max_shard_size`, in shards of at most that size with model.safetensors.index.json. Samples are drawn by a generator seeded with (seed, step), so a resumed run
sees the same samples as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmms_msd.models.checkpoints import shard_size
from lmms_msd.models.draft import (
    DraftConfig,
    MSDDraft,
    load_draft,
    new_random_draft,
    save_draft,
)
from lmms_msd.models.loading import DTYPES
from lmms_msd.models.prompt import IMAGE_PLACEHOLDER, TEMPLATE_SYSTEM_PROMPTS
from lmms_msd.models.target import EmbeddedPrompt, Target
from lmms_msd.speculative.drafting import prefill_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingConfig:
    steps: int = 2000
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_accum: int = 4  # samples per optimizer step
    feature_noise: float = 0.2  # width of the uniform noise added to target features
    ce_weight: float = 0.1
    text_only_fraction: float = 0.2  # stage 1: the first share of steps sees text-only samples
    max_length: int = 2048
    save_every: int = 500
    seed: int = 0


@dataclass
class Sample:
    input_ids: torch.Tensor  # [L0] with one image placeholder per image
    answer_mask: torch.Tensor  # [L0] bool, True on assistant tokens (the EOS closing each answer included)
    image: Path | None


# ---- data -------------------------------------------------------------------------------------------


def read_conversations(data_json: Path, image_folder: Path | None) -> list[dict[str, Any]]:
    if not data_json.is_file():
        raise FileNotFoundError(f"training data {data_json} does not exist")
    records = json.loads(data_json.read_text())
    if not isinstance(records, list) or not records:
        raise ValueError(f"{data_json} must hold a non-empty list of LLaVA conversations")
    for record in records:
        if "image" in record:
            if image_folder is None:
                raise ValueError(f"{data_json} has image samples (id {record.get('id')!r}); pass --image_folder")
            if not (image_folder / record["image"]).is_file():
                raise FileNotFoundError(f"image {image_folder / record['image']} (id {record.get('id')!r}) does not exist")
    return records


def encode_conversation(target: Target, record: dict[str, Any], image_folder: Path | None, with_image: bool) -> Sample:
    """Token ids of a whole conversation in the target's prompt format, and its assistant mask.

    The first human turn goes through the target's own PromptFormat, so training sees the prompt that
    inference sees; later turns follow the vicuna_v1 pattern " USER: q ASSISTANT:".
    """
    tokenizer, fmt = target.tokenizer, target.prompt_format
    turns = record["conversations"]
    if len(turns) < 2 or turns[0]["from"] != "human":
        raise ValueError(f"conversation {record.get('id')!r} must start with a human turn and have an answer")
    ids: list[torch.Tensor] = []
    mask: list[torch.Tensor] = []
    for i in range(0, len(turns) - 1, 2):
        question = turns[i]["value"].replace(IMAGE_PLACEHOLDER, "").strip()
        if i == 0:
            prompt = fmt.build(question, n_images=1 if with_image else 0)
            part = fmt.tokenize(tokenizer, prompt, target.image_token_id)
        else:
            part = torch.tensor(tokenizer(f" USER: {question} ASSISTANT:", add_special_tokens=False).input_ids)
        answer = tokenizer(" " + turns[i + 1]["value"].strip(), add_special_tokens=False).input_ids
        answer = torch.tensor(answer + [target.eos_token_id])
        ids += [part, answer]
        mask += [torch.zeros(len(part), dtype=torch.bool), torch.ones(len(answer), dtype=torch.bool)]
    image = image_folder / record["image"] if with_image else None
    return Sample(torch.cat(ids), torch.cat(mask), image)


# ---- one sample ---------------------------------------------------------------------------------------


def embed_sample(target: Target, sample: Sample) -> tuple[EmbeddedPrompt, torch.Tensor]:
    """The embedded sequence and its answer mask over expanded positions [L]."""
    from PIL import Image

    pixels = None
    if sample.image is not None:
        with Image.open(sample.image) as image:
            pixels = target.image_processor(image)
    embedded = target.embed(sample.input_ids, pixels)
    # embed runs in inference mode; autograd needs ordinary tensors
    embedded = EmbeddedPrompt(embedded.input_ids.clone(), embedded.inputs_embeds.clone(), embedded.image_mask.clone())
    # Expansion inserts image positions, none of which are answer tokens.
    mask = torch.zeros(embedded.input_ids.shape[0], dtype=torch.bool, device=target.device)
    mask[~embedded.image_mask] = sample.answer_mask.to(target.device)[sample.input_ids.to(target.device) != target.image_token_id]
    return embedded, mask


def sample_loss(
    draft: MSDDraft, target: Target, embedded: EmbeddedPrompt, answer_mask: torch.Tensor, config: TrainingConfig, generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, float]] | None:
    """The MSD loss of one sequence; None when it has no position to learn from."""
    length = embedded.input_ids.shape[0]
    # Output at t predicts f_{t+1} and so token t+2: learn where that token is part of an answer.
    learn = answer_mask[2:]  # [L-2], for t = 0..L-3
    if length < 3 or not learn.any():
        return None
    with torch.no_grad():
        cache = target.new_cache()
        features, _ = target.forward(embedded.inputs_embeds, cache, torch.arange(length, device=target.device))
    features = features.float().clone()  # [L, H]; clone: an ordinary tensor, not an inference one
    noise = (torch.rand(features.shape, generator=generator, device="cpu") - 0.5) * config.feature_noise
    # first_token: only row L-1 reads it, and that row is dropped below
    inputs = prefill_inputs(draft, embedded, features + noise.to(features.device), first_token=target.eos_token_id)
    inputs = inputs[:-2]  # [L-2, H]: positions 0..L-3 (the last two have nothing to predict)
    n = inputs.shape[0]
    cache = draft.new_cache(n)
    positions = torch.arange(n, device=inputs.device)
    causal = torch.ones(n, n, dtype=torch.bool, device=inputs.device).tril()
    hidden = draft(inputs[None], positions, cache, positions, causal)[0]  # [L-2, H]
    predicted, wanted = hidden[learn], features[1:-1][learn]
    regression = F.smooth_l1_loss(predicted, wanted)
    lm_head = target.lm_head
    with torch.no_grad():
        target_probs = torch.softmax(lm_head(wanted.to(lm_head.weight.dtype)).float(), dim=-1)
    draft_logp = torch.log_softmax(F.linear(predicted, lm_head.weight.float()), dim=-1)
    ce = -(target_probs * draft_logp).sum(-1).mean()
    agree = (draft_logp.argmax(-1) == target_probs.argmax(-1)).float().mean()
    return regression + config.ce_weight * ce, {"smooth_l1": regression.item(), "ce": ce.item(), "top1": agree.item()}


# ---- the loop -----------------------------------------------------------------------------------------


def image_share(step: int, config: TrainingConfig) -> float:
    """Share of image samples at a step: 0 in stage 1, then rising linearly to 1."""
    start = int(config.text_only_fraction * config.steps)
    if step < start:
        return 0.0
    return min(1.0, (step - start + 1) / max(1, config.steps - start))


def new_draft_for(target: Target, seed: int) -> MSDDraft:
    """A fresh head: random layer, the target's token embeddings (frozen, as in EAGLE and MSD)."""
    draft = new_random_draft(DraftConfig.like_target(target.model.config.text_config, target.vocab_size), seed)
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(target.model.get_input_embeddings().weight[: target.vocab_size].float())
    return draft


def learning_rate(step: int, config: TrainingConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())


def train_draft(
    target: Target,
    data_json: Path,
    image_folder: Path | None,
    output_dir: Path,
    config: TrainingConfig,
    stop_after: int | None = None,
    save_dtype: torch.dtype | None = None,
    max_shard_size: int | str | None = None,
) -> dict[str, Any]:
    """Train (or resume training) a draft for `target`; write it to `output_dir` in the MSD format.

    stop_after: end the run after this many steps (checkpoints as usual), as an interruption would
    save_dtype, max_shard_size: of the finished head in `output_dir` (`save_draft`) [float32, one file]
    """
    from tqdm.auto import tqdm

    records = read_conversations(data_json, image_folder)
    with_image = [r for r in records if "image" in r]
    text_only = [r for r in records if "image" not in r] or with_image  # image samples, image dropped
    checkpoint = output_dir / "checkpoint"
    draft, start = resume_or_start(target, checkpoint, config)
    draft.embed_tokens.weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay)
    if start:
        optimizer.load_state_dict(torch.load(checkpoint / "trainer_state.pt", map_location=target.device, weights_only=True)["optimizer"])
    history: list[dict[str, float]] = []
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=config.steps, desc="train-draft", unit="step")
    for step in bar:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        metrics = accumulate(draft, target, with_image, text_only, image_folder, step, config, generator)
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if metrics:
            history.append({"step": step, **metrics})
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", top1=f"{metrics['top1']:.2f}")
        if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
            save_checkpoint(draft, optimizer, step + 1, checkpoint, config)
    save_draft(draft.eval(), output_dir, dtype=save_dtype, max_shard_size=max_shard_size)
    summary = {"config": asdict(config), "last": history[-1] if history else None, "history": history[-200:]}
    (output_dir / "training_log.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def accumulate(draft, target, with_image, text_only, image_folder, step, config, generator) -> dict[str, float]:
    """Forward and backward over grad_accum samples; returns their mean metrics."""
    totals: dict[str, float] = {}
    used = 0
    share = image_share(step, config)
    for _ in range(config.grad_accum):
        use_image = bool(with_image) and float(torch.rand((), generator=generator)) < share
        pool = with_image if use_image else text_only
        record = pool[int(torch.randint(len(pool), (), generator=generator))]
        sample = encode_conversation(target, record, image_folder, with_image=use_image)
        if sample.input_ids.shape[0] > config.max_length:
            continue
        embedded, mask = embed_sample(target, sample)
        out = sample_loss(draft, target, embedded, mask, config, generator)
        if out is None:
            continue
        loss, metrics = out
        (loss / config.grad_accum).backward()
        used += 1
        for key, value in {"loss": loss.item(), **metrics}.items():
            totals[key] = totals.get(key, 0.0) + value
    return {key: value / used for key, value in totals.items()} if used else {}


def save_checkpoint(draft: MSDDraft, optimizer: torch.optim.Optimizer, step: int, folder: Path, config: TrainingConfig) -> None:
    save_draft(draft, folder)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "config": asdict(config)}, folder / "trainer_state.pt")
    log.info("checkpoint at step %d in %s", step, folder)


def resume_or_start(target: Target, checkpoint: Path, config: TrainingConfig) -> tuple[MSDDraft, int]:
    device = target.device
    if (checkpoint / "trainer_state.pt").is_file():
        state = torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=True)
        if state["config"] != asdict(config):
            changed = {k: (state["config"].get(k), v) for k, v in asdict(config).items() if state["config"].get(k) != v}
            log.warning("resuming from %s with changed settings (was, now): %s", checkpoint, changed)
        log.info("resuming from step %d (%s)", state["step"], checkpoint)
        return load_draft(str(checkpoint), device=device, dtype=torch.float32).train(), int(state["step"])
    return new_draft_for(target, config.seed).to(device).train(), 0


# ---- command line ---------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser):
    defaults = TrainingConfig()
    parser.add_argument("--pretrained", required=True, help="target: folder or hub id (HF or original LLaVA layout)")
    parser.add_argument("--data", required=True, type=Path, help="LLaVA conversation JSON (llava_v1_5_mix665k.json format)")
    parser.add_argument("--image_folder", type=Path, default=None, help="folder the JSON's image paths are relative to")
    parser.add_argument("--output_dir", required=True, type=Path, help="where the draft (MSD format) and checkpoints go")
    parser.add_argument("--vision_tower", default=None, help="original layout: override mm_vision_tower")
    parser.add_argument(
        "--conv_template", default="vicuna_v1", choices=sorted(TEMPLATE_SYSTEM_PROMPTS),
        help="the prompt of the first turn (lmms_msd.models.prompt); msd is the one released MSD heads were trained on",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="the target's dtype (the draft trains in float32)")
    parser.add_argument(
        "--save_dtype", choices=sorted(DTYPES), default="float32",
        help="dtype of the finished head in output_dir (its resume checkpoint stays float32)",
    )
    parser.add_argument(
        "--max_shard_size", default=None, type=shard_size,
        help="write the finished head in shards of at most this size (e.g. 15MB = 15 * 10**6 bytes) with "
        "model.safetensors.index.json; default one file, as released heads are",
    )
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field}", type=type(value), default=value)
    return run


def run(args: argparse.Namespace) -> int:
    from lmms_msd.models.loading import load_target

    config = TrainingConfig(**{field: getattr(args, field) for field in asdict(TrainingConfig())})
    target = load_target(
        args.pretrained, vision_tower=args.vision_tower, device=args.device, dtype=args.dtype, conv_template=args.conv_template
    )
    target.model.requires_grad_(False)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    summary = train_draft(
        target, args.data, args.image_folder, args.output_dir, config,
        save_dtype=DTYPES[args.save_dtype], max_shard_size=args.max_shard_size,
    )
    last = summary["last"] or {}
    print(f"draft written to {args.output_dir}; last step: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items()))
    return 0
