"""The original layout's prompt ids equal LLaVA's `tokenizer_image_token` with LLaVA's slow tokenizer.

LLaVA loads its tokenizer with `AutoTokenizer.from_pretrained(path, use_fast=False)`
(llava/model/builder.py) under transformers 4.37: the sentencepiece `LlamaTokenizer`. transformers 5
has no slow Llama class and turns a tokenizer.model into a fast tokenizer, so the reference here is
written from 4.37's code on sentencepiece itself (`SlowReference`), applied chunk by chunk by
`tokenizer_image_token` (llava/mm_utils.py, copied below). The sentencepiece model is trained in the
test with LLaMA's trainer settings (BPE, byte fallback, digits split, whitespace kept, dummy prefix).
Measured before the fix: the fast tokenizer made " USER: " ["<s>", "▁", "US", ...] where LLaVA's makes
["<s>", "▁▁", "US", ...], so the msd prompt's ids differed in every setting.
"""

from __future__ import annotations

import io
import json

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from lmms_msd.models.original_llava import load_tokenizer_with_image_token
from lmms_msd.models.prompt import PromptFormat

IMAGE_TOKEN_INDEX = -200  # llava/constants.py
CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is the value of the largest bar? ASSISTANT: The largest bar is 42.",
    "How many points are above 10.5? Answer with a number.",
    "Which colour is the smallest slice? Red, green or blue!",
    "  double  spaces and trailing ones matter here. ",
]  # no newline: as in LLaMA's vocabulary, "\n" is the byte piece <0x0A>
QUESTIONS = [
    "What is the value of the largest bar?",
    "How many points are above 10.5?\nAnswer with a number.",
    "  Which  colour is the smallest slice? ",
    "Is it red</s> or blue?",  # a special token written in the text becomes its id
]


