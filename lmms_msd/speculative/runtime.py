"""Where a generation runs: the target's forwards and caches, and the draft's, behind one interface.

The loops in `lmms_msd.speculative.decoding` (plain and speculative decoding) decide *what* to compute; a
`Runtime` decides *where and how*. There are two, and they give the same tokens:

- `EagerRuntime` (here): transformers' own language-model forward with a growing `DynamicCache`, and
  the draft through `Drafter`; it runs whatever LLaVA-1.5 the loader reads, on any device, and is
  the reference.
- `lmms_msd.speculative.fast.StaticEngine`: static KV caches written by slot and CUDA graphs, for speed on a GPU.

A generation in flight is a `Sequence`: `prefill` starts one and returns it, and every later call
takes it, so what a generation has written (its caches, its committed length, its drafter) belongs
to its `Sequence`, not to the runtime. `EagerRuntime` holds any number at once (each has its own
caches); `StaticEngine` holds one, and a `prefill` invalidates the sequence before it.

The calls of one speculative generation, in order (plain decoding: `prefill`, then `forward_next` per token):

    sequence, hidden, logits = runtime.prefill(prompt, extra_slots)
    root = runtime.prefill_draft(sequence, prompt, hidden, first_token, track_visual)
    per step: tree, ancestors = runtime.draft_tree(sequence, spec, token, root)
              tree_hidden, logits = runtime.verify(sequence, tree, ancestors)
              root = runtime.commit(sequence, path, next_tokens, tree_hidden[path])
    (a runtime may also offer `verify_greedy(sequence, tree, ancestors) -> verify.Verified`, the verification
    and greedy acceptance in one call, which the greedy loop then uses: `decoding.verify_step`)
    at the end:   runtime.release(sequence)

Many generations at once (`lmms_msd.speculative.batching`, the batched loop): a `BatchedRuntime` adds
calls that take a list of B live sequences and run *one* target forward for all of them. Each sequence
keeps its own state (caches, committed length, drafter); a batch is only the list passed to a call, so
the loop may change it between any two calls: a finished generation leaves (`release`) and a waiting
one joins (`prefill`, `prefill_draft`, as above: prompts are ragged and are prefilled one at a time).
The calls of one batched speculative step (plain decoding, or a step where no row grows a tree:
`forward_next_batch`):

    trees = runtime.draft_trees(sequences, specs, tokens, roots)      # [(Tree, ancestors [N_b, N_b])]
    padded = pad_trees([t for t, _ in trees], [a for _, a in trees])  # the trees side by side
    outs = runtime.verify_trees(sequences, padded)                    # one forward -> TreeOutputs
    runtime.keep_batch(sequences, paths)                               # per-row commit, target side
    roots = runtime.advance_batch(sequences, next_tokens, path_hidden)  # and draft side (may be deferred)

Rows are ragged: row b has its own committed length P_b and tree size N_b. The one forward pads every
row to the longest (prefix and tree): row b's tree node i is at RoPE position P_b + depth_i and sees
row b's P_b committed positions, its ancestors and itself, never padding or another row; padding
queries see one real slot and are dropped. So a row's outputs are the ones it would get alone, up to
floating-point rounding of the wider matrix products: tokens are the same at T=0, and a request's
sampled tokens are drawn by its own generator in the same order whatever the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from lmms_msd.models.draft import MSDDraft
from lmms_msd.models.target import EmbeddedPrompt, Target
from lmms_msd.speculative.drafting import Drafter, DraftRows, advance_rows
from lmms_msd.speculative.tree import Tree, TreeSpec, grow_tree, grow_trees
from lmms_msd.speculative.verify import PaddedTrees, pad_trees, tree_attention_mask


@dataclass(eq=False, kw_only=True)
class Sequence:
    """One generation in flight on a runtime: the loop holds it and hands it back; only the runtime
    that made it changes it."""

    # target positions holding committed tokens: the prompt, then each step's accepted path (speculative)
    # or each fed token (plain); the next tree or token goes right after them
    committed: int
    drafter: Drafter | None = None  # the draft's side, from `prefill_draft` on (speculative decoding only)


@dataclass(frozen=True)
class TreeOutputs:
    """The target's outputs over B rows' trees from one forward (`BatchedRuntime.verify_trees`), laid out as
    the forward ran: row b's node i at [places[b], i] for i < counts[b]; the rest is padding. Valid until
    the runtime's next call. Example: a static engine with sequences on cache rows 2 and 0: places [2, 0]."""

    hidden: torch.Tensor  # [R, T', H], R >= B rows, T' >= max(counts) nodes
    logits: torch.Tensor  # [R, T', V]
    places: list[int]  # row b's place in the batch
    index: torch.Tensor  # [B] long on the device: places
    counts: list[int]  # row b's nodes

    def row(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row b's hidden [N_b, H] and logits [N_b, V] (views)."""
        return self.hidden[self.places[b], : self.counts[b]], self.logits[self.places[b], : self.counts[b]]

    def rows(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.row(b) for b in range(len(self.places))]

    def argmax(self) -> torch.Tensor:
        """[B, max(counts)] the target's argmax at every node, row b's at [b, i] (padding past its nodes)."""
        return self.logits[:, : max(self.counts)].argmax(dim=-1)[self.index]

    def path_hidden(self, paths: torch.Tensor) -> torch.Tensor:
        """paths: [B, m] node indices per row -> the hidden there [B, m, H] (one gather, a copy)."""
        return self.hidden[self.index[:, None], paths]


class Runtime(Protocol):
    """Where the loops' forwards run. L: prompt positions; N: tree nodes; H: hidden size; V: vocabulary."""

    target: Target

    def prefill(self, prompt: EmbeddedPrompt, extra_slots: int) -> tuple[Sequence, torch.Tensor, torch.Tensor]:
        """Start a generation over the prompt: its sequence, the target's hidden [L, H] (after the final
        norm) and logits [L', V] whose last row is the last position's (L' = L eagerly; a `StaticEngine` computes
        that row alone, L' = 1). extra_slots: positions it may add after the prompt (new tokens, one tree)."""
        ...

    def forward_next(self, sequence: Sequence, token: torch.Tensor) -> torch.Tensor:
        """Plain decoding's step: feed token [1] after the committed positions and commit it -> logits [1, V]."""
        ...

    def prefill_draft(
        self, sequence: Sequence, prompt: EmbeddedPrompt, hidden: torch.Tensor, token: int, track_visual: bool
    ) -> DraftRows:
        """Start the draft's side over the prompt (hidden: the target's [L, H]; token: the first one chosen)
        -> the root's draft output [H] and its visual intensity [] (None untracked; `Drafter`)."""
        ...

    def draft_tree(self, sequence: Sequence, tree: TreeSpec, token: int, root: DraftRows) -> tuple[Tree, torch.Tensor]:
        """The step's tree grown as `tree` says under `token` (the last committed token, not yet fed to
        the target) from the draft output `root`, and its ancestor mask [N, N] (`Tree.ancestor_mask`)."""
        ...

    def verify(self, sequence: Sequence, tree: Tree, ancestors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One target forward over the tree after the committed positions: hidden [N, H], logits [N, V]."""
        ...

    def commit(
        self, sequence: Sequence, path: torch.Tensor, next_tokens: torch.Tensor, path_hidden: torch.Tensor
    ) -> DraftRows:
        """Keep only the accepted nodes of the verified tree in the target's cache, commit them and
        advance the draft over them -> the new root's draft output [H] and visual intensity [].
        path: [a + 1] node indices, root first; next_tokens: [a + 1] the committed tokens that follow
        them (the accepted tokens, then the bonus); path_hidden: [a + 1, H] the target's hidden there."""
        ...

    def release(self, sequence: Sequence) -> None:
        """The generation is over: free what it holds (a runtime with a cache row per sequence gives its
        row back). Every caller that starts a sequence releases it, however the generation ends."""
        ...


@runtime_checkable
class BatchedRuntime(Runtime, Protocol):
    """A `Runtime` that also steps many live sequences at once (the module docstring says how a batch
    changes between calls). B: sequences in the call; N_b: row b's tree nodes."""

    max_batch: int | None  # the most sequences it can hold live at once; None: no limit but memory

    def prefill_batch(
        self, prompts: list[EmbeddedPrompt], extra_slots: list[int]
    ) -> list[tuple[Sequence, torch.Tensor, torch.Tensor]]:
        """`Runtime.prefill` for several prompts joining at once, which a runtime may run as one forward:
        per prompt its sequence, the target's hidden [L_b, H] and the logits at its last position [V]
        (what choosing the first token needs). The hidden states stay valid while the sequence is live (the
        batched loop starts a row's draft from them later, `prefill_draft`). A prompt that cannot start
        raises `PrefillError` naming its place in `prompts`; then none of them has started."""
        ...

    def forward_next_batch(self, sequences: list[Sequence], tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain decoding's step for B sequences in one forward: feed tokens [B] (row b after sequence b's
        committed positions) and commit them -> the target's hidden [B, H] and logits [B, V] there."""
        ...

    def draft_trees(
        self, sequences: list[Sequence], specs: list[TreeSpec], tokens: list[int], roots: list[DraftRows]
    ) -> list[tuple[Tree, torch.Tensor]]:
        """Each sequence's tree, grown as its spec says under its last committed token from its root
        (`Runtime.draft_tree` per row: the same trees, which a runtime may grow all at once, one draft
        forward per level: `lmms_msd.speculative.tree.grow_trees`), and its ancestor mask [N_b, N_b]."""
        ...

    def verify_batch(
        self, sequences: list[Sequence], trees: list[Tree], ancestors: list[torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One target forward over every row's tree after that row's committed positions -> per row
        hidden [N_b, H] and logits [N_b, V] (`Runtime.verify`): `verify_trees` over `pad_trees`, row by row."""
        ...

    def verify_trees(self, sequences: list[Sequence], trees: PaddedTrees) -> TreeOutputs:
        """`verify_batch` over trees already padded (`lmms_msd.speculative.verify.pad_trees`), its outputs
        left as the forward laid them out, so that batched acceptance reads them without a copy per row."""
        ...

    def keep_batch(self, sequences: list[Sequence], paths: list[torch.Tensor]) -> None:
        """`Runtime.commit`'s target side for every row: keep only the accepted nodes of its verified tree
        (paths[b]: [a_b + 1] node indices, root first) and commit them. The draft side stays where it
        was until `advance_batch`, which may come steps later (a row taking plain steps drafts nothing)."""
        ...

    def advance_batch(
        self, sequences: list[Sequence], next_tokens: list[torch.Tensor], hidden: list[torch.Tensor]
    ) -> list[DraftRows]:
        """`Runtime.commit`'s draft side for every row: advance its draft over the m_b target positions
        committed since its last advance -> its new root. next_tokens[b]: [m_b] the committed tokens that
        follow those positions; hidden[b]: [m_b, H] the target's hidden states there."""
        ...



class PrefillError(ValueError):
    """`BatchedRuntime.prefill_batch`: the prompt at `position` of the call cannot start (the message says why)."""

    def __init__(self, position: int, message: str) -> None:
        super().__init__(message)
        self.position = position


def require_draft(draft: MSDDraft | None, runtime: object) -> MSDDraft:
    """The runtime's draft, or an error saying speculative decoding needs one."""
    if draft is None:
        raise ValueError(f"speculative decoding needs a draft; this {type(runtime).__name__} was built without one")
    return draft


def drafter_of(sequence: Sequence) -> Drafter:
    """The sequence's drafter, once `prefill_draft` has made it."""
    assert sequence.drafter is not None, "prefill_draft starts a sequence's draft side; call it before draft_tree or commit"
    return sequence.drafter


def pad_and_verify(
    runtime: BatchedRuntime, sequences: list[Sequence], trees: list[Tree], ancestors: list[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`BatchedRuntime.verify_batch` as every runtime runs it: the trees padded side by side (`pad_trees`),
    one `verify_trees`, its outputs split row by row."""
    assert len(sequences) == len(trees) == len(ancestors), "one tree and ancestor mask per sequence"
    return runtime.verify_trees(sequences, pad_trees(trees, ancestors)).rows()


@dataclass(eq=False, kw_only=True)
class EagerSequence(Sequence):
    """A sequence on `EagerRuntime`: it owns its caches."""

    cache: Any  # transformers' DynamicCache: the committed positions (and one tree, from verify to commit)
    capacity: int  # positions the generation may fill: the draft's cache starts this large (it grows if needed)


class EagerRuntime:
    """transformers' forward over a `DynamicCache` per sequence, and the eager `Drafter`: the reference
    runtime, a `BatchedRuntime`. Any number of sequences may be in flight; each owns its caches.

    A batched call gathers the rows' caches into one padded batch cache, runs one forward and puts each
    row's new positions back into its own cache (`_forward_rows`): clear rather than fast, as a
    reference should be (the caches are copied row by row; the new positions and masks are padded
    as the static engine pads them, `pad_trees`). Drafting is batched too: every tree level of all rows is one draft forward
(`grow_trees`), and so is the draft's advance of all rows (`advance_rows`); each row keeps its own
`Drafter`, whose caches are packed side by side for the call (`lmms_msd.speculative.drafting.run_packed`).
    """

    max_batch = None

    def __init__(self, target: Target, draft: MSDDraft | None = None) -> None:
        self.target = target
        self.draft = draft  # None: plain decoding only

    def prefill(self, prompt: EmbeddedPrompt, extra_slots: int) -> tuple[EagerSequence, torch.Tensor, torch.Tensor]:
        length = prompt.input_ids.shape[0]
        sequence = EagerSequence(committed=length, cache=self.target.new_cache(), capacity=length + extra_slots)
        positions = torch.arange(length, device=self.target.device)
        hidden, logits = self.target.forward(prompt.inputs_embeds, sequence.cache, positions)
        return sequence, hidden, logits

    def forward_next(self, sequence: EagerSequence, token: torch.Tensor) -> torch.Tensor:
        positions = torch.full((1,), sequence.committed, device=self.target.device)
        logits = self.target.forward(self.target.embed_tokens(token), sequence.cache, positions)[1]
        sequence.committed += 1
        return logits

    def prefill_draft(
        self, sequence: EagerSequence, prompt: EmbeddedPrompt, hidden: torch.Tensor, token: int, track_visual: bool
    ) -> DraftRows:
        draft = require_draft(self.draft, self)
        sequence.drafter = Drafter(draft, self.target.lm_head, capacity=sequence.capacity, track_visual=track_visual)
        return sequence.drafter.prefill(prompt, hidden, token)

    def draft_tree(self, sequence: EagerSequence, tree: TreeSpec, token: int, root: DraftRows) -> tuple[Tree, torch.Tensor]:
        drafted = grow_tree(drafter_of(sequence), tree, token, root.hidden, root.visual)
        return drafted, drafted.ancestor_mask(tree.max_depth)

    def verify(self, sequence: EagerSequence, tree: Tree, ancestors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prefix_len = sequence.committed
        assert sequence.cache.get_seq_length() == prefix_len, f"cache holds {sequence.cache.get_seq_length()}, not {prefix_len}"
        mask = tree_attention_mask(ancestors, prefix_len, self.target.dtype)
        return self.target.forward(self.target.embed_tokens(tree.tokens), sequence.cache, prefix_len + tree.depths, mask)

    def commit(
        self, sequence: EagerSequence, path: torch.Tensor, next_tokens: torch.Tensor, path_hidden: torch.Tensor
    ) -> DraftRows:
        keep_path(sequence.cache, sequence.committed, path)
        sequence.committed += path.shape[0]
        return drafter_of(sequence).advance(next_tokens, path_hidden)

    # ---- many sequences at once (BatchedRuntime) -------------------------------------------------------
    def prefill_batch(
        self, prompts: list[EmbeddedPrompt], extra_slots: list[int]
    ) -> list[tuple[EagerSequence, torch.Tensor, torch.Tensor]]:
        """One prompt at a time (each sequence owns its cache; the reference keeps it plain)."""
        started = []
        for position, (prompt, extra) in enumerate(zip(prompts, extra_slots, strict=True)):
            try:
                sequence, hidden, logits = self.prefill(prompt, extra)
            except ValueError as error:
                raise PrefillError(position, str(error)) from error
            started.append((sequence, hidden, logits[-1]))
        return started

    def forward_next_batch(self, sequences: list[EagerSequence], tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert tokens.shape == (len(sequences),), f"tokens {tuple(tokens.shape)} for {len(sequences)} sequences"
        embeds = self.target.embed_tokens(tokens)[0][:, None]  # [B, 1, H]
        device = self.target.device
        positions = torch.tensor([s.committed for s in sequences], device=device)[:, None]
        itself = torch.ones(len(sequences), 1, 1, dtype=torch.bool, device=device)
        hidden, logits = self._forward_rows(sequences, embeds, positions, itself, [1] * len(sequences))
        for sequence in sequences:
            sequence.committed += 1
        return hidden[:, 0], logits[:, 0]

    def draft_trees(
        self, sequences: list[EagerSequence], specs: list[TreeSpec], tokens: list[int], roots: list[DraftRows]
    ) -> list[tuple[Tree, torch.Tensor]]:
        assert len(sequences) == len(specs) == len(tokens) == len(roots), "one spec, token and root per sequence"
        drafters = [drafter_of(s) for s in sequences]
        trees = grow_trees(drafters, specs, tokens, [r.hidden for r in roots], [r.visual for r in roots])
        return [(tree, tree.ancestor_mask(spec.max_depth)) for tree, spec in zip(trees, specs)]

    def verify_batch(
        self, sequences: list[EagerSequence], trees: list[Tree], ancestors: list[torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return pad_and_verify(self, sequences, trees, ancestors)

    def verify_trees(self, sequences: list[EagerSequence], trees: PaddedTrees) -> TreeOutputs:
        assert len(sequences) == len(trees.counts), f"{len(trees.counts)} trees for {len(sequences)} sequences"
        device = self.target.device
        committed = torch.tensor([s.committed for s in sequences], device=device)
        positions = torch.where(trees.valid, committed[:, None] + trees.depths, 0)  # padding at 0: seen by no one
        embeds = self.target.embed_tokens(trees.tokens.flatten())[0].view(*trees.tokens.shape, -1)
        hidden, logits = self._forward_rows(sequences, embeds, positions, trees.ancestors, trees.counts)
        index = torch.arange(len(sequences), device=device)
        return TreeOutputs(hidden, logits, list(range(len(sequences))), index, trees.counts)

    def keep_batch(self, sequences: list[EagerSequence], paths: list[torch.Tensor]) -> None:
        for sequence, path in zip(sequences, paths, strict=True):
            keep_path(sequence.cache, sequence.committed, path)
            sequence.committed += path.shape[0]

    def advance_batch(
        self, sequences: list[EagerSequence], next_tokens: list[torch.Tensor], hidden: list[torch.Tensor]
    ) -> list[DraftRows]:
        assert len(sequences) == len(next_tokens) == len(hidden), "one token run and hidden run per sequence"
        return advance_rows([drafter_of(s) for s in sequences], next_tokens, hidden)

    def release(self, sequence: EagerSequence) -> None:
        """Nothing to give back: the sequence's caches go with it."""

    def _forward_rows(
        self, sequences: list[EagerSequence], embeds: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor,
        counts: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """One forward over counts[b] = n_b new positions per row, after each row's committed positions.

        embeds: [B, n, H], row b's new positions first (n = max n_b); positions: [B, n] RoPE positions;
        visible: [B, n, n] bool, which of the row's new positions each one sees (a tree's ancestor mask;
        [[True]] for one token; False past n_b).
        Layout of the batch (P_b committed, P = max P_b): slots 0..P_b-1 of row b hold its cache, slots
        P..P+n_b-1 its new positions; the rest is padding, which no real query sees.
        Example: P_0 = 3, P_1 = 5, n_0 = 2, n_1 = 1: row 0 = [c c c _ _ | x x], row 1 = [c c c c c | x _].
        Each row's cache gets its new positions appended (P_b + n_b positions afterwards).
        returns hidden [B, n, H] and logits [B, n, V], row b's first n_b valid
        """
        device, dtype = self.target.device, self.target.dtype
        rows, width = embeds.shape[:2]
        assert positions.shape == (rows, width) and visible.shape == (rows, width, width) and len(counts) == rows, (
            f"embeds {tuple(embeds.shape)}, positions {tuple(positions.shape)}, visible {tuple(visible.shape)}, {len(counts)} counts"
        )
        lengths = [s.committed for s in sequences]
        for s in sequences:
            assert s.cache.get_seq_length() == s.committed, f"cache holds {s.cache.get_seq_length()}, not {s.committed}"
        prefix = max(lengths)
        batch_cache = self.target.new_cache()
        for index, layer in enumerate(sequences[0].cache.layers):
            keys = layer.keys.new_zeros(rows, layer.keys.shape[1], prefix, layer.keys.shape[3])
            values = torch.zeros_like(keys)
            for b, s in enumerate(sequences):
                keys[b, :, : lengths[b]] = s.cache.layers[index].keys[0]
                values[b, :, : lengths[b]] = s.cache.layers[index].values[0]
            batch_cache.update(keys, values, index)
        sizes = torch.tensor([lengths, counts], device=device)  # [2, B]: committed and new positions per row
        slots = torch.arange(prefix + width, device=device)
        # a row's real queries see its committed slots, and its new positions as `visible` says
        seen = (slots[None, None, :] < sizes[0][:, None, None]) & (slots[None, :width, None] < sizes[1][:, None, None])
        seen[:, :, prefix:] = visible
        seen[:, :, 0] = True  # padding queries see one slot (a row of only masked slots is undefined)
        mask = torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill(~seen, torch.finfo(dtype).min)
        hidden, logits = self.target.forward_batch(embeds, batch_cache, positions, mask[:, None])
        for index, layer in enumerate(batch_cache.layers):
            for b, s in enumerate(sequences):
                own = s.cache.layers[index]
                new = slice(prefix, prefix + counts[b])
                own.keys = torch.cat([own.keys, layer.keys[b : b + 1, :, new]], dim=-2)
                own.values = torch.cat([own.values, layer.values[b : b + 1, :, new]], dim=-2)
        return hidden, logits


def keep_path(cache: Any, prefix_len: int, path: torch.Tensor) -> None:
    """Drop the tree from a transformers cache except the nodes on `path`.

    The cache holds [prefix | tree nodes]; afterwards it holds [prefix | path nodes] in path order.
    Example: prefix_len 5, tree of 4 nodes (slots 5..8), path [0, 2] -> keep slots 0..4, 5, 7.
    path: [a + 1] tree node indices, root first
    """
    assert path.dim() == 1, f"path must be [a + 1], got {tuple(path.shape)}"
    keep = prefix_len + path.to(torch.long)
    for layer in cache.layers:
        layer.keys = torch.cat([layer.keys[..., :prefix_len, :], layer.keys[..., keep, :]], dim=-2)
        layer.values = torch.cat([layer.values[..., :prefix_len, :], layer.values[..., keep, :]], dim=-2)
