from __future__ import annotations

from lmms_msd.calibration.token_types import (
    CONTENT,
    FUNCTION,
    NUMBER,
    token_type,
    token_type_table,
)


def test_pieces_by_type():
    assert [token_type(p) for p in ["42", "\u258142", "3.5", "12%", "Ġ7"]] == [NUMBER] * 5
    assert [token_type(p) for p in [".", "\u2581the", "Ġof", ",", "\u2581"]] == [FUNCTION] * 5
    assert [token_type(p) for p in ["\u2581bar", "chart", "Ġred", "B2B"]] == [CONTENT] * 4


def test_table_over_a_real_tokenizer(tiny_hf_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_hf_dir))
    table = token_type_table(tokenizer, len(tokenizer))
    assert table.shape == (len(tokenizer),)
    assert table[tokenizer.eos_token_id] == FUNCTION
    ids = tokenizer(" 42", add_special_tokens=False).input_ids
    assert all(table[i] == NUMBER for i in ids if tokenizer.convert_ids_to_tokens(i).strip("Ġ"))
