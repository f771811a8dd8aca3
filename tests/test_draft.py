"""The MSD draft head: checkpoint round trip, strict loading, fit to the target, MSD inputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmms_msd.models.draft import (
    DraftConfig,
    check_draft_fits,
    load_draft,
    new_random_draft,
    save_draft,
)
from lmms_msd.models.target import EmbeddedPrompt
from lmms_msd.speculative.drafting import Drafter, prefill_inputs
from lmms_msd.speculative.fast.static_drafter import StaticDrafter

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


# ---- MSD's shifted frame (DESIGN 4.1), expected sequences written from the rule -----------------------
#
# The draft's input at position t is built from what the target reads at t + 1 (after the prompt: the
# first generated token r): the image feature itself when that is an image position, else
# fc([e(x_{t+1}); f_t]). The expected rows below are written out position by position.

IMG = 50  # the placeholder id at image positions: past the draft's vocabulary (50 rows), as the original's
H = CONFIG.hidden_size


class Case:
    """A hand-made prompt: token ids (IMG at image positions), random image features and hidden states."""

    def __init__(self, ids: list[int], seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.draft = new_random_draft(CONFIG, seed=seed)
        self.ids = torch.tensor(ids)
        self.image_mask = self.ids == IMG
        n = int(self.image_mask.sum())  # image positions
        self.image = torch.randn(n, H, generator=g)  # image features I_0..I_{N-1}
        # Text rows of the target's inputs_embeds are noise: the rule reads text through the draft's own
        # embedding (upstream's `self.embed_tokens`), so using these rows instead would show.
        embeds = torch.randn(len(ids), H, generator=g)
        embeds[self.image_mask] = self.image
        self.prompt = EmbeddedPrompt(self.ids, embeds[None], self.image_mask)
        self.f = torch.randn(len(ids), H, generator=g)  # target hidden states f_0..f_{L-1}

    def fc(self, token: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fc([e(token); f_t]) computed row by row, and its rounding bound (see `assert_rows`)."""
        x = torch.cat([self.draft.embed_tokens.weight[token], self.f[t]])  # [2H]
        w, b = self.draft.fc.weight, self.draft.fc.bias
        # A float32 dot product of n terms is within n * eps * sum|w_i x_i| of the exact value (plus the
        # bias add); batched and row-wise evaluations each satisfy it, so they differ by at most twice that.
        bound = 2 * (x.numel() + 1) * torch.finfo(torch.float32).eps * (w.abs() @ x.abs() + b.abs())
        return w @ x + b, bound

    def actual(self, first_token: int) -> torch.Tensor:
        with torch.inference_mode():
            return prefill_inputs(self.draft, self.prompt, self.f, first_token)


def assert_rows(actual: torch.Tensor, expected: list) -> None:
    """Image rows (plain tensors) must be exact copies; fc rows ((value, bound) pairs) within the bound."""
    assert actual.shape == (len(expected), H)
    for t, want in enumerate(expected):
        if isinstance(want, tuple):
            value, bound = want
            assert ((actual[t] - value).abs() <= bound).all(), f"position {t}: fc row differs beyond {bound.max():.2e}"
        else:
            assert torch.equal(actual[t], want), f"position {t}: not the image feature expected"


def test_prefill_inputs_worked_example():
    """DESIGN 4.1: target inputs [t0, t1, t2, I0, I1, I2, t6, t7], first generated token r ->
    [fc(e(t1),f0), fc(e(t2),f1), I0, I1, I2, fc(e(t6),f5), fc(e(t7),f6), fc(e(r),f7)]."""
    t0, t1, t2, t6, t7, r = 11, 12, 13, 16, 17, 7
    case = Case([t0, t1, t2, IMG, IMG, IMG, t6, t7], seed=0)
    image = case.image
    expected = [case.fc(t1, 0), case.fc(t2, 1), image[0], image[1], image[2], case.fc(t6, 5), case.fc(t7, 6), case.fc(r, 7)]
    assert_rows(case.actual(first_token=r), expected)


def test_prefill_inputs_image_at_the_start():
    """p = 0: I_0 has no slot (no position -1); [I0, I1, I2, t3, t4], r -> [I1, I2, fc(e(t3),f2), fc(e(t4),f3), fc(e(r),f4)]."""
    t3, t4, r = 21, 22, 5
    case = Case([IMG, IMG, IMG, t3, t4], seed=1)
    image = case.image
    expected = [image[1], image[2], case.fc(t3, 2), case.fc(t4, 3), case.fc(r, 4)]
    assert_rows(case.actual(first_token=r), expected)


def test_prefill_inputs_image_at_the_end():
    """p + N = L: [t0, t1, I0, I1, I2], r -> [fc(e(t1),f0), I0, I1, I2, fc(e(r),f4)]."""
    t0, t1, r = 31, 32, 9
    case = Case([t0, t1, IMG, IMG, IMG], seed=2)
    image = case.image
    expected = [case.fc(t1, 0), image[0], image[1], image[2], case.fc(r, 4)]
    assert_rows(case.actual(first_token=r), expected)


def test_prefill_inputs_text_only():
    """No image: [t0, t1, t2], r -> [fc(e(t1),f0), fc(e(t2),f1), fc(e(r),f2)]."""
    t0, t1, t2, r = 1, 2, 3, 4
    case = Case([t0, t1, t2], seed=3)
    assert_rows(case.actual(first_token=r), [case.fc(t1, 0), case.fc(t2, 1), case.fc(r, 2)])


@pytest.mark.parametrize("static", [False, True], ids=["Drafter", "StaticDrafter"])
def test_visual_attention_reads_the_slots_fed_image_features(static):
    """The worked example's image features are fed at slots 2, 3, 4: those are the image slots."""
    case = Case([11, 12, 13, IMG, IMG, IMG, 16, 17], seed=4)
    lm_head = torch.nn.Linear(H, CONFIG.vocab_size, bias=False)
    if static:
        drafter = StaticDrafter(case.draft, lm_head, capacity=16, track_visual=True, cuda_graphs=False)
        drafter.reset()
    else:
        drafter = Drafter(case.draft, lm_head, capacity=16, track_visual=True)
    drafter.prefill(case.prompt, case.f, first_token=7)
    assert drafter.image_slots[:8].tolist() == [False, False, True, True, True, False, False, False]
    assert not drafter.image_slots[8:].any()
