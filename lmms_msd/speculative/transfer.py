"""Small copies from the host to the device that do not make the host wait.

`torch.tensor(values, device="cuda")` copies from pageable host memory and then synchronises the
stream: the host stops queuing work until the device has run everything queued before, so a step
with such a copy in its middle leaves the device idle while the host prepares what follows. Through
pinned memory the copy is asynchronous: the host goes on at once, and PyTorch's caching host
allocator keeps the pinned block until the copy has run. A batched step makes a few such copies
(node counts, cache rows and prefixes, kept slots); none waits.
"""

from __future__ import annotations

import torch

__all__ = ["to_device", "to_device_each"]


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """`values` as a long tensor on `device`, copied without waiting on CUDA (module docstring).
    Example: to_device([3, 1, 4], torch.device("cuda")) -> tensor([3, 1, 4], device='cuda:0')."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.long, device=device)
    return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)


def to_device_each(device: torch.device, *lists: list[int]) -> tuple[torch.Tensor, ...]:
    """Several lists of ints as long tensors on `device`, in one copy (`to_device`), split back.
    Example: to_device_each(device, [1, 2], [7]) -> (tensor([1, 2]), tensor([7]))."""
    flat = to_device([value for values in lists for value in values], device)
    return tuple(flat.split([len(values) for values in lists]))
