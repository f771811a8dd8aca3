"""`lmms-msd train-draft`: train an MSD draft head against any target the loaders accept (DESIGN 4.1).

The recipe: the head reads the target's last hidden states f_t (plus uniform noise) and predicts
f_{t+1}; the loss is SmoothL1(h_t, f_{t+1}) + ce_weight * cross-entropy between the target's
distribution softmax(lm_head(f_{t+1})) and the head's lm_head(h_t), on the positions whose predicted
token belongs to an assistant answer. The head's inputs are MSD's shifted frame, built by the function
inference uses (`lmms_msd.speculative.drafting.prefill_inputs`): the projected image features at the positions one
before the target's image positions, fc([embed(x_{t+1}); f_t]) everywhere else, so a head trained here
and a released MSD head are interchangeable. Two stages: text-only samples first, then a linearly
rising share of image samples.

An optimizer step averages the loss over batch_size * grad_accum samples: grad_accum micro-batches, each
of batch_size samples right-padded and run at once (the target over the padded rows, the head with a
per-row causal mask), each sample's loss the mean over its own positions, as if it were alone. Loader
workers prepare the coming steps (`lmms_msd.testbed.draft_data`); the metrics are read from the device
every LOG_EVERY steps.

Data: LLaVA conversation JSON (the format of llava_v1_5_mix665k.json: a list of {"id", "image"
(optional, relative to the image folder), "conversations": [{"from": "human", "value": ...},
{"from": "gpt", "value": ...}, ...]}) and an image folder. Checkpoints (draft in the MSD format plus
`trainer_state.pt` with the optimizer, read back with weights_only=True) go to
`<output_dir>/checkpoint` every `save_every` steps; a run started again on the same output folder
resumes from there. The finished head goes to `<output_dir>` in `save_dtype` (float32 by default; the
checkpoint stays float32 so a resumed run is exact), as one model.safetensors or, with
`max_shard_size`, in shards of at most that size with model.safetensors.index.json. Samples and noise are
drawn by a generator seeded with (seed, step), so a resumed run sees the same samples as an
uninterrupted one, whatever the number of workers.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
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
from lmms_msd.models.prompt import TEMPLATE_SYSTEM_PROMPTS
from lmms_msd.models.target import EmbeddedPrompt, Target
from lmms_msd.speculative.drafting import prefill_inputs
from lmms_msd.testbed.draft_data import (
    Encoding,
    MicroBatch,
    StepSamples,
    read_conversations,
    step_loader,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingConfig:
    steps: int = 2000
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_accum: int = 4  # micro-batches per optimizer step
    batch_size: int = 1  # draws per micro-batch: batch_size * grad_accum samples per optimizer step
    feature_noise: float = 0.2  # width of the uniform noise added to target features
    ce_weight: float = 0.1
    text_only_fraction: float = 0.2  # stage 1: the first share of steps sees text-only samples
    max_length: int = 2048
    save_every: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "grad_accum", "batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


HELP = {
    "grad_accum": "micro-batches per optimizer step (each one forward and backward of the head)",
    "batch_size": "samples per micro-batch, right-padded and run at once; an optimizer step averages the "
    "loss over batch_size * grad_accum samples (the learning rate is per optimizer step)",
}
METRICS = ("loss", "smooth_l1", "ce", "top1")
LOG_EVERY = 10  # steps between reads of the metrics from the device (one host sync each)


# ---- one micro-batch ----------------------------------------------------------------------------------


def embed_rows(target: Target, batch: MicroBatch) -> torch.Tensor:
    """What the target reads at each position of each row, as `Target.embed` builds it: token embeddings,
    and the projected image features at image positions (every image of the micro-batch in one vision
    forward). -> [B, T, H] in the target's dtype"""
    embeds = target.model.get_input_embeddings()(batch.input_ids.masked_fill(batch.image_mask, 0))
    if batch.pixels is not None:
        features = target.image_features(batch.pixels)  # [n_images, N, H]
        image = features.reshape(-1, features.shape[-1])  # rows' images in order, each contiguous
        assert image.shape[0] == int(batch.image_mask.sum()), (
            f"{features.shape[0]} image(s) of {features.shape[1]} features for {int(batch.image_mask.sum())} image positions"
        )
        embeds[batch.image_mask] = image.to(embeds.dtype)
    return embeds


