"""Where a generation runs: the target's forwards and caches, and the draft's, behind one interface.

The loops in `lmms_msd.speculative.decoding` (plain and speculative decoding) decide *what* to compute; a
`Runtime` decides *where and how*. There are two, and they give the same tokens:

- `EagerRuntime` (here): transformers' own language-model forward with a growing `DynamicCache`, and
  the draft through `Drafter`; it runs whatever LLaVA-1.5 the loader reads, on any device, and is
  the reference.
- `lmms_msd.speculative.fast.StaticEngine`: static KV caches written by slot and CUDA graphs, for speed on a GPU.

One runtime serves one generation at a time: `prefill` starts a generation and forgets the last.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from lmms_msd.models.draft import MSDDraft
from lmms_msd.models.target import EmbeddedPrompt, Target
from lmms_msd.speculative.drafting import Drafter
from lmms_msd.speculative.tree import Tree
from lmms_msd.speculative.verify import tree_attention_mask


class TreeBuilder(Protocol):
    max_depth: int

    def build(
        self, drafter: Drafter, root_token: int, root_hidden: torch.Tensor, root_visual: torch.Tensor | None = None
    ) -> Tree: ...


class Runtime(Protocol):
    device: torch.device

    def prefill(self, prompt: EmbeddedPrompt, extra_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Start a generation over the prompt; hidden [L, H] (after the final norm) and logits [L, V].
        extra_slots: positions the generation may add after the prompt (new tokens and one tree)."""
        ...

    def forward_next(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """Plain decoding's step: token [1] at `position` (all before it committed) -> logits [1, V]."""
        ...

    def drafter(self, track_visual: bool) -> Drafter:
        """The draft's side of this generation (to be prefilled)."""
        ...

    def draft_tree(
        self, tree_builder: TreeBuilder, drafter: Drafter, token: int, root_hidden: torch.Tensor, root_visual
    ) -> tuple[Tree, torch.Tensor]:
        """The step's tree under `token` and its ancestor mask [N, N] (`Tree.ancestor_mask`)."""
        ...

    def verify(self, tree: Tree, ancestors: torch.Tensor, prefix_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One target forward over the tree after `prefix_len` committed positions: hidden [N, H], logits [N, V]."""
        ...

    def keep_path(self, prefix_len: int, path: torch.Tensor) -> None:
        """Keep only the accepted nodes (path: [a + 1] node indices, root first) after the prefix."""
        ...


class EagerRuntime:
    """transformers' forward over a `DynamicCache`, and the eager `Drafter`: the reference runtime."""

    def __init__(self, target: Target, draft: MSDDraft | None) -> None:
        self.target = target
        self.draft = draft
        self.cache: Any = None
        self.capacity = 0  # draft cache slots to start with (it grows if needed)

    @property
    def device(self) -> torch.device:
        return self.target.device

    def prefill(self, prompt: EmbeddedPrompt, extra_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.cache = self.target.new_cache()
        length = prompt.input_ids.shape[0]
        self.capacity = length + extra_slots
        return self.target.forward(prompt.inputs_embeds, self.cache, torch.arange(length, device=self.device))

    def forward_next(self, token: torch.Tensor, position: int) -> torch.Tensor:
        positions = torch.full((1,), position, device=self.device)
        return self.target.forward(self.target.embed_tokens(token), self.cache, positions)[1]

    def drafter(self, track_visual: bool) -> Drafter:
        if self.draft is None:
            raise ValueError("speculative decoding needs a draft; this runtime was built without one")
        return Drafter(self.draft, self.target.lm_head, capacity=self.capacity, track_visual=track_visual)

    def draft_tree(self, tree_builder, drafter, token, root_hidden, root_visual):
        tree = tree_builder.build(drafter, token, root_hidden, root_visual)
        return tree, tree.ancestor_mask(tree_builder.max_depth)

    def verify(self, tree: Tree, ancestors: torch.Tensor, prefix_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.cache.get_seq_length() == prefix_len, f"cache holds {self.cache.get_seq_length()}, not {prefix_len}"
        mask = tree_attention_mask(ancestors, prefix_len, self.target.dtype)
        return self.target.forward(self.target.embed_tokens(tree.tokens), self.cache, prefix_len + tree.depths, mask)

    def keep_path(self, prefix_len: int, path: torch.Tensor) -> None:
        keep_path(self.cache, prefix_len, path)


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
