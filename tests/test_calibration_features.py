"""The calibrator's node features: which draft row gives a node its visual attention intensity, and
that tracking it changes nothing else (DESIGN 4.4, lmms_msd.speculative.drafting's docstring)."""

from __future__ import annotations

import torch
from decoding_fixtures import following_draft, random_prompt, tiny_target

from lmms_msd.models.draft import DraftConfig, new_random_draft
from lmms_msd.models.target import EmbeddedPrompt
from lmms_msd.speculative.decoding import speculative_generate
from lmms_msd.speculative.drafting import Drafter
from lmms_msd.speculative.runtime import EagerRuntime
from lmms_msd.speculative.sampling import GenerationConfig
from lmms_msd.speculative.tree import EagleTree, grow_tree

V, H, N_IMAGE, N_TEXT = 8, 32, 6, 4
# The image is at the target's positions 0..5; in MSD's shifted frame the draft is fed I_1..I_5 at
# slots 0..4 (I_0 has no slot: lmms_msd.speculative.drafting.prefill_inputs) and text at slots 5..9.
N_IMAGE_SLOTS = N_IMAGE - 1
LOOKER = 3  # the token whose rows look at the image


def image_looking_draft() -> tuple[torch.nn.Module, torch.nn.Linear]:
    """A draft whose query row attends (almost) only to image slots when the row's input is the
    embedding of token LOOKER, and uniformly otherwise.

    Inputs: fc passes embed(next token) through unchanged. Image rows carry a 1 at hidden dim 0,
    text rows a 0; embed(LOOKER) carries a 1 at dim 1. Keys copy dim 0 and queries 50 x dim 1 into
    head dim 3, the slowest RoPE pair (its rotation over a few positions is ~1e-2 rad), so
    q.k is large exactly between a LOOKER row and an image slot, and 0 everywhere else.
    """
    config = DraftConfig(hidden_size=H, intermediate_size=2 * H, num_attention_heads=4, num_key_value_heads=2, vocab_size=V)
    draft = new_random_draft(config, seed=0)
    d = config.resolved_head_dim
    with torch.no_grad():
        embed = torch.randn(V, H, generator=torch.Generator().manual_seed(1)) * 0.3
        embed[:, :2] = 0
        embed[LOOKER, 1] = 1.0
        draft.embed_tokens.weight.copy_(embed)
        draft.fc.weight.zero_()
        draft.fc.weight[:, :H] = torch.eye(H)
        attention = draft.layers[0].self_attn
        attention.q_proj.weight.zero_()
        attention.k_proj.weight.zero_()
        for head in range(config.num_attention_heads):
            attention.q_proj.weight[head * d + d // 2 - 1, 1] = 50.0
        for head in range(config.num_key_value_heads):
            attention.k_proj.weight[head * d + d // 2 - 1, 0] = 1.0
    lm_head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(torch.randn(V, H, generator=torch.Generator().manual_seed(2)))
    return draft.eval(), lm_head


def image_first_prompt() -> EmbeddedPrompt:
    """The target's positions 0..5 image (dim 0 = 1), 6..9 text tokens."""
    g = torch.Generator().manual_seed(3)
    image = torch.randn(N_IMAGE, H, generator=g) * 0.3
    image[:, :2] = 0
    image[:, 0] = 1.0
    ids = torch.tensor([99] * N_IMAGE + [0, 5, 6, 7])
    text = torch.zeros(N_TEXT, H)  # what the target read at text positions: unused by the draft
    mask = torch.tensor([True] * N_IMAGE + [False] * N_TEXT)
    return EmbeddedPrompt(ids, torch.cat([image, text])[None], mask)


def build(root_token: int, track: bool):
    draft, lm_head = image_looking_draft()
    prompt = image_first_prompt()
    drafter = Drafter(draft, lm_head, capacity=64, track_visual=track)
    hidden = torch.randn(N_IMAGE + N_TEXT, H, generator=torch.Generator().manual_seed(4))
    root_hidden, root_visual = drafter.prefill(prompt, hidden, root_token)
    tree = grow_tree(drafter, EagleTree(total_tokens=1 + V + V * V, depth=1, top_k=V), root_token, root_hidden, root_visual)
    return tree, root_hidden, root_visual


def test_depth_one_nodes_take_the_last_committed_row():
    # The root's children are scored by the output of the last committed row (slot 9), whose input
    # is embed(root token): a LOOKER root makes that row look at the image.
    tree, _, visual = build(root_token=LOOKER, track=True)
    assert visual > 0.99
    assert (tree.visual[tree.depths == 1] == visual).all()
    # Any other root: the row attends uniformly over the 10 committed slots, 5 of them image.
    tree, _, visual = build(root_token=5, track=True)
    assert abs(float(visual) - N_IMAGE_SLOTS / (N_IMAGE + N_TEXT)) < 1e-6
    assert torch.allclose(tree.visual[tree.depths == 1], torch.tensor(0.5))
    assert tree.visual[0] == 0 and tree.confidence[0] == 1


def test_depth_two_nodes_take_their_parents_row():
    # Every token is a depth-1 node (top_k = V) and is expanded; a depth-2 node's distribution
    # comes from its parent's row, whose input is embed(parent token): high exactly under LOOKER.
    tree, _, _ = build(root_token=5, track=True)
    deep = (tree.depths == 2).nonzero().flatten()
    assert deep.numel() == V * V
    parent_tokens = tree.tokens[tree.parents[deep]]
    visual = tree.visual[deep]
    assert (visual[parent_tokens == LOOKER] > 0.99).all()
    # other parents: the parent's row attends uniformly over the 10 prefix slots and its own (11), 5 image
    assert torch.allclose(visual[parent_tokens != LOOKER], torch.tensor(N_IMAGE_SLOTS / 11), atol=1e-6)
    # and a LOOKER *node* does not get a high intensity from its own row
    own = deep[(tree.tokens[deep] == LOOKER) & (parent_tokens != LOOKER)]
    assert own.numel() > 0 and (tree.visual[own] < 0.6).all()


def test_confidence_is_the_draft_probability():
    tree, root_hidden, _ = build(root_token=5, track=False)
    _, lm_head = image_looking_draft()
    with torch.inference_mode():
        probs = torch.softmax(lm_head(root_hidden), dim=-1)
    first = (tree.depths == 1).nonzero().flatten()
    assert torch.allclose(tree.confidence[first], probs[tree.tokens[first]], atol=1e-6)
    assert tree.visual is None


def test_tracking_changes_no_hidden_state_and_no_tree():
    tracked, hidden_tracked, _ = build(root_token=LOOKER, track=True)
    plain, hidden_plain, visual = build(root_token=LOOKER, track=False)
    assert visual is None
    assert torch.equal(hidden_tracked, hidden_plain)
    for name in ("tokens", "parents", "depths", "scores", "confidence"):
        assert torch.equal(getattr(tracked, name), getattr(plain, name)), name


def test_tracking_changes_no_output_token_and_no_tree_of_the_loop():
    target = tiny_target(3, context_scale=0.05)
    draft = following_draft(target)
    config = GenerationConfig(max_new_tokens=20)
    runs = {}
    for track in (False, True):
        trees = []
        result = speculative_generate(
            EagerRuntime(target, draft), random_prompt(target, 11), config, EagleTree(total_tokens=20, depth=4, top_k=4),
            observer=lambda tree, logits, acceptance, trees=trees: trees.append(tree), track_visual=track,
        )  # fmt: skip
        runs[track] = (result.token_ids, trees)
    assert runs[True][0] == runs[False][0]
    for a, b in zip(runs[True][1], runs[False][1]):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.parents, b.parents)
    visual = torch.cat([t.visual for t in runs[True][1]])
    assert ((visual >= 0) & (visual <= 1)).all() and visual.max() > 0
