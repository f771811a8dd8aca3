"""Where plain decoding stops, so that speculative decoding can stop at exactly the same token.

Plain decoding checks after every emitted token: end of sequence, the token budget, a stop string in
the decoded text. Speculative decoding commits several tokens per step and replays the same check
token by token over them, so an EOS, a stop string or the budget landing in the middle of an
accepted path cuts the output where plain decoding would have.
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

    def _decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def _stops_after(self, tokens: Sequence[int]) -> bool:
        if tokens[-1] == self.eos_token_id or len(tokens) >= self.max_new_tokens:
            return True
        if self.until:
            text = self._decode(tokens)
            return any(s in text for s in self.until)
        return False

    def first_stop(self, tokens: Sequence[int], checked: int) -> int | None:
        """The first n in (checked, len(tokens)] such that plain decoding stops after n tokens.

        `checked` tokens were already checked (and did not stop); returns None if none stops.
        """
        for n in range(checked + 1, len(tokens) + 1):
            if self._stops_after(tokens[:n]):
                return n
        return None

    def text(self, tokens: Sequence[int]) -> str:
        """The answer: decoded without special tokens, cut before the first stop string."""
        text = self._decode(tokens)
        for s in self.until:
            text = text.split(s)[0]
        return text
