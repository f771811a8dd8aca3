"""The two generation loops: plain autoregressive decoding (the baseline and the reference) and
speculative decoding with an MSD draft. Both take a runtime, an embedded prompt, settings and the
stopping rule, and return the text and statistics as data. The runtime (`lmms_msd.speculative.runtime`)
holds the target and the draft and decides where the forwards run: `EagerRuntime` (transformers'
forward) or `lmms_msd.speculative.fast.StaticEngine` (static caches and CUDA graphs); the loops, and
so the outputs, are the same.

    runtime = EagerRuntime(target, draft)
    result = speculative_generate(runtime, target.prepare(question, images), GenerationConfig(), EagleTree())

Many requests at once go through `lmms_msd.speculative.batching.generate_batched`, which steps each
request exactly as these loops do (`record_step` and the `Stopper` are shared; `accept`'s rules, the
greedy one for all rows at once: `lmms_msd.speculative.verify.accept_greedy_rows`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lmms_msd.models.target import EmbeddedPrompt, Target
from lmms_msd.speculative.runtime import Runtime
from lmms_msd.speculative.runtime import Sequence as RuntimeSequence
from lmms_msd.speculative.sampling import GenerationConfig, chosen_token, next_token
from lmms_msd.speculative.stopping import Stopper, first_stops
from lmms_msd.speculative.transfer import PendingRead, to_device
from lmms_msd.speculative.tree import Tree, TreeSpec
from lmms_msd.speculative.verify import Acceptance, Verified, accept_greedy, accept_sampling

__all__ = ["DecodeStats", "GenerationResult", "StepObserver", "plain_generate", "speculative_generate"]

# Called after every verification with the tree, the target's logits over it [N, V] and the outcome;
# statistics and the calibrator's labels come from here, with no extra target forward.
StepObserver = Callable[[Tree, torch.Tensor, Acceptance], None]


@dataclass
class DecodeStats:
    """Per-request statistics. A step is one target forward after the prefill."""

    new_tokens: int = 0
    steps: int = 0
    speculative: bool = False  # decoded by `speculative_generate` (with a draft), else by `plain_generate`
    # committed tokens of each step minus one (its bonus): draft tokens accepted and kept; a step cut
    # by a stop counts only what it kept, so tau = committed tokens / steps exactly
    accepted: list[int] = field(default_factory=list)
    discarded: int = 0  # tokens the last step verified past the stop (accepted drafts or bonus)
    prefill_s: float = 0.0  # the prompt's forward(s), the first token included
    wall_s: float = 0.0  # the whole request
    # Where the decoding loop's time goes, measured only with profile=True (0.0 otherwise): the device
    # is synchronised at every phase boundary, which slows the loop, so time a profiled run apart.
    draft_s: float = 0.0  # building the trees (speculative only)
    verify_s: float = 0.0  # the target's forwards after the prefill (over a tree, with its acceptance; or one token)
    other_s: float = 0.0  # everything else in the loop: stop checks, cache keeping, draft advance (plain: choosing)

    @property
    def alpha(self) -> float:
        """Accepted draft tokens per step (the thesis's "average acceptance rate")."""
        return sum(self.accepted) / self.steps if self.steps else 0.0

    @property
    def tau(self) -> float:
        """Tokens committed per step: accepted + 1."""
        return self.alpha + 1.0 if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "alpha": self.alpha, "tau": self.tau, "tokens_per_s": self.tokens_per_s}


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: DecodeStats


def _check_prompt(target: Target, prompt: EmbeddedPrompt) -> None:
    length = prompt.input_ids.shape[0]
    if length == 0:
        raise ValueError("the prompt is empty")
    if length >= target.max_length:
        raise ValueError(
            f"the prompt is {length} tokens long but the target's maximum length is {target.max_length}; "
            f"shorten the context"
        )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PhaseClock:
    """Seconds between successive `lap` calls, each ending at a device synchronisation; a no-op
    returning 0.0 when disabled, so an unprofiled loop gains no synchronisation."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.device = device
        self.enabled = enabled
        self.last = time.perf_counter()

    def lap(self) -> float:
        if not self.enabled:
            return 0.0
        _synchronize(self.device)
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


def accept(
    tree: Tree, logits: torch.Tensor, ancestors: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None
) -> Acceptance:
    """The step's outcome: greedy (one read from the device) or lossless sampling drawing from `generator`.
    logits: [N, V], the target's at every tree node; ancestors: [N, N] bool (`Tree.ancestor_mask`)"""
    if config.greedy:
        return accept_greedy(tree, logits, ancestors)
    return accept_sampling(tree, logits, ancestors, config, generator)