def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX):
    """llava/mm_utils.py `tokenizer_image_token` (haotian-liu/LLaVA), as written there (return_tensors=None)."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):  # noqa: N803  (upstream's name)
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])

    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


class SlowReference:
    """transformers 4.37 `LlamaTokenizer(legacy=...)`: `self(text).input_ids`, add_bos_token=True.

    From its code: `get_spm_processor` drops the dummy prefix when not legacy; `tokenize` returns
    `super().tokenize(text)` when legacy, else tokenizes "▁" + text.replace("▁", " ") and removes a
    leading "▁" token followed by a special one; `PreTrainedTokenizer.tokenize` splits the text on the
    special tokens (<s>, </s>, <unk>; no lstrip/rstrip) and calls `_tokenize` on the rest, which is
    `sp_model.encode(text, out_type=str)` when legacy or when the text starts with neither "▁" nor " ",
    else `sp_model.encode(unk_token + text)[unk_token_length:]`; then `build_inputs_with_special_tokens`
    puts BOS in front.
    """

    def __init__(self, proto: bytes, legacy: bool) -> None:
        if not legacy:
            model = sentencepiece_model_pb2.ModelProto.FromString(proto)
            model.normalizer_spec.add_dummy_prefix = False
            proto = model.SerializeToString()
        self.sp_model = spm.SentencePieceProcessor(model_proto=proto)
        self.legacy = legacy
        self.bos_token_id = 1
        self.all_special_tokens = ["<s>", "</s>", "<unk>"]

    def __call__(self, text):
        tokens = self.tokenize(text)
        return type("Encoding", (), {"input_ids": [self.bos_token_id] + [self.sp_model.piece_to_id(t) for t in tokens]})()

    def tokenize(self, text):
        if self.legacy or len(text) == 0:
            return self._split_and_tokenize(text)
        tokens = self._split_and_tokenize("▁" + text.replace("▁", " "))
        if len(tokens) > 1 and tokens[0] == "▁" and tokens[1] in self.all_special_tokens:
            tokens = tokens[1:]
        return tokens

    def _split_and_tokenize(self, text):
        parts, rest = [], text
        while rest:  # the trie split: the earliest special token, the longest at a position
            hits = [(rest.find(t), -len(t), t) for t in self.all_special_tokens if t in rest]
            if not hits:
                parts.append(rest)
                break
            at, _, token = min(hits)
            parts += [rest[:at], token]
            rest = rest[at + len(token):]
        out = []
        for part in parts:
            if part in self.all_special_tokens:
                out.append(part)
            elif part:
                out.extend(self._tokenize(part))
        return out

    def _tokenize(self, text):
        if self.legacy or not text.startswith(("▁", " ")):
            return self.sp_model.encode(text, out_type=str)
        tokens = self.sp_model.encode("<unk>" + text, out_type=str)
        unk_token_length = len(self.sp_model.encode("<unk>"))
        return tokens[unk_token_length:] if len(tokens) >= unk_token_length else tokens


@pytest.fixture(scope="module")
def sentencepiece_model() -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, model_type="bpe", vocab_size=400,
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, minloglevel=2,
    )
    return model.getvalue()


@pytest.fixture(scope="module", params=[True, False, None], ids=["legacy", "not-legacy", "legacy-unset"])
def tokenizer_folder(request, sentencepiece_model, tmp_path_factory):
    """An original-layout tokenizer folder (tokenizer.model + tokenizer_config.json, as liuhaotian/...
    ship), and the `legacy` the slow tokenizer runs with (4.37: an unset `legacy` means True)."""
    folder = tmp_path_factory.mktemp("sp-tokenizer")
    (folder / "tokenizer.model").write_bytes(sentencepiece_model)
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if request.param is not None:
        config["legacy"] = request.param
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder, request.param is not False


@pytest.mark.parametrize("template", ["msd", "vicuna_v1", "llava_v1"])
@pytest.mark.parametrize("n_images", [0, 1, 2])
@pytest.mark.parametrize("question", QUESTIONS)
def test_ids_equal_tokenizer_image_token_with_the_slow_tokenizer(
    tokenizer_folder, sentencepiece_model, template, n_images, question
):
    folder, legacy = tokenizer_folder
    tokenizer, image_token_id = load_tokenizer_with_image_token(folder)  # what the original layout loads
    fmt = PromptFormat(template, tokenization="llava")
    prompt = fmt.build(question, n_images)
    expected = tokenizer_image_token(prompt, SlowReference(sentencepiece_model, legacy))
    expected = [image_token_id if i == IMAGE_TOKEN_INDEX else i for i in expected]
    assert fmt.tokenize(tokenizer, prompt, image_token_id).tolist() == expected


def test_msd_prompt_chunks_keep_sentencepieces_dummy_prefix(tokenizer_folder, sentencepiece_model):
    """MSD's " USER: <image>\\nWhat is shown? ASSISTANT:": the first chunk reads "▁" (dummy prefix) +
    "▁" (the prompt's leading space), the chunk after the image "▁" + newline (byte piece)."""
    folder, _ = tokenizer_folder
    tokenizer, image_token_id = load_tokenizer_with_image_token(folder)
    sp = spm.SentencePieceProcessor(model_proto=sentencepiece_model)
    fmt = PromptFormat("msd", tokenization="llava")
    ids = fmt.tokenize(tokenizer, fmt.build("What is shown?", 1), image_token_id).tolist()
    image_at = ids.index(image_token_id)
    assert ids[0] == 1
    assert "".join(sp.id_to_piece(i) for i in ids[1:image_at]) == "▁▁USER:▁"
    assert "".join(sp.id_to_piece(i) for i in ids[image_at + 1:]) == "▁<0x0A>What▁is▁shown?▁ASSISTANT:"


def test_reference_copy_equals_llavas_own_function(sentencepiece_model):
    """The copy of `tokenizer_image_token` above is LLaVA's (needs llava-torch)."""
    pytest.importorskip("llava", reason="llava-torch is not installed (pip install --no-deps llava-torch)")
    from llava.mm_utils import tokenizer_image_token as llavas

    slow = SlowReference(sentencepiece_model, legacy=False)
    for n_images in (0, 1, 2):
        prompt = PromptFormat("msd").build(QUESTIONS[1], n_images)
        assert llavas(prompt, slow, IMAGE_TOKEN_INDEX) == tokenizer_image_token(prompt, slow)
