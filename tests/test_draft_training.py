"""`lmms-msd train-draft`: the MSD recipe learns, writes the MSD format, and resumes exactly; a micro-batch of
B samples gives each sample the loss, and the step the gradient, that the samples one at a time give (up
to the rounding of reductions over padded rows, bounded by `float_bounds.chain_gap`)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from float_bounds import chain_gap
from PIL import Image

from lmms_msd.commands.cli import main
from lmms_msd.models.draft import load_draft
from lmms_msd.models.loading import load_target
from lmms_msd.speculative.drafting import prefill_inputs
from lmms_msd.testbed.draft_data import (
    Drawn,
    Encoding,
    StepSamples,
    collate,
    encode_conversation,
    expand,
    image_share,
)
from lmms_msd.testbed.draft_training import (
    TrainingConfig,
    accumulate,
    batch_losses,
    image_positions,
    new_draft_for,
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


def drawn(target, data, record_index: int, with_image: bool, noise_seed: int | None) -> Drawn:
    """One record as a kept draw, with seeded feature noise (None: no noise)."""
    record = json.loads((data / "data.json").read_text())[record_index]
    sample = encode_conversation(target, record, data / "images", with_image=with_image)
    ids, answer = expand(sample, target.image_token_id, image_positions(target, [record], data / "images"))
    noise = torch.zeros(ids.shape[0], target.hidden_size)
    if noise_seed is not None:
        noise = torch.rand(noise.shape, generator=torch.Generator().manual_seed(noise_seed)) - 0.5
    return Drawn(sample, ids, answer, noise)


def reference_loss(draft, target, d: Drawn, config: TrainingConfig) -> torch.Tensor:
    """One sample alone, written out plainly (train-draft's per-sample recipe): `Target.embed`, the
    target's forward, `prefill_inputs`, the head with a causal mask, then SmoothL1 and cross-entropy
    means over the learn positions. -> [4] (loss, smooth_l1, ce, top1)"""
    from PIL import Image

    pixels = None
    if d.sample.image is not None:
        with Image.open(d.sample.image) as image:
            pixels = target.image_processor(image)
    embedded = target.embed(d.sample.input_ids, pixels)
    assert torch.equal(embedded.input_ids, d.input_ids)
    length = embedded.input_ids.shape[0]
    with torch.inference_mode():
        features, _ = target.forward(embedded.inputs_embeds, target.new_cache(), torch.arange(length))
    features = features.clone()
    embedded = type(embedded)(embedded.input_ids.clone(), embedded.inputs_embeds.clone(), embedded.image_mask.clone())
    inputs = prefill_inputs(draft, embedded, features + d.noise, first_token=target.eos_token_id)[:-2]
    n = inputs.shape[0]
    positions = torch.arange(n)
    hidden = draft(inputs[None], positions, draft.new_cache(n), positions, torch.ones(n, n, dtype=torch.bool).tril())[0]
    learn = d.answer_mask[2:]
    predicted, wanted = hidden[learn], features[1:-1][learn]
    smooth_l1 = F.smooth_l1_loss(predicted, wanted)
    target_probs = torch.softmax(target.lm_head(wanted), dim=-1)
    draft_logp = torch.log_softmax(F.linear(predicted, target.lm_head.weight), dim=-1)
    ce = -(target_probs * draft_logp).sum(-1).mean()
    top1 = (draft_logp.argmax(-1) == target_probs.argmax(-1)).float().mean()
    return torch.stack([smooth_l1 + config.ce_weight * ce, smooth_l1, ce, top1])


def attentive_draft(target, seed: int):
    """A fresh head whose attention matters: q/k/v/o at 20 times the initial scale (a fresh head's
    attention is nearly uniform and its output nearly its input, which would hide a leak)."""
    draft = new_draft_for(target, seed)
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(draft.layers[0].self_attn, name).weight.mul_(20)
    return draft


def step_reductions(target, draft, width: int, rows: int) -> list[int]:
    """The reductions on the longest path to a head gradient over rows of `width` positions: the vision
    tower (patch convolution; per layer LayerNorm, q/k/v, scores, softmax sum and weighted values, out
    projection, LayerNorm, fc1, fc2) and projector; the target's text layers (RMSNorm, q/k/v, scores,
    softmax sum and weighted values, o_proj, RMSNorm, gate/up, down) and final norm; the head (fc, q/k/v,
    scores, softmax sum and weighted values, o_proj, norm, gate/up, down); lm_head, its softmax and the
    cross-entropy sums; the per-sample means (over H, then positions); back through lm_head and the
    head; the weight gradient's sum over every position of the micro-batch."""
    text, vision = target.model.config.text_config, target.model.config.vision_config
    h, v, d_v = text.hidden_size, target.vocab_size, vision.hidden_size
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    vision_layer = [d_v, d_v, d_v, d_v // vision.num_attention_heads, patches, patches, d_v, d_v, d_v, d_v, vision.intermediate_size]
    text_layer = [h, h, text.head_dim, width, width, text.num_attention_heads * text.head_dim, h, h, text.intermediate_size]
    c = draft.config
    head = [2 * h, h, c.resolved_head_dim, width, width, c.num_attention_heads * c.resolved_head_dim, h, h, c.intermediate_size]
    return (
        [3 * vision.patch_size**2] + vision_layer * vision.num_hidden_layers + [d_v, h]
        + text_layer * text.num_hidden_layers + [h]
        + head + [h, v, v, h, width]
        + [v] + head[::-1] + [rows * width]
    )


def test_training_inputs_are_prefill_inputs(target, data):
    """train-draft feeds the head what inference's `prefill_inputs` builds on the same sample (one code
    path): with no feature noise the rows are identical, and the image features sit one position
    before the target's image positions (MSD's shifted frame)."""
    d = drawn(target, data, 0, with_image=True, noise_seed=None)
    embedded = target.embed(d.sample.input_ids, target.image_processor(Image.open(d.sample.image)))
    draft = new_draft_for(target, seed=0)
    fed = []
    draft.register_forward_pre_hook(lambda module, args: fed.append(args[0].detach().clone()))
    batch_losses(draft, target, collate(target, [d]), TrainingConfig())
    assert len(fed) == 1 and fed[0].shape[0] == 1
    length = embedded.input_ids.shape[0]
    with torch.inference_mode():
        features, _ = target.forward(embedded.inputs_embeds, target.new_cache(), torch.arange(length))
        expected = prefill_inputs(draft, embedded, features.float(), first_token=target.eos_token_id)
    assert torch.equal(fed[0][0], expected[:-2])  # [L-2, H]: the rows that have something to predict
    image = embedded.image_mask.nonzero().flatten()  # [N] the target's image positions p..p+N-1
    assert torch.equal(fed[0][0, image - 1], embedded.inputs_embeds[0, image].float())


def test_a_micro_batch_gives_the_step_of_its_samples_one_at_a_time(target, data):
    """batch_size 6, grad_accum 1: the per-sample losses of the micro-batch, and the gradient of the step,
    are those of the six draws each run alone (`reference_loss`), the step's loss their mean."""
    config = TrainingConfig(steps=4, batch_size=6, grad_accum=1, text_only_fraction=0.25)
    records = json.loads((data / "data.json").read_text())
    samples = StepSamples(Encoding.of(target), records, data / "images", config, range(2, 3), image_positions(target, records, data / "images"), target.hidden_size)
    (batch,) = samples[0]  # step 2: image share 1/3
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + 2)  # the step's draws, again
    kept = [samples.draw(image_share(2, config), generator) for _ in range(6)]
    assert [d.input_ids.shape[0] for d in kept] == batch.lengths  # none dropped
    assert len(set(batch.lengths)) > 1 and batch.pixels is not None and batch.pixels.shape[0] < 6  # ragged; text and images
    draft = attentive_draft(target, seed=1).train()
    draft.embed_tokens.weight.requires_grad_(False)
    params = [p for p in draft.parameters() if p.requires_grad]

    sums = accumulate(draft, target, [batch], config)
    batched = [p.grad.clone() for p in params]
    draft.zero_grad(set_to_none=True)
    expected = torch.stack([reference_loss(draft, target, d, config) for d in kept])  # [6, 4]
    (expected[:, 0].sum() / 6).backward()

    width = max(batch.lengths)
    bound = chain_gap(step_reductions(target, draft, width, rows=6), expected.abs().max().item(), torch.float32)
    torch.testing.assert_close(sums, expected.detach().sum(0), rtol=0, atol=6 * bound)
    for (name, _), got, p in zip([(n, p) for n, p in draft.named_parameters() if p.requires_grad], batched, params):
        bound = chain_gap(step_reductions(target, draft, width, rows=6), p.grad.abs().max().item(), torch.float32)
        torch.testing.assert_close(got, p.grad, rtol=0, atol=bound, msg=name)


