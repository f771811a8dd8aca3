"""The stop check against its definition, written out here from the tokenizers themselves: plain decoding
stops after the first n tokens that end in EOS, reach the budget, or whose decoded text
(`tokenizer.decode(tokens[:n], skip_special_tokens=True)`) holds a stop string.

Two tokenizers of the kinds LLaVA checkpoints ship: the bundled miniature's byte-level BPE, and LLaMA's
sentencepiece BPE with byte fallback (a tokenizer.model turned into a fast tokenizer by transformers, as
the original layout loads it). Random ids include byte pieces, so texts end in split multi-byte
characters, and special tokens, which the decode skips.
"""

from __future__ import annotations

import random

import pytest
from test_prompt_tokenization import sentencepiece_model, tokenizer_folder  # noqa: F401  (fixtures)
from transformers import AutoTokenizer

from lmms_msd.models.original_llava import load_tokenizer_with_image_token
from lmms_msd.speculative.stopping import Stopper, _decodes_in_backend, decode_all, first_stops
from lmms_msd.testbed.bundled import bundled_paths


@pytest.fixture(scope="module")
def byte_level():
    return AutoTokenizer.from_pretrained(str(bundled_paths()[0]))


@pytest.fixture
def tokenizers(byte_level, tokenizer_folder):  # noqa: F811
    return [byte_level, load_tokenizer_with_image_token(tokenizer_folder[0])[0]]


def definition(tokenizer, eos: int, budget: int, until: tuple[str, ...], tokens: list[int], checked: int) -> int | None:
    for n in range(checked + 1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:n], skip_special_tokens=True)
        if tokens[n - 1] == eos or n >= budget or any(s in text for s in until):
            return n
    return None


def random_ids(tokenizer, rng: random.Random, length: int) -> list[int]:
    """Mostly the tokens of a text with newlines and a non-ASCII character, some ids drawn at random."""
    text = "The largest bar is 42.\nAnswer: é 7\n\nUSER: next"
    words = tokenizer(text, add_special_tokens=False).input_ids
    return [rng.choice(words) if rng.random() < 0.7 else rng.randrange(len(tokenizer)) for _ in range(length)]


def test_decode_all_is_the_tokenizers_decode(tokenizers):
    rng = random.Random(0)
    for tokenizer in tokenizers:
        assert _decodes_in_backend(tokenizer)  # both take the backend's batched decode
        sequences = [random_ids(tokenizer, rng, rng.randrange(0, 30)) for _ in range(400)]
        expected = [tokenizer.decode(s, skip_special_tokens=True) for s in sequences]
        assert decode_all(tokenizer, sequences) == expected  # in parallel (`PARALLEL_DECODE` and more)
        assert [text for s in sequences[:60] for text in decode_all(tokenizer, [s])] == expected[:60]  # one by one


def test_first_stops_is_the_definition(tokenizers):
    rng = random.Random(1)
    for tokenizer in tokenizers:
        eos = tokenizer.eos_token_id
        cases = []
        for _ in range(300):
            tokens = random_ids(tokenizer, rng, rng.randrange(1, 25))
            if rng.random() < 0.2:
                tokens[rng.randrange(len(tokens))] = eos
            checked = rng.randrange(0, len(tokens))
            budget = rng.randrange(checked + 1, 40)
            until = rng.choice([(), ("\n",), ("\n\n", "USER"), ("Answer:",), ("é",), ("2.",)])
            cases.append((Stopper(tokenizer, eos, budget, until), tokens, checked))
        expected = [definition(tokenizer, s.eos_token_id, s.max_new_tokens, s.until, t, c) for s, t, c in cases]
        assert first_stops(cases) == expected
        assert [s.first_stop(t, c) for s, t, c in cases] == expected
        assert len(set(expected)) > 10 and None in expected  # the cases stop in many places, and some not at all


def test_a_tokenizer_with_its_own_decode_is_called_for_each_text(byte_level):
    class Counting(type(byte_level)):
        calls = 0

        def decode(self, token_ids, **kwargs):
            Counting.calls += 1
            return super().decode(token_ids, **kwargs).upper()

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_paths()[0]), tokenizer_class=None)
    tokenizer.__class__ = Counting
    assert not _decodes_in_backend(tokenizer)
    ids = byte_level("it stops at end", add_special_tokens=False).input_ids
    stopper = Stopper(tokenizer, byte_level.eos_token_id, 100, ("END",))
    assert stopper.first_stop(ids, 0) == definition(tokenizer, byte_level.eos_token_id, 100, ("END",), ids, 0) is not None
    assert Counting.calls > len(ids)  # every prefix through its own decode (the definition's calls included)
    tokenizer.__class__ = type(byte_level)
    tokenizer.clean_up_tokenization_spaces = True  # the library's clean-up runs in Python: decode as the tokenizer does
    assert not _decodes_in_backend(tokenizer)
