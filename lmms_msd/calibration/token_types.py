"""Token types, decided once per vocabulary id: number, punctuation or function word, content word.

Draft confidence is miscalibrated differently for each type (numbers read off a chart are hard to
guess; punctuation and function words are easy), so statistics and the calibrator group by it.
"""

from __future__ import annotations

import string
from typing import Any

import torch

NUMBER, FUNCTION, CONTENT = 0, 1, 2
TYPE_NAMES = ("number", "punctuation/function", "content")

FUNCTION_WORDS = frozenset(
    """a an the and or but nor so yet of to in on at by for with from into onto over under about as than
    then that this these those there here is are was were be been being am do does did has have had
    it its it's i you he she we they me him her us them my your his our their which who whom whose
    what when where why how if not no yes all any each both either neither some such only very can
    will would shall should may might must also just up down out off again""".split()
)
_WORD_MARKERS = "\u2581\u0120"  # sentencepiece's '▁' and byte-level BPE's 'Ġ' word starts
_NUMBER_CHARS = set(string.digits + ".,%-+")


def token_type(piece: str) -> int:
    text = piece.strip(_WORD_MARKERS + " ").lower()
    if any(c.isdigit() for c in text) and set(text) <= _NUMBER_CHARS:
        return NUMBER
    if not text or all(not c.isalnum() for c in text) or text in FUNCTION_WORDS:
        return FUNCTION
    return CONTENT


def token_type_table(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """[V] long: the type of every id the target can generate (special tokens count as punctuation)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pieces = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    return torch.tensor(
        [FUNCTION if i in special or piece is None else token_type(piece) for i, piece in enumerate(pieces)],
        dtype=torch.long,
    )