def verify_step(
    runtime: Runtime, sequence: RuntimeSequence, tree: Tree, ancestors: torch.Tensor, config: GenerationConfig,
    generator: torch.Generator | None,
) -> Verified:  # fmt: skip
    """Verify the tree and accept (`accept`): a greedy step on a runtime with `verify_greedy` (a
    `StaticEngine`: its acceptance runs in the verification's graph) in that one call; otherwise
    `Runtime.verify`, then `accept`, then the path to the device (`path_on_device`)."""
    if config.greedy and hasattr(runtime, "verify_greedy"):
        return runtime.verify_greedy(sequence, tree, ancestors)
    hidden, logits = runtime.verify(sequence, tree, ancestors)
    result = accept(tree, logits, ancestors, config, generator)
    path, next_tokens = path_on_device(result, hidden.device)
    return Verified(hidden, logits, result, path, next_tokens, hidden[path])


def record_step(tokens: list[int], stats: DecodeStats, stopper: Stopper, result: Acceptance) -> bool:
    """Append a verified step's committed tokens (the accepted path, then the bonus) to `tokens` and
    count the step; cut them exactly where plain decoding stops, even inside the path. Returns whether
    the generation stopped. Example: tokens [5], path tokens [6, 7], bonus 8, EOS 7: tokens [5, 6, 7],
    the step keeps 1 accepted draft token and discards 1 verified token."""
    return record_steps([(tokens, stats, stopper, result)])[0]


def record_steps(steps: Sequence[tuple[list[int], DecodeStats, Stopper, Acceptance]]) -> list[bool]:
    """`record_step` for many generations' (tokens, stats, stopper, result) at once, their stop checks
    together (`lmms_msd.speculative.stopping.first_stops`): whether each stopped."""
    checks = []
    for tokens, stats, stopper, result in steps:
        stats.steps += 1
        stats.accepted.append(result.accepted)
        checked = len(tokens)
        tokens += result.path_tokens + [result.bonus]
        checks.append((stopper, tokens, checked))
    stopped = []
    for (tokens, stats, _, _), (_, _, checked), stop in zip(steps, checks, first_stops(checks)):
        stopped.append(stop is not None)
        if stop is not None:
            stats.discarded = len(tokens) - stop
            stats.accepted[-1] = stop - checked - 1
            del tokens[stop:]
    return stopped


