"""Where plain decoding stops, so that speculative decoding can stop at exactly the same token.

Plain decoding checks after every emitted token: end of sequence, the token budget, a stop string in
the decoded text. Speculative decoding commits several tokens per step and replays the same check
token by token over them, so an EOS, a stop string or the budget landing in the middle of an
accepted path cuts the output where plain decoding would have.

The text check decodes every new prefix (`tokenizer.decode(tokens[:n], skip_special_tokens=True)`):
a decode is not always a prefix of the next one (a multi-byte character split over two tokens), so
no shortcut over earlier text is taken. `first_stops` checks many generations at once (a batched
step's rows): their prefixes are decoded together, and with a fast tokenizer whose decode is the
library's own (transformers' `TokenizersBackend`, no clean-up of spaces) by its Rust backend directly,
many at once in parallel, which gives the same strings (`decode_all`).
"""

from __future__ import annotations

from typing import Any, Sequence


class Stopper:
    """The stopping rule of one request."""

    def __init__(self, tokenizer: Any, eos_token_id: int, max_new_tokens: int, until: Sequence[str]) -> None:
        if any(not s for s in until):
            raise ValueError(f"stop strings must be non-empty, got {list(until)!r}")
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.max_new_tokens = max_new_tokens
        self.until = tuple(until)

    def _count_stop(self, tokens: Sequence[int], checked: int) -> int | None:
        """The first n in (checked, len(tokens)] ending in EOS or reaching the token budget, or None."""
        last = min(len(tokens), max(self.max_new_tokens, checked + 1))
        for n in range(checked + 1, last + 1):
            if tokens[n - 1] == self.eos_token_id:
                return n
        return last if last >= self.max_new_tokens else None

    def first_stop(self, tokens: Sequence[int], checked: int) -> int | None:
        """The first n in (checked, len(tokens)] such that plain decoding stops after n tokens.

        `checked` tokens were already checked (and did not stop); returns None if none stops.
        """
        return first_stops([(self, tokens, checked)])[0]

    def text(self, tokens: Sequence[int]) -> str:
        """The answer: decoded without special tokens, cut before the first stop string."""
        text = decode_all(self.tokenizer, [list(tokens)])[0]
        for s in self.until:
            text = text.split(s)[0]
        return text


def first_stops(checks: Sequence[tuple[Stopper, Sequence[int], int]]) -> list[int | None]:
    """`Stopper.first_stop` for many (stopper, tokens, checked) at once: the prefixes whose text must be
    checked are decoded together (`decode_all`, one call per tokenizer).
    Example: EOS 2, until ("\\n",): ([5, 7, 2], checked 1) -> 3 unless decode([5, 7]) holds "\\n" (then 2)."""
    stops: list[int | None] = []
    wanted: dict[int, tuple[Any, list[tuple[int, int]], list[list[int]]]] = {}  # tokenizer id -> (tokenizer, (check, n), prefixes)
    for c, (stopper, tokens, checked) in enumerate(checks):
        by_count = stopper._count_stop(tokens, checked)
        stops.append(by_count)
        if stopper.until:  # every prefix before the count stop needs its text checked, in order
            _, places, prefixes = wanted.setdefault(id(stopper.tokenizer), (stopper.tokenizer, [], []))
            for n in range(checked + 1, by_count if by_count is not None else len(tokens) + 1):
                places.append((c, n))
                prefixes.append(list(tokens[:n]))
    for tokenizer, places, prefixes in wanted.values():
        for (c, n), text in zip(places, decode_all(tokenizer, prefixes)):
            first = stops[c]
            if (first is None or n < first) and any(s in text for s in checks[c][0].until):
                stops[c] = n
    return stops


# sequences from which `decode_all` hands them to the backend's parallel `decode_batch`: below, waking its
# threads costs more than it saves (H200 host, batch 1: +90 us a stop check; 2 cores: 6 prefixes 90 us
# against 54 one by one, 64 prefixes 591 against 732)
PARALLEL_DECODE = 32


def decode_all(tokenizer: Any, sequences: list[list[int]]) -> list[str]:
    """`tokenizer.decode(s, skip_special_tokens=True)` for each sequence. A fast tokenizer whose decode
    is transformers' own without clean-up (`_decodes_in_backend`) runs it as exactly that: its Rust
    backend's decode, one call a sequence, or from `PARALLEL_DECODE` sequences on all in one `decode_batch`
    (in parallel)."""
    if not sequences or not _decodes_in_backend(tokenizer):
        return [tokenizer.decode(s, skip_special_tokens=True) for s in sequences]
    backend = tokenizer.backend_tokenizer
    if len(sequences) >= PARALLEL_DECODE:
        return backend.decode_batch(sequences, skip_special_tokens=True)
    return [backend.decode(s, skip_special_tokens=True) for s in sequences]


def _decodes_in_backend(tokenizer: Any) -> bool:
    """Whether `tokenizer.decode(ids, skip_special_tokens=True)` is its backend's decode and nothing else:
    transformers' `TokenizersBackend` (5.x) with its own `decode` and `_decode` (which call
    `backend_tokenizer.decode`, then clean up spaces only when `clean_up_tokenization_spaces` is set)."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: decode as the tokenizer does
        return False
    kind = type(tokenizer)
    return (
        isinstance(tokenizer, TokenizersBackend)
        and kind.decode is PreTrainedTokenizerBase.decode
        and kind._decode is TokenizersBackend._decode
        and not tokenizer.clean_up_tokenization_spaces
    )
