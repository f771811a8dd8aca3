"""The testbed target: tokenizer, model, training and the saved checkpoint (tiny sizes, CPU, seconds), and
the default sizes' shapes and on-disk budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmms_msd.testbed.charts import build_chart_dataset, read_conversations
from lmms_msd.testbed.target_training import (
    IGNORE_INDEX,
    PROMPT_FORMAT,
    SIZE_PRESETS,
    PixelNormalizer,
    TargetSizes,
    build_target_model,
    encode_conversations,
    final_answer,
    parameter_counts,
    reply_hidden,
    reply_logits,
    split_conversation,
    tokenizer_corpus,
    train_target,
    train_tokenizer,
)

IMAGE_SIZE = 32  # the charts' pixels; the tiny target resizes them to 28: two 14-pixel patches a side
N_IMAGE_TOKENS = (SIZE_PRESETS["tiny"].image_size // SIZE_PRESETS["tiny"].patch_size) ** 2  # 4
STEPS = 30


@pytest.fixture(scope="module")
def chart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("charts")
    build_chart_dataset(folder, n_train=24, n_test=6, seed=0, image_size=IMAGE_SIZE, write_parquet=False, progress=False)
    return folder


@pytest.fixture(scope="module")
def trained(chart_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("target")
    metrics = train_target(
        chart_dir, out, steps=STEPS, batch_size=8, lr=3e-3, warmup=3, device="cpu", seed=0,
        sizes=SIZE_PRESETS["tiny"], eval_every=STEPS, held_out_limit=8, n_samples=1, progress=False,
    )
    return out, metrics


@pytest.fixture(scope="module")
def loaded(trained: tuple[Path, dict]):
    from lmms_msd.models.loading import load_target

    return load_target(str(trained[0]))


def test_loss_decreases(trained: tuple[Path, dict]) -> None:
    curve = [loss for _, loss in trained[1]["loss_curve"]]
    assert len(curve) >= 10
    assert sum(curve[-3:]) / 3 < 0.8 * sum(curve[:3]) / 3, curve
    (held_out,) = trained[1]["held_out"]
    assert held_out["step"] == STEPS and held_out["loss"] < curve[0]


def test_time_limit_stops_early_with_an_annealed_learning_rate(chart_dir: Path, tmp_path: Path) -> None:
    metrics = train_target(
        chart_dir, tmp_path, steps=100_000, batch_size=4, lr=1e-3, warmup=1, device="cpu", seed=0,
        sizes=SIZE_PRESETS["tiny"], held_out_limit=4, n_samples=0, progress=False, time_limit_s=1.0,
    )
    assert metrics["stopped_at_step"] is not None and metrics["stopped_at_step"] < 100_000
    assert metrics["final_lr"] < 0.2e-3  # the cosine ran to (nearly) its end of 0.1 x lr
    assert metrics["held_out"][-1]["step"] == metrics["stopped_at_step"]
    assert (tmp_path / "model.safetensors").is_file()


def test_checkpoint_files_and_metrics(trained: tuple[Path, dict]) -> None:
    out, metrics = trained
    for name in (
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
        "processor_config.json", "chat_template.jinja",
    ):  # fmt: skip
        assert (out / name).is_file(), name
    saved = json.loads((out / "train_metrics.json").read_text())
    assert saved["steps"] == STEPS and saved["n_image_tokens"] == N_IMAGE_TOKENS == 4
    assert saved["loss_curve"] == [list(point) for point in metrics["loss_curve"]]
    config = json.loads((out / "config.json").read_text())
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    assert config["text_config"]["head_dim"] == 128 and config["text_config"]["vocab_size"] == 1024
    assert (config["vision_config"]["image_size"], config["vision_config"]["patch_size"]) == (28, 14)


def test_transformers_processor_makes_the_llava_hf_prompt(trained: tuple[Path, dict], chart_dir: Path) -> None:
    """The saved folder is what transformers' AutoProcessor (and so lmms-eval's llava_hf model) loads:
    its chat template and processor settings give the ids conv_template=llava_hf gives, `<image>`
    repeated once per image feature."""
    from PIL import Image
    from transformers import AutoProcessor

    from lmms_msd.models.loading import load_target

    out, _ = trained
    processor = AutoProcessor.from_pretrained(str(out))
    target = load_target(str(out), conv_template="llava_hf")
    record = read_conversations(chart_dir, "test")[0]
    question, _ = split_conversation(record)
    text = processor.apply_chat_template([{"role": "user", "content": "<image>\n" + question}], add_generation_prompt=True, tokenize=False)
    with Image.open(chart_dir / record["image"]) as image:
        inputs = processor(images=[image.convert("RGB")], text=text, return_tensors="pt")
        prompt = target.prepare(question, [image.convert("RGB")])
    assert inputs["input_ids"][0].tolist() == prompt.input_ids.tolist()


def test_loads_and_generates(loaded, chart_dir: Path) -> None:
    from PIL import Image

    from lmms_msd.speculative.decoding import plain_generate
    from lmms_msd.speculative.runtime import EagerRuntime
    from lmms_msd.speculative.sampling import GenerationConfig

    assert loaded.layout == "hf" and loaded.vocab_size == len(loaded.tokenizer)
    assert loaded.tokenizer.convert_ids_to_tokens(loaded.image_token_id) == "<image>"
    assert loaded.tokenizer.pad_token == "<pad>" and loaded.tokenizer.eos_token == "</s>"
    record = read_conversations(chart_dir, "test")[1]
    question, _ = split_conversation(record)
    with Image.open(chart_dir / record["image"]) as image:
        prompt = loaded.prepare(question, [image.convert("RGB")])
    assert int(prompt.image_mask.sum()) == N_IMAGE_TOKENS
    result = plain_generate(EagerRuntime(loaded), prompt, GenerationConfig(max_new_tokens=12))
    assert 1 <= len(result.token_ids) <= 12 and isinstance(result.text, str)


def test_training_ids_are_what_the_target_embeds(loaded, chart_dir: Path) -> None:
    """The training prompt is the one `Target.prepare` builds, the placeholder expanded the same way;
    the labels cover the reply and </s> only."""
    from PIL import Image

    record = read_conversations(chart_dir, "train")[1]
    question, reply = split_conversation(record)
    tokenizer = loaded.tokenizer
    input_ids, labels, lengths = encode_conversations([record], tokenizer, loaded.image_token_id, N_IMAGE_TOKENS, 1024)
    with Image.open(chart_dir / record["image"]) as image:
        embedded = loaded.prepare(question, [image.convert("RGB")])
    n_prompt = embedded.input_ids.shape[0]
    assert torch.equal(input_ids[0, :n_prompt], embedded.input_ids)
    assert input_ids[0, 0] == tokenizer.bos_token_id
    reply_ids = input_ids[0, n_prompt : int(lengths[0])]
    assert reply_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(reply_ids[:-1]) == " " + reply
    assert (labels[0, :n_prompt] == IGNORE_INDEX).all() and torch.equal(labels[0, n_prompt : int(lengths[0])], reply_ids)


def test_tokenizer_splits_digits_and_long_answers_are_long(loaded, chart_dir: Path) -> None:
    tokenizer = loaded.tokenizer
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(" is 45.", add_special_tokens=False).input_ids)
    assert "4" in tokens and "5" in tokens
    text = "This is a pie chart with 3 slices.\nAnswer: 100% <odd> text ü"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text  # byte-level: exact
    replies = [split_conversation(r)[1] for r in read_conversations(chart_dir, "train") if r["style"] == "long"]
    assert min(len(tokenizer(" " + reply, add_special_tokens=False).input_ids) for reply in replies) >= 30


def test_same_seed_same_initial_weights(loaded) -> None:
    a = build_target_model(SIZE_PRESETS["tiny"], loaded.tokenizer, seed=5).state_dict()
    b = build_target_model(SIZE_PRESETS["tiny"], loaded.tokenizer, seed=5).state_dict()
    c = build_target_model(SIZE_PRESETS["tiny"], loaded.tokenizer, seed=6).state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_final_answer() -> None:
    assert final_answer(" This is a bar chart. The red bar is 40.\nAnswer: red") == "red"
    assert final_answer(" 45") == "45"
    assert PROMPT_FORMAT.tokenization == "hf" and PROMPT_FORMAT.conv_template == "vicuna_v1"



def test_training_logits_are_the_inference_logits(loaded, trained: tuple[Path, dict], chart_dir: Path) -> None:
    """A right-padded training batch gives, on every real position, the hidden states (and so the
    logits) `Target.embed` + `Target.forward` give for that conversation alone (no attention mask
    needed: pads come last), and the training pixels, uint8 normalised per batch, are the ones
    `Target.prepare` computes."""
    from PIL import Image

    from lmms_msd.testbed.target_training import load_pixels

    records = read_conversations(chart_dir, "train")[:2]  # a short and a long conversation
    input_ids, labels, lengths = encode_conversations(records, loaded.tokenizer, loaded.image_token_id, N_IMAGE_TOKENS, 1024)
    assert lengths[0] < lengths[1]
    paths = [chart_dir / record["image"] for record in records]
    uint8 = load_pixels([str(path) for path in paths], trained[0], workers=1, progress=False)
    assert uint8.dtype == torch.uint8 and uint8.shape == (2, 3, 28, 28)
    pixels = PixelNormalizer.of(loaded.image_processor.processor, torch.device("cpu"))(uint8)
    for row, path in enumerate(paths):
        with Image.open(path) as image:
            expected = loaded.image_processor(image)
        # the same uint8 pixels through (x - mean') / std' in float32 on both sides: mean' and std' rounded
        # once, the subtraction and the division once each, values below 2.2 in magnitude: 4 roundings of
        # relative size u = 2**-24 at most
        bound = 4 * torch.finfo(torch.float32).eps / 2 * 2.2
        torch.testing.assert_close(pixels[row : row + 1], expected, atol=bound, rtol=0)
    batch = {"input_ids": input_ids, "labels": labels, "pixel_values": pixels}
    with torch.no_grad():
        hidden = reply_hidden(loaded, batch)  # [2, L, H]
        batch_logits = loaded.lm_head(hidden).float()
        picked, gold = reply_logits(loaded, hidden, labels)
    for row in range(2):
        n = int(lengths[row])
        ids = input_ids[row, :n]
        is_image = ids == loaded.image_token_id
        one_placeholder = ids[~is_image | (is_image.cumsum(0) == 1)]  # the n image ids back to one
        prompt = loaded.embed(one_placeholder, pixels[row : row + 1])
        assert torch.equal(prompt.input_ids, ids)
        _, logits = loaded.forward(prompt.inputs_embeds, loaded.new_cache(), torch.arange(n))
        torch.testing.assert_close(batch_logits[row, : n - 1], logits[:-1], atol=1e-4, rtol=1e-4)
    # reply_logits: the positions before each reply token (and </s>), in order, and those tokens
    scored = labels[:, 1:] != IGNORE_INDEX
    assert torch.equal(gold, labels[:, 1:][scored]) and int(scored.sum()) == picked.shape[0]
    assert torch.equal(picked, batch_logits[:, :-1][scored])
    n_prompt = [int((labels[row] == IGNORE_INDEX).sum() - (input_ids.shape[1] - lengths[row])) for row in range(2)]
    assert gold.tolist() == input_ids[0, n_prompt[0] : int(lengths[0])].tolist() + input_ids[1, n_prompt[1] : int(lengths[1])].tolist()


def test_pixel_normalizer_worked_example() -> None:
    """The docstring's worked example: CLIP's red-channel mean and std in 0..255 units."""
    from transformers import CLIPImageProcessor

    normalize = PixelNormalizer.of(CLIPImageProcessor(), torch.device("cpu"))
    pixels = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 1, 1)
    red = normalize(pixels)[:, 0, 0, 0]
    torch.testing.assert_close(red, torch.tensor([-1.792263, 1.930336]), atol=1e-6, rtol=0)


# ---- the 32000-entry vocabulary ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def vocabulary(chart_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The default sizes' tokenizer, trained on the chart conversations and reloaded with AutoTokenizer."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    sizes = TargetSizes()
    train_tokenizer(tokenizer_corpus(read_conversations(chart_dir, "train")), folder, sizes.vocab_size, sizes.max_position_embeddings)
    return AutoTokenizer.from_pretrained(str(folder))


def test_vocabulary_has_32000_entries_at_llama_and_llava_ids(vocabulary) -> None:
    """<unk> <s> </s> at LLaMA's 0 1 2, the trained BPE next, <unused0>... up to 31997, <image> 31998, <pad> 31999."""
    tokenizer = vocabulary
    assert len(tokenizer) == 32000
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 31998, 31999]) == ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2, 31999)
    first_unused = tokenizer.convert_tokens_to_ids("<unused0>")
    assert 3 + 256 < first_unused < 31998  # the byte symbols and the chart text's merges come first
    assert tokenizer.convert_ids_to_tokens(31997) == f"<unused{31997 - first_unused}>"
    assert tokenizer.decode([first_unused + 5]) == "<unused5>"
    ids = tokenizer("say <unused5> and <unused0>", add_special_tokens=False).input_ids
    assert all(i < first_unused for i in ids)  # no text encodes to a padding entry
    assert tokenizer.decode(ids) == "say <unused5> and <unused0>"


