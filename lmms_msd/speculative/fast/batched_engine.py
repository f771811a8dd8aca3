"""`BatchedStaticEngine`: static caches and CUDA graphs for many sequences at once, a `BatchedRuntime`.

The batched loop (`lmms_msd.speculative.batching.generate_batched`) runs on it as on `EagerRuntime`,
with the same outputs. What it keeps where:

- the target: `BatchedStaticTarget`, a cache row per sequence; `prefill` gives a sequence the lowest
  free row and `release` gives it back; plain steps and tree verifications of all rows in flight are
  one forward, replayed from a CUDA graph per (rows, tokens, width) bucket;
- the draft: a `StaticDrafter` per row (reused by every sequence that row holds) and a
  `GraphedTreeGrower` per row and tree spec. By default each row's drafter has a cache of its own
  and trees are grown row after row, each as fast as the single-sequence `StaticEngine` grows one, so
  at large batches drafting costs B times one row's.
  With `batched_drafting=True` the rows' drafters are the rows of one `SharedDraftCache` (draft keys
  and values [max_batch, kv_heads, capacity, D] per layer, row r for the sequence on target row r),
  and a batch of B > 1 rows grows all its trees with one draft forward per level over cache rows
  0..R-1 in place (nothing is copied). When every row grows one spec (EAGLE-2 or OPT-Tree) and tracks
  visual attention alike, each level, and the final choice of nodes, is one CUDA graph replay over all
  rows (`lmms_msd.speculative.fast.batched_growth.BatchedTreeGrower`, a graph per row bucket and width);
  batches of mixed specs grow eagerly (`lmms_msd.speculative.tree.grow_trees` through
  `lmms_msd.speculative.drafting.run_shared`). The draft's advance of all rows is one eager forward
  (`lmms_msd.speculative.drafting.advance_rows`).
  Worked example: rows 0, 1, 3 in flight with 700, 650 and 720 committed draft slots grow an EAGLE-2
  tree (top_k 10): each level is one forward over R = 4 rows of 10 inputs; row r's nodes go to its
  slots 700 + u.., 650 + u.., 720 + u.. (u: its tree slots used so far), and row 2, free, feeds
  padding that writes its scratch slot. A batch of one still grows its tree with the row's graphed
  `GraphedTreeGrower`, as fast as with `batched_drafting=False`.

It also runs the one-request loops (each call on a batch of one), so one engine serves every batch size.
"""

from __future__ import annotations

import heapq

import torch

from lmms_msd.models.draft import MSDDraft
from lmms_msd.models.target import EmbeddedPrompt, Target
from lmms_msd.speculative.drafting import (
    DraftRows,
    SharedDraftCache,
    advance_rows,
    on_one_shared_cache,
)
from lmms_msd.speculative.fast.batched_growth import BatchedTreeGrower
from lmms_msd.speculative.fast.batched_target import BatchedStaticTarget
from lmms_msd.speculative.fast.graphs import varying_shapes
from lmms_msd.speculative.fast.static_drafter import StaticDrafter, start_draft
from lmms_msd.speculative.fast.tree_growth import GraphedTreeGrower
from lmms_msd.speculative.runtime import (
    PrefillError,
    Sequence,
    TreeOutputs,
    drafter_of,
    pad_and_verify,
    require_draft,
)
from lmms_msd.speculative.tree import Tree, TreeSpec, grow_trees
from lmms_msd.speculative.verify import PaddedTrees

# the batched draft's eager forwards, whose shapes change every step, run without cuDNN's attention (`varying_shapes`)
_advance_rows = varying_shapes(advance_rows)
_grow_trees = varying_shapes(grow_trees)

# padded prompt positions one prefill forward may take (several prompts joining at once share a forward
# up to this many; a longer prompt runs alone): large enough to fill a GPU's matrix units, small
# enough for the activations (a 7B's MLP: 2 * 11008 values a position)
PREFILL_TOKENS = 4096


