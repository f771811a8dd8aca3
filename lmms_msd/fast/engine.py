"""Plain and speculative decoding on static caches: the loops of `lmms_msd.decoding`, made fast on a GPU.

The algorithm is the one `lmms_msd.decoding` implements (draft a tree, verify it in one target
forward, keep the accepted path and a bonus token, stop exactly where plain decoding would); the
differences are all in where the work happens:

- the target runs from `StaticTarget` (static KV cache written by slot, CUDA graphs per bucket) and
  the draft from `StaticDrafter` (the same), both allocated once per engine and reused;
- greedy acceptance runs on the device and the host reads one small tensor per step (the accepted
  path, its tokens and the bonus): the only synchronisation a greedy step needs besides the
  stopping rule, and OPT-Tree's early stop reading its expected length once per level;
- plain decoding goes through the same `StaticTarget`, so the baseline is as fast as this machinery
  makes one token per forward, and speculative outputs are compared against it.
"""

from __future__ import annotations

import time

import torch

from lmms_msd.decoding import (
    DecodeStats,
    GenerationResult,
    StepObserver,
    TreeBuilder,
    _check_prompt,
    _PhaseClock,
    _synchronize,
)
from lmms_msd.draft import MSDDraft
from lmms_msd.fast.static_drafter import StaticDrafter
from lmms_msd.fast.static_target import StaticTarget
from lmms_msd.fast.tree_growth import GraphedTreeGrower
from lmms_msd.sampling import GenerationConfig, next_token
from lmms_msd.stopping import Stopper
from lmms_msd.target import EmbeddedPrompt, Target
from lmms_msd.tree import Tree
from lmms_msd.verify import Acceptance, accept_sampling


def accept_greedy_on_device(
    tree: Tree, logits: torch.Tensor, ancestors: torch.Tensor
) -> tuple[torch.Tensor, Acceptance, list[int]]:
    """Greedy acceptance with one read from the device.

    A node is accepted when it and all its ancestors equal the target's argmax at their parents;
    the path ends at the deepest accepted node (a parent's children carry distinct tokens, so there
    is one). Same result as `lmms_msd.verify.accept_greedy`.
    tree: N nodes; logits: [N, V]; ancestors: [N, N] bool (`Tree.ancestor_mask`)
    returns the path on the device [a + 1], the Acceptance (path and bonus on the host) and the
    accepted nodes' tokens on the host (root excluded)
    """
    n = len(tree)
    best = logits.argmax(dim=-1)  # [N]
    matches = tree.tokens == best[tree.parents.clamp(min=0)]
    matches[0] = True
    accepted = ~(ancestors & ~matches[None, :]).any(dim=1)  # [N]
    deepest = torch.where(accepted, tree.depths, -1).argmax()  # ties impossible: see above
    on_path = ancestors[deepest]  # [N]
    depth_of = torch.where(on_path, tree.depths, n)  # off-path nodes go past the end
    path = torch.full((n + 1,), -1, dtype=torch.long, device=logits.device)
    path.scatter_(0, depth_of, torch.arange(n, device=logits.device))
    length = tree.depths[deepest] + 1
    path_tokens = tree.tokens[path[:n].clamp(min=0)]
    packed = torch.cat([length[None], best[deepest][None], path[:n], path_tokens]).tolist()  # the one sync
    a1, bonus = packed[0], packed[1]
    return path[:a1], Acceptance(packed[2 : 2 + a1], bonus), packed[2 + n + 1 : 2 + n + a1]


