"""The draft's side of one generation: its cache, its committed prefix, and the tree being drafted.

Positions and slots (worked example). The target has committed positions 0..P-1 and the root token
x_P (committed, not yet fed to the target). The draft's slot t (RoPE position t) holds the input
fc([embed(x_{t+1}); f_t]) for t = 0..P-1, so its last output already predicts the root's children.
A tree node at depth d (root = 0) is fed at RoPE position P - 1 + d, written to the first free slot
after the prefix; after verification the committed inputs overwrite those slots, so tree slots need
no rollback. With P = 10 and a first tree level of k = 3 nodes: slots 10, 11, 12 at position 10;
their chosen children next go to slots 13.. at position 11.

Visual attention intensity (`track_visual=True`): the share of a query row's attention mass, in the
draft layer, that falls on image slots, averaged over heads. The image slots are the prompt's image
positions (`EmbeddedPrompt.image_mask` at prefill); every later slot is text. The intensity that
belongs with a node is the one of the query row whose output *produced the node's distribution*,
i.e. the row whose logits gave the node its draft probability: the row that fed the node's parent.
The node's own row (the one that feeds its token) is computed only if the node is expanded, and it
produces the distribution of the node's children, not its own. Worked example, P = 10 committed
slots 0..9 with the image at slots 1..6:

    row (slot 9, last committed)   output -> logits of the root's children (depth 1)
                                   so every depth-1 node gets the visual intensity of row 9
    row (slot 10, depth-1 node a)  input fc([embed(a); h9]), output -> logits of a's children
                                   so every child of a (depth 2) gets the intensity of row 10

`prefill` and `advance` return the last committed row's intensity with the root's hidden state;
`expand` returns one intensity per fed node; tree builders pass them down to the children
(`lmms_msd.tree`). Without tracking the layer runs plain SDPA and every intensity is None.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lmms_msd.draft import MSDDraft
from lmms_msd.target import EmbeddedPrompt


class DraftRows(NamedTuple):
    """The draft's output at the rows one call fed."""

    hidden: torch.Tensor  # [n, H] (prefill / advance: [H], the last committed row only)
    visual: torch.Tensor | None  # [n] float32 (prefill / advance: [] ) visual attention intensity; None untracked


class Drafter:
    """Runs the MSD head against one target's hidden states, step after step.

    track_visual: also measure each row's attention mass on image positions (module docstring).
    """

    def __init__(self, draft: MSDDraft, lm_head: torch.nn.Linear, capacity: int, track_visual: bool = False) -> None:
        self.draft = draft
        self.lm_head = lm_head
        self.cache = draft.new_cache(capacity)
        self.committed = 0  # P: slots holding committed inputs
        self.tree_used = 0  # slots after P taken by the current tree
        self.track_visual = track_visual
        # [capacity] bool: True at slots that hold image positions (prompt slots only)
        self.image_slots = torch.zeros(capacity, dtype=torch.bool, device=self.device) if track_visual else None

    @property
    def device(self) -> torch.device:
        return self.draft.fc.weight.device

    def _reserve(self, slots: int) -> None:
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

    def _run(self, x: torch.Tensor, positions, slots, visible) -> DraftRows:
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
            self._reserve(length)
            self.image_slots[:length] = prompt.image_mask.to(self.device)
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
        m = x.shape[0]
        self._reserve(self.committed + m)
        slots, positions, visible = self._causal_block(m)
        rows = self._run(x, positions, slots, visible)
        self.committed += m
        self.tree_used = 0
        return DraftRows(rows.hidden[-1], None if rows.visual is None else rows.visual[-1])

    @torch.inference_mode()
    def expand(self, tokens: torch.Tensor, parent_hidden: torch.Tensor, depth: int, ancestors: torch.Tensor) -> DraftRows:
        """Feed n tree nodes of one depth; return their output hidden states [n, H] and visual intensities [n].

        tokens: [n] the nodes' tokens; parent_hidden: [n, H] the draft output at each node's parent
        depth: the nodes' depth (>= 1)
        ancestors: [n, tree_used] bool, which earlier tree slots are each node's ancestors
        """
        n = tokens.shape[0]
        assert parent_hidden.shape[0] == n and ancestors.shape == (n, self.tree_used), (
            f"tokens {tuple(tokens.shape)}, parent_hidden {tuple(parent_hidden.shape)}, "
            f"ancestors {tuple(ancestors.shape)} with {self.tree_used} tree slots used"
        )
        p, used = self.committed, self.tree_used
        self._reserve(p + used + n)
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
        x = self.draft.fuse(self.draft.embed_tokens(tokens)[None], parent_hidden[None])[0]
        rows = self._run(x, positions, slots, visible)
        self.tree_used += n
        return rows

    @torch.inference_mode()
    def logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, H] -> draft log-probabilities [n, V] (float32) through the target's lm_head."""
        return torch.log_softmax(self.lm_head(hidden.to(self.lm_head.weight.dtype)).float(), dim=-1)


def prefill_inputs(draft: MSDDraft, prompt: EmbeddedPrompt, target_hidden: torch.Tensor, first_token: int) -> torch.Tensor:
    """The draft's layer input at every prompt position (MSD decoupling).

    Text position t: fc([e_{t+1}; f_t]), where e_{t+1} is what the target read at t + 1 (the token's
    embedding, or the image feature when t + 1 is an image position; after the last position, the
    first generated token). Image position t: the projected image embedding itself.
    target_hidden: [L, H] -> [L, H]
    """
    length = prompt.input_ids.shape[0]
    assert target_hidden.shape[0] == length, f"target_hidden {tuple(target_hidden.shape)} vs L={length}"
    device = draft.fc.weight.device
    first = draft.embed_tokens(torch.tensor([first_token], device=device))  # [1, H]
    next_ids = prompt.input_ids[1:].masked_fill(prompt.image_mask[1:], 0)  # image ids are replaced below
    image = prompt.inputs_embeds[0].to(first.dtype)  # [L, H]
    next_is_image = torch.cat([prompt.image_mask[1:], prompt.image_mask.new_zeros(1)])
    next_embeds = torch.where(
        next_is_image[:, None], torch.cat([image[1:], first]), torch.cat([draft.embed_tokens(next_ids), first])
    )
    fused = draft.fuse(next_embeds[None], target_hidden[None])[0]
    return torch.where(prompt.image_mask[:, None], image, fused)