def batch_losses(draft: MSDDraft, target: Target, batch: MicroBatch, config: TrainingConfig) -> torch.Tensor:
    """The MSD loss and metrics of every row of a micro-batch, each a mean over that row's own learn
    positions, as if it were trained alone: [B, 4] (`METRICS`: loss, smooth_l1, ce, top1)."""
    device = target.device
    b, t = batch.input_ids.shape
    lengths = torch.tensor(batch.lengths, device=device)  # [B]
    valid = torch.arange(t, device=device) < lengths[:, None]  # [B, T]
    # 1. The target over the padded rows: right padding comes after every real position, so the causal
    # mask already keeps it out of them.
    with torch.inference_mode():
        embeds = embed_rows(target, batch)
        features, _ = target.forward_batch(embeds, target.new_cache(), torch.arange(t, device=device).expand(b, t))
    features, embeds = features.float().clone(), embeds.clone()  # [B, T, H]; ordinary tensors, not inference ones
    # 2. The head's inputs in MSD's shifted frame, by inference's `prefill_inputs` over the rows packed end
    # to end: a row's last position then reads the next row's first token (first_token only the last
    # row's), but the last two positions of every row are dropped below.
    packed = EmbeddedPrompt(batch.input_ids[valid], embeds[valid][None], batch.image_mask[valid])
    inputs = torch.zeros_like(features)
    inputs[valid] = prefill_inputs(draft, packed, (features + batch.noise)[valid], first_token=target.eos_token_id)
    inputs = inputs[:, :-2]  # [B, n]: position t predicts f_{t+1}; row r's real ones are 0..L_r-3
    n = t - 2
    # 3. The head over all rows at once: each position sees its own row's positions up to itself.
    positions = torch.arange(n, device=device).expand(b, n)
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    visible = causal & (positions < (lengths - 2)[:, None])[:, None, :]  # [B, n, n]
    hidden = draft(inputs, positions, draft.new_cache(n, rows=b), positions, visible)  # [B, n, H]
    # 4. Output t predicts f_{t+1} and so token t+2: learn where that token is part of an answer.
    learn = batch.answer_mask[:, 2:]  # [B, n]; False on padding
    row = torch.arange(b, device=device)[:, None].expand(b, n)[learn]  # [N] the row of each learn position
    predicted, wanted = hidden[learn], features[:, 1:-1][learn]  # [N, H]
    smooth_l1 = F.smooth_l1_loss(predicted, wanted, reduction="none").mean(-1)  # [N]
    lm_head = target.lm_head
    with torch.no_grad():
        target_probs = torch.softmax(lm_head(wanted.to(lm_head.weight.dtype)).float(), dim=-1)  # [N, V]
    draft_logp = torch.log_softmax(F.linear(predicted, lm_head.weight.float()), dim=-1)  # [N, V]
    ce = -(target_probs * draft_logp).sum(-1)  # [N]
    top1 = (draft_logp.argmax(-1) == target_probs.argmax(-1)).float()  # [N]
    per_position = torch.stack([smooth_l1, ce, top1], dim=-1)  # [N, 3]
    per_row = per_position.new_zeros(b, 3).index_add(0, row, per_position) / learn.sum(1)[:, None]  # [B, 3]
    loss = per_row[:, 0] + config.ce_weight * per_row[:, 1]
    return torch.cat([loss[:, None], per_row], dim=1)


