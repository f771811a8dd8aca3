"""CUDA graphs for fixed-shape calls: capture a function once per input shape, replay it after.

A decoding step launches hundreds of small kernels; replaying them as one graph removes the launch
cost, which dominates at batch size one. Shapes are made static by the callers (token counts and
attention widths rounded up to buckets, `bucket`), so a handful of graphs serve a whole run.

The outputs of a replay live in the graph's memory and are overwritten by its next replay: callers
use or copy them before calling the same graph again.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

WIDTH_STEP = 256  # attention widths (cache slots a forward reads) are multiples of this
COMPILE_BACKEND = "inductor"  # torch.compile's backend for `compiled` (CPU tests trace with "aot_eager": no C++ build)


def width_bucket(used: int, capacity: int) -> int:
    """The attention width for `used` cache slots: rounded up to WIDTH_STEP, at most `capacity`.
    Example: width_bucket(300, 2048) == 512."""
    return min(-(-used // WIDTH_STEP) * WIDTH_STEP, capacity)


PROMPT_STEP = 32  # a prompt's forward is padded to a multiple of this many positions and replayed from a graph


def prompt_rows(n: int) -> int:
    """The padded length of a prompt's forward of n positions: n rounded up to PROMPT_STEP.
    Example: prompt_rows(661) == 672."""
    return -(-n // PROMPT_STEP) * PROMPT_STEP


def bucket(n: int, sizes: Sequence[int]) -> int:
    """The smallest of `sizes` (ascending) that holds n. Example: bucket(61, (1, 16, 64)) == 64."""
    for size in sizes:
        if n <= size:
            return size
    raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")


# SDPA's backends for forwards whose shapes vary from call to call (prompts, eager fallbacks): all but cuDNN's.
# cuDNN builds an execution plan the first time it meets a shape, once per shape: on the H200 a new length of
# 3 padded prompts cost 38.7 ms that way (0.26 ms without cuDNN) and a new width of the batched draft's advance
# over 64 rows 41.8 ms (0.44 without), where a second call of the shape takes 0.32 and 0.60 ms (0.26 and 0.42
# without; `python scripts/kernel_probes.py shapes`, `benchmarks/h200_7b_varying_shapes/`). Graphs capture
# bucketed shapes, a bounded set met again and again, so they keep every backend: cuDNN's plans pay there.
VARYING_SHAPE_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
ALL_BACKENDS = tuple(b for name, b in SDPBackend.__members__.items() if name != "ERROR")


def varying_shapes(fn: Callable) -> Callable:
    """`fn` run with SDPA restricted to `VARYING_SHAPE_BACKENDS` (no cuDNN): for the eager forwards whose
    shapes are not bucketed (a prompt's length, a batch's widths), which would build a cuDNN plan at
    nearly every call. A graph captured inside still captures what it calls with every backend
    (`GraphedFunction`). Example: varying_shapes(target.prefill)(embeds)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with sdpa_kernel(list(VARYING_SHAPE_BACKENDS)):
            return fn(*args, **kwargs)

    return call


def compiled(fn: Callable) -> Callable:
    """`fn` through torch.compile (inductor) as one whole graph: an operation that would split it raises
    at its first call instead of running slower in pieces. Shapes start static; a function called with
    a new shape is compiled again, and from then on with that dimension dynamic (torch.compile's own
    rule), so prompts of every length share a compilation. The first call of a shape takes seconds;
    calls that a CUDA graph captures run the compiled kernels at every replay. A function that calls SDPA
    keeps the backend PyTorch chose when it was traced (not guarded on): trace it under one choice of
    backends only (the static engines compile such a function, the draft's head, for graphs alone).

    Example (inductor's code for CPU, read with torch._inductor.utils.run_and_get_code): compiled(layer_output)
    is three library matrix products and two fused kernels, the
    residual add with the RMSNorm that reads it, and the SiLU with the gating product; compiled(attention_inputs)
    is the RMSNorm, one product and one kernel for all of RoPE.
    """
    dynamo = torch._dynamo.config
    # every layer (and every graphed bucket) calls the same function object: room for its shapes
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, limit):
            setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
    return torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND)


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    inputs: list[torch.Tensor]
    outputs: tuple[torch.Tensor, ...]


