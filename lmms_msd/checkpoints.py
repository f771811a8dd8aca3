"""Finding checkpoint folders (a local folder as is, otherwise a Hugging Face hub id) and loading
LLaVA weights strictly.

The hub path is real code (huggingface_hub's snapshot_download, or its local cache) even though
nothing can be downloaded where the tests run; errors name what was asked for and how to fix it.
"""

from __future__ import annotations

from pathlib import Path

# weights in formats transformers does not read for PyTorch: never download them
IGNORED_DOWNLOADS = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.tflite"]


def resolve_folder(name_or_path: str, what: str, allow_patterns: list[str] | None = None) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (or found in the cache) by huggingface_hub.

    what: what the folder is, for messages ("checkpoint", "draft checkpoint", ...)
    allow_patterns: download only these files (None: everything but IGNORED_DOWNLOADS)
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=allow_patterns, ignore_patterns=IGNORED_DOWNLOADS))
    except (ValueError, OSError, HfHubHTTPError) as error:
        raise FileNotFoundError(
            f"the {what} {name_or_path!r} is neither a local folder nor reachable on the Hugging Face hub "
            f"({type(error).__name__}: {error}); pass an existing folder, or a hub id with network access "
            "or already in the local cache"
        ) from error


def llava_from_pretrained(source, *, problem: str, dtype, device, attn_implementation: str | None, **kwargs):
    """`LlavaForConditionalGeneration.from_pretrained`, refusing anything transformers reports as
    missing, unexpected or mismatched (it would otherwise initialise those weights at random).

    problem: the start of the error message, naming what was loaded
    """
    from transformers import LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(
        source,
        dtype=dtype,
        device_map={"": device},
        attn_implementation=attn_implementation,
        output_loading_info=True,
        **kwargs,
    )
    reported = {kind: found for kind, found in info.items() if found}
    if reported:
        raise ValueError(f"{problem}: {reported}")
    return model
