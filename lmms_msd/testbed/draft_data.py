"""train-draft's data: LLaVA conversations -> token ids and answer masks, and each optimizer step's
samples drawn and prepared ahead of the GPU.

Every optimizer step draws `batch_size * grad_accum` samples from a generator seeded with (seed, step),
in one fixed order: per sample an image coin, a record, then (for a sample that is kept) its feature
noise. Steps are independent of one another, so loader workers prepare whole steps in parallel and in
any order while `DataLoader` hands them over in step order: the samples and the noise depend on the seed
and the step only (not on `workers`), and a resumed run sees what an uninterrupted one sees. With
batch_size 1 the draws are the ones train-draft made before it batched.

Words: a *micro-batch* is what one forward and backward of the head reads (the kept samples of
`batch_size` draws, right-padded to one length); a step has `grad_accum` of them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmms_msd.models.prompt import IMAGE_PLACEHOLDER

if TYPE_CHECKING:
    from lmms_msd.models.prompt import PromptFormat
    from lmms_msd.models.target import Target
    from lmms_msd.testbed.draft_training import TrainingConfig


@dataclass
class Sample:
    input_ids: torch.Tensor  # [L0] with one image placeholder per image
    answer_mask: torch.Tensor  # [L0] bool, True on assistant tokens (the EOS closing each answer included)
    image: Path | None


@dataclass(frozen=True)
class Encoding:
    """What turning a record into model inputs needs from the target, without the model (loader
    workers receive it). `Target` has the same attributes, so either can be passed where this is."""

    tokenizer: Any
    prompt_format: PromptFormat
    image_processor: Callable[..., torch.Tensor]  # PIL image -> pixel_values [1, 3, S, S]
    image_token_id: int
    eos_token_id: int

    @classmethod
    def of(cls, target: Target) -> Encoding:
        return cls(target.tokenizer, target.prompt_format, target.image_processor, target.image_token_id, target.eos_token_id)


@dataclass
class MicroBatch:
    """The kept samples of `batch_size` draws, right-padded to T = the longest expanded length.

    Expanded: each image placeholder repeated once per image position, as `Target.embed` expands it.
    """

    input_ids: torch.Tensor  # [B, T] long, expanded; padding holds 0
    image_mask: torch.Tensor  # [B, T] bool, True at image positions
    answer_mask: torch.Tensor  # [B, T] bool, True on assistant tokens; False on padding
    noise: torch.Tensor  # [B, T, H] float32, the feature noise; zero on padding
    pixels: torch.Tensor | None  # [n_images, 3, S, S] float32, the images of rows 0..B-1 in order; None without
    lengths: list[int]  # [B] expanded lengths (each >= 3 with at least one position to learn from)

    def pin_memory(self) -> MicroBatch:
        """Page-locked copies, so the copies to the GPU do not wait for the host (DataLoader's hook)."""
        return MicroBatch(**{f.name: _apply(getattr(self, f.name), torch.Tensor.pin_memory) for f in fields(self)})

    def to(self, device: torch.device) -> MicroBatch:
        return MicroBatch(
            **{f.name: _apply(getattr(self, f.name), lambda t: t.to(device, non_blocking=True)) for f in fields(self)}
        )


def _apply(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    return fn(value) if isinstance(value, torch.Tensor) else value


# ---- conversations --------------------------------------------------------------------------------------


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


def encode_conversation(encoding: Encoding | Target, record: dict[str, Any], image_folder: Path | None, with_image: bool) -> Sample:
    """Token ids of a whole conversation in the target's prompt format, and its assistant mask.

    The first human turn goes through the target's own PromptFormat, so training sees the prompt that
    inference sees; later turns follow the vicuna_v1 pattern " USER: q ASSISTANT:".
    """
    tokenizer, fmt = encoding.tokenizer, encoding.prompt_format
    turns = record["conversations"]
    if len(turns) < 2 or turns[0]["from"] != "human":
        raise ValueError(f"conversation {record.get('id')!r} must start with a human turn and have an answer")
    ids: list[torch.Tensor] = []
    mask: list[torch.Tensor] = []
    for i in range(0, len(turns) - 1, 2):
        question = turns[i]["value"].replace(IMAGE_PLACEHOLDER, "").strip()
        if i == 0:
            prompt = fmt.build(question, n_images=1 if with_image else 0)
            part = fmt.tokenize(tokenizer, prompt, encoding.image_token_id)
        else:
            part = torch.tensor(tokenizer(f" USER: {question} ASSISTANT:", add_special_tokens=False).input_ids)
        answer = tokenizer(" " + turns[i + 1]["value"].strip(), add_special_tokens=False).input_ids
        answer = torch.tensor(answer + [encoding.eos_token_id])
        ids += [part, answer]
        mask += [torch.zeros(len(part), dtype=torch.bool), torch.ones(len(answer), dtype=torch.bool)]
    image = image_folder / record["image"] if with_image else None
    return Sample(torch.cat(ids), torch.cat(mask), image)


def expand(sample: Sample, image_token_id: int, image_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids and answer mask over the positions the target reads: each placeholder repeated
    `image_positions` times (no image position is an answer token). -> [L], [L] bool"""
    repeats = torch.where(sample.input_ids == image_token_id, image_positions, 1)
    return sample.input_ids.repeat_interleave(repeats), sample.answer_mask.repeat_interleave(repeats)


def image_share(step: int, config: TrainingConfig) -> float:
    """Share of image samples at a step: 0 in stage 1, then rising linearly to 1."""
    start = int(config.text_only_fraction * config.steps)
    if step < start:
        return 0.0
    return min(1.0, (step - start + 1) / max(1, config.steps - start))


# ---- the samples of a step ------------------------------------------------------------------------------


class StepSamples(torch.utils.data.Dataset):
    """Item i: the micro-batches of optimizer step `steps[i]` (the empty ones left out).

    A draw is dropped, as it always was, when its unexpanded ids exceed `max_length` (before its
    noise is drawn) or when it has no position to learn from (output t learns token t + 2: an answer
    token at an expanded position >= 2). Dropped draws still count in the loss's denominator
    (`batch_size * grad_accum`), so the gradient is that of the mean over all draws.

    image_positions: image positions per image (the vision tower's output; measured by the caller)
    hidden_size: the target's, the width of the feature noise
    """

    def __init__(
        self,
        encoding: Encoding,
        records: list[dict[str, Any]],
        image_folder: Path | None,
        config: TrainingConfig,
        steps: range,
        image_positions: int,
        hidden_size: int,
    ) -> None:
        self.encoding, self.image_folder, self.config, self.steps = encoding, image_folder, config, steps
        self.with_image = [r for r in records if "image" in r]
        self.text_only = [r for r in records if "image" not in r] or self.with_image  # image samples, image dropped
        self.image_positions, self.hidden_size = image_positions, hidden_size

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, index: int) -> list[MicroBatch]:
        step, config = self.steps[index], self.config
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        share = image_share(step, config)
        micro_batches = []
        for _ in range(config.grad_accum):
            drawn = [self.draw(share, generator) for _ in range(config.batch_size)]
            kept = [d for d in drawn if d is not None]
            if kept:
                micro_batches.append(collate(self.encoding, kept))
        return micro_batches

    def draw(self, share: float, generator: torch.Generator) -> Drawn | None:
        """One draw (image coin, record, noise, in this order); None when it is dropped."""
        use_image = bool(self.with_image) and float(torch.rand((), generator=generator)) < share
        pool = self.with_image if use_image else self.text_only
        record = pool[int(torch.randint(len(pool), (), generator=generator))]
        sample = encode_conversation(self.encoding, record, self.image_folder, with_image=use_image)
        if sample.input_ids.shape[0] > self.config.max_length:
            return None
        ids, answer = expand(sample, self.encoding.image_token_id, self.image_positions)
        if ids.shape[0] < 3 or not answer[2:].any():
            return None
        noise = (torch.rand((ids.shape[0], self.hidden_size), generator=generator) - 0.5) * self.config.feature_noise
        return Drawn(sample, ids, answer, noise)


@dataclass
class Drawn:
    """A kept draw: the sample and what the micro-batch holds of it."""

    sample: Sample
    input_ids: torch.Tensor  # [L] expanded (`expand`)
    answer_mask: torch.Tensor  # [L] bool
    noise: torch.Tensor  # [L, H] float32


def collate(encoding: Encoding | Target, drawn: list[Drawn]) -> MicroBatch:
    """Right-pad the draws into one micro-batch and preprocess their images (PIL, the image processor)."""
    from PIL import Image

    assert drawn, "a micro-batch needs at least one draw"
    lengths = [d.input_ids.shape[0] for d in drawn]
    b, t, h = len(drawn), max(lengths), drawn[0].noise.shape[1]
    input_ids = torch.zeros(b, t, dtype=torch.long)
    answer_mask = torch.zeros(b, t, dtype=torch.bool)
    noise = torch.zeros(b, t, h)
    pixels = []
    for row, d in enumerate(drawn):
        n = lengths[row]
        input_ids[row, :n], answer_mask[row, :n], noise[row, :n] = d.input_ids, d.answer_mask, d.noise
        if d.sample.image is not None:
            with Image.open(d.sample.image) as image:
                pixels.append(encoding.image_processor(image))
    image_mask = input_ids == encoding.image_token_id  # padding holds 0, never the image id
    return MicroBatch(input_ids, image_mask, answer_mask, noise, torch.cat(pixels) if pixels else None, lengths)


def step_loader(samples: StepSamples, workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """The steps in order, each prepared by one of `workers` processes (0: in this process) a few
    steps ahead of the one training."""
    return torch.utils.data.DataLoader(
        samples,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        collate_fn=_keep,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator(),  # the workers' base seed, unused, without touching the global generator
    )


def _keep(item: list[MicroBatch]) -> list[MicroBatch]:
    return item
