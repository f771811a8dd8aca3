"""Small copies between the host and the device that do not make the host wait.

`torch.tensor(values, device="cuda")` copies from pageable host memory and then synchronises the
stream: the host stops queuing work until the device has run everything queued before, so a step
with such a copy in its middle leaves the device idle while the host prepares what follows. Through
pinned memory the copy is asynchronous: the host goes on at once, and PyTorch's caching host
allocator keeps the pinned block until the copy has run. A batched step makes a few such copies
(node counts, cache rows and prefixes, kept slots); none waits.

The other way, `QueuedReads`: a value the host needs from the device (a tree's stop rule reads one per
level) is copied into pinned memory behind the work queued so far, while the host goes on queuing the
next work; the host then waits for that copy alone, and the device stays busy with what was queued after it.
"""

from __future__ import annotations

import torch

__all__ = ["QueuedReads", "to_device", "to_device_each"]


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


class QueuedReads:
    """Reads of a few float32 values from the device, queued now and collected later (module docstring).

    slots: reads that may be pending at once, each of `width` values; a slot read again before it was
    collected holds the later read. device: where the values live (CPU: a read is a plain copy).
    Example: reads.queue(0, expected[3]); level(4)  # queued after the read; reads.get(0) -> [expected[3]],
    as soon as the work before the read has run, while level 4 runs on.
    """

    def __init__(self, slots: int, width: int, device: torch.device) -> None:
        self.device = device
        cuda = device.type == "cuda"
        self.host = torch.zeros(slots, width, dtype=torch.float32, pin_memory=cuda)
        self.events = [torch.cuda.Event() for _ in range(slots)] if cuda else None

    def queue(self, slot: int, values: torch.Tensor) -> None:
        """Copy `values` (float32, `width` of them) to the host behind the work queued so far, without waiting."""
        self.host[slot].copy_(values.reshape(-1), non_blocking=True)
        if self.events is not None:
            self.events[slot].record(torch.cuda.current_stream(self.device))

    def get(self, slot: int) -> list[float]:
        """The values of the slot's last read, once its copy has run (waiting for nothing queued after it)."""
        if self.events is not None:
            self.events[slot].synchronize()
        return self.host[slot].tolist()