def test_padding_does_not_leak(target, data):
    """A sample's loss is the same alone and in a micro-batch next to a longer one (before or after it):
    the longer row's positions and the shorter row's padding reach neither."""
    short, long = drawn(target, data, 4, with_image=False, noise_seed=0), drawn(target, data, 1, with_image=True, noise_seed=1)
    assert short.input_ids.shape[0] < long.input_ids.shape[0]
    draft = attentive_draft(target, seed=2)
    config = TrainingConfig()
    with torch.no_grad():
        alone = [batch_losses(draft, target, collate(target, [d]), config)[0] for d in (short, long)]
        together = batch_losses(draft, target, collate(target, [short, long]), config)
        swapped = batch_losses(draft, target, collate(target, [long, short]), config)
    width = long.input_ids.shape[0]
    bound = chain_gap(step_reductions(target, draft, width, rows=2), max(a.abs().max().item() for a in alone), torch.float32)
    for got in (together, swapped.flip(0)):
        torch.testing.assert_close(got[0], alone[0], rtol=0, atol=bound)
        torch.testing.assert_close(got[1], alone[1], rtol=0, atol=bound)


def test_draws_do_not_depend_on_how_they_are_grouped(target, data):
    """The draws of a step come in one order from the step's seed: batch_size 3 x grad_accum 2 holds the
    samples and noise of batch_size 1 x grad_accum 6, row by row."""
    records = json.loads((data / "data.json").read_text())
    positions = image_positions(target, records, data / "images")

    def rows(batch_size, grad_accum):
        config = TrainingConfig(steps=4, batch_size=batch_size, grad_accum=grad_accum, text_only_fraction=0.25)
        samples = StepSamples(Encoding.of(target), records, data / "images", config, range(4), positions, target.hidden_size)
        return [
            (b.input_ids[r, :n], b.noise[r, :n], b.answer_mask[r, :n])
            for step in range(4) for b in samples[step] for r, n in enumerate(b.lengths)
        ]

    grouped, single = rows(3, 2), rows(1, 6)
    assert len(grouped) == len(single) == 24
    for a, b in zip(grouped, single):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_curriculum_is_text_first_then_rising():
    config = TrainingConfig(steps=100, text_only_fraction=0.2)
    shares = [image_share(s, config) for s in range(100)]
    assert shares[:20] == [0.0] * 20
    assert all(a <= b for a, b in itertools.pairwise(shares)) and shares[-1] == 1.0