class GraphedFunction:
    """`fn(*tensors) -> tuple of tensors`, replayed from a CUDA graph per distinct input shape.

    enabled False (CPU, or switched off) calls `fn` directly. All graphs of one object share a
    memory pool. `fn` must not synchronise with the host (no .item(), no data-dependent shapes).
    It runs (and is captured) with every SDPA backend, cuDNN's included, even inside `varying_shapes`:
    its shapes are a bounded set (the callers' buckets), so cuDNN builds each plan once.
    device: the CUDA device the graphs run on (captured and replayed with it current, so a process
    driving cuda:1 works whatever its current device).
    static_inputs: a graph reads the very tensors of the call that captured it, in place, rather than copies
    of them (a copy kernel per argument at every replay): the caller keeps them alive and passes the same
    ones, with new values written in, at every later call of that shape; another tensor raises ValueError
    (checked on CPU too). Example: a tree level's committed count and attention window (`GraphedTreeGrower`).
    """

    def __init__(
        self, fn: Callable[..., tuple[torch.Tensor, ...]], enabled: bool, device: torch.device | None = None, warmup: int = 2,
        static_inputs: bool = False,
    ) -> None:  # fmt: skip
        self.fn = fn
        self.enabled = enabled
        self.device = device
        self.warmup = warmup
        self.static_inputs = static_inputs
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = None
        self._addresses: dict[tuple, list[int]] = {}  # static_inputs: the arguments' addresses by shape

    def _check_static(self, key: tuple, args: Sequence[torch.Tensor]) -> None:
        addresses = [a.data_ptr() for a in args]
        if self._addresses.setdefault(key, addresses) != addresses:
            raise ValueError(
                f"{getattr(self.fn, '__name__', self.fn)!r} reads its inputs in place (static_inputs): call it with the "
                f"tensors its first call of this shape passed, not others"
            )

    def __len__(self) -> int:
        return len(self._graphs)

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        if self.static_inputs:
            self._check_static(key, args)
        if not self.enabled:
            with sdpa_kernel(list(ALL_BACKENDS)):  # as captured: every backend, whatever the caller restricted
                return self.fn(*args)
        with torch.cuda.device(self.device):
            captured = self._graphs.get(key)
            if captured is None:
                # every SDPA backend, whatever the caller restricted (`varying_shapes`): the shape is met at every replay
                with sdpa_kernel(list(ALL_BACKENDS)):
                    captured = self._graphs[key] = self._capture(args)
            if not self.static_inputs:
                for buffer, value in zip(captured.inputs, args):
                    buffer.copy_(value)
            captured.graph.replay()
        return captured.outputs

    def _capture(self, args: Sequence[torch.Tensor]) -> _Captured:
        inputs = list(args) if self.static_inputs else [a.clone() for a in args]
        # Warm up on a side stream (as torch.cuda.graphs recommends): lazy initialisation and
        # library workspace allocation must not happen during capture. The warm-up calls compute
        # what the replay will (same inputs), so their side effects (cache writes) are harmless.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = self.fn(*inputs)
        return _Captured(graph, inputs, tuple(outputs))


class CaptureRules(TorchDispatchMode):
    """Raise on what a CUDA graph capture forbids, so that CPU tests catch it without a GPU.

    - `aten.lift_fresh`: a Python number or list turned into a (host) tensor, which `t[i] = 0`,
      `t[mask] = True` or `torch.tensor([...])` do; copying it to the device fails during capture
      (use `fill_`, `zero_`, `new_full` or a device scalar instead);
    - `aten._local_scalar_dense`: `.item()`, `int(t)`, `float(t)`: a host synchronisation.
    """

    FORBIDDEN = {"aten.lift_fresh.default", "aten._local_scalar_dense.default"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in self.FORBIDDEN:
            raise RuntimeError(f"{func} inside a function meant for CUDA graph capture")
        return func(*args, **(kwargs or {}))
