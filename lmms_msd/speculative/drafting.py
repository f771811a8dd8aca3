"""The draft's side of one generation: its cache, its committed prefix, and the tree being drafted.

Positions and slots (worked example). The target has committed positions 0..P-1 and the root token
x_P (committed, not yet fed to the target). The draft's slot t (RoPE position t) holds the input
fc([embed(x_{t+1}); f_t]) for t = 0..P-1, or, where the target read an image feature at t + 1, that
feature (MSD's shifted frame, `prefill_inputs`), so its last output already predicts the root's children.
A tree node at depth d (root = 0) is fed at RoPE position P - 1 + d, written to the first free slot
after the prefix; after verification the committed inputs overwrite those slots, so tree slots need
no rollback. With P = 10 and a first tree level of k = 3 nodes: slots 10, 11, 12 at position 10;
their chosen children next go to slots 13.. at position 11.

Visual attention intensity (`track_visual=True`): the share of a query row's attention mass, in the
draft layer, that falls on image slots, averaged over heads. The image slots are the slots where the
draft is fed image features: in MSD's shifted frame (`prefill_inputs`) that is one slot before each
image position of the target (`draft_image_slots`); every later slot is text. The intensity that
belongs with a node is the one of the query row whose output *produced the node's distribution*,
i.e. the row whose logits gave the node its draft probability: the row that fed the node's parent.
The node's own row (the one that feeds its token) is computed only if the node is expanded, and it
produces the distribution of the node's children, not its own. Worked example, P = 10 committed
slots 0..9, the target's image at positions 2..7, so the draft's image slots are 1..6:

    row (slot 9, last committed)   output -> logits of the root's children (depth 1)
                                   so every depth-1 node gets the visual intensity of row 9
    row (slot 10, depth-1 node a)  input fc([embed(a); h9]), output -> logits of a's children
                                   so every child of a (depth 2) gets the intensity of row 10

Many sequences at once. A drafter has a cache of its own (it grows as needed), or drafts on a row of a
`SharedDraftCache` (keys and values [rows, kv_heads, capacity, D] per layer; row r holds one sequence,
in the slots and positions above, and its last slot is scratch). `expand_rows` and `advance_rows` run
many drafters' calls as one head forward: drafters on distinct rows of one shared cache write and read
their rows in place (`run_shared`: input row r is cache row r; places and rows with nothing to feed
are padding that writes the scratch slot); drafters with caches of their own are copied side by side
into one packed cache and back (`run_packed`, as `EagerRuntime` does). Worked example: rows 0 and 2 of
a shared cache, P = 10 and 6 committed slots, expand 3 nodes each at depth 1: one forward over cache
rows 0..2; row 0 writes slots 10..12 at position 10, row 2 slots 6..8 at position 6, row 1 (no tree)
writes its scratch slot only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lmms_msd.models.draft import DraftLayerCache, MSDDraft
from lmms_msd.models.target import EmbeddedPrompt
from lmms_msd.speculative.transfer import to_device_each


class DraftRows(NamedTuple):
    """The draft's output at the rows one call fed."""

    hidden: torch.Tensor  # [n, H] (prefill / advance: [H], the last committed row only)
    visual: torch.Tensor | None  # [n] float32 (prefill / advance: [] ) visual attention intensity; None untracked


class Block(NamedTuple):
    """One call's rows for the head, in one drafter's own slots: `Drafter._run`'s arguments."""

    x: torch.Tensor  # [T, H] layer inputs
    positions: torch.Tensor  # [T] RoPE positions
    slots: torch.Tensor  # [T] cache slots written
    visible: torch.Tensor  # [T, S] bool over the drafter's slots 0..S-1


