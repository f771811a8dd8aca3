"""`lmms-msd train-draft`: the MSD recipe learns, writes the MSD format, and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from lmms_msd.commands.cli import main
from lmms_msd.models.draft import load_draft
from lmms_msd.models.loading import load_target
from lmms_msd.speculative.drafting import prefill_inputs
from lmms_msd.testbed.draft_training import (
    TrainingConfig,
    embed_sample,
    encode_conversation,
    image_share,
    new_draft_for,
    sample_loss,
    train_draft,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("draft-data")
    (root / "images").mkdir()
    records = []
    for i in range(4):
        Image.new("RGB", (42, 42), (60 * i, 120, 200 - 40 * i)).save(root / "images" / f"{i}.png")
        records.append({
            "id": str(i), "image": f"{i}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is the value of the largest bar?"},
                {"from": "gpt", "value": f"The largest bar is {7 * i}. The chart shows sales in 2019."},
                {"from": "human", "value": "And the smallest?"},
                {"from": "gpt", "value": "It is 3."},
            ],
        })
    records.append({"id": "text", "conversations": [{"from": "human", "value": "Which colour?"}, {"from": "gpt", "value": "Red, green or blue!"}]})
    (root / "data.json").write_text(json.dumps(records))
    return root


@pytest.fixture(scope="module")
def target(tiny_hf_dir):
    target = load_target(str(tiny_hf_dir))
    target.model.requires_grad_(False)
    return target


def test_conversation_mask_covers_answers_only(target, data):
    record = json.loads((data / "data.json").read_text())[0]
    sample = encode_conversation(target, record, data / "images", with_image=True)
    answers = target.tokenizer.decode(sample.input_ids[sample.answer_mask].tolist(), skip_special_tokens=True)
    assert "The largest bar is 0" in answers and "It is 3." in answers
    assert "What is the value" not in answers and "smallest" not in answers
    assert (sample.input_ids == target.image_token_id).sum() == 1
    assert sample.input_ids[sample.answer_mask][-1] == target.eos_token_id


def test_training_inputs_are_prefill_inputs(target, data):
    """train-draft feeds the head what inference's `prefill_inputs` builds on the same sample (one code
    path): with no feature noise the rows are identical, and the image features sit one position
    before the target's image positions (MSD's shifted frame)."""
    record = json.loads((data / "data.json").read_text())[0]
    embedded, mask = embed_sample(target, encode_conversation(target, record, data / "images", with_image=True))
    draft = new_draft_for(target, seed=0)
    fed = []
    draft.register_forward_pre_hook(lambda module, args: fed.append(args[0][0].detach().clone()))
    config = TrainingConfig(feature_noise=0.0)
    assert sample_loss(draft, target, embedded, mask, config, torch.Generator().manual_seed(0)) is not None
    assert len(fed) == 1
    length = embedded.input_ids.shape[0]
    with torch.inference_mode():
        features, _ = target.forward(embedded.inputs_embeds, target.new_cache(), torch.arange(length))
        expected = prefill_inputs(draft, embedded, features.float(), first_token=target.eos_token_id)
    assert torch.equal(fed[0], expected[:-2])  # [L-2, H]: the rows that have something to predict
    image = embedded.image_mask.nonzero().flatten()  # [N] the target's image positions p..p+N-1
    assert torch.equal(fed[0][image - 1], embedded.inputs_embeds[0, image].float())


def test_curriculum_is_text_first_then_rising():
    config = TrainingConfig(steps=100, text_only_fraction=0.2)
    shares = [image_share(s, config) for s in range(100)]
    assert shares[:20] == [0.0] * 20
    assert all(a <= b for a, b in zip(shares, shares[1:])) and shares[-1] == 1.0


def test_training_learns_and_resumes_exactly(target, data, tmp_path):
    config = TrainingConfig(steps=12, warmup_steps=2, grad_accum=2, lr=3e-3, save_every=6, text_only_fraction=0.25)
    straight = train_draft(target, data / "data.json", data / "images", tmp_path / "straight", config)
    first, last = straight["history"][0], straight["history"][-1]
    assert last["smooth_l1"] < first["smooth_l1"] and last["ce"] < first["ce"]

    # A run stopped after its step-6 checkpoint, then started again on the same folder.
    resumed_dir = tmp_path / "resumed"
    train_draft(target, data / "data.json", data / "images", resumed_dir, config, stop_after=6)
    train_draft(target, data / "data.json", data / "images", resumed_dir, config)
    a, b = load_draft(str(tmp_path / "straight")), load_draft(str(resumed_dir))
    for key, value in a.state_dict().items():
        assert torch.allclose(value, b.state_dict()[key], atol=1e-6), key


def test_command_line_writes_the_msd_format(tiny_hf_dir, data, tmp_path):
    status = main([
        "train-draft", "--pretrained", str(tiny_hf_dir), "--data", str(data / "data.json"),
        "--image_folder", str(data / "images"), "--output_dir", str(tmp_path / "out"), "--device", "cpu",
        "--steps", "2", "--warmup_steps", "1", "--grad_accum", "1",
    ])
    assert status == 0
    draft = load_draft(str(tmp_path / "out"))
    assert draft.config.vocab_size == load_target(str(tiny_hf_dir)).vocab_size


def test_command_line_conv_template_reaches_the_prompt(tiny_hf_dir, data, tmp_path, monkeypatch):
    """--conv_template msd: the first turn is built with MSD's prompt (empty system prompt)."""
    import lmms_msd.testbed.draft_training as draft_training

    seen = {}

    def record(target, *args, **kwargs):
        seen["target"] = target
        return {"last": None}

    monkeypatch.setattr(draft_training, "train_draft", record)
    main([
        "train-draft", "--pretrained", str(tiny_hf_dir), "--data", str(data / "data.json"),
        "--image_folder", str(data / "images"), "--output_dir", str(tmp_path / "out"), "--device", "cpu",
        "--conv_template", "msd",
    ])
    assert seen["target"].prompt_format.build("Q?", 1) == " USER: <image>\nQ? ASSISTANT:"


