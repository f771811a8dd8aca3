"""Image preprocessing: a PIL image -> the pixel values the target's vision tower reads.

Original layout (liuhaotian/...): LLaVA-1.5's `process_images` with image_aspect_ratio="pad" — pad the
image to a square with the processor's mean colour (`expand2square`), then the CLIP image processor.
The original code ran the PIL implementation of `CLIPImageProcessor` (transformers 4.x), so that is
the backend loaded for this layout (transformers 5 defaults to a torchvision one whose resizing
differs slightly).

HF layout (llava-hf/...): the folder's own image processor, exactly as its preprocessor_config.json
configures it (padding included, if it asks for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Pad to a square, the image centred on its short side (LLaVA's `expand2square`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


@dataclass
class ImagePreprocessor:
    """PIL image -> pixel_values [1, 3, S, S] float32.

    processor: a transformers image processor (its crop size gives S)
    pad_to_square: pad with the mean colour first (original LLaVA-1.5, image_aspect_ratio="pad")
    """

    processor: Any
    pad_to_square: bool

    def __call__(self, image: Image.Image) -> torch.Tensor:
        rgb = _to_rgb(image)
        if self.pad_to_square:
            rgb = expand2square(rgb, self.mean_colour)
        pixel_values = self.processor(rgb, return_tensors="pt")["pixel_values"]
        assert pixel_values.dim() == 4 and pixel_values.shape[:2] == (1, 3), (
            f"the image processor returned pixel_values {tuple(pixel_values.shape)}, expected [1, 3, S, S]"
        )
        return pixel_values.float()

    @property
    def mean_colour(self) -> tuple[int, ...]:
        """The padding colour: the processor's mean in 0-255 (LLaVA's `int(x * 255)`, truncated)."""
        return tuple(int(x * 255) for x in self.processor.image_mean)


def load_image_preprocessor(folder: str | Path, *, pad_to_square: bool) -> ImagePreprocessor:
    """The image processor saved in `folder`: the PIL backend for the original layout's padding path
    (what LLaVA's code ran), the folder's configured default otherwise."""
    from transformers import AutoImageProcessor

    folder = Path(folder)
    if not (folder / "preprocessor_config.json").is_file():
        raise FileNotFoundError(
            f"no preprocessor_config.json in {folder}; the image processor settings (size, crop, mean, std) "
            "are read from there: copy it from the checkpoint (or its CLIP vision tower folder)"
        )
    backend = {"backend": "pil"} if pad_to_square else {}
    return ImagePreprocessor(AutoImageProcessor.from_pretrained(str(folder), **backend), pad_to_square)


def _to_rgb(image: Any) -> Image.Image:
    """Decode and convert to RGB, turning decoding failures into errors that name the input."""
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"expected a PIL.Image.Image, got {type(image).__name__}; open files with PIL.Image.open(path)"
        )
    try:
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:
        source = getattr(image, "filename", "") or "<in memory>"
        raise ValueError(f"could not decode the image {source!r} ({error}); the file is corrupt or not an image") from error
