"""The target: a LLaVA-1.5 model whose outputs speculative decoding must reproduce exactly.

`Target` bundles transformers' `LlavaForConditionalGeneration` with its tokenizer, image preprocessing
and prompt format, whichever checkpoint layout it was loaded from (`lmms_msd.models.loading`). The
decoding loops use only the two runtime operations defined here:

- `embed`: token ids (one placeholder id per image) and pixels -> the input embeddings the language
  model sees, with each placeholder expanded to as many positions as the vision tower returns
  features. The count comes from the vision tower's output, never from a literal.
- `forward`: the language model plus lm_head over a block of input embeddings, with an explicit
  cache, position ids and (optionally) a 4D additive float mask; returns the last hidden state after
  the final norm (what the MSD draft reads) and the logits.

A request becomes inputs in two stages (`prepare` runs both): `preprocess` on the CPU (the prompt text,
the image processor), safe on another thread, and `embed_inputs` (the tokenizer, then `embed`).

Prompts are embedded here rather than through `LlavaForConditionalGeneration.forward` so that the
original layout can keep its 32,000-row vocabulary (the image placeholder id lies past it, as in the
original LLaVA code) and so that the draft receives the very image embeddings the target saw.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from PIL import Image

    from lmms_msd.models.prompt import PromptFormat


@dataclass
class EmbeddedPrompt:
    """A prompt after embedding: what the language model reads at each position."""

    input_ids: torch.Tensor  # [L] long; image positions hold the image placeholder id
    inputs_embeds: torch.Tensor  # [1, L, H] in the model's dtype
    image_mask: torch.Tensor  # [L] bool; True at positions filled with projected image features

    def __post_init__(self) -> None:
        length = self.input_ids.shape[0]
        assert self.input_ids.dim() == 1, f"input_ids must be [L], got {tuple(self.input_ids.shape)}"
        assert self.inputs_embeds.shape[:2] == (1, length), (
            f"inputs_embeds {tuple(self.inputs_embeds.shape)} does not match L={length}"
        )
        assert self.image_mask.shape == (length,), f"image_mask {tuple(self.image_mask.shape)} != ({length},)"


@dataclass
class PromptInputs:
    """A prompt before the tokenizer and the device (`Target.preprocess`): what another thread may compute."""

    text: str  # the conversation prompt, one `<image>` placeholder per image (`PromptFormat.build`)
    pixel_values: torch.Tensor | None  # [n_images, 3, S, S] float32 on the CPU; None without images

    def __post_init__(self) -> None:
        if self.pixel_values is not None:
            assert self.pixel_values.dim() == 4 and self.pixel_values.shape[1] == 3, (
                f"pixel_values must be [n_images, 3, S, S], got {tuple(self.pixel_values.shape)}"
            )


@dataclass
class Target:
    """A loaded LLaVA-1.5 target with everything needed to turn a request into model inputs."""

    model: Any  # transformers.LlavaForConditionalGeneration, in eval mode
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    image_processor: Callable[["Image.Image"], torch.Tensor]  # PIL image -> pixel_values [1, 3, S, S]
    prompt_format: "PromptFormat"
    layout: str  # "hf" (llava-hf/...) or "original" (liuhaotian/...)
    # what `image_features` runs without gradients: None runs `vision_forward`; a static engine on CUDA sets
    # it to `vision_forward` replayed from CUDA graphs (`lmms_msd.speculative.fast.static_target.replay_vision`)
    vision_runner: Callable[[torch.Tensor], tuple[torch.Tensor]] | None = field(default=None, repr=False, compare=False)

    # ---- sizes, all read from the configs -------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def vocab_size(self) -> int:
        """Rows of lm_head: the ids the target can generate."""
        return int(self.model.lm_head.out_features)

    @property
    def max_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    @property
    def eos_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the target's tokenizer defines no eos_token; set eos_token in tokenizer_config.json")
        return int(eos)

    @property
    def lm_head(self) -> torch.nn.Linear:
        return self.model.lm_head

    # ---- requests -> inputs -----------------------------------------------------------------------
    def prepare(self, question: str, images: list[Image.Image]) -> EmbeddedPrompt:
        """A user question (no `<image>` in it) and its images -> the embedded prompt: `preprocess`, then
        `embed_inputs`.

        The prompt format puts one image placeholder per image; `embed` expands it.
        """
        return self.embed_inputs(self.preprocess(question, images))

    def preprocess(self, question: str, images: list[Image.Image]) -> PromptInputs:
        """The CPU stage of `prepare`: the conversation prompt and the images' pixel values.

        It reads neither the tokenizer nor the device, so it may run on another thread while this one
        decodes (`lmms_msd.prefetch`): a fast tokenizer encoding on one thread while another decodes
        text (the stop strings) can fail with "Already borrowed".
        """
        text = self.prompt_format.build(question, n_images=len(images))
        pixel_values = torch.cat([self.image_processor(image) for image in images]) if images else None
        return PromptInputs(text, pixel_values)

    def embed_inputs(self, inputs: PromptInputs) -> EmbeddedPrompt:
        """The device stage of `prepare`: the prompt's token ids (the tokenizer, on the calling thread),
        then `embed` (the vision tower on the device, the embedded prompt)."""
        input_ids = self.prompt_format.tokenize(self.tokenizer, inputs.text, self.image_token_id)
        return self.embed(input_ids, inputs.pixel_values)

    # ---- runtime ----------------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image features, the vectors that replace the image placeholder.

        pixel_values: [n_images, 3, S, S] -> [n_images, n_image_tokens, H]
        """
        assert pixel_values.dim() == 4, f"pixel_values must be [N, 3, S, S], got {tuple(pixel_values.shape)}"
        pixel_values = pixel_values.to(self.device, self.dtype)
        if self.vision_runner is not None and not torch.is_grad_enabled():
            return self.vision_runner(pixel_values)[0].clone()  # a graph's output lives until its next replay
        return self.vision_forward(pixel_values)

    def vision_forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision tower and projector: pixel_values [n_images, 3, S, S] on the device, in the model's
        dtype -> [n_images, n_image_tokens, H]"""
        cfg = self.model.config
        out = self.model.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
        return torch.stack(list(out.pooler_output))

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> EmbeddedPrompt:
        """Embed a prompt, expanding each image placeholder into that image's feature vectors.

        input_ids: [L0] with one `image_token_id` per image (or none when pixel_values is None)
        pixel_values: [n_images, 3, S, S] or None
        """
        assert input_ids.dim() == 1, f"input_ids must be [L0], got {tuple(input_ids.shape)}"
        input_ids = input_ids.to(self.device)
        placeholders = (input_ids == self.image_token_id).nonzero().flatten().tolist()
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if len(placeholders) != n_images:
            raise ValueError(
                f"the prompt has {len(placeholders)} image placeholder(s) but {n_images} image(s) were given"
            )
        embed_tokens = self.model.get_input_embeddings()
        if n_images == 0:
            embeds = embed_tokens(input_ids)
            return EmbeddedPrompt(input_ids, embeds[None], torch.zeros_like(input_ids, dtype=torch.bool))

        features = self.image_features(pixel_values)  # [n_images, n_image_tokens, H]
        ids_parts, embed_parts, mask_parts = [], [], []
        start = 0
        for image_index, pos in enumerate(placeholders):
            text_ids = input_ids[start:pos]
            ids_parts += [text_ids, input_ids.new_full((features.shape[1],), self.image_token_id)]
            embed_parts += [embed_tokens(text_ids), features[image_index]]
            mask_parts += [torch.zeros_like(text_ids, dtype=torch.bool), text_ids.new_ones(features.shape[1], dtype=torch.bool)]
            start = pos + 1
        tail = input_ids[start:]
        ids_parts.append(tail)
        embed_parts.append(embed_tokens(tail))
        mask_parts.append(torch.zeros_like(tail, dtype=torch.bool))
        return EmbeddedPrompt(torch.cat(ids_parts), torch.cat(embed_parts)[None], torch.cat(mask_parts))

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids: [T] -> [1, T, H]"""
        return self.model.get_input_embeddings()(token_ids.to(self.device))[None]

    @torch.inference_mode()
    def forward(
        self,
        inputs_embeds: torch.Tensor,
        cache: Any,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the language model over new positions, appending them to `cache`.

        inputs_embeds: [1, T, H]
        cache: transformers Cache holding the P positions before these
        position_ids: [T] long (RoPE positions; a tree's are P + depth)
        attention_mask: [1, 1, T, P + T] additive float mask, or None for causal
        returns hidden [T, H] (after the final norm) and logits [T, V] in float32
        """
        t = inputs_embeds.shape[1]
        assert inputs_embeds.dim() == 3 and inputs_embeds.shape[0] == 1, f"inputs_embeds {tuple(inputs_embeds.shape)}"
        assert position_ids.shape == (t,), f"position_ids {tuple(position_ids.shape)} != ({t},)"
        hidden, logits = self.forward_batch(inputs_embeds, cache, position_ids[None], attention_mask)
        return hidden[0], logits[0]

    @torch.inference_mode()
    def forward_batch(
        self,
        inputs_embeds: torch.Tensor,
        cache: Any,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` over B rows at once (`lmms_msd.speculative.runtime.EagerRuntime`'s batched calls).

        inputs_embeds: [B, T, H]; cache: transformers Cache of batch B holding S positions per row
        position_ids: [B, T] long; attention_mask: [B, 1, T, S + T] additive float mask, or None for causal
        returns hidden [B, T, H] (after the final norm) and logits [B, T, V] in float32
        """
        b, t = inputs_embeds.shape[:2]
        assert inputs_embeds.dim() == 3, f"inputs_embeds must be [B, T, H], got {tuple(inputs_embeds.shape)}"
        assert position_ids.shape == (b, t), f"position_ids {tuple(position_ids.shape)} != ({b}, {t})"
        if attention_mask is not None:
            past = cache.get_seq_length()
            assert attention_mask.shape == (b, 1, t, past + t), (
                f"attention_mask {tuple(attention_mask.shape)} != ({b}, 1, {t}, {past + t})"
            )
        out = self.model.model.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_keyword: cache},
        )
        hidden = out.last_hidden_state
        return hidden, self.model.lm_head(hidden).float()

    @functools.cached_property
    def _cache_keyword(self) -> str:
        """transformers renamed `past_key_values` to `cache` (5.2x); an unknown keyword is silently ignored."""
        parameters = inspect.signature(self.model.model.language_model.forward).parameters
        return "cache" if "cache" in parameters else "past_key_values"

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config.text_config)
