"""What a benchmark ran on, and two quick measures of how fast that machine is where decoding feels it.

Machines of one kind differ: on H200s lent for this project the same command ran up to 15% apart, and the
batch-1 loop more where the host was slower (it launches the kernels the device then waits for). So a bench
report carries, besides the names and versions, the device's copy bandwidth (what bounds a decoding step's
weight reads) and the host's time to launch one small operation (what bounds a step's eager parts and the
gaps between graph replays), measured in a fraction of a second at the end of the run.
"""

from __future__ import annotations

import platform
import statistics
import time
from importlib import metadata
from typing import Any

import torch

__all__ = ["copy_bandwidth", "describe", "launch_seconds", "speed_text"]


def copy_bandwidth(device: torch.device, gib: float = 2, repeats: int = 20) -> float:
    """Bytes per second moved by a copy of `gib` GiB within `device`'s memory (read + write: bandwidth =
    2 x bytes / time), after 3 warm-up copies; CUDA copies are timed with events, CPU ones with the clock."""
    source = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    if device.type == "cuda":
        with torch.cuda.device(device):  # the events on the stream the copies run on
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                target.copy_(source)
            end.record()
            torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1e3 / repeats
    else:
        begin = time.perf_counter()
        for _ in range(repeats):
            target.copy_(source)
        seconds = (time.perf_counter() - begin) / repeats
    return 2 * source.numel() / seconds


def launch_seconds(device: torch.device, operations: int = 200, rounds: int = 5) -> float:
    """Seconds per small operation issued from Python (an in-place add on one element, `operations` in a row,
    then a synchronisation), the median of `rounds`: on CUDA the host's launch cost, which a step's eager
    operations pay one by one."""
    x = torch.zeros(1, device=device)
    per_op = []
    for _ in range(rounds + 1):  # the first round warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        for _ in range(operations):
            x.add_(1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        per_op.append((time.perf_counter() - begin) / operations)
    return statistics.median(per_op[1:])


def describe(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The machine of a report: the device's name, dtype and versions, and the measured copy bandwidth in GB/s
    (`copy_bandwidth` of 0.5 GiB on a GPU, None when that does not fit in its free memory; 64 MiB on CPU) and the
    launch time in us (`launch_seconds`). Example: {"device_name": "NVIDIA H200", ..., "triton": "3.6.0", "copy_gb_s": 4010.3,
    "launch_us": 5.2}."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    described: dict[str, Any] = {
        "device_name": name, "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
        "transformers": metadata.version("transformers"), "python": platform.python_version(),
        "triton": _triton_version(),  # None without it: the static target's one-row products then stay on cuBLAS
    }  # fmt: skip
    try:
        described["copy_gb_s"] = round(copy_bandwidth(device, gib=0.5 if device.type == "cuda" else 1 / 16) / 1e9, 1)
    except torch.OutOfMemoryError:
        described["copy_gb_s"] = None
    described["launch_us"] = round(launch_seconds(device) * 1e6, 2)
    return described


def _triton_version() -> str | None:
    """The importable Triton's own version (its distribution's name varies: triton, pytorch-triton, ...), or None."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def speed_text(described: dict[str, Any]) -> str:
    """`describe`'s measured speed for a report's text, or "" for a report made before it was measured.
    Example: "; measured: 4010.3 GB/s copies, 5.2 us to launch a small operation"."""
    if "launch_us" not in described:
        return ""
    copy = f"{described['copy_gb_s']:g} GB/s copies" if described.get("copy_gb_s") is not None else "copies not measured"
    return f"; measured: {copy}, {described['launch_us']:g} us to launch a small operation"