def test_missing_image_is_named(target, data, tmp_path):
    records = json.loads((data / "data.json").read_text())
    records[0]["image"] = "nope.png"
    (tmp_path / "bad.json").write_text(json.dumps(records))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        train_draft(target, tmp_path / "bad.json", data / "images", tmp_path / "o", TrainingConfig(steps=1))


def test_draft_sees_the_ids_the_target_was_trained_on(data, tmp_path):
    """With the testbed target's padded byte-level vocabulary, train-draft's sequence for a conversation
    is train-target's (prompt, " " + reply, </s>; one placeholder where train-target expands it) and its
    answer mask is train-target's label span."""
    from lmms_msd.models.image import load_image_preprocessor
    from lmms_msd.models.target import Target
    from lmms_msd.testbed.target_training import (
        IGNORE_INDEX,
        PROMPT_FORMAT,
        SIZE_PRESETS,
        build_target_model,
        encode_conversations,
        tokenizer_corpus,
        train_tokenizer,
    )
    from lmms_msd.testbed.tiny import save_clip_image_processor

    records = [r for r in json.loads((data / "data.json").read_text()) if "image" in r]
    one_turn = [{**r, "conversations": r["conversations"][:2]} for r in records]
    sizes = SIZE_PRESETS["tiny"]
    tokenizer = train_tokenizer(tokenizer_corpus(one_turn), tmp_path, sizes.vocab_size, sizes.max_position_embeddings)
    save_clip_image_processor(tmp_path, sizes.image_size)
    model = build_target_model(sizes, tokenizer, seed=0)
    target = Target(model.eval(), tokenizer, load_image_preprocessor(tmp_path, pad_to_square=False), PROMPT_FORMAT, "hf")
    n_image = (sizes.image_size // sizes.patch_size) ** 2
    input_ids, labels, lengths = encode_conversations(one_turn, tokenizer, target.image_token_id, n_image, 1024)
    for row, record in enumerate(one_turn):
        sample = encode_conversation(target, record, data / "images", with_image=True)
        ids = input_ids[row, : int(lengths[row])]
        is_image = ids == target.image_token_id
        keep = ~is_image | (is_image.cumsum(0) == 1)  # the expanded image ids back to one placeholder
        assert torch.equal(sample.input_ids, ids[keep])
        assert torch.equal(sample.answer_mask, (labels[row, : int(lengths[row])] != IGNORE_INDEX)[keep])


def test_command_line_writes_float16_shards(tiny_hf_dir, data, tmp_path):
    """--save_dtype float16 --max_shard_size: the finished head in float16 shards with their index (the
    bundled pair's format); the resume checkpoint stays one float32 file."""
    status = main([
        "train-draft", "--pretrained", str(tiny_hf_dir), "--data", str(data / "data.json"),
        "--image_folder", str(data / "images"), "--output_dir", str(tmp_path / "out"), "--device", "cpu",
        "--steps", "1", "--warmup_steps", "1", "--grad_accum", "1", "--save_dtype", "float16", "--max_shard_size", "20000",
    ])
    assert status == 0
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    draft = load_draft(str(out), dtype=torch.float16)
    resumable = load_draft(str(out / "checkpoint"), dtype=torch.float32)
    assert (out / "checkpoint" / "model.safetensors").is_file()
    for key, value in resumable.state_dict().items():
        assert torch.equal(draft.state_dict()[key], value.half()), key