class StaticEngine:
    """Generation with static caches and CUDA graphs; one request at a time.

    max_length: cache slots (prompt + new tokens + one tree must fit); clipped to the target's maximum
    cuda_graphs: None replays graphs when the target is on CUDA; False runs the same code eagerly
    The first requests of each shape capture graphs (slower); time after a warm-up.
    """

    def __init__(self, target: Target, draft: MSDDraft | None, max_length: int = 2048, cuda_graphs: bool | None = None) -> None:
        self.target = target
        self.draft = draft
        self.static_target = StaticTarget(target, max_length, cuda_graphs)
        self.cuda_graphs = self.static_target._graphed.enabled
        self._drafters: dict[bool, StaticDrafter] = {}
        self._growers: dict[tuple, GraphedTreeGrower] = {}

    def _drafter(self, track_visual: bool) -> StaticDrafter:
        if self.draft is None:
            raise ValueError("speculative decoding needs a draft; this StaticEngine was built without one")
        drafter = self._drafters.get(track_visual)
        if drafter is None:
            drafter = self._drafters[track_visual] = StaticDrafter(
                self.draft, self.target.lm_head, self.static_target.capacity, track_visual, self.cuda_graphs
            )
        drafter.reset()
        return drafter

    def _tree(self, tree_builder: TreeBuilder, drafter: StaticDrafter, token: int, root_hidden, root_visual):
        """The step's tree and its ancestor mask: graphed growth for the builders that describe theirs
        (`growth`: EAGLE-2, OPT-Tree), the builder's own `build` for any other."""
        growth = getattr(tree_builder, "growth", None)
        if growth is None:
            tree = tree_builder.build(drafter, token, root_hidden, root_visual)
            return tree, tree.ancestor_mask(tree_builder.max_depth)
        key = (drafter.track_visual, growth)
        grower = self._growers.get(key)
        if grower is None:
            grower = self._growers[key] = GraphedTreeGrower(drafter, growth, self.cuda_graphs)
        return grower.build(token, root_hidden, root_visual)

    def _check_room(self, prompt: EmbeddedPrompt, config: GenerationConfig, tree_nodes: int) -> None:
        need = prompt.input_ids.shape[0] + config.max_new_tokens + tree_nodes + 1
        if need > self.static_target.usable:
            raise ValueError(
                f"prompt ({prompt.input_ids.shape[0]}) + max_new_tokens ({config.max_new_tokens}) + a tree "
                f"({tree_nodes}) needs {need} cache slots; the engine holds {self.static_target.usable}: "
                f"raise max_length"
            )

    @torch.inference_mode()
    def plain_generate(
        self, prompt: EmbeddedPrompt, config: GenerationConfig, generator: torch.Generator | None = None, profile: bool = False
    ) -> GenerationResult:
        """One target forward per token (a CUDA graph replay each): the baseline."""
        target, runner = self.target, self.static_target
        _check_prompt(target, prompt)
        self._check_room(prompt, config, 0)
        stopper = Stopper(target.tokenizer, target.eos_token_id, config.max_new_tokens, config.until)
        start = time.perf_counter()
        _, logits = runner.prefill(prompt.inputs_embeds[0])
        token = next_token(logits[-1], config, generator)
        _synchronize(target.device)
        stats = DecodeStats(prefill_s=time.perf_counter() - start)
        clock = _PhaseClock(target.device, profile)
        length = prompt.input_ids.shape[0]
        tokens = [token]
        device = target.device
        current = torch.full((1,), token, device=device)
        while stopper.first_stop(tokens, len(tokens) - 1) is None:
            _, logits = runner.forward_next(current, length + len(tokens) - 1)
            stats.verify_s += clock.lap()
            if config.greedy:
                current = logits[-1].argmax()[None]
                token = int(current)
            else:
                token = next_token(logits[-1], config, generator)
                current = torch.full((1,), token, device=device)
            tokens.append(token)
            stats.steps += 1
            stats.accepted.append(0)
            stats.other_s += clock.lap()
        _synchronize(device)
        stats.wall_s = time.perf_counter() - start
        stats.new_tokens = len(tokens)
        return GenerationResult(stopper.text(tokens), tokens, stats)

    @torch.inference_mode()
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
        """`lmms_msd.decoding.speculative_generate` on static caches (same arguments, same outputs)."""
        target, runner = self.target, self.static_target
        _check_prompt(target, prompt)
        max_depth = tree_builder.max_depth
        self._check_room(prompt, config, getattr(tree_builder, "node_budget", getattr(tree_builder, "total_tokens", 0)) + 1)
        stopper = Stopper(target.tokenizer, target.eos_token_id, config.max_new_tokens, config.until)
        start = time.perf_counter()
        hidden, logits = runner.prefill(prompt.inputs_embeds[0])
        token = next_token(logits[-1], config, generator)
        drafter = self._drafter(track_visual)
        root_hidden, root_visual = drafter.prefill(prompt, hidden, token)
        _synchronize(target.device)
        stats = DecodeStats(prefill_s=time.perf_counter() - start)
        clock = _PhaseClock(target.device, profile)
        prefix_len = prompt.input_ids.shape[0]
        tokens = [token]
        stop = stopper.first_stop(tokens, 0)
        while stop is None:
            tree, ancestors = self._tree(tree_builder, drafter, token, root_hidden, root_visual)
            stats.draft_s += clock.lap()
            tree_hidden, logits = runner.forward_tokens(tree.tokens, prefix_len + tree.depths, prefix_len, ancestors)
            stats.verify_s += clock.lap()
            if config.greedy:
                path, result, path_tokens = accept_greedy_on_device(tree, logits, ancestors)
            else:
                result = accept_sampling(tree, logits, config, generator)
                path = torch.tensor(result.path, device=target.device)
                path_tokens = tree.tokens[path[1:]].tolist()
            stats.steps += 1
            stats.accepted.append(result.accepted)
            if observer is not None:
                observer(tree, logits, result)
            committed_ids = torch.cat([tree.tokens[path[1:]], torch.full((1,), result.bonus, device=target.device)])
            checked = len(tokens)
            tokens += path_tokens + [result.bonus]
            stop = stopper.first_stop(tokens, checked)
            if stop is not None:
                stats.discarded = len(tokens) - stop
                stats.accepted[-1] = stop - checked - 1
                del tokens[stop:]
                stats.other_s += clock.lap()
                break
            runner.keep_path(prefix_len, path)
            prefix_len += path.shape[0]
            root_hidden, root_visual = drafter.advance(committed_ids, tree_hidden[path])
            token = result.bonus
            stats.other_s += clock.lap()
        _synchronize(target.device)
        stats.wall_s = time.perf_counter() - start
        stats.new_tokens = len(tokens)
        return GenerationResult(stopper.text(tokens), tokens, stats)