def path_on_device(result: Acceptance, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The accepted path's node indices [a + 1] and the committed tokens that follow them [a + 1] (the
    accepted tokens, then the bonus), in one copy to the device that does not make the host wait
    (`lmms_msd.speculative.transfer.to_device`): what `Runtime.commit` takes."""
    on_device = to_device(result.path + result.path_tokens + [result.bonus], device)
    return on_device[: len(result.path)], on_device[len(result.path) :]


@torch.inference_mode()
def plain_generate(
    runtime: Runtime,
    prompt: EmbeddedPrompt,
    config: GenerationConfig,
    generator: torch.Generator | None = None,
    profile: bool = False,
) -> GenerationResult:
    """One target forward per token: the baseline, and the reference speculative decoding must equal.

    The loop runs one forward ahead of its reads: each chosen token stays on the device and is fed to the
    next forward, which is queued before the host reads the token (`PendingRead`) and checks the stopping
    rule; so the device never waits for the host between steps. A stop (EOS, a stop string) thus leaves
    one forward queued past it, whose token is never read (a cache slot after the answer is written and
    dropped with the sequence); no forward is queued past `max_new_tokens`. The tokens are those of one
    forward after each read, the same draws from `generator`.

    runtime: where the forwards run (`EagerRuntime(target)`: transformers' forward; a `StaticEngine`)
    profile: split the loop's time into `DecodeStats.verify_s` (the forwards) and `other_s` (choosing
    the token, stop checks), synchronising the device between them; the output is the same.
    """
    target = runtime.target
    _check_prompt(target, prompt)
    device = target.device
    stopper = Stopper(target.tokenizer, target.eos_token_id, config.max_new_tokens, config.until)
    start = time.perf_counter()
    sequence, _, logits = runtime.prefill(prompt, config.max_new_tokens)
    try:
        chosen = chosen_token(logits[-1], config, generator)
        tokens = PendingRead(chosen).get()
        stats = DecodeStats(prefill_s=time.perf_counter() - start)
        clock = _PhaseClock(device, profile)

        def step(token: torch.Tensor) -> tuple[torch.Tensor, PendingRead]:
            """Queue the forward after `token` and the choice of the next one, and its read."""
            stats.other_s += clock.lap()
            logits = runtime.forward_next(sequence, token)
            stats.verify_s += clock.lap()
            token = chosen_token(logits[-1], config, generator)
            return token, PendingRead(token)

        queued = step(chosen) if stopper.first_stop(tokens, 0) is None else None
        while queued is not None:
            chosen, read = queued
            # the forward after this token, queued before its read, unless the count ends the answer with it
            queued = step(chosen) if len(tokens) + 2 <= config.max_new_tokens else None
            tokens += read.get()
            stats.steps += 1
            stats.accepted.append(0)
            if stopper.first_stop(tokens, len(tokens) - 1) is not None:
                break
    finally:
        runtime.release(sequence)
    stats.other_s += clock.lap()
    _synchronize(device)
    stats.wall_s = time.perf_counter() - start
    stats.new_tokens = len(tokens)
    return GenerationResult(stopper.text(tokens), tokens, stats)


@torch.inference_mode()
def speculative_generate(
    runtime: Runtime,
    prompt: EmbeddedPrompt,
    config: GenerationConfig,
    tree: TreeSpec,
    generator: torch.Generator | None = None,
    observer: StepObserver | None = None,
    track_visual: bool = False,
    profile: bool = False,
) -> GenerationResult:
    """Draft a tree, verify it in one target forward, commit the accepted path plus a bonus token; repeat.

    runtime: where the forwards run, holding the target and the draft (`EagerRuntime(target, draft)`:
    transformers' forward; a `StaticEngine`)
    tree: how each step's tree grows (`EagleTree(...)`, `OptTree(...)`)
    observer: called after every verification (statistics, calibration labels); it only reads.
    track_visual: measure the draft's attention on the image for every tree node (`Tree.visual`),
    which a calibrated scorer with attention bins (`tree.needs_visual`) and a calibration observer
    need; off, the draft layer runs plain SDPA. Neither changes a single output token.
    profile: split the loop's time into `DecodeStats.draft_s` (tree building), `verify_s` (the target
    forward over the tree and the acceptance, `verify_step`) and `other_s` (the rest), synchronising the device at each boundary; the
    output is the same, only slower to come, so time unprofiled runs for speed.
    """
    target = runtime.target
    _check_prompt(target, prompt)
    device = target.device
    stopper = Stopper(target.tokenizer, target.eos_token_id, config.max_new_tokens, config.until)
    start = time.perf_counter()
    # 1. prefill the target, choose the first token, prefill the draft
    sequence, hidden, logits = runtime.prefill(prompt, config.max_new_tokens + tree.slots)
    try:
        token = next_token(logits[-1], config, generator)
        root = runtime.prefill_draft(sequence, prompt, hidden, token, track_visual)
        _synchronize(device)
        stats = DecodeStats(prefill_s=time.perf_counter() - start, speculative=True)
        clock = _PhaseClock(device, profile)
        tokens = [token]
        stop = stopper.first_stop(tokens, 0)
        while stop is None:
            stats.other_s += clock.lap()
            # 2. draft a tree under the root (the last committed token)
            drafted, ancestors = runtime.draft_tree(sequence, tree, token, root)
            stats.draft_s += clock.lap()
            # 3. verify it in one forward and accept (greedy: one read from the device)
            verified = verify_step(runtime, sequence, drafted, ancestors, config, generator)
            stats.verify_s += clock.lap()
            result = verified.acceptance
            if observer is not None:
                observer(drafted, verified.logits, result)
            # 4. keep the accepted path in the target cache, advance the draft over it (the path already on the device):
            # queued before the host's stop check, which the device's work then hides; a stop wastes it
            root = runtime.commit(sequence, verified.path, verified.next_tokens, verified.path_hidden)
            # 5. stop exactly where plain decoding would, even inside the path
            if record_step(tokens, stats, stopper, result):
                break
            token = result.bonus
    finally:
        runtime.release(sequence)
    stats.other_s += clock.lap()
    _synchronize(device)
    stats.wall_s = time.perf_counter() - start
    stats.new_tokens = len(tokens)
    return GenerationResult(stopper.text(tokens), tokens, stats)
