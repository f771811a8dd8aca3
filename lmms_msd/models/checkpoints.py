"""Finding checkpoint folders (a local folder as is, otherwise a Hugging Face hub id), reading their
files, and loading LLaVA weights strictly.

The hub path is real code (huggingface_hub's snapshot_download, or its local cache) even though
nothing can be downloaded where the tests run; errors name what was asked for and how to fix it.
A file that cannot be read (truncated, not JSON, not a weight file) is an error that names the file
and the reader's own message: `read_json`, `load_weight_file`, and `llava_from_pretrained`, which on a
failure checks every weight file in the folder to name the one at fault.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

# weights in formats transformers does not read for PyTorch: never download them
IGNORED_DOWNLOADS = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.tflite"]
# hub ids are "name" or "owner/name" (huggingface_hub's validate_repo_id); anything else can only be a path
HUB_ID = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?$")
# what safetensors and torch.load raise on a truncated or foreign file
READ_ERRORS = (SafetensorError, OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# a checkpoint's weights, in the order looked for: one file, or the shards its index names (the names
# transformers' save_pretrained and huggingface_hub's sharding write)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


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
    if not could_be_hub_id(str(name_or_path)):
        raise FileNotFoundError(missing_folder_message(str(name_or_path), what))
    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=allow_patterns, ignore_patterns=IGNORED_DOWNLOADS))
    except (ValueError, OSError, HfHubHTTPError) as error:
        raise FileNotFoundError(
            f"the {what} {name_or_path!r} is neither a local folder nor reachable on the Hugging Face hub "
            f"({type(error).__name__}: {error}); pass an existing folder, or a hub id with network access "
            "or already in the local cache"
        ) from error


def could_be_hub_id(name: str) -> bool:
    """Whether `name` has the shape of a hub id; a path with more parts, or absolute, or starting with
    "." or "~", cannot be one."""
    return bool(HUB_ID.match(name)) and not name.startswith((".", "~")) and ".." not in name


def missing_folder_message(name_or_path: str, what: str) -> str | None:
    """None when `name_or_path` is an existing folder; else a sentence saying that it is not, and, when
    it cannot be a hub id either, that the folder is missing."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return None
    if could_be_hub_id(name_or_path):
        return f"{what} {name_or_path!r} is not a local folder ({path.resolve()} does not exist), so it is taken as a hub id"
    return f"the {what} folder {path.resolve()} does not exist (from {name_or_path!r}); pass an existing folder or a hub id"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file of a checkpoint; a missing or unreadable one is an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; a checkpoint folder needs its config.json")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the file is truncated or corrupt: copy it again") from error


def check_json_files(folder: Path) -> None:
    """Read every JSON file of a checkpoint folder (config, tokenizer, processor, generation, shard
    index), so that a truncated one is named here rather than failing without a name inside transformers."""
    for path in sorted(folder.glob("*.json")):
        read_json(path)


def load_tokenizer(folder: Path) -> Any:
    """`AutoTokenizer.from_pretrained(folder)`; a failure names the folder and transformers' reason."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"transformers could not load the tokenizer in {folder}: {type(error).__name__}: {error}") from error


def load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors or torch file -> its tensors, never unpickling arbitrary objects
    (`weights_only=True`); an unreadable file is a ValueError naming it, its size and the cause."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except READ_ERRORS as error:
        raise ValueError(unreadable_message(path, error)) from error


def check_weight_file(path: Path) -> None:
    """Read `path` far enough to know it is whole: a safetensors header (which must cover the file), or
    the torch archive's index (memory-mapped, nothing loaded); raises as `load_weight_file` does."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        else:
            # a torch zip archive keeps its index at the end: memory-mapped, only that is read; the
            # legacy (non-zip) format, and a zip cut short, are loaded in full
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except READ_ERRORS as error:
        raise ValueError(unreadable_message(path, error)) from error


def unreadable_message(path: Path, error: BaseException) -> str:
    size = path.stat().st_size if path.is_file() else 0
    return (
        f"could not read the weights file {path} ({size:,} bytes): {type(error).__name__}: {error}; "
        "the file is truncated or is not a safetensors/torch weight file: download or save it again"
    )


def llava_from_pretrained(source, *, problem: str, dtype, device, attn_implementation: str | None, **kwargs):
    """`LlavaForConditionalGeneration.from_pretrained`, refusing anything transformers reports as
    missing, unexpected or mismatched (it would otherwise initialise those weights at random).

    problem: the start of the error message, naming what was loaded
    source: a folder, or None with `config=` and `state_dict=` in kwargs
    A file that transformers cannot read is named: on a read error every weight file in the folder is
    checked, and the first unreadable one is reported with its cause.
    """
    from transformers import LlavaForConditionalGeneration

    try:
        model, info = LlavaForConditionalGeneration.from_pretrained(
            source,
            dtype=dtype,
            device_map={"": device},
            attn_implementation=attn_implementation,
            output_loading_info=True,
            **kwargs,
        )
    except READ_ERRORS as error:
        if source is None:
            raise
        for path in sorted(Path(source).iterdir()):
            if path.suffix in WEIGHT_SUFFIXES:
                try:
                    check_weight_file(path)
                except ValueError as unreadable:
                    raise unreadable from error
        raise
    reported = {kind: found for kind, found in info.items() if found}
    if reported:
        raise ValueError(f"{problem}: {reported}")
    return model


def find_weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: one file, or the shards its index names."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        shards = sorted(set(read_json(path)["weight_map"].values()))
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} names shards that are not in {folder}: {missing}")
        return [folder / shard for shard in shards]
    raise FileNotFoundError(f"no weights in {folder}: looked for {list(WEIGHT_FILES)}")


def save_safetensors(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str | None = None) -> list[Path]:
    """Write `state` to `folder` as transformers' save_pretrained does: model.safetensors, or, when it
    is bigger than max_shard_size (bytes, or a string such as "15MB" = 15 * 10**6 bytes; None: one
    file), shards model-00001-of-0000n.safetensors and model.safetensors.index.json ({"metadata":
    {"total_size": bytes}, "weight_map": {key: shard}}). A tensor bigger than max_shard_size gets a
    shard of its own. Weight files of an earlier save in `folder` are removed first, so the folder
    never holds two versions that `find_weight_files` could pick from. Returns the weight files written.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for old in [*(folder / name for name in WEIGHT_FILES), *folder.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)
    state = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    if max_shard_size is None:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return [folder / "model.safetensors"]
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for file, keys in split.filename_to_tensors.items():
        save_file({key: state[key] for key in keys}, str(folder / file), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())}, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [folder / file for file in sorted(split.filename_to_tensors)]


def shard_size(text: str) -> int | str:
    """A --max-shard-size argument: a number of bytes ("15000000") as an int, or a size with a unit as
    huggingface_hub and transformers read it ("15MB" = 15 * 10**6 bytes, "15MiB" = 15 * 2**20)."""
    return int(text) if text.isdigit() else text
