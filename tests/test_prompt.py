"""`conv_template=msd`: MSD's prompt, written out literally (lmms_msd.models.prompt.PromptFormat.build).

MSD builds its conversation with LLaVA's SeparatorStyle.TWO template and `conv.system = ""`
(Lyn-Lucy/MSD: EAGLE/eagle/ge_data/ge_data_all_llava15.py for training, lmms-eval/lmms_eval/models/
llava_msd.py for evaluation). LLaVA's `Conversation.get_prompt` (llava/conversation.py) starts with
`self.system + seps[0]`, so the empty system still leaves the separator " " before "USER:".
"""

from __future__ import annotations

import pytest

from lmms_msd.models.prompt import VICUNA_V1_SYSTEM, PromptFormat

QUESTION = "What is shown?"


def test_msd_prompt_worked_example():
    assert PromptFormat("msd").build(QUESTION, n_images=1) == " USER: <image>\nWhat is shown? ASSISTANT:"


def test_msd_prompt_joins_images_with_a_space_and_has_none_without_images():
    """MSD's evaluation: `" ".join(image_tokens) + "\\n" + context`; no image, no placeholder line."""
    assert PromptFormat("msd").build(QUESTION, n_images=2) == " USER: <image> <image>\nWhat is shown? ASSISTANT:"
    assert PromptFormat("msd").build(QUESTION, n_images=0) == " USER: What is shown? ASSISTANT:"


def test_llava_conversation_keeps_its_separator_with_an_empty_system_prompt():
    """vicuna_v1 with system_prompt="" is LLaVA's conv_vicuna_v1 with `conv.system = ""`: MSD's text."""
    assert PromptFormat("vicuna_v1", system_prompt="").build(QUESTION, 1) == " USER: <image>\nWhat is shown? ASSISTANT:"
    assert PromptFormat("vicuna_v1").build(QUESTION, 1) == f"{VICUNA_V1_SYSTEM} USER: <image>\nWhat is shown? ASSISTANT:"
    assert PromptFormat("llava_hf").build(QUESTION, 1) == "USER: <image>\nWhat is shown? ASSISTANT:"


def test_msd_prompt_equals_llavas_conversation_with_empty_system():
    """The same text from LLaVA's own conversation code, built as MSD builds it (needs llava-torch)."""
    pytest.importorskip("llava", reason="llava-torch is not installed (pip install --no-deps llava-torch)")
    from llava.conversation import conv_templates

    for template in ("llava_v1", "vicuna_v1"):  # MSD's training and evaluation templates
        conv = conv_templates[template].copy()
        conv.system = ""
        conv.append_message(conv.roles[0], "<image>\n" + QUESTION)
        conv.append_message(conv.roles[1], None)
        assert PromptFormat("msd").build(QUESTION, n_images=1) == conv.get_prompt()
