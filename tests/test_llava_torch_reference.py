"""The original-layout loader against the original LLaVA code (`llava-torch`, installed with
`pip install --no-deps llava-torch`): the same tiny checkpoint must give the same prompt, token ids,
pixels and logits.

llava-torch pins transformers 4.36 but its model classes still build and run forward under
transformers 5 (only `generate` breaks), so it serves as the reference here. Its
`CLIPImageProcessor.from_pretrained` now resolves to transformers 5's torchvision backend, while
under the pinned transformers it was the PIL implementation: the pixel reference uses the PIL one
(`CLIPImageProcessorPil`), the one the original code actually ran.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

llava = pytest.importorskip("llava", reason="llava-torch is not installed (pip install --no-deps llava-torch)")

from llava.constants import IMAGE_TOKEN_INDEX  # noqa: E402
from llava.conversation import conv_templates  # noqa: E402
from llava.mm_utils import process_images, tokenizer_image_token  # noqa: E402

from lmms_msd.models.prompt import PromptFormat  # noqa: E402

QUESTION = "How many points are above 10.5? Answer with a number."


@pytest.fixture(scope="module")
def reference(tiny_original_dir):
    """llava-torch's LlavaLlamaForCausalLM on the tiny checkpoint, its CLIP tower loaded from the
    folder config.json names, fp32, eval mode; and its tokenizer."""
    from llava.model import LlavaLlamaForCausalLM
    from transformers import AutoTokenizer

    model = LlavaLlamaForCausalLM.from_pretrained(str(tiny_original_dir), dtype=torch.float32)
    model.get_vision_tower().load_model()
    return model.eval(), AutoTokenizer.from_pretrained(str(tiny_original_dir))


def llava_prompt(template: str, question: str, n_images: int) -> str:
    """The prompt as LLaVA's evaluation scripts build it."""
    conv = conv_templates[template].copy()
    conv.append_message(conv.roles[0], "<image>\n" * n_images + question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_v1"])
@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_prompt_matches_llava_conversation(template, n_images):
    assert PromptFormat(template).build(QUESTION, n_images) == llava_prompt(template, QUESTION, n_images)


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_token_ids_match_tokenizer_image_token(reference, tiny_original_target, n_images):
    _, llava_tokenizer = reference
    target = tiny_original_target
    prompt = llava_prompt("vicuna_v1", QUESTION, n_images)
    expected = tokenizer_image_token(prompt, llava_tokenizer, return_tensors="pt")
    expected[expected == IMAGE_TOKEN_INDEX] = target.image_token_id
    ids = target.prompt_format.tokenize(target.tokenizer, prompt, target.image_token_id)
    assert ids.tolist() == expected.tolist()


def test_pixels_match_process_images_with_padding(tiny_original_target, tiny_clip_dir, tiny_image, make_image):
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil.from_pretrained(str(tiny_clip_dir))
    images = [tiny_image, make_image(20, 40, seed=1), make_image(42, 42, seed=2)]
    expected = process_images(images, processor, SimpleNamespace(image_aspect_ratio="pad"))  # [3, 3, S, S]
    ours = torch.cat([tiny_original_target.image_processor(image) for image in images])
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, atol=0, rtol=0)


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_logits_match_llava_torch(reference, tiny_original_target, tiny_image, make_image, n_images):
    model, llava_tokenizer = reference
    target = tiny_original_target
    images = [tiny_image, make_image(20, 40, seed=1)][:n_images]

    prompt = target.prepare(QUESTION, images)  # ours: prompt format, tokenizer, pixels, embedding
    _, logits = target.forward(prompt.inputs_embeds, target.new_cache(), torch.arange(prompt.input_ids.shape[0]))

    ids = tokenizer_image_token(llava_prompt("vicuna_v1", QUESTION, n_images), llava_tokenizer, return_tensors="pt")
    pixels = torch.cat([target.image_processor(image) for image in images]) if images else None
    with torch.inference_mode():
        expected = model(input_ids=ids[None], images=pixels).logits[0]  # [L, 32000-like vocab]
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max() <= 1e-5
