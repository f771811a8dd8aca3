"""Shared fixtures: tiny LLaVA checkpoints in both layouts (written once per session), a random draft
for the HF-layout one and that pair loaded, and test images.

The checkpoint folders are session-scoped and shared: never write into them; copy them first
(`shutil.copytree`) when a test needs a modified checkpoint. The loaded targets are shared too:
do not change their weights or settings.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

# Nothing can be downloaded in tests; set before transformers / huggingface_hub read it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from lmms_msd.testbed.tiny import save_tiny_hf_target, save_tiny_original_target  # noqa: E402

if TYPE_CHECKING:
    from lmms_msd.pipeline import Pair, PairSettings

# The tests run tiny models: intra-op threads cost more than they give (several times slower on 2 cores).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF-layout tiny LLaVA folder (seed 0)."""
    return save_tiny_hf_target(tmp_path_factory.mktemp("tiny") / "llava-tiny-hf", seed=0)


@pytest.fixture(scope="session")
def tiny_original_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An original-layout tiny LLaVA folder (seed 0); its config.json's mm_vision_tower names the
    CLIP folder `tiny_clip_dir`, a sibling folder."""
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_original_target(root / "llava-v1.5-tiny", seed=0, clip_folder=root / "clip-vit-tiny")


@pytest.fixture(scope="session")
def tiny_clip_dir(tiny_original_dir: Path) -> Path:
    """The CLIP vision tower folder of `tiny_original_dir` (a CLIPModel checkpoint + preprocessor)."""
    return tiny_original_dir.parent / "clip-vit-tiny"


@pytest.fixture(scope="session")
def tiny_hf_target(tiny_hf_dir: Path):
    """`load_target(tiny_hf_dir)`, fp32 on CPU (shared: do not modify)."""
    from lmms_msd.models.loading import load_target

    return load_target(str(tiny_hf_dir))


@pytest.fixture(scope="session")
def tiny_original_target(tiny_original_dir: Path):
    """`load_target(tiny_original_dir)`, fp32 on CPU (shared: do not modify)."""
    from lmms_msd.models.loading import load_target

    return load_target(str(tiny_original_dir))


def save_random_draft(target, folder: Path, seed: int = 1, hidden_size: int | None = None) -> Path:
    """A random MSD head sized for `target` (or with another hidden size, to not fit it), saved in `folder`."""
    from lmms_msd.models.draft import DraftConfig, new_random_draft, save_draft

    config = DraftConfig.like_target(target.model.config.text_config, target.vocab_size)
    if hidden_size is not None:
        config = dataclasses.replace(config, hidden_size=hidden_size)
    return save_draft(new_random_draft(config, seed), folder)


@pytest.fixture(scope="module")
def tiny_pair_settings(tiny_hf_dir: Path, tiny_hf_target, tmp_path_factory: pytest.TempPathFactory) -> PairSettings:
    """`tiny_hf_dir` with a random draft (`save_random_draft`, seed 1) saved for the module, fp32 on CPU."""
    from lmms_msd.pipeline import PairSettings

    draft = save_random_draft(tiny_hf_target, tmp_path_factory.mktemp("draft") / "msd")
    return PairSettings(str(tiny_hf_dir), str(draft), "cpu", "float32")


@pytest.fixture(scope="module")
def tiny_pair(tiny_pair_settings: PairSettings) -> Pair:
    """`load_pair(tiny_pair_settings)`, once per module."""
    from lmms_msd.pipeline import load_pair

    return load_pair(tiny_pair_settings)


def random_image(width: int, height: int, seed: int) -> Image.Image:
    """A seeded RGB noise image (noise makes every pixel and the resize path matter)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture
def make_image():
    """`make_image(width, height, seed)` -> a seeded RGB noise PIL image."""
    return random_image


@pytest.fixture
def tiny_image() -> Image.Image:
    """A non-square (50 x 30) seeded noise image: exercises padding to a square and resizing."""
    return random_image(50, 30, seed=0)
