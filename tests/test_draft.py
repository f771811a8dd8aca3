"""The MSD draft head: checkpoint round trip, strict loading, fit to the target, MSD inputs."""

from __future__ import annotations

import json

import pytest
import torch
from decoding_fixtures import random_draft, random_prompt, tiny_target
from safetensors.torch import load_file, save_file

from lmms_msd.draft import DraftConfig, check_draft_fits, load_draft, new_random_draft, save_draft
from lmms_msd.drafting import prefill_inputs

CONFIG = DraftConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=50)


def test_saved_draft_loads_back(tmp_path):
    draft = new_random_draft(CONFIG, seed=0)
    save_draft(draft, tmp_path / "d")
    loaded = load_draft(str(tmp_path / "d"))
    assert loaded.config == CONFIG
    for key, value in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert sorted(load_file(str(tmp_path / "d" / "model.safetensors"))) == sorted(
        [
            "embed_tokens.weight", "fc.weight", "fc.bias",
            "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight",
            "layers.0.self_attn.v_proj.weight", "layers.0.self_attn.o_proj.weight",
            "layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight",
            "layers.0.post_attention_layernorm.weight",
        ]
    )


def test_released_format_pytorch_bin_and_config_keys(tmp_path):
    """The released checkpoints: pytorch_model.bin and a LLaVA/LLaMA config with extra keys."""
    draft = new_random_draft(DraftConfig(**{**CONFIG.__dict__, "bias": False}), seed=1)
    folder = tmp_path / "released"
    folder.mkdir()
    torch.save(draft.state_dict(), folder / "pytorch_model.bin")
    raw = {
        "model_type": "llava", "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 50,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "hidden_act": "silu", "bias": False,
        "torch_dtype": "float16",
    }
    (folder / "config.json").write_text(json.dumps(raw))
    loaded = load_draft(str(folder))
    assert loaded.fc.bias is None and loaded.config.rms_norm_eps == 1e-5
    assert torch.equal(loaded.fc.weight, draft.fc.weight)


def test_missing_key_is_named(tmp_path):
    save_draft(new_random_draft(CONFIG, seed=0), tmp_path / "d")
    state = load_file(str(tmp_path / "d" / "model.safetensors"))
    del state["layers.0.mlp.up_proj.weight"]
    save_file(state, str(tmp_path / "d" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['layers.0.mlp.up_proj.weight'\]"):
        load_draft(str(tmp_path / "d"))


def test_unexpected_key_is_named(tmp_path):
    save_draft(new_random_draft(CONFIG, seed=0), tmp_path / "d")
    state = load_file(str(tmp_path / "d" / "model.safetensors"))
    state["norm.weight"] = torch.ones(32)
    save_file(state, str(tmp_path / "d" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected keys \['norm.weight'\]"):
        load_draft(str(tmp_path / "d"))


def test_wrong_shape_is_named(tmp_path):
    save_draft(new_random_draft(CONFIG, seed=0), tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "d" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"layers.0.mlp.gate_proj.weight: \(64, 32\) in file, \(96, 32\) expected"):
        load_draft(str(tmp_path / "d"))


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-draft"):
        load_draft(str(tmp_path / "no-such-draft"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_draft(str(tmp_path / "empty"))


def test_draft_of_another_size_names_both_sizes():
    draft = new_random_draft(CONFIG, seed=0)
    with pytest.raises(ValueError, match="hidden size: draft 32, target 4096"):
        check_draft_fits(draft, hidden_size=4096, vocab_size=50)
    with pytest.raises(ValueError, match="vocabulary: draft 50, target 32000"):
        check_draft_fits(draft, hidden_size=32, vocab_size=32000)
    check_draft_fits(draft, hidden_size=32, vocab_size=50)


def test_prefill_inputs_decouple_image_positions():
    """Image positions take the projected image embedding; the text position before the image
    fuses the first image feature (what the target read next); the last fuses the first new token."""
    target = tiny_target(0)
    draft = random_draft(target, 1)
    prompt = random_prompt(target, 3, with_image=True)
    length = prompt.input_ids.shape[0]
    hidden = torch.randn(length, target.hidden_size)
    with torch.inference_mode():
        x = prefill_inputs(draft, prompt, hidden, first_token=7)
    image_pos = prompt.image_mask.nonzero().flatten()
    embeds = prompt.inputs_embeds[0]
    assert image_pos.numel() == target.image_features(torch.zeros(1, 3, 28, 28)).shape[1]
    assert torch.equal(x[image_pos], embeds[image_pos])
    before = int(image_pos[0]) - 1
    with torch.inference_mode():
        fuse = lambda e, f: draft.fuse(e[None, None], f[None, None])[0, 0]  # noqa: E731
        assert torch.allclose(x[before], fuse(embeds[before + 1], hidden[before]), atol=1e-5)
        assert torch.allclose(x[-1], fuse(draft.embed_tokens.weight[7], hidden[-1]), atol=1e-5)
        assert torch.allclose(x[0], fuse(draft.embed_tokens.weight[prompt.input_ids[1]], hidden[0]), atol=1e-5)
