"""Checkpoint files: every layout transformers saves or the hub ships loads, and every file that cannot be
read is an error naming the file and the cause (issue 12, item 5; issue 10)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmms_msd.lmms_eval.plugin import LlavaMsdCalibrated
from lmms_msd.models.checkpoints import load_weight_file, resolve_folder
from lmms_msd.models.draft import DraftConfig, load_draft, new_random_draft, save_draft
from lmms_msd.models.loading import load_target

QUESTION = "What is the value of the largest bar?"


def copy_folder(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def truncate(path: Path) -> None:
    """Keep the first half of the file, as an interrupted download or copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def prompt_logits(target, images) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids [L], pixel values [n, 3, S, S], logits [L, V]) of QUESTION."""
    prompt = target.prepare(QUESTION, images)
    _, logits = target.forward(prompt.inputs_embeds, target.new_cache(), torch.arange(prompt.input_ids.shape[0]))
    return prompt.input_ids, torch.cat([target.image_processor(image) for image in images]), logits


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory) -> Path:
    config = DraftConfig(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2, vocab_size=100)
    return save_draft(new_random_draft(config, seed=0), tmp_path_factory.mktemp("draft") / "msd-tiny")


# ---- layouts ----------------------------------------------------------------------------------------
def test_folder_written_by_transformers_save_pretrained_loads(tiny_hf_dir, tiny_hf_target, tiny_image, tmp_path):
    """transformers 5's save_pretrained of a LLaVA model and its processor keeps the image settings inside
    processor_config.json and writes no preprocessor_config.json; that folder loads, to the same target."""
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    saved = tmp_path / "saved-by-transformers"
    model = LlavaForConditionalGeneration.from_pretrained(str(tiny_hf_dir))
    model.save_pretrained(str(saved))
    LlavaProcessor(
        image_processor=AutoImageProcessor.from_pretrained(str(tiny_hf_dir)),
        tokenizer=AutoTokenizer.from_pretrained(str(tiny_hf_dir)),
        patch_size=model.config.vision_config.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    ).save_pretrained(str(saved))
    assert not (saved / "preprocessor_config.json").exists()
    assert "image_processor" in json.loads((saved / "processor_config.json").read_text())

    ids, pixels, logits = prompt_logits(load_target(str(saved)), [tiny_image])
    expected_ids, expected_pixels, expected_logits = prompt_logits(tiny_hf_target, [tiny_image])
    assert torch.equal(ids, expected_ids)
    # the same weights, settings and input shapes on both sides: the same kernels, so bit for bit
    assert torch.equal(pixels, expected_pixels) and torch.equal(logits, expected_logits)


def test_folder_without_image_settings_names_both_files(tiny_hf_dir, tmp_path):
    folder = copy_folder(tiny_hf_dir, tmp_path)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"no image processor settings in {folder}: .*preprocessor_config.json.*processor_config.json"):
        load_target(str(folder))


def test_bundled_target_is_a_complete_hf_folder(tiny_image):
    """transformers' AutoProcessor loads the bundled target (processor settings and chat template) and
    makes, from an image and the chat template's prompt, the ids and pixels that conv_template=llava_hf
    makes: the llava-hf model cards' prompt."""
    from transformers import AutoProcessor

    from lmms_msd.testbed.bundled import bundled_paths

    folder, _ = bundled_paths()
    processor = AutoProcessor.from_pretrained(str(folder))
    as_lmms_eval = [{"role": "user", "content": "<image>\n" + QUESTION}]  # lmms-eval's llava_hf passes a string
    as_model_card = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(as_lmms_eval, add_generation_prompt=True, tokenize=False)
    assert text == processor.apply_chat_template(as_model_card, add_generation_prompt=True, tokenize=False)
    assert text == f"USER: <image>\n{QUESTION} ASSISTANT:"

    inputs = processor(images=[tiny_image], text=text, return_tensors="pt")
    ids, pixels, _ = prompt_logits(load_target(str(folder), conv_template="llava_hf"), [tiny_image])
    assert inputs["input_ids"][0].tolist() == ids.tolist()
    assert torch.equal(inputs["pixel_values"], pixels)  # the same CLIP processor on the same image


# ---- sharded folders (what train-target and train-draft write with a max shard size) -----------------
SHARD = 20_000  # bytes: more than any tensor of the tiny draft in float16 (16 KB at most), so every shard fits


def test_sharded_draft_loads_the_same(draft_dir, tmp_path):
    """save_draft with max_shard_size writes shards and model.safetensors.index.json (transformers' names);
    load_draft reads them back to the same tensors, in the asked save dtype."""
    draft = load_draft(str(draft_dir))
    folder = save_draft(draft, tmp_path / "sharded", dtype=torch.float16, max_shard_size=SHARD)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(path.name for path in folder.glob("*.safetensors")) == shards and not (folder / "model.safetensors").exists()
    assert index["weight_map"].keys() == draft.state_dict().keys()
    assert all((folder / shard).stat().st_size <= SHARD + 1024 for shard in shards)  # + the safetensors header
    loaded = load_draft(str(folder))
    for key, value in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.half().float()), key


def test_draft_saved_again_keeps_one_version(draft_dir, tmp_path):
    """A folder saved sharded, then as one file (or the other way round), holds only the last save."""
    draft = load_draft(str(draft_dir))
    folder = save_draft(draft, tmp_path / "again", max_shard_size=SHARD)
    save_draft(draft, folder)
    assert sorted(path.name for path in folder.iterdir()) == ["config.json", "model.safetensors"]
    save_draft(draft, folder, max_shard_size=SHARD)
    assert not (folder / "model.safetensors").exists() and (folder / "model.safetensors.index.json").is_file()


