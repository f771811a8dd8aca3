"""What the Triton kernels of the GPU loop share: the import (absent on CPU-only installs) and the rule for a
kernel that cannot run on a device (a GPU older than compute capability 7.0, or a compilation that fails):
the library's computation instead, with one warning saying why."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: every kernel keeps its library fallback
    triton = tl = None

logger = logging.getLogger(__name__)

T = TypeVar("T")

_unusable: dict[tuple[str, torch.device], str] = {}  # (kernel, device) where it cannot run, and why


def run_kernel(name: str, device: torch.device, launch: Callable[[], T], fallback: Callable[[], T], library: str) -> T:
    """launch() on `device`, unless the kernel `name` cannot run there: then fallback(), with one warning
    (naming `library`, what runs instead) the first time."""
    if (name, device) not in _unusable:
        capability = torch.cuda.get_device_capability(device)
        if capability < (7, 0):
            _give_up(name, device, f"compute capability {capability} is below Triton's 7.0", library)
        else:
            try:
                return launch()
            except Exception as error:  # noqa: BLE001 (any failure of Triton's compiler: fall back, once, loudly)
                _give_up(name, device, f"{type(error).__name__}: {error}", library)
    return fallback()


def _give_up(name: str, device: torch.device, why: str, library: str) -> None:
    _unusable[name, device] = why
    logger.warning("%s on %s falls back to %s (the Triton kernel cannot run: %s)", name, device, library, why)