def test_vocabulary_round_trips_the_task_text(vocabulary, chart_dir: Path) -> None:
    """decode(encode(text)) is the text for every conversation (prompt and reply) and for text the
    BPE never saw; numbers are digit by digit."""
    tokenizer = vocabulary
    for split in ("train", "test"):
        for record in read_conversations(chart_dir, split):
            question, reply = split_conversation(record)
            for text in (PROMPT_FORMAT.build(question, n_images=1), " " + reply):
                assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    text = "Ünïcode, tabs\tand 12,345.67% <odd>"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer(" is 45.", add_special_tokens=False).input_ids)[-3:] == ["4", "5", "."]


def test_vocabulary_makes_the_vicuna_prompt(vocabulary) -> None:
    """The byte-level BPE splits the prompt as the model is trained on it: "USER:" and "ASSISTANT:"
    whole words with their leading space (Ġ), one <image> id between ":" + "Ġ" and "\n" (Ċ), <s>
    first; LLaVA's chunk-by-chunk tokenisation (tokenizer_image_token) gives the same ids (with no
    sentencepiece model, it calls the tokenizer as is rather than SlowLlamaTokenizer)."""
    from lmms_msd.models.prompt import PromptFormat, SlowLlamaTokenizer

    tokenizer = vocabulary
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    prompt = PROMPT_FORMAT.build("What is the value of the red bar?", n_images=1)
    ids = PROMPT_FORMAT.tokenize(tokenizer, prompt, image_id).tolist()
    tokens = tokenizer.convert_ids_to_tokens(ids)
    at = tokens.index("<image>")
    assert tokens[0] == "<s>" and ids.count(image_id) == 1
    assert tokens[at - 3 : at + 2] == ["ĠUSER", ":", "Ġ", "<image>", "Ċ"]
    assert tokens[-2:] == ["ĠASSISTANT", ":"]
    assert tokenizer.decode(ids[1:]) == prompt
    assert SlowLlamaTokenizer.of(tokenizer) is None
    llava_style = PromptFormat(conv_template="vicuna_v1", tokenization="llava")
    assert llava_style.tokenize(tokenizer, prompt, image_id).tolist() == ids