def test_sharded_draft_with_a_missing_or_truncated_shard_is_named(draft_dir, tmp_path):
    folder = save_draft(load_draft(str(draft_dir)), tmp_path / "broken", max_shard_size=SHARD)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    truncate(shard)
    with pytest.raises(ValueError, match=rf"could not read the weights file {shard} .*SafetensorError"):
        load_draft(str(folder))
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"no draft weights in {folder}: .*index\.json names shards that are not in .*{shard.name}"):
        load_draft(str(folder))


def test_sharded_hf_target_loads_the_same(tiny_hf_dir, tiny_hf_target, tiny_image, tmp_path):
    """An HF-layout folder whose weights transformers' save_pretrained sharded (train-target's
    --max-shard-size) loads to the same target; a truncated shard is named."""
    from transformers import LlavaForConditionalGeneration

    folder = copy_folder(tiny_hf_dir, tmp_path)
    (folder / "model.safetensors").unlink()
    LlavaForConditionalGeneration.from_pretrained(str(tiny_hf_dir)).save_pretrained(str(folder), max_shard_size=SHARD)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 2 and (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    ids, pixels, logits = prompt_logits(load_target(str(folder)), [tiny_image])
    expected_ids, expected_pixels, expected_logits = prompt_logits(tiny_hf_target, [tiny_image])
    # the same weights, settings and input shapes on both sides: the same kernels, so bit for bit
    assert torch.equal(ids, expected_ids) and torch.equal(logits, expected_logits)
    truncate(shards[1])
    with pytest.raises(ValueError, match=rf"could not read the weights file {shards[1]}"):
        load_target(str(folder))


# ---- unreadable files -------------------------------------------------------------------------------
def test_truncated_draft_weights_are_named(draft_dir, tmp_path):
    folder = copy_folder(draft_dir, tmp_path)
    truncate(folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"could not read the weights file .*model\.safetensors \([\d,]+ bytes\): SafetensorError: .*truncated"):
        load_draft(str(folder))


def test_truncated_draft_pytorch_bin_is_named(draft_dir, tmp_path):
    """A torch zip cut short fails inside torch.load with no file named (`OSError: [Errno 22] Invalid
    argument`, or a zip reader's RuntimeError, depending on where it was cut)."""
    folder = copy_folder(draft_dir, tmp_path)
    torch.save(load_weight_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert load_draft(str(folder)).config.hidden_size == 64
    truncate(folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"could not read the weights file .*msd-tiny/pytorch_model\.bin \([\d,]+ bytes\): (OSError|RuntimeError): .*truncated"):
        load_draft(str(folder))


def test_truncated_draft_config_is_named(draft_dir, tmp_path):
    folder = copy_folder(draft_dir, tmp_path)
    truncate(folder / "config.json")
    with pytest.raises(ValueError, match=r"msd-tiny/config\.json is not valid JSON"):
        load_draft(str(folder))


def test_truncated_hf_weights_are_named(tiny_hf_dir, tmp_path):
    folder = copy_folder(tiny_hf_dir, tmp_path)
    truncate(folder / "model.safetensors")
    with pytest.raises(ValueError, match=rf"could not read the weights file {folder}/model\.safetensors .*SafetensorError"):
        load_target(str(folder))


def test_truncated_hf_pytorch_bin_is_named(tiny_hf_dir, tmp_path):
    folder = copy_folder(tiny_hf_dir, tmp_path)
    from transformers import LlavaForConditionalGeneration

    state = LlavaForConditionalGeneration.from_pretrained(str(tiny_hf_dir)).state_dict()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert load_target(str(folder)).layout == "hf"
    truncate(folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=rf"could not read the weights file {folder}/pytorch_model\.bin"):
        load_target(str(folder))


def test_truncated_original_weights_are_named(tiny_original_dir, tmp_path):
    folder = copy_folder(tiny_original_dir, tmp_path)
    truncate(folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=rf"could not read the weights file {folder}/pytorch_model\.bin"):
        load_target(str(folder))


def test_truncated_vision_tower_weights_are_named(tiny_original_dir, tiny_clip_dir, tmp_path):
    clip = copy_folder(tiny_clip_dir, tmp_path)
    truncate(clip / "model.safetensors")
    with pytest.raises(ValueError, match=rf"could not read the weights file {clip}/model\.safetensors"):
        load_target(str(tiny_original_dir), vision_tower=str(clip))


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"])
def test_truncated_json_files_are_named(tiny_hf_dir, tmp_path, name):
    folder = copy_folder(tiny_hf_dir, tmp_path)
    truncate(folder / name)
    with pytest.raises(ValueError, match=rf"{folder}/{name} is not valid JSON"):
        load_target(str(folder))


# ---- missing folders --------------------------------------------------------------------------------
def test_missing_folder_is_said_to_be_missing(tmp_path):
    gone = tmp_path / "no-such-checkpoint"
    with pytest.raises(FileNotFoundError, match=f"the checkpoint folder {gone} does not exist"):
        resolve_folder(str(gone), "checkpoint")


def test_missing_pretrained_folder_with_the_default_use_msd():
    """The folder's absence comes first, not the missing msd_model_path (the default use_msd=true)."""
    with pytest.raises(FileNotFoundError, match="the pretrained folder /no/such/llava does not exist"):
        LlavaMsdCalibrated.create_from_arg_string("pretrained=/no/such/llava")
    # a relative path has the shape of a hub id too: both readings are given
    with pytest.raises(ValueError, match=r"pretrained 'out/llava' is not a local folder \(.*/out/llava does not exist\).*msd_model_path="):
        LlavaMsdCalibrated.create_from_arg_string("pretrained=out/llava")
