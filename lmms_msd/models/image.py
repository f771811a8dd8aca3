"""Image preprocessing: a PIL image -> the pixel values the target's vision tower reads.

Original layout (liuhaotian/...): LLaVA-1.5's `process_images` with image_aspect_ratio="pad" — pad the
image to a square with the processor's mean colour (`expand2square`), then the CLIP image processor.
The original code ran the PIL implementation of `CLIPImageProcessor` (transformers 4.x), so that is
the backend loaded for this layout (transformers 5 defaults to a torchvision one whose resizing
differs slightly).

HF layout (llava-hf/...): the folder's own image processor, exactly as its preprocessor_config.json
or processor_config.json configures it (padding included, if it asks for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lmms_msd.models.checkpoints import read_json


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
    (what LLaVA's code ran), the folder's configured default otherwise.

    transformers keeps the settings in either of two files, and both load: `preprocessor_config.json`
    (the hub's checkpoints, CLIP towers, transformers 4) or the "image_processor" entry of
    `processor_config.json` (what transformers 5's `save_pretrained` of a processor writes, with no
    preprocessor_config.json).
    """
    from transformers import AutoImageProcessor

    folder = Path(folder)
    sources = image_processor_files(folder)
    if not sources:
        raise FileNotFoundError(
            f"no image processor settings in {folder}: looked for preprocessor_config.json and for an "
            '"image_processor" entry in processor_config.json (size, crop, mean, std); copy them from the '
            "checkpoint (or its CLIP vision tower folder), or save the model's processor there with save_pretrained"
        )
    backend = {"backend": "pil"} if pad_to_square else {}
    try:
        processor = AutoImageProcessor.from_pretrained(str(folder), **backend)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"transformers could not build the image processor from {[str(p) for p in sources]}: "
            f"{type(error).__name__}: {error}"
        ) from error
    return ImagePreprocessor(processor, pad_to_square)


def image_processor_files(folder: Path) -> list[Path]:
    """The files in `folder` that hold image processor settings (each checked to be readable JSON)."""
    found = []
    legacy, processor = folder / "preprocessor_config.json", folder / "processor_config.json"
    if legacy.is_file():
        read_json(legacy)
        found.append(legacy)
    if processor.is_file() and "image_processor" in read_json(processor):
        found.append(processor)
    return found


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
