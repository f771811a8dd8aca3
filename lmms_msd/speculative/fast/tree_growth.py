"""Growing a draft tree level by level with each level replayed from a CUDA graph.

`lmms_msd.speculative.tree.grow_tree` grows a tree with a few dozen small tensor operations per level, issued
from Python; at a 7B draft's size the GPU finishes each faster than Python issues the next. Here the
same computation is laid out on preallocated tensors with fixed shapes per level, so that a level
(feed the frontier through the draft, propose top-k children, score them, pick the next frontier)
is one graph replay, and so is choosing the final nodes. The trees are the same as `grow_tree`'s; on CUDA the
children's log-softmax and top-k over the vocabulary are fused Triton kernels (`logprob_topk`), whose float32
roundings and order of equal logits may differ from the library's, so a near tie may go the other way there.

Layout: every stored node has a fixed place in the pool. Depth 1 holds the root's k children at
places 0..k-1; depth d >= 2 holds w nodes from place k + (d-2)*w on, w = k*k (every proposal) or k
(`TreeSpec.frontier_only`: the frontier only, in the order the frontier is fed). Pool index = place + 1
(pool index 0 is the root), as in `grow_tree`. The frontier fed at depth d is kept in row d of the
frontier tensors, so a level reads row d and writes row d + 1: replaying a level twice (as graph
warm-up does) gives the same result.

The host reads nothing while drafting an EAGLE-2 tree; OPT-Tree's stop "delta" reads the expected
accepted length once per level (and once after the first level, upstream's variant); its stop "cost"
reads the best rate and size once per level, and selects the nodes with a graph per depth and size.
"""

from __future__ import annotations

from functools import partial

import torch

from lmms_msd.speculative.cost import best_size
from lmms_msd.speculative.fast.graphs import GraphedFunction, width_bucket
from lmms_msd.speculative.fast.logprob_topk import draft_topk
from lmms_msd.speculative.fast.static_drafter import StaticDrafter
from lmms_msd.speculative.tree import Tree, TreeSpec, pool_capacity, select_nodes