# ---- the loop -----------------------------------------------------------------------------------------


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
    workers: int = 0,
    time_limit_s: float | None = None,
) -> dict[str, Any]:
    """Train (or resume training) a draft for `target`; write it to `output_dir` in the MSD format.

    stop_after: end the run after this many steps (checkpoints as usual), as an interruption would
    save_dtype, max_shard_size: of the finished head in `output_dir` (`save_draft`) [float32, one file]
    workers: processes preparing the coming steps' samples (tokens, images, noise); 0: this process.
        The result does not depend on it.
    time_limit_s: a safety net for machines that kill long commands, as train-target's: the learning
        rate's clock is the further along of the step and elapsed / time_limit_s of the steps, so when time
        runs out first the schedule has decayed all the same; training then stops past time_limit_s of
        training and saves the head (`training_log.json` says at which step). When the steps finish
        first, time plays no part.
    """
    if time_limit_s is not None and time_limit_s <= 0:
        raise ValueError(f"time_limit_s must be positive, got {time_limit_s}: no time is left for training")
    from tqdm.auto import tqdm

    records = read_conversations(data_json, image_folder)
    checkpoint = output_dir / "checkpoint"
    draft, start = resume_or_start(target, checkpoint, config)
    draft.embed_tokens.weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay)
    if start:
        optimizer.load_state_dict(torch.load(checkpoint / "trainer_state.pt", map_location=target.device, weights_only=True)["optimizer"])
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    samples = StepSamples(
        Encoding.of(target), records, image_folder, config, range(start, end),
        image_positions(target, records, image_folder), target.hidden_size,
    )
    history: list[dict[str, float]] = []
    pending: list[tuple[int, torch.Tensor, int]] = []  # (step, metric sums [4] on the device, samples used)
    bar = tqdm(total=config.steps, initial=start, desc="train-draft", unit="step")
    stopped_at_step = None
    began = time.perf_counter()
    for step, micro_batches in zip(samples.steps, step_loader(samples, workers, pin_memory=target.device.type == "cuda")):
        clock = step
        if time_limit_s is not None:
            clock = max(clock, start + int((config.steps - start) * (time.perf_counter() - began) / time_limit_s))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(min(clock, config.steps - 1), config)
        sums = accumulate(draft, target, micro_batches, config)
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if sums is not None:
            pending.append((step, sums, sum(len(m.lengths) for m in micro_batches)))
        bar.update()
        out_of_time = time_limit_s is not None and step + 1 < end and time.perf_counter() - began > time_limit_s
        save = (step + 1) % config.save_every == 0 or step + 1 == config.steps or out_of_time
        if pending and (len(pending) >= LOG_EVERY or save or step + 1 == end):
            history += read_metrics(pending)
            pending.clear()
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", top1=f"{history[-1]['top1']:.2f}")
        if save:
            save_checkpoint(draft, optimizer, step + 1, checkpoint, config)
        if out_of_time:
            stopped_at_step = step + 1
            log.warning("time limit of %.0f s reached: training stops at step %d of %d", time_limit_s, stopped_at_step, config.steps)
            break
    bar.close()
    save_draft(draft.eval(), output_dir, dtype=save_dtype, max_shard_size=max_shard_size)
    summary = {
        "config": asdict(config), "stopped_at_step": stopped_at_step, "train_seconds": time.perf_counter() - began,
        "last": history[-1] if history else None, "history": history[-200:],
    }  # fmt: skip
    (output_dir / "training_log.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def image_positions(target: Target, records: list[dict[str, Any]], image_folder: Path | None) -> int:
    """Positions one image takes in the target's input: the vision tower's output for the first image
    record (0 without image records)."""
    from PIL import Image

    record = next((r for r in records if "image" in r), None)
    if record is None:
        return 0
    with Image.open(image_folder / record["image"]) as image, torch.inference_mode():
        return int(target.image_features(target.image_processor(image)).shape[1])


def accumulate(draft: MSDDraft, target: Target, micro_batches: list[MicroBatch], config: TrainingConfig) -> torch.Tensor | None:
    """Forward and backward over one optimizer step's micro-batches: the gradient of the mean loss over
    its batch_size * grad_accum draws (dropped draws count as zero). Returns the sums of `METRICS` over
    the samples used [4] (on the device, not read), or None when every draw was dropped."""
    total = None
    for batch in micro_batches:
        per_row = batch_losses(draft, target, batch.to(target.device), config)  # [B, 4]
        (per_row[:, 0].sum() / (config.batch_size * config.grad_accum)).backward()
        sums = per_row.detach().sum(0)
        total = sums if total is None else total + sums
    return total


def read_metrics(pending: list[tuple[int, torch.Tensor, int]]) -> list[dict[str, float]]:
    """Steps' metric sums -> their means per sample, read from the device at once."""
    values = torch.stack([sums for _, sums, _ in pending]).tolist()
    return [
        {"step": step, **{name: value / used for name, value in zip(METRICS, row)}}
        for (step, _, used), row in zip(pending, values)
    ]


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
        "--time_limit_minutes", type=float, default=None,
        help="stop past this many minutes of training, the learning rate decayed on the way and the head saved "
        "(for machines that kill long commands) [none]",
    )  # fmt: skip
    parser.add_argument(
        "--save_dtype", choices=sorted(DTYPES), default="float32",
        help="dtype of the finished head in output_dir (its resume checkpoint stays float32)",
    )
    parser.add_argument(
        "--max_shard_size", default=None, type=shard_size,
        help="write the finished head in shards of at most this size (e.g. 15MB = 15 * 10**6 bytes) with "
        "model.safetensors.index.json; default one file, as released heads are",
    )
    parser.add_argument(
        "--workers", type=int, default=4,
        help="processes preparing the coming steps' samples (tokens, images, noise) while the device trains; "
        "0: the training process; the result does not depend on it",
    )
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field}", type=type(value), default=value, help=HELP.get(field))
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
        save_dtype=DTYPES[args.save_dtype], max_shard_size=args.max_shard_size, workers=args.workers,
        time_limit_s=None if args.time_limit_minutes is None else 60 * args.time_limit_minutes,
    )
    last = summary["last"] or {}
    print(f"draft written to {args.output_dir}; last step: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items()))
    return 0
