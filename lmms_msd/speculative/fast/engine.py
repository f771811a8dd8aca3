"""`StaticEngine`: the runtime (`lmms_msd.speculative.runtime.Runtime`) that makes the decoding loops fast on a GPU.

The loops are `lmms_msd.speculative.decoding`'s, unchanged (pass the engine as their runtime); what the
engine changes is where their work runs:

- the target runs from `StaticTarget` (a static KV cache written by slot, CUDA graphs per bucket) and
  the draft from `StaticDrafter` (the same), both allocated once per engine and reused;
- EAGLE-2 and OPT-Tree trees grow as graph replays, one per level (`GraphedTreeGrower`), and their
  ancestor masks come with them;
- committing a step advances the draft over the accepted path in one graph replay (`StaticDrafter.advance`:
  the fuse, the causal block and the head, with the committed count a device tensor);
- greedy acceptance (`lmms_msd.speculative.verify.greedy_outcome`) runs inside the verification's graph
  (`verify_greedy`), and the host reads one small tensor per step: with the stopping rule, the only host
  synchronisation of a greedy step besides OPT-Tree's early stop, which reads the expected length once
  per level; the accepted path, its tokens and hidden states stay on the device for `commit`;
- plain decoding goes through the same `StaticTarget`, so the baseline is as fast as this machinery
  makes one token per forward.
"""

from __future__ import annotations

import torch

from lmms_msd.models.draft import MSDDraft
from lmms_msd.models.target import EmbeddedPrompt, Target
from lmms_msd.speculative.drafting import DraftRows
from lmms_msd.speculative.fast.static_drafter import StaticDrafter, start_draft
from lmms_msd.speculative.fast.static_target import StaticTarget
from lmms_msd.speculative.fast.tree_growth import GraphedTreeGrower
from lmms_msd.speculative.runtime import Sequence, drafter_of, require_draft
from lmms_msd.speculative.tree import Tree, TreeSpec
from lmms_msd.speculative.verify import Verified, unpack_greedy


class StaticEngine:
    """Static caches and CUDA graphs for one target (and draft): a `Runtime` for one sequence at a time.

    The caches are the engine's, allocated once, so `prefill` starts a sequence over them and
    invalidates the one before: any later call with the old sequence raises (a `RuntimeError` that
    says so), rather than read caches another generation has overwritten.
    max_length: cache slots (prompt + new tokens + one tree must fit); clipped to the target's maximum
    cuda_graphs: None replays graphs when the target is on CUDA; False runs the same code eagerly
    compile: the target's layers and the draft's head through torch.compile (`StaticTarget`, `StaticDrafter`)
    The first requests of each shape capture graphs (slower; with compile, compilations too); time after a warm-up.
    """

    def __init__(
        self, target: Target, draft: MSDDraft | None = None, max_length: int = 2048, cuda_graphs: bool | None = None,
        compile: bool = False,
    ) -> None:  # fmt: skip
        self.target = target
        self.draft = draft  # None: plain decoding only
        self.static_target = StaticTarget(target, max_length, cuda_graphs, compile)
        self.cuda_graphs = self.static_target.cuda_graphs
        self.compile = compile
        self._drafters: dict[bool, StaticDrafter] = {}  # by track_visual
        self._growers: dict[tuple[bool, TreeSpec], GraphedTreeGrower] = {}  # by (track_visual, spec)
        self._live: Sequence | None = None  # the one sequence the caches hold

    def _check_live(self, sequence: Sequence) -> None:
        if sequence is not self._live:
            raise RuntimeError(
                "this sequence is no longer live: a StaticEngine holds one generation at a time, and a later "
                "prefill on it started another over the same caches; finish a generation before starting the "
                "next, or give each concurrent generation its own engine (or use an EagerRuntime)"
            )

    def prefill(self, prompt: EmbeddedPrompt, extra_slots: int) -> tuple[Sequence, torch.Tensor, torch.Tensor]:
        length = prompt.input_ids.shape[0]
        if length + extra_slots > self.static_target.usable:
            raise ValueError(
                f"the prompt ({length} positions) and what may follow it (max_new_tokens and one tree: "
                f"{extra_slots}) need {length + extra_slots} cache slots; the engine holds "
                f"{self.static_target.usable}: raise max_length"
            )
        self._live = Sequence(committed=length)
        hidden, logits = self.static_target.prefill(prompt.inputs_embeds[0])
        return self._live, hidden, logits

    def release(self, sequence: Sequence) -> None:
        """The caches hold no generation from here on (the next `prefill` would overwrite them anyway)."""
        self._check_live(sequence)
        self._live = None

    def forward_next(self, sequence: Sequence, token: torch.Tensor) -> torch.Tensor:
        self._check_live(sequence)
        logits = self.static_target.forward_next(token, sequence.committed)[1]
        sequence.committed += 1
        return logits

    def prefill_draft(
        self, sequence: Sequence, prompt: EmbeddedPrompt, hidden: torch.Tensor, token: int, track_visual: bool
    ) -> DraftRows:
        self._check_live(sequence)
        draft = require_draft(self.draft, self)

        def make() -> StaticDrafter:
            return StaticDrafter(
                draft, self.target.lm_head, self.static_target.capacity, track_visual, self.cuda_graphs, compile=self.compile,
                graph_prompts=True,
            )  # fmt: skip

        return start_draft(self._drafters, track_visual, make, sequence, prompt, hidden, token)

    def draft_tree(self, sequence: Sequence, tree: TreeSpec, token: int, root: DraftRows) -> tuple[Tree, torch.Tensor]:
        """Grown by a `GraphedTreeGrower` (one per drafter and spec, reused: its graphs are captured once)."""
        self._check_live(sequence)
        drafter = drafter_of(sequence)
        assert isinstance(drafter, StaticDrafter), f"a StaticEngine sequence drafts with a StaticDrafter, not {drafter!r}"
        key = (drafter.track_visual, tree)
        grower = self._growers.get(key)
        if grower is None:
            grower = self._growers[key] = GraphedTreeGrower(drafter, tree, self.cuda_graphs)
        return grower.build(token, root.hidden, root.visual)

    def verify(self, sequence: Sequence, tree: Tree, ancestors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_live(sequence)
        prefix_len = sequence.committed
        return self.static_target.forward_tokens(tree.tokens, prefix_len + tree.depths, prefix_len, ancestors)

    def verify_greedy(self, sequence: Sequence, tree: Tree, ancestors: torch.Tensor) -> Verified:
        """`verify` and `accept_greedy` in one graph replay (`StaticTarget.forward_tree_greedy`) and one read: the
        path, the committed tokens and the hidden there stay on the device, as slices of the graph's outputs."""
        self._check_live(sequence)
        prefix_len = sequence.committed
        hidden, logits, outcome, path_hidden = self.static_target.forward_tree_greedy(
            tree.tokens, tree.parents, prefix_len + tree.depths, prefix_len, ancestors
        )  # fmt: skip
        result = unpack_greedy(outcome.tolist())  # the one read
        a1, rows = len(result.path), path_hidden.shape[0]
        return Verified(hidden, logits, result, outcome[2 : 2 + a1], outcome[2 + rows : 2 + rows + a1], path_hidden[:a1])

    def commit(self, sequence: Sequence, path: torch.Tensor, next_tokens: torch.Tensor, path_hidden: torch.Tensor) -> DraftRows:
        self._check_live(sequence)
        self.static_target.keep_path(sequence.committed, path)
        sequence.committed += path.shape[0]
        return drafter_of(sequence).advance(next_tokens, path_hidden)
