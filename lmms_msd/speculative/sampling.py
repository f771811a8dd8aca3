"""Generation settings and the logits processing that plain and speculative decoding share.

Both loops turn target logits into a distribution with `processed_probs`, so a token is drawn from
exactly the same distribution whichever loop runs. The processors follow transformers' order and
semantics: temperature, then top-k, then top-p (keeping at least one token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class GenerationConfig:
    """What lmms-eval's gen_kwargs ask for, validated."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    until: tuple[str, ...] = field(default_factory=tuple)  # stop strings

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        """Greedy when sampling is off or the temperature is 0 (lmms-eval's convention)."""
        return not self.do_sample or self.temperature == 0


def processed_probs(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Sampling distribution after temperature, top-k and top-p.

    logits: [N, V] float -> probs [N, V] float32, rows summing to 1
    """
    assert logits.dim() == 2, f"logits must be [N, V], got {tuple(logits.shape)}"
    assert not config.greedy, "processed_probs is for sampling; greedy decoding takes the argmax"
    scores = logits.float() / config.temperature
    if config.top_k > 0 and config.top_k < scores.shape[-1]:
        kth = torch.topk(scores, config.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - config.top_p)
        remove_sorted[:, -1] = False  # keep at least the most likely token
        remove = remove_sorted.scatter(1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores.softmax(dim=-1)


def next_token(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> int:
    """The token plain decoding emits after one target position, read to the host.

    logits: [V]
    """
    return int(chosen_token(logits, config, generator))


def chosen_token(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """`next_token` left where the logits are: [1] long, the same draw from `generator`, for a loop that feeds
    it to the next forward before (or without) reading it.

    logits: [V]
    """
    assert logits.dim() == 1, f"logits must be [V], got {tuple(logits.shape)}"
    if config.greedy:
        return logits.argmax().reshape(1)
    probs = processed_probs(logits[None], config)[0]
    return torch.multinomial(probs, 1, generator=generator)