def prefill_groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Prompts (by place) grouped in order so that each group's count times its longest prompt stays
    within `budget` padded positions (a prompt longer than the budget alone).
    Example: prefill_groups([600, 620, 610, 3000], 2048) == [[0, 1, 2], [3]]."""
    groups: list[list[int]] = []
    longest = 0
    for i, n in enumerate(lengths):
        if groups and (len(groups[-1]) + 1) * max(longest, n) <= budget:
            groups[-1].append(i)
            longest = max(longest, n)
        else:
            groups.append([i])
            longest = n
    return groups


class RowSequence(Sequence):
    """A sequence on a `BatchedStaticEngine`: the cache row it holds."""

    def __init__(self, committed: int, row: int) -> None:
        super().__init__(committed=committed)
        self.row = row


class BatchedStaticEngine:
    """Static caches with a row per sequence, and CUDA graphs (module docstring): a `BatchedRuntime`.

    max_batch: sequences held at once (cache rows); max_length: slots per row (prompt + new tokens + one
    tree must fit), clipped to the target's maximum; cuda_graphs: None replays graphs when the target
    is on CUDA, False runs the same code eagerly; batched_drafting: many rows draft in one forward
    per level on one shared draft cache (module docstring); compile: the target's layers through
    torch.compile (`StaticTarget`; the drafts run as they are). Memory: the target's KV cache takes
    2 * layers * max_batch * kv_heads * max_length * head_dim values, the draft's the same with the
    head's one layer.
    """

    def __init__(
        self, target: Target, draft: MSDDraft | None = None, max_batch: int = 16, max_length: int = 2048,
        cuda_graphs: bool | None = None, batched_drafting: bool = False, compile: bool = False,
    ) -> None:  # fmt: skip
        self.target = target
        self.draft = draft  # None: plain decoding only
        self.max_batch = max_batch
        self.batched_drafting = batched_drafting  # the module docstring says what it changes
        self.static_target = BatchedStaticTarget(target, max_batch, max_length, cuda_graphs, compile)
        self.cuda_graphs = self.static_target.cuda_graphs
        self.compile = compile
        self._free = list(range(max_batch))  # a heap: the lowest free row first
        self._live: dict[int, RowSequence] = {}  # row -> the sequence holding it
        self._drafters: dict[tuple[int, bool], StaticDrafter] = {}  # by (row, track_visual)
        # batched_drafting: the draft cache the rows' drafters share (made with the first drafter)
        self._shared: SharedDraftCache | None = None
        self._growers: dict[tuple[int, bool, TreeSpec], GraphedTreeGrower] = {}  # by (row, track_visual, spec)
        self._batch_growers: dict[tuple[bool, TreeSpec], BatchedTreeGrower] = {}  # batched_drafting: by (track_visual, spec)

    def _check_live(self, sequences: list[RowSequence]) -> list[int]:
        """The rows of live sequences; a released one raises."""
        for sequence in sequences:
            if self._live.get(sequence.row) is not sequence:
                raise RuntimeError(
                    f"this sequence (row {sequence.row}) is no longer live on the BatchedStaticEngine: it was "
                    "released, and its row may hold another generation now"
                )
        return [s.row for s in sequences]

    # ---- one sequence --------------------------------------------------------------------------------
    def _check_fits(self, length: int, extra_slots: int) -> None:
        if length + extra_slots > self.static_target.usable:
            raise ValueError(
                f"the prompt ({length} positions) and what may follow it (max_new_tokens and one tree: "
                f"{extra_slots}) need {length + extra_slots} cache slots; the engine holds "
                f"{self.static_target.usable} per sequence: raise max_length"
            )

    def prefill(self, prompt: EmbeddedPrompt, extra_slots: int) -> tuple[RowSequence, torch.Tensor, torch.Tensor]:
        length = prompt.input_ids.shape[0]
        self._check_fits(length, extra_slots)
        if not self._free:
            raise RuntimeError(f"all {self.max_batch} rows are live: release a finished sequence before starting another")
        row = heapq.heappop(self._free)
        sequence = self._live[row] = RowSequence(length, row)
        hidden, logits = self.static_target.prefill_row(row, prompt.inputs_embeds[0])
        return sequence, hidden, logits

    def prefill_batch(
        self, prompts: list[EmbeddedPrompt], extra_slots: list[int]
    ) -> list[tuple[RowSequence, torch.Tensor, torch.Tensor]]:
        """Each prompt takes the lowest free row; together they run as few forwards as `PREFILL_TOKENS`
        allows (prompts of one forward are padded to the longest of them)."""
        for position, (prompt, extra) in enumerate(zip(prompts, extra_slots, strict=True)):
            try:
                self._check_fits(prompt.input_ids.shape[0], extra)
            except ValueError as error:
                raise PrefillError(position, str(error)) from error
        if len(prompts) > len(self._free):
            raise RuntimeError(f"{len(prompts)} prompts join but {len(self._free)} of {self.max_batch} rows are free")
        started = []
        for group in prefill_groups([p.input_ids.shape[0] for p in prompts], PREFILL_TOKENS):
            rows = [heapq.heappop(self._free) for _ in group]
            outs = self.static_target.prefill_rows(rows, [prompts[i].inputs_embeds[0] for i in group])
            for i, row, (hidden, logits) in zip(group, rows, outs):
                self._live[row] = RowSequence(prompts[i].input_ids.shape[0], row)
                started.append((i, (self._live[row], hidden, logits)))
        return [out for _, out in sorted(started, key=lambda item: item[0])]

    def release(self, sequence: RowSequence) -> None:
        self._check_live([sequence])
        del self._live[sequence.row]
        heapq.heappush(self._free, sequence.row)

    def forward_next(self, sequence: RowSequence, token: torch.Tensor) -> torch.Tensor:
        return self.forward_next_batch([sequence], token)[1]

    def prefill_draft(
        self, sequence: RowSequence, prompt: EmbeddedPrompt, hidden: torch.Tensor, token: int, track_visual: bool
    ) -> DraftRows:
        self._check_live([sequence])
        draft, row, capacity = require_draft(self.draft, self), sequence.row, self.static_target.capacity

        def make() -> StaticDrafter:
            if not self.batched_drafting:
                return StaticDrafter(draft, self.target.lm_head, capacity, track_visual, self.cuda_graphs)
            if self._shared is None:
                self._shared = SharedDraftCache(draft, self.max_batch, capacity)
            return StaticDrafter(draft, self.target.lm_head, capacity, track_visual, self.cuda_graphs, self._shared, row)

        return start_draft(self._drafters, (row, track_visual), make, sequence, prompt, hidden, token)

    def draft_tree(self, sequence: RowSequence, tree: TreeSpec, token: int, root: DraftRows) -> tuple[Tree, torch.Tensor]:
        """Grown by the row's `GraphedTreeGrower` for this spec (made once, its graphs captured once)."""
        self._check_live([sequence])
        drafter = drafter_of(sequence)
        assert isinstance(drafter, StaticDrafter), f"a BatchedStaticEngine sequence drafts with a StaticDrafter, not {drafter!r}"
        key = (sequence.row, drafter.track_visual, tree)
        grower = self._growers.get(key)
        if grower is None:
            grower = self._growers[key] = GraphedTreeGrower(drafter, tree, self.cuda_graphs)
        return grower.build(token, root.hidden, root.visual)

    def verify(self, sequence: RowSequence, tree: Tree, ancestors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.verify_batch([sequence], [tree], [ancestors])[0]

    def commit(self, sequence: RowSequence, path: torch.Tensor, next_tokens: torch.Tensor, path_hidden: torch.Tensor) -> DraftRows:
        self.keep_batch([sequence], [path])
        return self.advance_batch([sequence], [next_tokens], [path_hidden])[0]

    # ---- many sequences at once ------------------------------------------------------------------------
    def forward_next_batch(self, sequences: list[RowSequence], tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._check_live(sequences)
        assert tokens.shape == (len(sequences),), f"tokens {tuple(tokens.shape)} for {len(sequences)} sequences"
        out = self.static_target.forward_next_rows(rows, [s.committed for s in sequences], tokens)
        for sequence in sequences:
            sequence.committed += 1
        return out

    def draft_trees(
        self, sequences: list[RowSequence], specs: list[TreeSpec], tokens: list[int], roots: list[DraftRows]
    ) -> list[tuple[Tree, torch.Tensor]]:
        assert len(sequences) == len(specs) == len(tokens) == len(roots), "one spec, token and root per sequence"
        if self.batched_drafting and len(sequences) > 1:
            drafters = [drafter_of(s) for s in sequences]
            self._check_live(sequences)
            hidden, visual = [r.hidden for r in roots], [r.visual for r in roots]
            grower = self._batch_grower(drafters, specs)
            if grower is not None:
                return grower.build(drafters, tokens, hidden, visual)
            trees = _grow_trees(drafters, specs, tokens, hidden, visual)
            return [(tree, tree.ancestor_mask(spec.max_depth)) for tree, spec in zip(trees, specs)]
        # a grower's outputs are copied out of its graph's memory (`GraphedTreeGrower.build`), so rows may follow each other
        return [self.draft_tree(*row) for row in zip(sequences, specs, tokens, roots)]

    def _batch_grower(self, drafters: list[StaticDrafter], specs: list[TreeSpec]) -> BatchedTreeGrower | None:
        """The shared cache's `BatchedTreeGrower` for these rows (made once per spec and tracking), or None
        when they differ in spec or tracking (`grow_trees` grows them)."""
        spec, track_visual = specs[0], drafters[0].track_visual
        alike = all(s is spec or s == spec for s in specs) and all(d.track_visual == track_visual for d in drafters)
        if not (alike and on_one_shared_cache(drafters)):
            return None
        key = (track_visual, spec)
        grower = self._batch_growers.get(key)
        if grower is None:
            grower = BatchedTreeGrower(drafters[0].shared, self.target.lm_head, spec, track_visual, self.cuda_graphs)
            self._batch_growers[key] = grower
        return grower

    def verify_batch(
        self, sequences: list[RowSequence], trees: list[Tree], ancestors: list[torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return pad_and_verify(self, sequences, trees, ancestors)

    def verify_trees(self, sequences: list[RowSequence], trees: PaddedTrees) -> TreeOutputs:
        rows = self._check_live(sequences)
        assert len(sequences) == len(trees.counts), f"{len(trees.counts)} trees for {len(sequences)} sequences"
        hidden, logits, places, index = self.static_target.forward_trees(rows, [s.committed for s in sequences], trees)
        return TreeOutputs(hidden, logits, places, index, trees.counts)

    def keep_batch(self, sequences: list[RowSequence], paths: list[torch.Tensor]) -> None:
        rows = self._check_live(sequences)
        self.static_target.keep_paths(rows, [s.committed for s in sequences], paths)
        for sequence, path in zip(sequences, paths, strict=True):
            sequence.committed += path.shape[0]

    def advance_batch(
        self, sequences: list[RowSequence], next_tokens: list[torch.Tensor], hidden: list[torch.Tensor]
    ) -> list[DraftRows]:
        self._check_live(sequences)
        if self.batched_drafting:
            return _advance_rows([drafter_of(s) for s in sequences], next_tokens, hidden)
        return [drafter_of(s).advance(t, h) for s, t, h in zip(sequences, next_tokens, hidden, strict=True)]
