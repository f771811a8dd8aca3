"""The target's language model over a static KV cache with one row per sequence in flight.

`StaticTarget` holds one generation; `BatchedStaticTarget` holds `rows`: each KV cache tensor is
[layers, rows, kv_heads, capacity, head_dim], row r holding the sequence given row r, written by slot
as in `StaticTarget` (the same weights, packed once, the same RoPE tables and the same arithmetic).

A forward over many sequences runs over cache rows 0..R-1 at once, R the smallest row bucket that
holds every row taken part (`ROW_BUCKETS`; the engine gives out the lowest free row, so R stays
small when few are in flight). Cache rows in that range that take no part are padding: they feed a
dummy token, read slot 0 and write the scratch slot (the last), which no sequence ever uses, so a
row's committed slots are never touched by another row's step. With R, the tokens per row T and the
attention width W all bucketed, each (R, T, W) shape is replayed from one CUDA graph.

Worked example: rows 0 and 2 in flight with 5 and 7 committed slots, one new token each (plain
decoding): R = 4 (bucket of 3), W = 256; row 0 writes slot 5 and sees slots 0..5, row 2 writes slot 7
and sees 0..7; padding rows 1 and 3 write slot capacity - 1 and see slot 0.

A tree verification whose rows are few but spread (the last requests of a run on high rows) runs over
the listed rows alone instead (`forward_trees`): R the bucket of their number, each row's cache read by a
gather, since padding rows cost a tree's tokens each. Example: rows 100 and 3 of 128 in flight, 64-node
trees: R = 2 rows of 64 tokens instead of 128 rows of 64 (on the H200's 7B-shaped testbed, EAGLE-2's
verifications in a 128-request pass at batch 64 took 0.72 s instead of 1.10, `benchmarks/h200_7b_batch_default/`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmms_msd.models.target import Target
from lmms_msd.speculative.fast.graphs import GraphedFunction, bucket, varying_shapes
from lmms_msd.speculative.fast.static_target import TOKEN_BUCKETS, StaticTarget, attention_inputs
from lmms_msd.speculative.transfer import to_device, to_device_each
from lmms_msd.speculative.verify import PaddedTrees


def row_buckets(rows: int) -> tuple[int, ...]:
    """Powers of two below `rows`, then `rows`. Example: row_buckets(24) == (1, 2, 4, 8, 16, 24)."""
    sizes = []
    size = 1
    while size < rows:
        sizes.append(size)
        size *= 2
    return (*sizes, rows)


def check_cache_fits(target: Target, rows: int, capacity: int) -> None:
    """On CUDA, refuse a KV cache of `rows` rows of `capacity` slots that the device's free memory cannot
    hold (keys and values: 2 * layers * rows * kv_heads * capacity * head_dim values), naming the sizes."""
    if target.device.type != "cuda":
        return
    cfg = target.model.config.text_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_row = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * capacity * head_dim * target.dtype.itemsize
    free = torch.cuda.mem_get_info(target.device)[0]
    if rows * per_row > free:
        raise ValueError(
            f"a KV cache of {rows} rows x {capacity} slots needs {rows * per_row / 2**30:.1f} GiB "
            f"({per_row / 2**30:.2f} GiB a row) but {free / 2**30:.1f} GiB of {target.device} are free: lower max_length "
            f"(slots per request: prompt + max_new_tokens + one tree) or the batch size"
        )


def cached_row_attention_inputs(x, delta, input_norm, qkv, cos, sin, eps: float, heads: int, kv_heads: int, keys, values, rows, slots):
    """`cached_attention_inputs` for rows of sequences, k and v written to the layer's cache at (row, slot).
    x, delta: [R, T, H]; keys, values: [rows, kv_heads, S, D] (one layer's cache); rows, slots: [R, T] long
    -> q [R, T, heads, D], x + delta"""
    x = x + delta
    q, k, v = attention_inputs(x, input_norm, qkv, cos, sin, eps, heads, kv_heads)
    keys[rows, :, slots] = k  # [R, T, kv, D] at (row, slot)
    values[rows, :, slots] = v
    return q, x


class BatchedStaticTarget(StaticTarget):
    """A `StaticTarget` with a cache row per sequence (module docstring).

    rows: sequences it can hold at once; capacity: slots per row (prompt + new tokens + one tree + the
    scratch slot must fit)
    """

    attention_inputs = staticmethod(cached_row_attention_inputs)

    def __init__(self, target: Target, rows: int, capacity: int, cuda_graphs: bool | None = None, compile: bool = False) -> None:
        if rows < 1:
            raise ValueError(f"a batched static target needs at least 1 row, got {rows}")
        check_cache_fits(target, rows, min(capacity, target.max_length))
        self.rows = rows
        super().__init__(target, capacity, cuda_graphs, compile)
        self.row_sizes = row_buckets(rows)
        self.row_ids = torch.arange(rows, device=self.device)
        self._graphed_rows = GraphedFunction(self._forward_row_tokens, self.cuda_graphs, self.device)
        self._graphed_next_rows = GraphedFunction(self._forward_next_rows, self.cuda_graphs, self.device)
        self._graphed_listed = GraphedFunction(self._forward_listed_tokens, self.cuda_graphs, self.device)

    def cache_shape(self, capacity: int) -> tuple[int, ...]:
        return (len(self.layers), self.rows, self.n_kv_heads, capacity, self.head_dim)

    # ---- the forward ------------------------------------------------------------------------------
    def _forward_rows(self, x, positions, slots, mask, first_row: int = 0, rows: torch.Tensor | None = None):
        """Cache rows first_row .. first_row + R - 1 at once, or the listed `rows` [R] (gathered to read).

        x: [R, T, H]; positions, slots: [R, T] long; mask: [R, T, S] additive over each row's slots 0..S-1, or
        None: causal over each row's slots 0..T-1 (prompts at slots 0.., right-padded: SDPA's causal kernels)
        -> hidden [R, T, H], logits [R, T, V] float32 (None with listed rows: the caller takes the logits it needs)
        """
        hidden = self._layers(x, positions, slots, mask, first_row, rows)
        return hidden, (None if rows is not None else (hidden @ self.lm_head.T).float())

    def _layers(self, x, positions, slots, mask, first_row: int, listed: torch.Tensor | None):
        """`_forward_rows`' language model up to the final norm -> hidden [R, T, H]."""
        r, t = x.shape[:2]
        width = t if mask is None else mask.shape[2]
        heads, kv = self.n_heads, self.n_kv_heads
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]  # [R, T, 1, D]
        by_row = first_row + self.row_ids[:r] if listed is None else listed
        rows = by_row[:, None].expand(r, t)  # [R, T]
        attn_mask = None if mask is None else mask[:, None]  # [R, 1, T, S]
        delta = torch.zeros_like(x)  # what the last layer's MLP adds to the stream (`layer_output`)
        for index, w in enumerate(self.layers):
            q, x = self._attention_inputs(
                x, delta, w.input_norm, w.qkv, cos, sin, self.eps, heads, kv, self.keys[index], self.values[index], rows, slots
            )
            read = slice(first_row, first_row + r) if listed is None else listed
            out = self.attend(
                q.transpose(1, 2),
                self.keys[index, read, :, :width],
                self.values[index, read, :, :width],
                attn_mask=attn_mask,
                enable_gqa=kv != heads,
            )  # [R, heads, T, D]
            x, delta = self._layer_output(x, out.transpose(1, 2).flatten(-2), w.o, w.post_norm, w.gate_up, w.down, self.eps)
        return F.rms_norm(x + delta, (self.hidden_size,), self.final_norm, self.eps)

    def _forward_row_tokens(self, tokens, positions, slots, mask):
        return self._forward_rows(F.embedding(tokens, self.embed), positions, slots, mask)

    def _forward_listed_tokens(self, tokens, positions, slots, mask, listed):
        """`_forward_row_tokens` over the listed cache rows [R] long (gathered to read), logits included."""
        hidden = self._layers(F.embedding(tokens, self.embed), positions, slots, mask, 0, listed)
        return hidden, (hidden @ self.lm_head.T).float()

    def _forward_next_rows(self, tokens, positions, slots, window):
        """Plain decoding's step with its mask built inside the graph: tokens, positions, slots [R, 1]
        long; window: slots 0..S-1 [S] -> hidden [R, 1, H], logits [R, 1, V]. Row r sees slots 0..position."""
        mask = torch.zeros(positions.shape[0], 1, window.shape[0], dtype=self.lm_head.dtype, device=window.device)
        mask.masked_fill_(window[None, None, :] > positions[:, :, None], torch.finfo(self.lm_head.dtype).min)
        return self._forward_row_tokens(tokens, positions, slots, mask)

    # ---- what the engine calls ----------------------------------------------------------------------
    def _row_bucket(self, rows: list[int]) -> int:
        return bucket(max(rows) + 1, self.row_sizes)

    @torch.inference_mode()
    @varying_shapes
    def prefill_row(self, row: int, inputs_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt at slots 0..L-1 of `row`, causal over them (eager: prompt lengths vary; as
        `StaticTarget.prefill`). inputs_embeds: [L, H] -> hidden [L, H], logits [L, V]"""
        length = inputs_embeds.shape[0]
        self._check_room(length)
        positions = self.slots[:length][None]
        x = inputs_embeds.to(self.lm_head.dtype)[None]
        hidden, logits = self._forward_rows(x, positions, positions, None, first_row=row)
        return hidden[0], logits[0]

    @torch.inference_mode()
    @varying_shapes
    def prefill_rows(self, rows: list[int], inputs_embeds: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Several prompts in one forward (eager): prompt i at slots 0..L_i-1 of rows[i], padded on the right
        to the longest, causal over slots 0..T-1 of each row (SDPA's causal kernels, no mask); a padding query
        feeds zeros at position 0 and writes the scratch slot, so no row's slots are touched by another's.
        inputs_embeds[i]: [L_i, H] -> per prompt hidden [L_i, H] and the logits at its last position [V] float32.

        Worked example: rows [3, 0] with prompts of 4 and 2 positions: T = 4; query q of either row sees
        slots 0..q of its row; row 0's queries 0, 1 see its own prompt only, and its queries 2, 3 (padding)
        write the scratch slot and see, besides, slots 2 and 3 of row 0 as an earlier sequence left them,
        which changes only their own outputs, never read.
        """
        lengths = [e.shape[0] for e in inputs_embeds]
        longest = max(lengths)
        self._check_room(longest)
        r = len(rows)
        length, listed = to_device_each(self.device, lengths, rows)
        query = self.slots[:longest]
        real = query[None, :] < length[:, None]  # [R, T]
        positions = torch.where(real, query[None, :], 0)
        slots = torch.where(real, query[None, :], self.scratch)
        x = torch.nn.utils.rnn.pad_sequence([e.to(self.lm_head.dtype) for e in inputs_embeds], batch_first=True)
        hidden, _ = self._forward_rows(x, positions, slots, None, rows=listed)
        last = (hidden[torch.arange(r, device=self.device), length - 1] @ self.lm_head.T).float()  # [R, V]
        return [(hidden[i, :n], last[i]) for i, n in enumerate(lengths)]

    @torch.inference_mode()
    def forward_next_rows(self, rows: list[int], positions: list[int], tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per listed row: row rows[i] feeds tokens[i] at positions[i] (its slot too), after
        that many committed slots. tokens: [B] long -> hidden [B, H], logits [B, V] float32 (gathered: they
        outlive the next call)"""
        self._check_room(max(positions) + 1)
        r, b = self._row_bucket(rows), len(rows)
        # cache rows 0..r-1: a listed row at its position (and slot), a padding row at 0 (writing the scratch slot)
        padded_positions, slots = [0] * r, [self.scratch] * r
        for row, position in zip(rows, positions):
            padded_positions[row] = slots[row] = position
        on_device = to_device(rows + padded_positions + slots, self.device)  # the one copy to the device
        index, padded_positions, slots = on_device[:b], on_device[b : b + r, None], on_device[b + r :, None]
        padded_tokens = tokens.new_zeros(r).index_copy_(0, index, tokens)[:, None]
        window = self.slots[: self.width(max(positions) + 1)]
        hidden, logits = self._graphed_next_rows(padded_tokens, padded_positions, slots, window)
        return hidden[index, 0], logits[index, 0]

    @torch.inference_mode()
    def forward_trees(
        self, rows: list[int], prefixes: list[int], trees: PaddedTrees
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward over a tree per listed row, written to the slots after that row's prefix; the
        padding is built with a fixed number of device operations whatever the number of rows.

        trees: row i's tree at trees.*[i] (`lmms_msd.speculative.verify.pad_trees`)
        returns hidden [R, T', H] and logits [R, T', V] float32 with row i's node j at [places[i], j] (valid until
        the next call), places (a list) and on the device [B] long: the cache rows themselves, or, when the
        rows' number fits a smaller row bucket than their spread (module docstring), 0..B-1 over the listed
        rows (padded with rows[0]: its scratch slot written, its slot 0 read)
        """
        counts = trees.counts
        used = max(p + n for p, n in zip(prefixes, counts))
        self._check_room(used)
        r, b = self._row_bucket(rows), len(rows)
        by_list = bucket(b, self.row_sizes) < r  # few rows, spread: over their list (module docstring)
        if by_list:
            r = bucket(b, self.row_sizes)
            places, extra = list(range(b)), rows + [rows[0]] * (r - b)
        else:
            places, extra = rows, []
        longest = trees.tokens.shape[1]
        t = bucket(longest, TOKEN_BUCKETS) if longest <= TOKEN_BUCKETS[-1] else longest
        width = self.width(used)
        on_device = to_device(places + prefixes + extra, self.device)  # the one copy to the device
        index, prefix = on_device[:b], on_device[b : 2 * b, None]  # [B], [B, 1]
        valid = trees.valid  # [B, T]
        node = self.slots[:longest][None, :]  # [1, T]: node j of a tree
        padded_tokens = torch.zeros(r, t, dtype=torch.long, device=self.device)
        padded_tokens[index, :longest] = trees.tokens
        positions = torch.zeros(r, t, dtype=torch.long, device=self.device)
        positions[index, :longest] = torch.where(valid, prefix + trees.depths, 0)
        slots = torch.full((r, t), self.scratch, dtype=torch.long, device=self.device)
        slots[index, :longest] = torch.where(valid, prefix + node, self.scratch)
        # row i's real queries see its prefix, then its ancestors at slots prefix + j (T columns of room past
        # the width, so that padding nodes' columns stay in range; cut off below); padding queries see slot 0
        visible = torch.zeros(r, t, width + longest, dtype=torch.bool, device=self.device)
        visible[index, :longest, :width] = (self.slots[:width][None, None, :] < prefix[:, :, None]) & valid[:, :, None]
        visible[index[:, None, None], node[:, :, None], (prefix + node)[:, None, :]] = trees.ancestors
        visible[:, :, 0] = True
        mask = torch.zeros(r, t, width, dtype=self.lm_head.dtype, device=self.device).masked_fill_(
            ~visible[:, :, :width], torch.finfo(self.lm_head.dtype).min
        )
        if by_list:
            run = self._graphed_listed if t <= TOKEN_BUCKETS[-1] else varying_shapes(self._forward_listed_tokens)
            hidden, logits = run(padded_tokens, positions, slots, mask, on_device[2 * b :])
        else:
            run = self._graphed_rows if t <= TOKEN_BUCKETS[-1] else varying_shapes(self._forward_row_tokens)
            hidden, logits = run(padded_tokens, positions, slots, mask)
        return hidden, logits, places, index

    @torch.inference_mode()
    def keep_paths(self, rows: list[int], prefixes: list[int], paths: list[torch.Tensor]) -> None:
        """In each listed row, move the accepted nodes' keys and values down to the slots after its prefix.

        paths[i]: [a_i + 1] tree node indices, root first (node j of row rows[i] sits at slot prefixes[i] + j)
        Example: row 2, prefix 5, path [0, 2] -> row 2's slots 5, 7 are copied to 5, 6.
        """
        row_index, target, shift = [], [], []  # per kept node: its cache row, its new slot, its row's prefix
        for row, prefix, path in zip(rows, prefixes, paths, strict=True):
            n = path.shape[0]
            row_index += [row] * n
            target += range(prefix, prefix + n)
            shift += [prefix] * n
        on_device = to_device(row_index + target + shift, self.device)  # the one copy to the device
        row_index, target, shift = on_device.view(3, -1)
        source = shift + torch.cat(paths)
        for cache in (self.keys, self.values):
            cache[:, row_index, :, target] = cache[:, row_index, :, source]  # gathered first: overlaps are safe