class Drafter:
    """Runs the MSD head against one target's hidden states, step after step.

    track_visual: also measure each row's attention mass on image positions (module docstring).
    shared, row: draft on row `row` of a `SharedDraftCache` (its capacity; the cache then never grows)
    instead of a cache of its own; many such drafters advance and grow trees in one head forward
    (`expand_rows`, `advance_rows`), each writing its own row in place.
    """

    def __init__(
        self, draft: MSDDraft, lm_head: torch.nn.Linear, capacity: int, track_visual: bool = False,
        shared: SharedDraftCache | None = None, row: int = 0,
    ) -> None:  # fmt: skip
        self.draft = draft
        self.lm_head = lm_head
        self.shared, self.row = shared, row
        self.committed = 0  # P: slots holding committed inputs
        self.tree_used = 0  # slots after P taken by the current tree
        self.track_visual = track_visual
        if shared is None:
            self.cache = draft.new_cache(capacity)
            # [capacity] bool: True at slots fed image features (prompt slots only; see draft_image_slots)
            self.image_slots = torch.zeros(capacity, dtype=torch.bool, device=self.device) if track_visual else None
            return
        if shared.draft is not draft or shared.capacity != capacity or not 0 <= row < shared.rows:
            raise ValueError(
                f"row {row} of a shared draft cache of {shared.rows} rows x {shared.capacity} slots does not fit a drafter "
                f"of {capacity} slots (or the cache belongs to another head)"
            )
        self.cache = [DraftLayerCache.of_row(layer_cache, row) for layer_cache in shared.cache]
        self.image_slots = shared.image_slots[row] if track_visual else None  # a view of the shared row

    @property
    def device(self) -> torch.device:
        return self.draft.fc.weight.device

    def reserve(self, slots: int) -> None:
        """Make the cache hold at least `slots` slots (it grows; on a shared cache, and in `StaticDrafter`,
        it is checked instead)."""
        if self.shared is not None:
            if slots > self.shared.scratch:
                raise ValueError(
                    f"the draft needs {slots} cache slots but a row of the shared cache holds {self.shared.scratch}; "
                    "raise max_length"
                )
            return
        for layer_cache in self.cache:
            layer_cache.reserve(slots)
        if self.image_slots is not None and self.image_slots.shape[0] < self.cache[0].capacity:
            pad = self.image_slots.new_zeros(self.cache[0].capacity - self.image_slots.shape[0])
            self.image_slots = torch.cat([self.image_slots, pad])

    def _causal_block(self, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slots, positions and visibility for m new committed inputs appended after the prefix."""
        p = self.committed
        slots = torch.arange(p, p + m, device=self.device)
        visible = torch.ones(m, p + m, dtype=torch.bool, device=self.device)
        visible[:, p:] = torch.ones(m, m, dtype=torch.bool, device=self.device).tril()
        return slots, slots.clone(), visible

    def _run(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, visible: torch.Tensor) -> DraftRows:
        """x: [T, H] -> the head's output at those rows [T, H] and their visual intensity [T] or None."""
        if not self.track_visual:
            return DraftRows(self.draft(x[None], positions, self.cache, slots, visible)[0], None)
        image_slots = self.image_slots[: visible.shape[1]]
        hidden, visual = self.draft.forward_with_visual(x[None], positions, self.cache, slots, visible, image_slots)
        return DraftRows(hidden[0], visual)

    @torch.inference_mode()
    def prefill(self, prompt: EmbeddedPrompt, target_hidden: torch.Tensor, first_token: int) -> DraftRows:
        """Fill the draft cache over the prompt; return the root's hidden state [H] and visual intensity [].

        target_hidden: [L, H], the target's last hidden states over the prompt
        first_token: the token the target chose after the prompt (the first root)
        """
        assert self.committed == 0, "prefill starts a generation; this Drafter already holds one"
        if self.track_visual:
            length = prompt.image_mask.shape[0]
            self.reserve(length)
            self.image_slots[:length] = draft_image_slots(prompt.image_mask).to(self.device)
        return self._append(prefill_inputs(self.draft, prompt, target_hidden, first_token))

    @torch.inference_mode()
    def advance(self, next_tokens: torch.Tensor, target_hidden: torch.Tensor) -> DraftRows:
        """Commit m target positions (the root and the accepted nodes); return the new root's hidden [H]
        and visual intensity [].

        next_tokens: [m] the committed tokens that follow those positions (accepted tokens, then the bonus)
        target_hidden: [m, H] the target's hidden states at those positions
        """
        assert next_tokens.dim() == 1 and target_hidden.shape[0] == next_tokens.shape[0], (
            f"next_tokens {tuple(next_tokens.shape)} vs target_hidden {tuple(target_hidden.shape)}"
        )
        x = self.draft.fuse(self.draft.embed_tokens(next_tokens)[None], target_hidden[None])[0]
        return self._append(x)

    def _append(self, x: torch.Tensor) -> DraftRows:
        return self._appended(self._run(*self._append_block(x)))

    def _append_block(self, x: torch.Tensor) -> Block:
        """The block that appends m committed inputs x [m, H] after the prefix."""
        m = x.shape[0]
        self.reserve(self.committed + m)
        slots, positions, visible = self._causal_block(m)
        return Block(x, positions, slots, visible)

    def _appended(self, rows: DraftRows) -> DraftRows:
        """Record an appended block as committed -> the new root's hidden [H] and visual intensity []."""
        self.committed += rows.hidden.shape[0]
        self.tree_used = 0
        return DraftRows(rows.hidden[-1], None if rows.visual is None else rows.visual[-1])

    @torch.inference_mode()
    def expand(self, tokens: torch.Tensor, parent_hidden: torch.Tensor, depth: int, ancestors: torch.Tensor) -> DraftRows:
        """Feed n tree nodes of one depth; return their output hidden states [n, H] and visual intensities [n].

        tokens: [n] the nodes' tokens; parent_hidden: [n, H] the draft output at each node's parent
        depth: the nodes' depth (>= 1)
        ancestors: [n, tree_used] bool, which earlier tree slots are each node's ancestors
        """
        x = self.draft.fuse(self.draft.embed_tokens(tokens)[None], parent_hidden[None])[0]
        rows = self._run(*self._tree_block(x, depth, ancestors))
        self.tree_used += tokens.shape[0]
        return rows

    def _tree_block(self, x: torch.Tensor, depth: int, ancestors: torch.Tensor) -> Block:
        """The block that feeds n tree nodes of one depth (`expand`); x: [n, H] their layer inputs."""
        n = x.shape[0]
        assert ancestors.shape == (n, self.tree_used), (
            f"{n} nodes, ancestors {tuple(ancestors.shape)} with {self.tree_used} tree slots used"
        )
        p, used = self.committed, self.tree_used
        self.reserve(p + used + n)
        slots = torch.arange(p + used, p + used + n, device=self.device)
        positions = torch.full((n,), p - 1 + depth, device=self.device)
        visible = torch.cat(
            [
                torch.ones(n, p, dtype=torch.bool, device=self.device),
                ancestors,
                torch.eye(n, dtype=torch.bool, device=self.device),
            ],
            dim=1,
        )
        return Block(x, positions, slots, visible)

    @torch.inference_mode()
    def logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, H] -> draft log-probabilities [n, V] (float32) through the target's lm_head."""
        return draft_logprobs(self.lm_head, hidden)


