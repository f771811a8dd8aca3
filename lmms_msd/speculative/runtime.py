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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from lmms_msd.models.draft import MSDDraft
from lmms_msd.models.target import EmbeddedPrompt, Target
from lmms_msd.speculative.drafting import Drafter, DraftRows
from lmms_msd.speculative.tree import Tree, TreeSpec, grow_tree
from lmms_msd.speculative.verify import tree_attention_mask


@dataclass(eq=False, kw_only=True)
class Sequence:
    """One generation in flight on a runtime: the loop holds it and hands it back; only the runtime
    that made it changes it."""

    # target positions holding committed tokens: the prompt, then each step's accepted path (speculative)
    # or each fed token (plain); the next tree or token goes right after them
    committed: int
    drafter: Drafter | None = None  # the draft's side, from `prefill_draft` on (speculative decoding only)


class Runtime(Protocol):
    """Where the loops' forwards run. L: prompt positions; N: tree nodes; H: hidden size; V: vocabulary."""

    target: Target

    def prefill(self, prompt: EmbeddedPrompt, extra_slots: int) -> tuple[Sequence, torch.Tensor, torch.Tensor]:
        """Start a generation over the prompt: its sequence, the target's hidden [L, H] (after the final
        norm) and logits [L, V]. extra_slots: positions it may add after the prompt (new tokens, one tree)."""
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


def require_draft(draft: MSDDraft | None, runtime: object) -> MSDDraft:
    """The runtime's draft, or an error saying speculative decoding needs one."""
    if draft is None:
        raise ValueError(f"speculative decoding needs a draft; this {type(runtime).__name__} was built without one")
    return draft


def drafter_of(sequence: Sequence) -> Drafter:
    """The sequence's drafter, once `prefill_draft` has made it."""
    assert sequence.drafter is not None, "prefill_draft starts a sequence's draft side; call it before draft_tree or commit"
    return sequence.drafter


@dataclass(eq=False, kw_only=True)
class EagerSequence(Sequence):
    """A sequence on `EagerRuntime`: it owns its caches."""

    cache: Any  # transformers' DynamicCache: the committed positions (and one tree, from verify to commit)
    capacity: int  # positions the generation may fill: the draft's cache starts this large (it grows if needed)


class EagerRuntime:
    """transformers' forward over a `DynamicCache` per sequence, and the eager `Drafter`: the reference
    runtime. Any number of sequences may be in flight; each owns its caches."""

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
