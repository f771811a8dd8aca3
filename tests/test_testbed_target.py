"""The testbed target: tokenizer, model, training and the saved checkpoint (tiny sizes, CPU, seconds)."""

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
    TargetSizes,
    build_target_model,
    encode_conversations,
    final_answer,
    parameter_counts,
    split_conversation,
    train_target,
)

IMAGE_SIZE = 32  # two 16-pixel patches a side: 4 image tokens
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
    assert saved["steps"] == STEPS and saved["n_image_tokens"] == (IMAGE_SIZE // 16) ** 2
    assert saved["loss_curve"] == [list(point) for point in metrics["loss_curve"]]
    config = json.loads((out / "config.json").read_text())
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    assert config["text_config"]["head_dim"] == 128


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
    assert int(prompt.image_mask.sum()) == (IMAGE_SIZE // 16) ** 2
    result = plain_generate(EagerRuntime(loaded), prompt, GenerationConfig(max_new_tokens=12))
    assert 1 <= len(result.token_ids) <= 12 and isinstance(result.text, str)


def test_training_ids_are_what_the_target_embeds(loaded, chart_dir: Path) -> None:
    """The training prompt is the one `Target.prepare` builds, the placeholder expanded the same way;
    the labels cover the reply and </s> only."""
    from PIL import Image

    record = read_conversations(chart_dir, "train")[1]
    question, reply = split_conversation(record)
    tokenizer = loaded.tokenizer
    n_image_tokens = (IMAGE_SIZE // 16) ** 2
    input_ids, labels, lengths = encode_conversations([record], tokenizer, loaded.image_token_id, n_image_tokens, 1024)
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


def test_default_size_fits_the_embedded_budget(loaded) -> None:
    """The default target in float16 stays within 18 MB even with the full 1024-token BPE budget."""
    sizes = TargetSizes()
    counts = parameter_counts(build_target_model(sizes, loaded.tokenizer, 128, seed=0))
    extra_rows = sizes.vocab_size + 2 - len(loaded.tokenizer)  # + <image>, <pad>
    total = counts["total"] + 2 * extra_rows * sizes.hidden_size  # embed_tokens and lm_head rows
    assert 2 * total <= 18e6, total


def test_same_seed_same_initial_weights(loaded) -> None:
    a = build_target_model(SIZE_PRESETS["tiny"], loaded.tokenizer, IMAGE_SIZE, seed=5).state_dict()
    b = build_target_model(SIZE_PRESETS["tiny"], loaded.tokenizer, IMAGE_SIZE, seed=5).state_dict()
    c = build_target_model(SIZE_PRESETS["tiny"], loaded.tokenizer, IMAGE_SIZE, seed=6).state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_final_answer() -> None:
    assert final_answer(" This is a bar chart. The red bar is 40.\nAnswer: red") == "red"
    assert final_answer(" 45") == "45"
    assert PROMPT_FORMAT.tokenization == "hf" and PROMPT_FORMAT.conv_template == "vicuna_v1"



def test_training_logits_are_the_inference_logits(loaded, trained: tuple[Path, dict], chart_dir: Path) -> None:
    """A right-padded training batch gives, on every real position, the logits `Target.embed` +
    `Target.forward` give for that conversation alone (no attention mask needed: pads come last),
    and the training pixels are the ones `Target.prepare` computes."""
    from PIL import Image

    from lmms_msd.testbed.target_training import load_pixels, reply_logits

    records = read_conversations(chart_dir, "train")[:2]  # a short and a long conversation
    n_image_tokens = (IMAGE_SIZE // 16) ** 2
    input_ids, _, lengths = encode_conversations(records, loaded.tokenizer, loaded.image_token_id, n_image_tokens, 1024)
    assert lengths[0] < lengths[1]
    paths = [chart_dir / record["image"] for record in records]
    pixels = load_pixels([str(path) for path in paths], trained[0], workers=1, progress=False).float()
    for row, path in enumerate(paths):
        with Image.open(path) as image:
            torch.testing.assert_close(pixels[row : row + 1], loaded.image_processor(image), atol=2e-3, rtol=0)
    with torch.no_grad():
        batch_logits = reply_logits(loaded, {"input_ids": input_ids, "pixel_values": pixels})
    for row in range(2):
        n = int(lengths[row])
        ids = input_ids[row, :n]
        is_image = ids == loaded.image_token_id
        one_placeholder = ids[~is_image | (is_image.cumsum(0) == 1)]  # the n image ids back to one
        prompt = loaded.embed(one_placeholder, pixels[row : row + 1])
        assert torch.equal(prompt.input_ids, ids)
        _, logits = loaded.forward(prompt.inputs_embeds, loaded.new_cache(), torch.arange(n))
        torch.testing.assert_close(batch_logits[row, : n - 1], logits[:-1], atol=1e-4, rtol=1e-4)
