"""`StaticEngine`: the runtime (`lmms_msd.speculative.runtime.Runtime`) that makes the decoding loops fast on a GPU.

The loops are `lmms_msd.speculative.decoding`'s, unchanged; what the engine changes is where their work runs:

- the target runs from `StaticTarget` (a static KV cache written by slot, CUDA graphs per bucket) and
  the draft from `StaticDrafter` (the same), both allocated once per engine and reused;
- EAGLE-2 and OPT-Tree trees grow as graph replays, one per level (`GraphedTreeGrower`), and their
  ancestor masks come with them;
- greedy acceptance (`lmms_msd.speculative.verify.accept_greedy`) reads one small tensor per step: with the
  stopping rule, the only host synchronisation of a greedy step besides OPT-Tree's early stop, which
  reads the expected length once per level;
- plain decoding goes through the same `StaticTarget`, so the baseline is as fast as this machinery
  makes one token per forward.
"""

from __future__ import annotations

import torch

from lmms_msd.models.draft import MSDDraft
from lmms_msd.models.target import EmbeddedPrompt, Target
from lmms_msd.speculative.decoding import (
    GenerationResult,
    StepObserver,
    plain_generate,
    speculative_generate,
)
from lmms_msd.speculative.fast.static_drafter import StaticDrafter
from lmms_msd.speculative.fast.static_target import StaticTarget
from lmms_msd.speculative.fast.tree_growth import GraphedTreeGrower
from lmms_msd.speculative.runtime import TreeBuilder
from lmms_msd.speculative.sampling import GenerationConfig
from lmms_msd.speculative.tree import Tree


class StaticEngine:
    """Static caches and CUDA graphs for one target (and draft); one generation at a time.

    max_length: cache slots (prompt + new tokens + one tree must fit); clipped to the target's maximum
    cuda_graphs: None replays graphs when the target is on CUDA; False runs the same code eagerly
    The first requests of each shape capture graphs (slower); time after a warm-up.
    """

    def __init__(self, target: Target, draft: MSDDraft | None, max_length: int = 2048, cuda_graphs: bool | None = None) -> None:
        self.target = target
        self.draft = draft
        self.static_target = StaticTarget(target, max_length, cuda_graphs)
        self.cuda_graphs = self.static_target.cuda_graphs
        self._drafters: dict[bool, StaticDrafter] = {}
        self._growers: dict[tuple, GraphedTreeGrower] = {}

    # ---- the loops, on this runtime ------------------------------------------------------------------
    def plain_generate(
        self, prompt: EmbeddedPrompt, config: GenerationConfig, generator: torch.Generator | None = None, profile: bool = False
    ) -> GenerationResult:
        """`lmms_msd.speculative.decoding.plain_generate` on static caches."""
        return plain_generate(self.target, prompt, config, generator, profile=profile, runtime=self)

    def speculative_generate(
        self,
        prompt: EmbeddedPrompt,
        config: GenerationConfig,
        tree_builder: TreeBuilder,
        generator: torch.Generator | None = None,
        observer: StepObserver | None = None,
        track_visual: bool = False,
        profile: bool = False,
    ) -> GenerationResult:
        """`lmms_msd.speculative.decoding.speculative_generate` on static caches (same arguments, same outputs)."""
        if self.draft is None:
            raise ValueError("speculative decoding needs a draft; this StaticEngine was built without one")
        return speculative_generate(
            self.target, self.draft, prompt, config, tree_builder, generator, observer, track_visual, profile, runtime=self
        )

    # ---- the Runtime interface ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.target.device

    def prefill(self, prompt: EmbeddedPrompt, extra_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        length = prompt.input_ids.shape[0]
        if length + extra_slots > self.static_target.usable:
            raise ValueError(
                f"the prompt ({length} positions) and what may follow it (max_new_tokens and one tree: "
                f"{extra_slots}) need {length + extra_slots} cache slots; the engine holds "
                f"{self.static_target.usable}: raise max_length"
            )
        return self.static_target.prefill(prompt.inputs_embeds[0])

    def forward_next(self, token: torch.Tensor, position: int) -> torch.Tensor:
        return self.static_target.forward_next(token, position)[1]

    def drafter(self, track_visual: bool) -> StaticDrafter:
        drafter = self._drafters.get(track_visual)
        if drafter is None:
            drafter = self._drafters[track_visual] = StaticDrafter(
                self.draft, self.target.lm_head, self.static_target.capacity, track_visual, self.cuda_graphs
            )
        drafter.reset()
        return drafter

    def draft_tree(
        self, tree_builder: TreeBuilder, drafter: StaticDrafter, token: int, root_hidden: torch.Tensor, root_visual
    ) -> tuple[Tree, torch.Tensor]:
        """Graphed growth for the builders that describe theirs (`growth`: EAGLE-2, OPT-Tree), the
        builder's own `build` for any other."""
        growth = getattr(tree_builder, "growth", None)
        if growth is None:
            tree = tree_builder.build(drafter, token, root_hidden, root_visual)
            return tree, tree.ancestor_mask(tree_builder.max_depth)
        key = (drafter.track_visual, growth)
        grower = self._growers.get(key)
        if grower is None:
            grower = self._growers[key] = GraphedTreeGrower(drafter, growth, self.cuda_graphs)
        return grower.build(token, root_hidden, root_visual)

    def verify(self, tree: Tree, ancestors: torch.Tensor, prefix_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.static_target.forward_tokens(tree.tokens, prefix_len + tree.depths, prefix_len, ancestors)

    def keep_path(self, prefix_len: int, path: torch.Tensor) -> None:
        self.static_target.keep_path(prefix_len, path)
