"""Growing the trees of many sequences at once, each level one CUDA graph replay over all rows.

`lmms_msd.speculative.tree.grow_trees` grows the trees of B rows of a `SharedDraftCache` with one draft
forward per level, but issues a few dozen small operations per level from Python. `GraphedTreeGrower`
(`tree_growth`) lays one row's growth out on preallocated tensors so that each level is one graph
replay; `BatchedTreeGrower` does the same for every row of the shared cache at once: its state tensors
have a leading cache-row axis, and a level feeds all rows' frontiers through one head forward over cache
rows 0..R-1 in place (as `lmms_msd.speculative.drafting.run_shared` does). The trees are the ones
`grow_tree` grows for each row alone, up to the rounding of the wider products.

Layout: row r of every state tensor belongs to cache row r; within a row, nodes have the places of
`GraphedTreeGrower` (depth 1 at places 0..k-1, depth d >= 2 at k + (d-2)*w on, w = k*k or k with
`TreeSpec.frontier_only`; pool index = place + 1) and the frontier fed at depth d is kept at [r, d], so
replaying a level twice (graph warm-up) gives the same result. A level's call names each cache row's
committed slots P_r, 0 for rows that take no part (free rows, rows drafting otherwise, rows whose tree
stopped growing): such padding rows compute on whatever their state holds, but write only their scratch
slot (the cache's last) and see slot 0 only, so no real row's slots change; what they store lands in
places past their own tree, which the final selection ignores (`select_rows`' used).

Graphs: one per (R, W) for each level, R the row bucket holding the highest row taking part
(`lmms_msd.speculative.fast.batched_target.row_buckets` of the cache's rows) and W the attention width
bucket (`graphs.width_bucket` of the deepest reach, max P_r + (max_depth - 1) * k); the first level one
per R, the final selection one per R and most nodes kept. The host reads nothing while growing EAGLE-2
trees; OPT-Tree's stop "delta" reads every row's expected accepted length after each level (and after
the first, upstream's variant), stop "cost" every row's best rate and size: one read per level for all rows.

Worked example: rows 0, 1 and 3 of a 4-row cache with 700, 650 and 720 committed slots, EAGLE-2 top_k 10,
max_depth 6: R = 4, W = width_bucket(720 + 50) = 1024; level d writes row 0's slots 700 + 10(d-1) ..,
row 1's 650 + 10(d-1) .., row 3's 720 + 10(d-1) ..; row 2 (P = 0) writes slot capacity - 1 only. An
OPT-Tree whose row 1 stops after level 3 feeds levels 4.. with P_1 = 0: row 1 is padding from then on.
"""

from __future__ import annotations

from functools import partial

import torch

from lmms_msd.models.draft import MSDDraft
from lmms_msd.speculative.cost import best_size
from lmms_msd.speculative.drafting import SharedDraftCache
from lmms_msd.speculative.fast.batched_target import row_buckets
from lmms_msd.speculative.fast.graphs import GraphedFunction, bucket, width_bucket
from lmms_msd.speculative.fast.logprob_topk import draft_topk
from lmms_msd.speculative.fast.static_drafter import StaticDrafter
from lmms_msd.speculative.transfer import to_device, to_device_each
from lmms_msd.speculative.tree import (
    TreeSpec,
    ancestor_masks,
    pool_capacity,
    select_rows,
)
from lmms_msd.speculative.verify import GrownTrees


