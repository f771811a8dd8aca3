"""Small copies between the host and the device that do not make the host wait.

`torch.tensor(values, device="cuda")` copies from pageable host memory and then synchronises the
stream: the host stops queuing work until the device has run everything queued before, so a step
with such a copy in its middle leaves the device idle while the host prepares what follows. Through
pinned memory the copy is asynchronous: the host goes on at once, and PyTorch's caching host
allocator keeps the pinned block until the copy has run. A batched step makes a few such copies
(node counts, cache rows and prefixes, kept slots); none waits.

The other way, `PendingRead`: a value the host needs from the device (plain decoding's token) is copied
into pinned memory behind the work queued so far, and the host goes on queuing more (the next forward)
before it waits for that copy alone; the device stays busy with what was queued after it.
"""

from __future__ import annotations

import torch

__all__ = ["PendingRead", "to_device", "to_device_each"]


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


class PendingRead:
    """A small device tensor's values on their way to the host (module docstring): the copy is queued when the
    read is made, behind the work queued so far, and `get` waits for that copy alone, not for work queued later.
    On a CPU the values are read at once. Example: read = PendingRead(token); logits = forward(token)  # queued
    after the copy; read.get() -> [token's value] as soon as the copy has run, while the forward runs on."""

    def __init__(self, values: torch.Tensor) -> None:
        self.event = None
        if values.device.type != "cuda":
            self.host = values
            return
        self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        self.host.copy_(values, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record(torch.cuda.current_stream(values.device))

    def get(self) -> list:
        """The values (`Tensor.tolist()`), once the copy has run."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()
