"""The draft's side of a generation on a fixed-size cache, with each draft forward replayed from a CUDA graph.

`Drafter` (lmms_msd.speculative.drafting) already writes a preallocated cache by slot; what changes here is that
the cache is allocated once per engine at full capacity (a graph keeps the addresses it captured),
and every call of the head is padded to a bucketed (rows, width) shape and replayed from a graph.
Tree building (`lmms_msd.speculative.tree`) drives this drafter exactly as it drives the eager one.
Committing a step (`advance`) is one graph replay too: the fuse, the causal block and the head together.
Its cache may be a row of a `SharedDraftCache` (`BatchedStaticEngine(batched_drafting=True)`): alone it
replays its graphs on that row, and with other rows of the cache it drafts in one forward over the
rows: trees of one spec from graphs (`lmms_msd.speculative.fast.batched_growth.BatchedTreeGrower`), the
rest eagerly (`lmms_msd.speculative.drafting.run_shared`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from lmms_msd.models.draft import MSDDraft
from lmms_msd.models.target import EmbeddedPrompt
from lmms_msd.speculative.drafting import Drafter, DraftRows, SharedDraftCache
from lmms_msd.speculative.fast.graphs import GraphedFunction, bucket, compiled, prompt_rows, varying_shapes, width_bucket
from lmms_msd.speculative.runtime import Sequence

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class StaticDrafter(Drafter):
    """A `Drafter` whose cache never grows and whose head runs from CUDA graphs (when enabled).

    Reused across generations: `reset` before each prefill. shared, row: its cache is row `row` of a
    `SharedDraftCache` (views of it, so the graphs it captures write the shared tensors), as `Drafter`'s.
    compile: `head` is its torch.compile'd self (`lmms_msd.speculative.fast.graphs.compiled`), for its own
    graphs and for the tree growers that call it inside theirs. graph_prompts: a prompt's rows are padded
    (`prompt_rows`) and replayed from a graph too, on the uncompiled head (`_run`; the one-request engine's
    drafter: a batched engine keeps a drafter per row, and a graph per row and prompt length would multiply
    captures and memory by the batch). Otherwise prompts, and an advance over more rows than ROW_BUCKETS
    holds, run the head eagerly, uncompiled and without cuDNN's attention (`varying_shapes`): a compiled
    function keeps the SDPA backend it was traced with, so the compiled head is only ever traced inside a
    graph's capture.
    """

    def __init__(
        self, draft: MSDDraft, lm_head: torch.nn.Linear, capacity: int, track_visual: bool, cuda_graphs: bool,
        shared: SharedDraftCache | None = None, row: int = 0, compile: bool = False, graph_prompts: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(draft, lm_head, capacity, track_visual=track_visual, shared=shared, row=row)
        self._varying_head = varying_shapes(self.head)  # uncompiled: for forwards that are not graphed
        # a prompt's graphs run the head uncompiled: traced at a prompt's rows first, the compiled head would
        # recompile with its rows dynamic before the trees' graphs capture it (`compiled`), slower kernels for them
        self._prompt_graphed = GraphedFunction(self.head, cuda_graphs, self.device)
        if compile:
            self.head = compiled(self.head)
        self.capacity = capacity
        self.graph_prompts = graph_prompts
        self.scratch = capacity - 1  # padding rows write here; no real row ever sees it
        self._graphed = GraphedFunction(self.head, cuda_graphs, self.device)
        self._advancing = GraphedFunction(self._advance_rows, cuda_graphs, self.device)
        self.window = torch.arange(capacity, device=self.device)  # slots 0..capacity-1; `advance` passes the first S

    def reset(self) -> None:
        """Forget the last generation (before the next prefill)."""
        self.committed = 0
        self.tree_used = 0
        if self.image_slots is not None:
            self.image_slots.zero_()

    def mark_tree_fed(self, slots: int) -> None:
        """Record that a tree's first `slots` slots after the prefix were fed through `head` (by a grower
        that writes them itself), as `expand` records its own."""
        assert 0 <= slots <= self.capacity - 1 - self.committed, f"{slots} tree slots after {self.committed} committed"
        self.tree_used = slots

    def reserve(self, slots: int) -> None:
        """Check that `slots` slots fit: the cache never grows (a graph keeps the addresses it captured)."""
        if slots > self.capacity - 1:
            raise ValueError(
                f"the draft needs {slots} cache slots but the static cache holds {self.capacity - 1}; raise max_length"
            )

    def head(self, x, positions, slots, visible):
        """The head over rows at given cache slots, as they come (no padding, no graph): what this
        drafter replays, and what a caller capturing a larger graph (`GraphedTreeGrower`) runs inside it.
        x: [T, H]; positions, slots: [T] long; visible: [T, S] bool -> (hidden [T, H],) or, tracking
        visual attention, (hidden [T, H], visual [T])
        """
        width = visible.shape[1]
        if not self.track_visual:
            return (self.draft(x[None], positions, self.cache, slots, visible)[0],)
        hidden, visual = self.draft.forward_with_visual(
            x[None], positions, self.cache, slots, visible, self.image_slots[:width]
        )
        return hidden[0], visual

    @torch.inference_mode()
    def advance(self, next_tokens: torch.Tensor, target_hidden: torch.Tensor) -> DraftRows:
        """`Drafter.advance` as one replay of a graph per (m, attention width): outside it only the
        committed count P goes to the device and the new root's row is copied out. The same values as
        `Drafter._append` through `_run`, so the same outputs bit for bit. The graphs go by m itself, not
        its row bucket: the fuse's product keeps its m rows (a GPU matrix product may sum in another order
        for another row count); a step commits at most a tree's depth + 1, so there are few of them.

        next_tokens: [m]; target_hidden: [m, H] -> the new root's hidden [H] and visual intensity []
        """
        m = next_tokens.shape[0]
        assert next_tokens.dim() == 1 and target_hidden.shape[0] == m, (
            f"next_tokens {tuple(next_tokens.shape)} vs target_hidden {tuple(target_hidden.shape)}"
        )
        self.reserve(self.committed + m)
        width = width_bucket(self.committed + m, self.capacity)
        prefix = torch.full((1,), self.committed, device=self.device)
        if m <= ROW_BUCKETS[-1]:
            out = self._advancing(next_tokens, target_hidden, prefix, self.window[:width])
        else:  # as `_run`: many rows run eagerly
            out = self._advance_rows(next_tokens, target_hidden, prefix, self.window[:width], head=self._varying_head)
        self.committed += m
        self.tree_used = 0
        # graph outputs are overwritten by the next replay: copy what the caller keeps
        return DraftRows(out[0].clone(), out[1].clone() if self.track_visual else None)

    def _advance_rows(self, next_tokens, target_hidden, prefix, window, head=None):
        """What `advance` replays: fuse the m committed inputs, append them after the prefix as `_causal_block`
        does, padded to a row bucket as `_run` pads (padding rows: zeros at position 0, writing the scratch
        slot and seeing slot 0), and run the head. next_tokens: [m] long; target_hidden: [m, H]; prefix:
        [1] long, P; window: [S] slots 0..S-1 (S, the attention width, covers P + m); head: what runs the head
        [`head`] -> the last row's (hidden [H],) or (hidden [H], visual [])

        Example: P = 5, m = 3, S = 256: rows 4; slots [5, 6, 7, C - 1], positions [5, 6, 7, 0]; row i < 3
        sees slots 0..5 + i, row 3 slot 0 only.
        """
        m = next_tokens.shape[0]
        rows = bucket(m, ROW_BUCKETS) if m <= ROW_BUCKETS[-1] else m
        x = self.draft.fuse(self.draft.embed_tokens(next_tokens)[None], target_hidden[None])[0]  # [m, H]
        padded_x = torch.cat([x, x.new_zeros(rows - m, x.shape[1])])
        place = torch.arange(rows, device=window.device)
        real = place < m
        slots = prefix + place
        visible = torch.where(real[:, None], window[None, :] <= slots[:, None], window[None, :] == 0)  # [rows, S]
        positions = slots.masked_fill(~real, 0)
        slots = slots.masked_fill(~real, self.scratch)
        out = (head or self.head)(padded_x, positions, slots, visible)
        return tuple(t[m - 1] for t in out)

    def _run(self, x: torch.Tensor, positions, slots, visible) -> DraftRows:
        """Pad to a (rows, width) bucket and replay the head's graph for it: rows a ROW_BUCKETS size, or past
        the largest (a prompt's) `prompt_rows`, as the target's prompt forward pads (`graph_prompts`; else a
        prompt runs eagerly at its own length)."""
        n, used = visible.shape
        width = width_bucket(used, self.capacity)
        if n <= ROW_BUCKETS[-1]:
            rows, run = bucket(n, ROW_BUCKETS), self._graphed
        elif self.graph_prompts:
            rows, run = prompt_rows(n), self._prompt_graphed
        else:
            rows, run = n, self._varying_head
        padded_visible = torch.zeros(rows, width, dtype=torch.bool, device=self.device)
        padded_visible[:n, :used] = visible
        padded_visible[n:, 0] = True
        padded_x = x.new_zeros(rows, x.shape[1])
        padded_x[:n] = x
        padded_positions = positions.new_zeros(rows)
        padded_positions[:n] = positions
        padded_slots = slots.new_full((rows,), self.scratch)
        padded_slots[:n] = slots
        out = run(padded_x, padded_positions, padded_slots, padded_visible)
        # graph outputs are overwritten by the next replay: copy what the caller keeps
        return DraftRows(out[0][:n].clone(), out[1][:n].clone() if self.track_visual else None)


def start_draft(
    drafters: dict[Hashable, StaticDrafter], key: Hashable, make: Callable[[], StaticDrafter], sequence: Sequence,
    prompt: EmbeddedPrompt, hidden: torch.Tensor, token: int,
) -> DraftRows:  # fmt: skip
    """An engine's `prefill_draft`: the engine keeps its `StaticDrafter`s by `key` (made by `make` the first
    time, reused by every later generation with that key); this one is reset, becomes the sequence's
    drafter and fills its cache over the prompt (`Drafter.prefill`) -> the root's hidden [H] and visual []."""
    drafter = drafters.get(key)
    if drafter is None:
        drafter = drafters[key] = make()
    drafter.reset()
    sequence.drafter = drafter
    return drafter.prefill(prompt, hidden, token)