def test_default_sizes_are_llava_shapes_within_the_size_budget(vocabulary, tmp_path: Path) -> None:
    """The default target has LLaVA-1.5's shapes (576 image positions, a 32000-row vocabulary, head_dim
    128); with its draft and tokenizer it takes at most 30 MiB on disk in float16, every file at most
    15 MB (what comes back from the GPU machine in one piece), and both load back from their shards."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    from lmms_msd.models.draft import load_draft, save_draft
    from lmms_msd.models.image import load_image_preprocessor
    from lmms_msd.models.loading import load_target
    from lmms_msd.models.target import Target
    from lmms_msd.testbed.draft_training import new_draft_for

    sizes = TargetSizes()
    model = build_target_model(sizes, vocabulary, seed=0)
    counts = parameter_counts(model)
    assert counts == {  # the TargetSizes docstring's figures
        "vision_tower": 942_848, "projector": 33_024, "language_model": 5_211_264, "lm_head": 4_096_000, "total": 10_283_136,
    }
    folder = tmp_path / "target"
    model.half().save_pretrained(str(folder), max_shard_size="15MB")
    vocabulary.save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(str(folder))
    target = load_target(str(folder))
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    assert target.vocab_size == 32000 and target.model.config.text_config.head_dim == 128
    pixels = load_image_preprocessor(folder, pad_to_square=False)(Image.new("RGB", (400, 300)))
    assert pixels.shape == (1, 3, 336, 336) and target.image_features(pixels).shape == (1, 576, 128)
    assert torch.equal(target.model.lm_head.weight, model.lm_head.weight.float())  # every shard read

    draft = new_draft_for(Target(model.float(), vocabulary, None, PROMPT_FORMAT, "hf"), seed=0)
    assert sum(p.numel() for p in draft.parameters()) == 4_407_552  # embed 4,096,000 + fc 32,896 + layer 278,656
    save_draft(draft, tmp_path / "draft", dtype=torch.float16, max_shard_size="15MB")
    assert torch.equal(load_draft(str(tmp_path / "draft")).embed_tokens.weight, draft.embed_tokens.weight.half().float())

    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert max(path.stat().st_size for path in files) <= 15e6, {path.name: path.stat().st_size for path in files}
    assert sum(path.stat().st_size for path in files) <= 30 * 2**20


