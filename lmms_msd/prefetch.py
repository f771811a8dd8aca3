"""Requests' CPU stage run ahead on one background thread while the main thread decodes.

A request of `lmms_msd.pipeline.decode_requests` may come in two stages (`Request.load`): a CPU stage
(the lmms-eval plugin: the document's images through the task's doc_to_visual, the prompt text, the
image processor: `Target.preprocess`) and a device stage on the main thread (the tokenizer, the vision
tower, the embedded prompt: `Target.embed_inputs`), just before the request decodes or joins the batch.
Run in turn, the device idles while the host loads; `Prefetcher` runs the CPU stage of the next
requests in decoding order on one worker thread, at most `ahead` of them before their turn, so their
pixel tensors are the only memory it holds beyond the request decoding. What a stage computes does not
depend on the thread that runs it: the results are the same with and without prefetching.

Worked example, ahead 2, order [2, 0, 1, 3]: at request 2's turn the worker is given the loads of 2, 0
and 1 and request 2 waits for its own; at request 0's turn, the load of 1 may still run and 3 is given;
at each turn the loads given and not yet taken are the `ahead` requests after it, in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Self

THREAD_NAME = "lmms-msd-prefetch"  # the worker thread's name prefix (a traceback or a profiler shows it)


class Prefetcher:
    """The results of `loads`, taken in `order`, each computed at most `ahead` turns before its own.

    loads: per index, the request's CPU stage, or None (nothing to load: `take` gives None)
    order: the indices in the order their turns come, each once
    ahead: loads run before their turn on one worker thread; 0 runs each on the caller's thread at its turn

    Use it as a context manager. `take` raises what the load raised, at the load's turn. Whatever ends the
    block (an error, a caller that stops early), the loads not started are cancelled, and the one running,
    if any, finishes on the worker on its own, its result dropped: leaving never waits for a load.
    """

    def __init__(self, loads: Sequence[Callable[[], Any] | None], order: Sequence[int], ahead: int) -> None:
        if ahead < 0:
            raise ValueError(f"prefetch must be at least 0 (0: each request loads at its turn), got {ahead}")
        self.loads = loads
        self.order = list(order)
        self.ahead = ahead
        self._turn = 0  # turns taken: the next take is order[_turn]
        self._given = 0  # order[:_given] have been given to the worker (or had nothing to load)
        self._pending: dict[int, Future] = {}  # index -> its load, given and not yet taken
        needed = ahead > 0 and any(loads[index] is not None for index in self.order)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME) if needed else None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancel the loads not started and let the worker go, without waiting for a load that runs."""
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)
            self._worker = None
        self._pending.clear()

    def take(self, index: int) -> Any:
        """The result of `index`'s load (None without one), at its turn: the next index of `order`."""
        assert self._turn < len(self.order) and self.order[self._turn] == index, (
            f"request {index} taken out of turn: the next in order is "
            f"{self.order[self._turn] if self._turn < len(self.order) else 'none (all were taken)'}"
        )
        self._turn += 1
        load = self.loads[index]
        if self._worker is None:
            return None if load is None else load()
        self._give(until=min(self._turn + self.ahead, len(self.order)))  # this one and `ahead` after it
        future = self._pending.pop(index, None)
        return None if future is None else future.result()

    def _give(self, until: int) -> None:
        """Give the worker the loads of order[_given:until], in order."""
        assert self._worker is not None
        for index in self.order[self._given : until]:
            load = self.loads[index]
            if load is not None:
                self._pending[index] = self._worker.submit(load)
        self._given = max(self._given, until)