@pytest.mark.parametrize("batch_size, workers", [(1, 0), (2, 2)])
def test_training_learns_and_resumes_exactly(target, data, tmp_path, batch_size, workers):
    """Stopped after its step-6 checkpoint and started again, a run ends where an uninterrupted one does;
    the resumed run's loader workers (processes) change nothing."""
    config = TrainingConfig(steps=12, warmup_steps=2, grad_accum=2, batch_size=batch_size, lr=3e-3, save_every=6, text_only_fraction=0.25)
    straight = train_draft(target, data / "data.json", data / "images", tmp_path / "straight", config)
    first, last = straight["history"][0], straight["history"][-1]
    assert last["smooth_l1"] < first["smooth_l1"] and last["ce"] < first["ce"]
    assert [h["step"] for h in straight["history"]] == list(range(12))

    resumed_dir = tmp_path / "resumed"
    train_draft(target, data / "data.json", data / "images", resumed_dir, config, stop_after=6, workers=workers)
    train_draft(target, data / "data.json", data / "images", resumed_dir, config, workers=workers)
    a, b = load_draft(str(tmp_path / "straight")), load_draft(str(resumed_dir))
    for key, value in a.state_dict().items():
        assert torch.allclose(value, b.state_dict()[key], atol=1e-6), key


def test_command_line_writes_the_msd_format(tiny_hf_dir, data, tmp_path):
    status = main([
        "train-draft", "--pretrained", str(tiny_hf_dir), "--data", str(data / "data.json"),
        "--image_folder", str(data / "images"), "--output_dir", str(tmp_path / "out"), "--device", "cpu",
        "--steps", "2", "--warmup_steps", "1", "--grad_accum", "1", "--workers", "0",
    ])
    assert status == 0
    draft = load_draft(str(tmp_path / "out"))
    assert draft.config.vocab_size == load_target(str(tiny_hf_dir)).vocab_size


def test_command_line_conv_template_reaches_the_prompt(tiny_hf_dir, data, tmp_path, monkeypatch):
    """--conv_template msd: the first turn is built with MSD's prompt (empty system prompt)."""
    from lmms_msd.testbed import draft_training

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
        "--steps", "1", "--warmup_steps", "1", "--grad_accum", "1", "--workers", "0", "--save_dtype", "float16", "--max_shard_size", "20000",
    ])
    assert status == 0
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    draft = load_draft(str(out), dtype=torch.float16)
    resumable = load_draft(str(out / "checkpoint"), dtype=torch.float32)
    assert (out / "checkpoint" / "model.safetensors").is_file()
    for key, value in resumable.state_dict().items():
        assert torch.equal(draft.state_dict()[key], value.half()), key


def test_time_limit_stops_with_the_schedule_decayed_and_saves(target, data, tmp_path):
    """Past time_limit_s the run stops after the step in hand and saves the head; the learning rate's clock
    ran ahead with the time, so that step already used the schedule's last rate. A limit never reached
    changes nothing."""
    config = TrainingConfig(steps=12, warmup_steps=2, grad_accum=2, lr=3e-3, save_every=6, text_only_fraction=0.25)
    cut = train_draft(target, data / "data.json", data / "images", tmp_path / "cut", config, time_limit_s=1e-9)
    assert cut["stopped_at_step"] == 1 and [h["step"] for h in cut["history"]] == [0]
    assert json.loads((tmp_path / "cut" / "training_log.json").read_text())["stopped_at_step"] == 1
    load_draft(str(tmp_path / "cut"))  # the head was saved

    straight = train_draft(target, data / "data.json", data / "images", tmp_path / "straight", config)
    roomy = train_draft(target, data / "data.json", data / "images", tmp_path / "roomy", config, time_limit_s=1e6)
    assert roomy["stopped_at_step"] is None and roomy["history"] == straight["history"]
    with pytest.raises(ValueError, match="time_limit_s must be positive"):
        train_draft(target, data / "data.json", data / "images", tmp_path / "none", config, time_limit_s=0)