def draft_logprobs(lm_head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """hidden: [..., H] draft outputs -> log-probabilities [..., V] (float32) through the target's lm_head."""
    return torch.log_softmax(lm_head(hidden.to(lm_head.weight.dtype)).float(), dim=-1)


@torch.inference_mode()
def expand_rows(
    drafters: list[Drafter], tokens: list[torch.Tensor], parent_hidden: list[torch.Tensor], depth: int,
    ancestors: list[torch.Tensor],
) -> list[DraftRows]:  # fmt: skip
    """`Drafter.expand` for many drafters (one tree each) in one head forward: drafters on rows of one
    `SharedDraftCache` run on it in place (`run_shared`), others are packed (`run_packed`); one drafter
    runs its own `expand`. Row b: tokens [n_b], parent_hidden [n_b, H], ancestors [n_b, tree_used_b]
    -> its output hidden states [n_b, H] and visual intensities [n_b]."""
    if len(drafters) == 1:
        return [drafters[0].expand(tokens[0], parent_hidden[0], depth, ancestors[0])]
    draft = drafters[0].draft
    counts = [t.shape[0] for t in tokens]
    x = draft.fuse(draft.embed_tokens(torch.cat(tokens))[None], torch.cat(parent_hidden)[None])[0]  # [N, H]
    if on_one_shared_cache(drafters):
        rows = run_shared(drafters, x, counts, *shared_tree_block(drafters, counts, depth, ancestors))
    else:
        blocks = [d._tree_block(x_b, depth, a) for d, x_b, a in zip(drafters, x.split(counts), ancestors, strict=True)]
        rows = run_packed(drafters, blocks)
    for drafter, n in zip(drafters, counts):
        drafter.tree_used += n
    return rows


@torch.inference_mode()
def advance_rows(drafters: list[Drafter], next_tokens: list[torch.Tensor], target_hidden: list[torch.Tensor]) -> list[DraftRows]:
    """`Drafter.advance` for many drafters in one head forward (`run_shared` on one `SharedDraftCache`,
    else `run_packed`); one drafter runs its own `advance`. Row b: next_tokens [m_b], target_hidden
    [m_b, H] -> its new root's hidden [H] and visual []."""
    if len(drafters) == 1:
        return [drafters[0].advance(next_tokens[0], target_hidden[0])]
    draft = drafters[0].draft
    counts = [t.shape[0] for t in next_tokens]
    x = draft.fuse(draft.embed_tokens(torch.cat(next_tokens))[None], torch.cat(target_hidden)[None])[0]  # [N, H]
    if on_one_shared_cache(drafters):
        rows = run_shared(drafters, x, counts, *shared_append_block(drafters, counts))
    else:
        rows = run_packed(drafters, [d._append_block(x_b) for d, x_b in zip(drafters, x.split(counts), strict=True)])
    return [drafter._appended(out) for drafter, out in zip(drafters, rows)]


class SharedDraftCache:
    """One draft cache with a row per sequence: per layer keys and values [rows, kv_heads, capacity, D]
    (`MSDDraft.new_cache`), and the rows' image slots [rows, capacity] bool. A `Drafter` made with
    `shared=this, row=r` reads and writes row r only, so many rows' head forwards run as one over the
    tensors themselves (`run_shared`): nothing is packed or copied. The last slot of every row is
    scratch: padding inputs write it and no row ever sees it, so drafters use slots 0..capacity-2.
    Memory: 2 * layers * rows * kv_heads * capacity * head_dim values of the head's dtype.
    """

    def __init__(self, draft: MSDDraft, rows: int, capacity: int) -> None:
        if rows < 1 or capacity < 2:
            raise ValueError(f"a shared draft cache needs rows >= 1 and capacity >= 2 (one slot is scratch), got {rows}, {capacity}")
        self.draft, self.rows, self.capacity = draft, rows, capacity
        self.scratch = capacity - 1
        self.cache = draft.new_cache(capacity, rows)
        self.image_slots = torch.zeros(rows, capacity, dtype=torch.bool, device=draft.fc.weight.device)


def on_one_shared_cache(drafters: list[Drafter]) -> bool:
    """Whether every drafter drafts on its own row of one `SharedDraftCache`."""
    shared = drafters[0].shared
    rows = [d.row for d in drafters]
    return shared is not None and all(d.shared is shared for d in drafters) and len(set(rows)) == len(rows)


def shared_tree_block(
    drafters: list[Drafter], counts: list[int], depth: int, ancestors: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`Drafter._tree_block` of every drafter as [B, T] positions and slots and [B, T, S] visibility
    (T = max n_b; S = max P_b + u_b + n_b), padding places set as `run_shared` says; built in a few
    tensor operations for all rows. Drafter b (P_b committed, u_b tree slots used) feeds its n_b nodes
    at slots P_b + u_b + j, position P_b - 1 + depth, each seeing the prefix, its ancestors and itself.
    """
    device, b, t = drafters[0].device, len(drafters), max(counts)
    used = [d.tree_used for d in drafters]
    for drafter, n, a in zip(drafters, counts, ancestors, strict=True):
        assert a.shape == (n, drafter.tree_used), f"{n} nodes, ancestors {tuple(a.shape)} with {drafter.tree_used} tree slots used"
        drafter.reserve(drafter.committed + drafter.tree_used + n)
    u = max(used)
    if len({a.shape for a in ancestors}) == 1:
        stacked = torch.stack(ancestors)  # [B, T, u]
    else:
        stacked = torch.zeros(b, t, u, dtype=torch.bool, device=device)
        for row, a in enumerate(ancestors):
            stacked[row, : a.shape[0], : a.shape[1]] = a
    prefix, fed = to_device_each(device, [d.committed for d in drafters], used)  # [B] each
    width = max(d.committed + d.tree_used + n for d, n in zip(drafters, counts))
    col, place = torch.arange(width, device=device), torch.arange(t, device=device)
    rel = col[None] - prefix[:, None]  # [B, S]: slot relative to the tree's first
    if u:
        seen = stacked.gather(2, rel.clamp(0, u - 1)[:, None].expand(b, t, width)) & ((rel >= 0) & (rel < fed[:, None]))[:, None]
    else:
        seen = torch.zeros(b, t, width, dtype=torch.bool, device=device)
    own = rel[:, None, :] == (fed[:, None] + place[None])[:, :, None]  # [B, T, S]
    visible = (col[None] < prefix[:, None])[:, None] | seen | own
    slots = (prefix + fed)[:, None] + place[None]
    positions = (prefix - 1 + depth)[:, None].expand(b, t)
    return positions, slots, visible


def shared_append_block(drafters: list[Drafter], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`Drafter._append_block` of every drafter as [B, T] positions and slots and [B, T, S] visibility
    (T = max m_b; S = max P_b + m_b): drafter b's m_b committed inputs at slots and positions P_b + j,
    causal over its prefix. Padding places as `run_shared` says."""
    device, t = drafters[0].device, max(counts)
    for drafter, m in zip(drafters, counts):
        drafter.reserve(drafter.committed + m)
    (prefix,) = to_device_each(device, [d.committed for d in drafters])
    width = max(d.committed + m for d, m in zip(drafters, counts))
    slots = prefix[:, None] + torch.arange(t, device=device)[None]  # [B, T]
    visible = torch.arange(width, device=device)[None, None] <= slots[:, :, None]
    return slots, slots.clone(), visible


def run_shared(
    drafters: list[Drafter], x: torch.Tensor, counts: list[int], positions: torch.Tensor, slots: torch.Tensor,
    visible: torch.Tensor,
) -> list[DraftRows]:  # fmt: skip
    """One head forward over drafters on distinct rows of one `SharedDraftCache`, in place.

    x: [N, H], drafter b's n_b = counts[b] inputs after drafter b-1's; positions, slots [B, T] and
    visible [B, T, S] bool: drafter b's, in its own row's slots (T >= every n_b; places j >= n_b are
    padding, whatever they hold). The head runs over cache rows 0..R-1, R = 1 + the highest row taking
    part: drafter b's inputs are input row `row_b`; padding places and rows that take no part (free
    rows, or trees that stopped growing) feed zeros at position 0, write the row's scratch slot and
    see slot 0 only, so no committed or tree slot of any row changes but those the drafters write.
    Example: drafters on rows 0 and 2 feeding 2 and 1 inputs: R = 3, T = 2; row 1 and row 2's second
    place are padding. Visual intensities are measured when any drafter tracks them and returned to those
    that do. -> per drafter, its rows' hidden [n_b, H] and visual [n_b] (None untracked)
    """
    shared = drafters[0].shared
    device, b, t = drafters[0].device, len(drafters), positions.shape[1]
    rows = [d.row for d in drafters]
    r, width, total = max(rows) + 1, visible.shape[2], x.shape[0]
    assert sum(counts) == total and max(counts) <= t, f"{total} inputs as {counts} in {t} places"
    # where each input goes: input row, place
    index, repeats = to_device_each(device, rows, counts)  # [B] each
    owner = torch.repeat_interleave(torch.arange(b, device=device), repeats, output_size=total)  # [N]
    place = torch.arange(total, device=device) - (repeats.cumsum(0) - repeats)[owner]  # [N]
    input_row = index[owner]  # [N]
    real = torch.zeros(r, t, dtype=torch.bool, device=device)
    real[input_row, place] = True
    padded_x = x.new_zeros(r, t, x.shape[1])
    padded_x[input_row, place] = x
    padded_positions = positions.new_zeros(r, t)
    padded_positions[index] = positions
    padded_slots = torch.full((r, t), shared.scratch, dtype=torch.long, device=device)
    padded_slots[index] = slots
    padded_visible = torch.zeros(r, t, width, dtype=torch.bool, device=device)
    padded_visible[index] = visible
    padding = ~real
    padded_positions.masked_fill_(padding, 0)
    padded_slots.masked_fill_(padding, shared.scratch)
    padded_visible.masked_fill_(padding[:, :, None], False)
    padded_visible[:, :, 0] |= padding
    draft = shared.draft
    if any(d.track_visual for d in drafters):
        image_slots = shared.image_slots[:r, :width]
        hidden, visual = draft.forward_with_visual(padded_x, padded_positions, shared.cache, padded_slots, padded_visible, image_slots)
        visual = visual[input_row, place].split(counts)
    else:
        hidden, visual = draft(padded_x, padded_positions, shared.cache, padded_slots, padded_visible), [None] * b
    hidden = hidden[input_row, place].split(counts)
    return [DraftRows(h, v if d.track_visual else None) for d, h, v in zip(drafters, hidden, visual)]


class PackedLayerCache(DraftLayerCache):
    """Many drafters' caches of one layer side by side in one tensor (`run_packed`)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values


def run_packed(drafters: list[Drafter], blocks: list[Block]) -> list[DraftRows]:
    """One head forward over every drafter's block: the blocks packed into one sequence.

    Drafter b's slots 0..S_b-1 (S_b: its block's visible width) are copied side by side into one cache
    at offset o_b = S_0 + ... + S_{b-1}; its rows write slot o_b + s for their slot s and see slot
    o_b + s where they see s, nothing of another drafter (a block-diagonal mask). So each row attends
    to exactly what it would alone (its outputs are the same up to the rounding of longer reductions);
    positions are each row's own. The slots written are then copied back into each drafter's cache.
    Example: S = (3, 2), one row each seeing everything: packed visible [[1,1,1,0,0], [0,0,0,1,1]].
    The drafters share one head; visual intensities are measured when any drafter tracks them and
    returned to those that do. Runs eagerly, also for `StaticDrafter`s (whose caches it writes in place).
    -> per drafter, its rows' hidden [T_b, H] and visual [T_b] (None untracked)
    """
    draft = drafters[0].draft
    assert all(d.draft is draft for d in drafters), "packed drafters share one head"
    widths = [block.visible.shape[1] for block in blocks]
    offsets = [sum(widths[:b]) for b in range(len(blocks))]
    device = drafters[0].device
    rows = [block.x.shape[0] for block in blocks]
    visible = torch.zeros(sum(rows), sum(widths), dtype=torch.bool, device=device)
    first = 0  # the block's first packed row
    for block, offset, n, width in zip(blocks, offsets, rows, widths):
        visible[first : first + n, offset : offset + width] = block.visible
        first += n
    slots = torch.cat([block.slots + offset for block, offset in zip(blocks, offsets)])
    positions = torch.cat([block.positions for block in blocks])
    x = torch.cat([block.x for block in blocks])[None]
    cache = [
        PackedLayerCache(
            torch.cat([d.cache[layer].keys[:, :, :w] for d, w in zip(drafters, widths)], dim=2),
            torch.cat([d.cache[layer].values[:, :, :w] for d, w in zip(drafters, widths)], dim=2),
        )
        for layer in range(len(drafters[0].cache))
    ]
    if any(d.track_visual for d in drafters):
        image_slots = torch.cat(
            [d.image_slots[:w] if d.track_visual else torch.zeros(w, dtype=torch.bool, device=device) for d, w in zip(drafters, widths)]
        )
        hidden, visual = draft.forward_with_visual(x, positions, cache, slots, visible, image_slots)
    else:
        hidden, visual = draft(x, positions, cache, slots, visible), None
    for layer, packed in enumerate(cache):
        for d, block, offset in zip(drafters, blocks, offsets):
            d.cache[layer].keys[:, :, block.slots] = packed.keys[:, :, block.slots + offset]
            d.cache[layer].values[:, :, block.slots] = packed.values[:, :, block.slots + offset]
    hidden = hidden[0].split(rows)
    visual = [None] * len(rows) if visual is None else visual.split(rows)
    return [DraftRows(h, v if d.track_visual else None) for d, h, v in zip(drafters, hidden, visual)]


def draft_image_slots(image_mask: torch.Tensor) -> torch.Tensor:
    """The draft slots fed image features: slot t is one iff the target's position t + 1 is an image
    position (`prefill_inputs`). image_mask: [L] bool -> [L] bool

    Example: image_mask [F, F, F, T, T, T, F, F] -> [F, F, T, T, T, F, F, F].
    """
    assert image_mask.dim() == 1, f"image_mask must be [L], got {tuple(image_mask.shape)}"
    return torch.cat([image_mask[1:], image_mask.new_zeros(1)])


def prefill_inputs(draft: MSDDraft, prompt: EmbeddedPrompt, target_hidden: torch.Tensor, first_token: int) -> torch.Tensor:
    """The draft's layer input at every prompt position, in MSD's shifted frame (DESIGN 4.1).

    Rule: the draft's input at position t is built from what the target reads at t + 1 (x_L, after
    the prompt, is the first generated token). When that is an image feature, the input is the feature
    itself (no fc, f_t unused); otherwise it is fc([embed(x_{t+1}); f_t]). So with image features
    I_0..I_{N-1} at the target's positions p..p+N-1, the draft gets I_0..I_{N-1} at p-1..p+N-2 and
    fc([embed(first text token after the image); f_{p+N-1}]) at p+N-1. Worked example, target
    inputs [t0, t1, t2, I0, I1, I2, t6, t7], first generated token r, e(.) the embedding:

        position      0             1             2   3   4   5             6             7
        target input  t0            t1            t2  I0  I1  I2            t6            t7
        draft input   fc(e(t1),f0)  fc(e(t2),f1)  I0  I1  I2  fc(e(t6),f5)  fc(e(t7),f6)  fc(e(r),f7)

    Upstream (Lyn-Lucy/MSD `EAGLE/eagle/model/cnets.py`): `topK_genrate` shifts the target's
    `inputs_embeds` left by one and appends the sampled token (`inputs_embeds = torch.cat((inputs_embeds[:,1:],
    new_embed),dim=1)`) and shifts `input_ids = input_ids[:, 1:]`, so the `-200` placeholder sits at
    p - 1; the `use_msd` branch of `Model.forward` computes `new_hidden_state = self.fc(cat_tensor)`
    over every position and then `new_hidden_state[indice : indice + image_tokens_num[0]] =
    temp_image_tensor` (the shifted image features, indice = p - 1). The `decouple` training branch
    does the same on data shifted the same way in `main_deepspeed.py` (`inputs_embeds_target =
    inputs_embeds[:, 1:, :]`, `input_ids_target = input_ids[:, 1:]`).

    Image at the end of the prompt (p + N = L): position L - 1 = p + N - 1 gets fc([e(r); f_{L-1}]),
    as upstream, whose appended `new_embed` is the first text after the image there.
    Image at the very start (p = 0): I_0 has no slot (there is no position -1) and is not fed; the
    draft gets I_1..I_{N-1} at 0..N-2 and fc([e(x_N); f_{N-1}]) at N-1. Upstream has no such case:
    `tokenizer_image_token` always keeps BOS in front, and a prompt starting with `-200` would lose
    its placeholder to `input_ids[:, 1:]`, leaving `embed_tokens(input_ids)` (the unexpanded ids)
    shorter than `hidden_states` so the `torch.cat` before `self.fc` fails. The rule above is the
    shifted frame with nothing to shift in at position -1.

    target_hidden: [L, H], the target's last hidden states over the prompt -> [L, H]
    """
    length = prompt.input_ids.shape[0]
    assert target_hidden.shape[0] == length, f"target_hidden {tuple(target_hidden.shape)} vs L={length}"
    device = draft.fc.weight.device
    next_is_image = draft_image_slots(prompt.image_mask)  # [L]
    next_ids = torch.cat([prompt.input_ids[1:], torch.tensor([first_token], device=prompt.input_ids.device)])
    next_ids = next_ids.masked_fill(next_is_image, 0).to(device)  # [L]; image ids take the features below
    next_text = draft.embed_tokens(next_ids)  # [L, H]
    image = prompt.inputs_embeds[0, 1:].to(device, next_text.dtype)  # [L-1, H]: what the target read at t + 1
    next_image = torch.cat([image, image.new_zeros(1, image.shape[1])])  # [L, H]; row L-1 is never an image
    fused = draft.fuse(next_text[None], target_hidden[None])[0]  # [L, H]
    return torch.where(next_is_image[:, None].to(device), next_image, fused)