class GraphedTreeGrower:
    """Grows the trees of one `TreeSpec` (EAGLE-2 or OPT-Tree, as `grow_tree`) on one drafter."""

    def __init__(self, drafter: StaticDrafter, spec: TreeSpec, cuda_graphs: bool) -> None:
        self.drafter = drafter
        self.spec = spec
        k, depth = spec.top_k, spec.max_depth
        device = drafter.device
        hidden_size = drafter.draft.config.hidden_size
        self.width = k if spec.frontier_only else k * k  # nodes stored per level after the first
        self.places = spec.pool_capacity  # pool places, the root excluded
        long = dict(dtype=torch.long, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        self.tokens = torch.zeros(self.places, **long)
        self.parents = torch.zeros(self.places, **long)  # pool indices
        self.depths = torch.cat([torch.full((k,), 1, **long)] + [torch.full((self.width,), d, **long) for d in range(2, depth + 1)])
        self.scores = torch.zeros(self.places, **f32)  # cumulative log acceptance estimates
        self.logprobs = torch.zeros(self.places, **f32)  # the draft's log-probability of each node
        self.visual = torch.zeros(self.places, **f32) if drafter.track_visual else None
        self.expected = torch.zeros(depth + 1, **f32)  # expected accepted length once depth d is grown
        # row d: the frontier fed at depth d (rows 1..depth-1)
        self.frontier = torch.zeros(depth, k, **long)  # pool indices
        self.frontier_tokens = torch.zeros(depth, k, **long)
        self.frontier_scores = torch.zeros(depth, k, **f32)
        self.parent_hidden = torch.zeros(depth, k, hidden_size, dtype=drafter.draft.fc.weight.dtype, device=device)
        self.ancestors = torch.zeros(depth, k, max(depth - 1, 1) * k, dtype=torch.bool, device=device)
        self.rows = torch.arange(k, device=device)
        self.window = drafter.window  # slots 0..capacity-1, the drafter's own
        self._root = GraphedFunction(self._grow_root, cuda_graphs, device)
        # a level reads the committed count and the window in place (no copy kernels at each replay)
        self.prefix = torch.zeros(1, **long)  # the committed slots P, written once per tree
        self._levels = [GraphedFunction(partial(self._grow_level, d), cuda_graphs, device, static_inputs=True) for d in range(depth)]
        self._select = [GraphedFunction(partial(self._select_nodes, d), cuda_graphs, device) for d in range(depth + 1)]
        if spec.cost is not None:  # stop "cost": [depth + 1, budget + 1] step seconds by levels (row 0 unused)
            rows = [spec.cost.step_seconds(max(d, 1), spec.budget) for d in range(depth + 1)]
            self.seconds = torch.stack(rows).to(device)
            self.best = torch.zeros(depth + 1, 2, **f32)  # row d: the best rate and size once depth d is grown

    def end(self, depth: int) -> int:
        """Pool places used once levels 1..depth are grown."""
        return pool_capacity(self.spec.top_k, depth, self.spec.frontier_only)

    # ---- the graphed pieces --------------------------------------------------------------------------
    def _record_expected(self, depth: int) -> None:
        used = self.end(depth)
        budget = min(self.spec.budget, used)
        top = self.scores[:used].topk(budget).values
        self.expected[depth] = top.exp().sum()
        if self.spec.cost is not None:
            self.best[depth] = best_size(top, self.seconds[depth])

    def _grow_root(self, root_hidden, root_visual):
        """root_hidden: [H]; root_visual: [1] (zeros when untracked)."""
        k, score = self.spec.top_k, self.spec.scorer
        top = draft_topk(self.drafter.lm_head, root_hidden[None], k)  # [1, k]
        visual = root_visual.float() if self.visual is not None else None
        scores = score(top.values, top.indices, 1, visual)[0]
        self.tokens[:k] = top.indices[0]
        self.parents[:k].zero_()
        self.scores[:k] = scores
        self.logprobs[:k] = top.values[0]
        if self.visual is not None:
            self.visual[:k] = visual.repeat_interleave(k)
        self._record_expected(1)
        if self.spec.max_depth > 1:
            self.frontier[1] = self.rows + 1
            self.frontier_tokens[1] = top.indices[0]
            self.frontier_scores[1] = scores
            self.parent_hidden[1] = root_hidden[None].expand(k, -1)
        return (self.expected,)

    def _grow_level(self, depth: int, prefix, window):
        """Feed the frontier of `depth` and propose depth + 1. prefix: [1] long, the committed slots P;
        window: [S] slots 0..S-1 (its length is the draft's attention width)."""
        k, score = self.spec.top_k, self.spec.scorer
        drafter, draft = self.drafter, self.drafter.draft
        used = (depth - 1) * k  # tree slots fed before this level
        # 1. feed the frontier: tree slots P + used .. P + used + k - 1, RoPE position P - 1 + depth
        tokens, parent_hidden = self.frontier_tokens[depth], self.parent_hidden[depth]
        x = draft.fuse(draft.embed_tokens(tokens)[None], parent_hidden[None])[0]
        slots = prefix + used + self.rows
        positions = (prefix - 1 + depth).expand(k)
        visible = (window[None, :] < prefix).expand(k, -1).clone()
        if used:
            visible[self.rows[:, None], (prefix + self.window[:used])[None, :]] = self.ancestors[depth, :, :used]
        visible[self.rows, slots] = torch.ones((), dtype=torch.bool, device=visible.device)  # no host scalar in a graph
        out = drafter.head(x, positions, slots, visible)
        hidden, visual = out[0], (out[1] if self.visual is not None else None)
        # 2. propose k children each, scored cumulatively; store them (or only the best k)
        children = draft_topk(drafter.lm_head, hidden, k)  # [k, k]
        scores = (self.frontier_scores[depth][:, None] + score(children.values, children.indices, depth + 1, visual)).flatten()
        tokens, logprobs = children.indices.flatten(), children.values.flatten()  # [k * k]
        parents = self.frontier[depth].repeat_interleave(k)
        best = scores.topk(k).indices  # [k]
        parent_row = best // k
        start = self.end(depth)
        places = slice(start, start + self.width)
        stored = best if self.spec.frontier_only else slice(None)
        self.tokens[places] = tokens[stored]
        self.parents[places] = parents[stored]
        self.scores[places] = scores[stored]
        self.logprobs[places] = logprobs[stored]
        if self.visual is not None:
            self.visual[places] = visual.float().repeat_interleave(k)[stored]
        self._record_expected(depth + 1)
        # 3. the best k become the frontier of depth + 1
        if depth + 1 < self.spec.max_depth:
            self.ancestors[depth + 1, :, :used] = self.ancestors[depth, :, :used][parent_row]
            self.ancestors[depth + 1, :, used : used + k] = torch.nn.functional.one_hot(parent_row, k).bool()
            self.frontier[depth + 1] = start + 1 + (self.rows if self.spec.frontier_only else best)
            self.frontier_tokens[depth + 1] = tokens[best]
            self.frontier_scores[depth + 1] = scores[best]
            self.parent_hidden[depth + 1] = hidden[parent_row]
        return (self.expected,)

    def _select_nodes(self, depth: int, size: torch.Tensor | None = None):
        """size (stop "cost"): [n], whose length is the number of nodes to keep: a graph per shape, so one
        depth's selections of every size share its graphs' memory pool."""
        used = self.end(depth)
        visual = None if self.visual is None else self.visual[:used]
        budget = self.spec.budget if size is None else size.shape[0]
        tree = select_nodes(
            0, self.tokens[:used], self.parents[:used], self.depths[:used], self.scores[:used], budget,
            confidence=self.logprobs[:used].exp(), visual=visual,
        )  # fmt: skip
        fields = (tree.tokens, tree.parents, tree.depths, tree.scores, tree.confidence)
        return fields + ((tree.visual,) if visual is not None else ()) + (tree.ancestor_mask(depth),)

    # ---- one tree ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def build(self, root_token: int, root_hidden: torch.Tensor, root_visual: torch.Tensor | None) -> tuple[Tree, torch.Tensor]:
        """The tree under the root and its ancestor mask [N, N] (what verification needs)."""
        drafter, spec = self.drafter, self.spec
        assert (root_visual is not None) == (self.visual is not None), "track_visual differs between drafter and call"
        visual = root_visual.reshape(1) if root_visual is not None else root_hidden.new_zeros(1, dtype=torch.float32)
        expected = self._root(root_hidden, visual)[0]
        stop_delta = spec.stop_delta
        last = float(expected[1]) if stop_delta is not None else 0.0
        levels = 1 if spec.frontier_only and stop_delta is not None and last <= stop_delta else spec.max_depth
        prefix = self.prefix.fill_(drafter.committed)
        reach = drafter.committed + (spec.max_depth - 1) * spec.top_k
        drafter.reserve(reach)
        width = width_bucket(reach, drafter.capacity)
        grown = 1
        if spec.cost is not None:  # stop "cost", as grow_tree: no tree beats a plain step: no forward
            rate, size = self.best[1].tolist()
            levels = 1 if size == 0 else spec.max_depth
        for depth in range(1, levels):
            expected = self._levels[depth](prefix, self.window[:width])[0]
            grown = depth + 1
            if stop_delta is not None:
                now = float(expected[grown])
                gained, last = now - last, now
                if gained <= stop_delta:
                    break
            if spec.cost is not None:
                grown_rate, size = self.best[grown].tolist()
                if grown_rate <= rate:
                    break
                rate = grown_rate
        drafter.mark_tree_fed((grown - 1) * spec.top_k)
        sized = () if spec.cost is None else (self.scores.new_empty(int(size)),)
        out = [t.clone() for t in self._select[grown](*sized)]
        tokens, parents, depths, scores, confidence = out[:5]
        tokens[0] = root_token
        visual = out[5] if self.visual is not None else None
        return Tree(tokens, parents, depths, scores, confidence=confidence, visual=visual), out[-1]