class BatchedTreeGrower:
    """Grows one `TreeSpec`'s trees (EAGLE-2 or OPT-Tree, as `grow_tree`) for drafters on rows of one
    `SharedDraftCache`.

    lm_head: the target's (the draft's log-probabilities); track_visual: whether the drafters measure
    visual attention (every drafter of a call alike), which the trees then carry as `grow_tree`'s do.
    """

    def __init__(self, shared: SharedDraftCache, lm_head: torch.nn.Linear, spec: TreeSpec, track_visual: bool, cuda_graphs: bool) -> None:
        self.shared, self.lm_head, self.spec, self.track_visual = shared, lm_head, spec, track_visual
        draft: MSDDraft = shared.draft
        self.draft = draft
        self.device = device = draft.fc.weight.device
        rows, k, depth, hidden_size = shared.rows, spec.top_k, spec.max_depth, draft.config.hidden_size
        self.row_sizes = row_buckets(rows)
        self.width = k if spec.frontier_only else k * k  # nodes stored per level after the first
        self.places = spec.pool_capacity  # pool places, the root excluded
        long = {"dtype": torch.long, "device": device}
        f32 = {"dtype": torch.float32, "device": device}
        self.tokens = torch.zeros(rows, self.places, **long)
        self.parents = torch.zeros(rows, self.places, **long)  # pool indices
        self.depths = torch.cat([torch.full((k,), 1, **long)] + [torch.full((self.width,), d, **long) for d in range(2, depth + 1)])
        self.scores = torch.zeros(rows, self.places, **f32)  # cumulative log acceptance estimates
        self.logprobs = torch.zeros(rows, self.places, **f32)  # the draft's log-probability of each node
        self.visual = torch.zeros(rows, self.places, **f32) if track_visual else None
        # [r, d]: row r's frontier fed at depth d (d = 1..depth-1)
        self.frontier = torch.zeros(rows, depth, k, **long)  # pool indices
        self.frontier_tokens = torch.zeros(rows, depth, k, **long)
        self.frontier_scores = torch.zeros(rows, depth, k, **f32)
        self.parent_hidden = torch.zeros(rows, depth, k, hidden_size, dtype=draft.fc.weight.dtype, device=device)
        self.ancestors = torch.zeros(rows, depth, k, max(depth - 1, 1) * k, dtype=torch.bool, device=device)  # over tree slots fed
        self.nodes = torch.arange(k, device=device)  # a frontier's places
        self.window = torch.arange(shared.capacity, device=device)
        # what the host reads after each level (OPT-Tree): [r, d] once depth d is grown
        self.expected = torch.zeros(rows, depth + 1, **f32)  # stop "delta": the expected accepted length
        if spec.cost is not None:  # stop "cost": [depth + 1, budget + 1] step seconds by levels (row 0 unused)
            self.seconds = torch.stack([spec.cost.step_seconds(max(d, 1), spec.budget) for d in range(depth + 1)]).to(device)
            self.best = torch.zeros(rows, depth + 1, 2, **f32)  # the best rate and size
        self._root = GraphedFunction(self._grow_root, cuda_graphs, device)
        self._levels = {d: GraphedFunction(partial(self._grow_level, d), cuda_graphs, device) for d in range(1, depth)}
        self._select = GraphedFunction(self._select_nodes, cuda_graphs, device)

    def end(self, depth: int) -> int:
        """Pool places used once levels 1..depth are grown."""
        return pool_capacity(self.spec.top_k, depth, self.spec.frontier_only)

    # ---- the graphed pieces --------------------------------------------------------------------------
    def _record_expected(self, depth: int, r: int) -> None:
        """Rows 0..R-1's expected accepted length (stop "delta") or best rate and size (stop "cost") once
        depth `depth` is grown."""
        if self.spec.kind == "eagle2":
            return
        used = self.end(depth)
        top = self.scores[:r, :used].topk(min(self.spec.budget, used)).values  # [R, n]
        if self.spec.stop_delta is not None:
            self.expected[:r, depth] = top.exp().sum(dim=1)
        if self.spec.cost is not None:
            self.best[:r, depth] = best_size(top, self.seconds[depth])

    def _grow_root(self, root_hidden, root_visual):
        """The first level of rows 0..R-1. root_hidden: [R, H]; root_visual: [R] float32 (zeros untracked)."""
        k, score, r = self.spec.top_k, self.spec.scorer, root_hidden.shape[0]
        top = draft_topk(self.lm_head, root_hidden, k)  # [R, k]
        visual = root_visual if self.visual is not None else None
        scores = score(top.values, top.indices, 1, visual)  # [R, k]
        self.tokens[:r, :k] = top.indices
        self.parents[:r, :k].zero_()
        self.scores[:r, :k] = scores
        self.logprobs[:r, :k] = top.values
        if self.visual is not None:
            self.visual[:r, :k] = visual[:, None].expand(r, k)
        self._record_expected(1, r)
        if self.spec.max_depth > 1:
            self.frontier[:r, 1] = self.nodes + 1
            self.frontier_tokens[:r, 1] = top.indices
            self.frontier_scores[:r, 1] = scores
            self.parent_hidden[:r, 1] = root_hidden[:, None].expand(r, k, -1)
        return ()

    def _grow_level(self, depth: int, prefix, window):
        """Feed the frontiers of `depth` and propose depth + 1, in rows 0..R-1. prefix: [R] long, each row's
        committed slots P_r (0: padding); window: [S] slots 0..S-1 (its length is the attention width)."""
        k, score, draft = self.spec.top_k, self.spec.scorer, self.draft
        r, width = prefix.shape[0], window.shape[0]
        used = (depth - 1) * k  # tree slots fed before this level
        real = prefix > 0  # [R]
        # 1. feed the frontiers: row r's tree slots P_r + used .. + k - 1, RoPE position P_r - 1 + depth
        x = draft.fuse(draft.embed_tokens(self.frontier_tokens[:r, depth]), self.parent_hidden[:r, depth])  # [R, k, H]
        own = prefix[:, None] + used + self.nodes  # [R, k]
        positions = (prefix - 1 + depth)[:, None].expand(r, k)
        visible = (window[None, None, :] < prefix[:, None, None]).expand(r, k, width).clone()  # [R, k, S]
        if used:
            ancestors = prefix[:, None] + self.window[:used]  # [R, used]: the tree slots fed so far
            visible.scatter_(2, ancestors[:, None, :].expand(r, k, used), self.ancestors[:r, depth, :, :used])
        visible.scatter_(2, own[:, :, None], True)
        visible = torch.where(real[:, None, None], visible, window == 0)  # padding sees slot 0 only
        slots = own.masked_fill(~real[:, None], self.shared.scratch)  # padding writes its scratch slot only
        if self.visual is None:
            hidden, visual = draft(x, positions, self.shared.cache, slots, visible), None
        else:
            image_slots = self.shared.image_slots[:r, :width]
            hidden, visual = draft.forward_with_visual(x, positions, self.shared.cache, slots, visible, image_slots)
            visual = visual.reshape(r * k)
        # 2. propose k children each, scored cumulatively; store them (or only the best k)
        children = draft_topk(self.lm_head, hidden, k)  # [R, k, k]
        node_scores = score(children.values.view(r * k, k), children.indices.view(r * k, k), depth + 1, visual)
        scores = (self.frontier_scores[:r, depth][:, :, None] + node_scores.view(r, k, k)).view(r, k * k)
        tokens, logprobs = children.indices.view(r, k * k), children.values.view(r, k * k)
        parents = self.frontier[:r, depth].repeat_interleave(k, dim=1)
        best = scores.topk(k).indices  # [R, k]
        parent_row = best // k  # [R, k]

        def stored(values: torch.Tensor) -> torch.Tensor:  # [R, k * k] -> what the level stores
            return values.gather(1, best) if self.spec.frontier_only else values

        start = self.end(depth)
        places = slice(start, start + self.width)
        self.tokens[:r, places] = stored(tokens)
        self.parents[:r, places] = stored(parents)
        self.scores[:r, places] = stored(scores)
        self.logprobs[:r, places] = stored(logprobs)
        if self.visual is not None:
            self.visual[:r, places] = stored(visual.view(r, k).repeat_interleave(k, dim=1))
        self._record_expected(depth + 1, r)
        # 3. the best k become the frontier of depth + 1
        if depth + 1 < self.spec.max_depth:
            fed = self.ancestors[:r, depth, :, :used].gather(1, parent_row[:, :, None].expand(r, k, used))
            self.ancestors[:r, depth + 1, :, :used] = fed
            self.ancestors[:r, depth + 1, :, used : used + k] = torch.nn.functional.one_hot(parent_row, k).bool()
            self.frontier[:r, depth + 1] = start + 1 + (self.nodes if self.spec.frontier_only else best)
            self.frontier_tokens[:r, depth + 1] = tokens.gather(1, best)
            self.frontier_scores[:r, depth + 1] = scores.gather(1, best)
            self.parent_hidden[:r, depth + 1] = hidden.gather(1, parent_row[:, :, None].expand(r, k, hidden.shape[2]))
        return ()

    def _select_nodes(self, root_tokens, used, sizes, budget):
        """Rows 0..R-1's trees: root_tokens, used (pool places grown), sizes (nodes kept): [R] long; budget:
        [n], whose length is the most nodes a row keeps -> `Tree`'s fields [R, n + 1] and ancestor masks
        [R, n + 1, n + 1] (row r's tree: its first 1 + sizes_r)."""
        r = root_tokens.shape[0]
        visual = None if self.visual is None else self.visual[:r]
        fields = select_rows(
            root_tokens, self.tokens[:r], self.parents[:r], self.depths, self.scores[:r], budget.shape[0],
            confidence=self.logprobs[:r].exp(), visual=visual, used=used, sizes=sizes,
        )  # fmt: skip
        return tuple(f for f in fields if f is not None) + (ancestor_masks(fields[1], self.spec.max_depth),)

    # ---- the trees of one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def build(
        self, drafters: list[StaticDrafter], root_tokens: list[int], root_hidden: list[torch.Tensor],
        root_visual: list[torch.Tensor | None],
    ) -> GrownTrees:  # fmt: skip
        """Row b's tree (drafter b, on its own row of the shared cache, positioned after its committed prefix;
        root token, root hidden [H] and visual [] or None) and its ancestor mask [N, N], as `grow_tree` grows it."""
        spec, k = self.spec, self.spec.top_k
        assert len(drafters) == len(root_tokens) == len(root_hidden) == len(root_visual), "one of each per row"
        rows = [d.row for d in drafters]
        assert len(set(rows)) == len(rows) and all(d.shared is self.shared for d in drafters), "drafters on distinct rows of this cache"
        assert all(d.track_visual == self.track_visual for d in drafters), f"every drafter must have track_visual={self.track_visual}"
        r = bucket(max(rows) + 1, self.row_sizes)
        committed = [0] * r
        for drafter in drafters:
            drafter.reserve(drafter.committed + (spec.max_depth - 1) * k)
            committed[drafter.row] = drafter.committed
        width = width_bucket(max(committed) + (spec.max_depth - 1) * k, self.shared.capacity)
        (index,) = to_device_each(self.device, rows)  # [B]
        hidden = torch.zeros(r, self.parent_hidden.shape[3], dtype=self.parent_hidden.dtype, device=self.device)
        hidden[index] = torch.stack(root_hidden).to(hidden.dtype)
        visual = torch.zeros(r, dtype=torch.float32, device=self.device)
        if self.track_visual:
            visual[index] = torch.stack([v.reshape(()) for v in root_visual]).float()
        self._root(hidden, visual)
        grown, sizes = self._grow(rows, committed, width)
        for drafter in drafters:
            drafter.mark_tree_fed((grown[drafter.row] - 1) * k)
        tokens, used, kept = to_device_each(
            self.device, [0] * r, [self.end(grown.get(row, 1)) for row in range(r)], [sizes.get(row, 0) for row in range(r)]
        )  # fmt: skip
        tokens[index] = to_device(root_tokens, self.device)
        selected = self._select(tokens, used, kept, tokens.new_empty(max(sizes.values())))
        out = [t[index] for t in selected]  # copied out of the graph's memory
        fields = (*out[:5], out[5] if self.visual is not None else None)
        return GrownTrees(fields, out[-1], [sizes[row] + 1 for row in rows])

    def _grow(self, rows: list[int], committed: list[int], width: int) -> tuple[dict[int, int], dict[int, int]]:
        """Grow the levels after the first while any row grows (each level one replay over rows 0..R-1; a row
        that stopped is padding from then on) -> per row, its levels grown and the nodes its tree keeps.
        EAGLE-2 grows every level and reads nothing; OPT-Tree reads the rows' stop values after each level,
        its stop rule as `grow_tree`'s (`TreeGrowth`)."""
        spec = self.spec
        grown = dict.fromkeys(rows, 1)
        sizes = dict.fromkeys(rows, spec.budget)
        last: dict[int, float] = {}
        rates: dict[int, float] = {}
        growing = list(rows) if spec.max_depth > 1 else []
        if spec.stop_delta is not None:
            expected = self.expected[:, 1].tolist()
            last = {row: expected[row] for row in rows}
            if spec.frontier_only:
                growing = [row for row in growing if last[row] > spec.stop_delta]
        if spec.cost is not None:  # none of a first level's trees beats a plain step: no forward
            best = self.best[:, 1].tolist()
            for row in rows:
                rates[row], sizes[row] = best[row][0], int(best[row][1])
            growing = [row for row in growing if sizes[row] > 0]
        for depth in range(1, spec.max_depth):
            if not growing:
                break
            prefix = to_device([committed[row] if row in growing else 0 for row in range(len(committed))], self.device)
            self._levels[depth](prefix, self.window[:width])
            for row in growing:
                grown[row] = depth + 1
            stops = set()
            if spec.stop_delta is not None:
                expected = self.expected[:, depth + 1].tolist()  # one host read for all rows
                for row in growing:
                    now = expected[row]
                    if now - last[row] <= spec.stop_delta:
                        stops.add(row)
                    last[row] = now
            if spec.cost is not None:
                best = self.best[:, depth + 1].tolist()  # one host read for all rows
                for row in growing:
                    rate, sizes[row] = best[row][0], int(best[row][1])
                    if rate <= rates[row]:
                        stops.add(row)
                    rates[row] = rate
            growing = [row for row in growing if row not in stops]
        for row in rows:
            sizes[row] = min(sizes[row], self.end(grown[row]))
        return grown, sizes
