"""Target loading (both layouts), prompt format and image preprocessing, on tiny fp32 checkpoints."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from lmms_msd.models.image import expand2square
from lmms_msd.models.loading import load_target, resolve_dtype
from lmms_msd.models.original_llava import find_weight_files, load_weight_file
from lmms_msd.models.prompt import LLAVA_V1_SYSTEM, VICUNA_V1_SYSTEM, PromptFormat
from lmms_msd.testbed.tiny import randomize_

QUESTION = "What is the value of the largest bar? Answer with a number."


def n_image_features(target) -> int:
    """Image positions per image, from the vision config (patch tokens; "full" adds CLS)."""
    vision = target.model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + (target.model.config.vision_feature_select_strategy == "full")


def prompt_logits(target, question: str, images: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(expanded input ids [L], logits [L, V]) through Target.prepare + Target.forward."""
    prompt = target.prepare(question, images)
    positions = torch.arange(prompt.input_ids.shape[0])
    _, logits = target.forward(prompt.inputs_embeds, target.new_cache(), positions)
    return prompt.input_ids, logits


def copy_checkpoint(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def edit_json(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# ---- prompt format ----------------------------------------------------------------------------------
def test_vicuna_v1_prompt_is_llavas():
    fmt = PromptFormat()
    assert fmt.build("Q?", n_images=1) == f"{VICUNA_V1_SYSTEM} USER: <image>\nQ? ASSISTANT:"
    assert fmt.build("Q?", n_images=0) == f"{VICUNA_V1_SYSTEM} USER: Q? ASSISTANT:"
    assert fmt.build("Q?", n_images=2) == f"{VICUNA_V1_SYSTEM} USER: <image>\n<image>\nQ? ASSISTANT:"
    assert PromptFormat("llava_v1").build("Q?", 1) == f"{LLAVA_V1_SYSTEM} USER: <image>\nQ? ASSISTANT:"
    assert PromptFormat(system_prompt="Be brief.").build("Q?", 1) == "Be brief. USER: <image>\nQ? ASSISTANT:"


def test_llava_hf_prompt_has_no_system_unless_given():
    assert PromptFormat("llava_hf").build("Q?", 1) == "USER: <image>\nQ? ASSISTANT:"
    assert PromptFormat("llava_hf", system_prompt="S.").build("Q?", 1) == "S. USER: <image>\nQ? ASSISTANT:"


def test_unknown_template_lists_valid_ones():
    with pytest.raises(ValueError, match="valid ones: .*'llava_hf'.*'vicuna_v1'"):
        PromptFormat("chatml")
    with pytest.raises(ValueError, match="without it"):
        PromptFormat().build("<image>\nQ?", n_images=1)


class CharTokenizer:
    """Each character is one id (its code point), a BOS (id 1) first: chunk ids are easy to write out."""

    bos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = True):
        return type("Encoding", (), {"input_ids": [1] + [ord(c) for c in text]})()

    def convert_tokens_to_ids(self, token: str) -> int:
        return 3


def test_llava_tokenization_drops_later_bos_and_puts_one_placeholder_per_image():
    """Chunks "a", "b", "c" -> [1, a] [1, b] [1, c] -> BOS once, the later BOS dropped, one id between."""
    ids = PromptFormat().tokenize(CharTokenizer(), "a<image>b<image>c", image_token_id=-200)
    assert ids.tolist() == [1, ord("a"), -200, ord("b"), -200, ord("c")]
    assert ids.dtype == torch.long


def test_tokenize_refuses_a_tokenizer_without_the_image_token():
    with pytest.raises(ValueError, match="1 '<image>' but its token ids hold 0 image_token_id=99"):
        PromptFormat(tokenization="hf").tokenize(CharTokenizer(), "a<image>b", image_token_id=99)


def test_hf_tokenization_is_the_whole_string(tiny_hf_target):
    tokenizer, image_id = tiny_hf_target.tokenizer, tiny_hf_target.image_token_id
    prompt = PromptFormat().build(QUESTION, n_images=1)
    ids = tiny_hf_target.prompt_format.tokenize(tokenizer, prompt, image_id)
    assert ids.tolist() == tokenizer(prompt).input_ids
    assert ids.tolist().count(image_id) == 1 and ids[0] == tokenizer.bos_token_id


# ---- HF layout --------------------------------------------------------------------------------------
def test_hf_layout_forward_equals_the_transformers_model(tiny_hf_target, tiny_image, make_image):
    target = tiny_hf_target
    assert target.layout == "hf" and target.prompt_format.tokenization == "hf"
    images = [tiny_image, make_image(20, 40, seed=1)]
    input_ids, logits = prompt_logits(target, QUESTION, images)
    assert (input_ids == target.image_token_id).sum() == len(images) * n_image_features(target)
    pixel_values = torch.cat([target.image_processor(image) for image in images])
    with torch.inference_mode():
        reference = target.model(input_ids=input_ids[None], pixel_values=pixel_values).logits[0]
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


def test_hf_layout_uses_the_folders_image_processor_without_padding(tiny_hf_target, tiny_image):
    assert not tiny_hf_target.image_processor.pad_to_square
    pixels = tiny_hf_target.image_processor(tiny_image)
    size = tiny_hf_target.model.config.vision_config.image_size
    assert pixels.shape == (1, 3, size, size) and pixels.dtype == torch.float32


# ---- original layout --------------------------------------------------------------------------------
def test_original_layout_keeps_the_checkpoint_vocabulary(tiny_original_target, tiny_original_dir, tiny_image):
    target = tiny_original_target
    config = json.loads((tiny_original_dir / "config.json").read_text())
    assert target.layout == "original" and target.prompt_format.tokenization == "llava"
    assert target.vocab_size == config["vocab_size"] == target.model.get_input_embeddings().num_embeddings
    # `<image>` then `<pad>` are added to the tokenizer only, right past the vocabulary
    assert target.image_token_id == config["vocab_size"]
    assert target.tokenizer.pad_token_id == config["vocab_size"] + 1
    input_ids, logits = prompt_logits(target, QUESTION, [tiny_image])
    assert (input_ids == target.image_token_id).sum() == n_image_features(target)
    assert logits.shape == (input_ids.shape[0], config["vocab_size"]) and torch.isfinite(logits).all()


def test_original_layout_pads_images_with_the_mean_colour(tiny_original_target):
    processor = tiny_original_target.image_processor
    assert processor.pad_to_square
    wide = Image.new("RGB", (60, 20), (255, 255, 255))
    pixels = processor(wide)  # [1, 3, S, S]: a white band between two mean-colour bands
    mean = torch.tensor(processor.processor.image_mean)
    std = torch.tensor(processor.processor.image_std)
    padded = (torch.tensor(processor.mean_colour) / 255 - mean) / std
    torch.testing.assert_close(pixels[0, :, 0, 0], padded, atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels[0, :, pixels.shape[2] // 2, 0], (1 - mean) / std, atol=1e-5, rtol=0)
    assert expand2square(wide, (1, 2, 3)).size == (60, 60)


def test_sharded_safetensors_checkpoint_loads_the_same(tiny_original_dir, tiny_original_target, tiny_image, tmp_path):
    from safetensors.torch import save_file

    folder = copy_checkpoint(tiny_original_dir, tmp_path)
    state = load_weight_file(folder / "pytorch_model.bin")
    (folder / "pytorch_model.bin").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({k: state[k].contiguous() for k in shard_keys}, str(folder / name))
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert [p.name for p in find_weight_files(folder)] == sorted(shards)

    _, logits = prompt_logits(load_target(str(folder)), QUESTION, [tiny_image])
    _, reference = prompt_logits(tiny_original_target, QUESTION, [tiny_image])
    # the same weights and input shapes on both sides: the same kernels, so bit for bit on any machine
    torch.testing.assert_close(logits, reference, atol=0, rtol=0)


def test_vision_tower_saved_inside_the_checkpoint_is_used(tiny_original_dir, tiny_clip_dir, tiny_original_target, tiny_image, tmp_path):
    """Keys `model.vision_tower.vision_tower.vision_model.*` replace the CLIP folder's weights."""
    folder = copy_checkpoint(tiny_original_dir, tmp_path)
    clip = copy_checkpoint(tiny_clip_dir, tmp_path)
    state = load_weight_file(folder / "pytorch_model.bin")
    for key, tensor in load_weight_file(clip / "model.safetensors").items():
        if key.startswith("vision_model."):
            state["model.vision_tower.vision_tower." + key] = tensor
    torch.save(state, folder / "pytorch_model.bin")
    (clip / "model.safetensors").unlink()  # only its config and preprocessor remain
    target = load_target(str(folder), vision_tower=str(clip))
    torch.testing.assert_close(prompt_logits(target, QUESTION, [tiny_image])[1],
                               prompt_logits(tiny_original_target, QUESTION, [tiny_image])[1], atol=0, rtol=0)


def test_plain_clip_vision_model_folder_works_as_vision_tower(tiny_original_dir, tiny_clip_dir, tiny_original_target, tiny_image, tmp_path):
    """A CLIPVisionModel folder (plain CLIPVisionConfig; transformers 5 saves its keys without
    `vision_model.`) gives the same target as the CLIPModel folder it was cut from."""
    from transformers import CLIPVisionModel

    vision_only = tmp_path / "clip-vision-only"
    CLIPVisionModel.from_pretrained(str(tiny_clip_dir)).save_pretrained(str(vision_only))
    shutil.copy(tiny_clip_dir / "preprocessor_config.json", vision_only)
    assert "vision_config" not in json.loads((vision_only / "config.json").read_text())
    target = load_target(str(tiny_original_dir), vision_tower=str(vision_only))
    torch.testing.assert_close(prompt_logits(target, QUESTION, [tiny_image])[1],
                               prompt_logits(tiny_original_target, QUESTION, [tiny_image])[1], atol=0, rtol=0)


def test_dtype_names_and_auto():
    assert resolve_dtype("bfloat16", {}) is torch.bfloat16
    assert resolve_dtype("auto", {"torch_dtype": "float16"}) is torch.float16
    assert resolve_dtype("auto", {"text_config": {"dtype": "bfloat16"}}) is torch.bfloat16
    assert resolve_dtype("auto", {}) is torch.float32
    with pytest.raises(ValueError, match="'float8' is not supported"):
        resolve_dtype("float8", {})


def test_original_layout_loads_in_bfloat16(tiny_original_dir, tiny_image):
    target = load_target(str(tiny_original_dir), dtype="bfloat16")
    assert target.dtype == torch.bfloat16
    _, logits = prompt_logits(target, QUESTION, [tiny_image])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


# ---- loader errors ----------------------------------------------------------------------------------
def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(FileNotFoundError, match=f"the checkpoint folder {missing} does not exist"):
        load_target(str(missing))


def test_unreachable_hub_id_is_named():
    with pytest.raises(FileNotFoundError, match="'nobody-here/llava-none' is neither a local folder nor reachable"):
        load_target("nobody-here/llava-none")


def test_folder_without_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'config.json'} does not exist"):
        load_target(str(tmp_path))


def test_unknown_layout_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match="cannot tell the layout.*found neither"):
        load_target(str(tmp_path))


def test_missing_key_is_named(tiny_original_dir, tmp_path):
    folder = copy_checkpoint(tiny_original_dir, tmp_path)
    state = load_weight_file(folder / "pytorch_model.bin")
    del state["model.layers.1.mlp.up_proj.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"missing keys .*pytorch_model\.bin.*: model\.layers\.1\.mlp\.up_proj\.weight \(model key"):
        load_target(str(folder))


def test_missing_vision_tower_key_is_named_with_the_clip_file(tiny_original_dir, tiny_clip_dir, tmp_path):
    from safetensors.torch import save_file

    clip = copy_checkpoint(tiny_clip_dir, tmp_path)
    state = load_weight_file(clip / "model.safetensors")
    del state["vision_model.post_layernorm.bias"]
    save_file(state, str(clip / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys .*clip-vit-tiny/model\.safetensors.*: vision_model\.post_layernorm\.bias"):
        load_target(str(tiny_original_dir), vision_tower=str(clip))


def test_unexpected_key_is_named(tiny_original_dir, tmp_path):
    folder = copy_checkpoint(tiny_original_dir, tmp_path)
    state = load_weight_file(folder / "pytorch_model.bin")
    state["model.mm_projector.4.weight"] = torch.zeros(2, 2)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # ignored, as in old checkpoints
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"unexpected keys: model\.mm_projector\.4\.weight \(in .*pytorch_model\.bin\)$"):
        load_target(str(folder))


def test_shape_mismatch_is_named(tiny_original_dir, tmp_path):
    folder = copy_checkpoint(tiny_original_dir, tmp_path)
    state = load_weight_file(folder / "pytorch_model.bin")
    state["model.norm.weight"] = torch.ones(3)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"shape mismatches: model\.norm\.weight .*\(3,\), model expects \(64,\)"):
        load_target(str(folder))


def test_missing_vision_tower_folder_is_named(tiny_original_dir, tmp_path):
    folder = copy_checkpoint(tiny_original_dir, tmp_path)
    gone = tmp_path / "clip-that-is-not-here"
    edit_json(folder / "config.json", mm_vision_tower=str(gone))
    with pytest.raises(FileNotFoundError, match=f"vision tower .*mm_vision_tower.* folder {gone} does not exist"):
        load_target(str(folder))


def test_vision_tower_argument_overrides_the_config(tiny_original_dir, tiny_clip_dir, tmp_path):
    folder = copy_checkpoint(tiny_original_dir, tmp_path)
    edit_json(folder / "config.json", mm_vision_tower=str(tmp_path / "elsewhere"))
    assert load_target(str(folder), vision_tower=str(tiny_clip_dir)).layout == "original"


def test_unsupported_projector_is_refused(tiny_original_dir, tmp_path):
    folder = copy_checkpoint(tiny_original_dir, tmp_path)
    edit_json(folder / "config.json", mm_projector_type="linear")
    with pytest.raises(ValueError, match="mm_projector_type='linear'; only \\['mlp2x_gelu'\\]"):
        load_target(str(folder))


def test_vision_tower_argument_is_refused_for_the_hf_layout(tiny_hf_dir):
    with pytest.raises(ValueError, match="original-layout checkpoints only"):
        load_target(str(tiny_hf_dir), vision_tower="openai/clip-vit-large-patch14-336")


# ---- images -----------------------------------------------------------------------------------------
def test_corrupt_and_non_image_inputs_give_clear_errors(tiny_original_target, tmp_path, tiny_image, monkeypatch):
    # PIL's default. Importing lmms_eval.api.task sets ImageFile.LOAD_TRUNCATED_IMAGES = True for the whole
    # process (lmms-eval's choice: truncated dataset images decode as far as they go), so under lmms-eval,
    # or after another test imported it, a truncated file is not an error.
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    buffer = io.BytesIO()
    tiny_image.save(buffer, format="PNG")
    broken = tmp_path / "broken.png"
    broken.write_bytes(buffer.getvalue()[:60])
    with pytest.raises(ValueError, match="could not decode the image .*broken.png"):
        tiny_original_target.image_processor(Image.open(broken))
    with pytest.raises(TypeError, match="expected a PIL.Image.Image, got str"):
        tiny_original_target.image_processor("chart.png")


def test_greyscale_and_rgba_images_become_rgb(tiny_original_target):
    for mode in ("L", "RGBA", "P"):
        pixels = tiny_original_target.image_processor(Image.new(mode, (30, 30)))
        assert pixels.shape[:2] == (1, 3)


# ---- factories --------------------------------------------------------------------------------------
def test_randomize_is_seeded():
    def weights(seed: int) -> torch.Tensor:
        return randomize_(torch.nn.Linear(4, 3), seed).weight.detach().clone()

    assert torch.equal(weights(0), weights(0)) and not torch.equal(weights(0), weights(1))
