"""The static-cache engine (lmms_msd.speculative.fast) gives the outputs of the eager loops, token for token.

On CPU the engine runs its code without CUDA graphs; the graph test runs where CUDA is (the GPU
machine), checking that replayed graphs change nothing.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import torch
from decoding_fixtures import (
    CharTokenizer,
    children_lists,
    following_draft,
    random_draft,
    random_prompt,
    tiny_target,
)

from lmms_msd.speculative.decoding import plain_generate, speculative_generate
from lmms_msd.speculative.fast import StaticEngine
from lmms_msd.speculative.runtime import EagerRuntime
from lmms_msd.speculative.sampling import GenerationConfig
from lmms_msd.speculative.tree import EagleTree, OptTree, Tree
from lmms_msd.speculative.verify import accept_greedy


@pytest.fixture(autouse=True)
def capture_rules(monkeypatch):
    """Every function the engine would capture in a CUDA graph runs under `CaptureRules` on CPU: a host
    scalar copied to the device or a host synchronisation inside one fails here, not on the GPU."""
    from lmms_msd.speculative.fast.graphs import CaptureRules, GraphedFunction

    def checked_call(self, *args):
        if self.enabled:
            return original(self, *args)
        with CaptureRules():
            return original(self, *args)  # disabled: `fn` itself

    original = GraphedFunction.__call__
    monkeypatch.setattr(GraphedFunction, "__call__", checked_call)


@pytest.fixture
def graphed_advances(monkeypatch):
    """The m of every call of the graphed draft advance (`StaticDrafter._advance_rows`), in order."""
    from lmms_msd.speculative.fast.static_drafter import StaticDrafter

    def counted(self, next_tokens, *args, **kwargs):
        calls.append(next_tokens.shape[0])
        return original(self, next_tokens, *args, **kwargs)

    calls = []
    original = StaticDrafter._advance_rows
    monkeypatch.setattr(StaticDrafter, "_advance_rows", counted)
    return calls


def took_every_commit(advances: list[int], result) -> bool:
    """Whether `advances` (the m of each graphed draft advance) are the commits of a speculative generation: one
    per step, accepted + 1 tokens; the last step's is queued before its stop check, so it commits the whole path,
    of which the stop may have kept fewer (stats.accepted counts what was kept)."""
    accepted = result.stats.accepted
    if not accepted:
        return advances == []
    return (
        len(advances) == len(accepted)
        and advances[:-1] == [a + 1 for a in accepted[:-1]]
        and advances[-1] >= accepted[-1] + 1
    )


TREES = {
    "eagle2": EagleTree(total_tokens=20, depth=5, top_k=4),  # nodes to depth 6
    "opt": OptTree(node_budget=24, stop_delta=0.2, max_depth=7, top_k=4, variant="frontier"),
    "opt_upstream": OptTree(node_budget=24, stop_delta=0.2, max_depth=7, top_k=4, variant="upstream"),
    # upstream's own shape: frontier width = branching = node budget
    "opt_upstream_wide": OptTree(node_budget=12, stop_delta=0.5, max_depth=6, top_k=12, variant="upstream"),
}


def with_eos(target, eos_token_id):
    return dataclasses.replace(target, tokenizer=CharTokenizer(target.tokenizer.vocab_size, eos_token_id))


@pytest.mark.parametrize("draft_kind", ["following", "random"])
def test_static_engine_greedy_equals_eager(draft_kind, graphed_advances):
    target = tiny_target(3, context_scale=0.05 if draft_kind == "following" else 1.0)
    draft = following_draft(target) if draft_kind == "following" else random_draft(target, 11)
    no_eos = with_eos(target, 10_000)
    engine = StaticEngine(no_eos, draft, max_length=256)  # one engine for every request: caches are reused
    deep = 0
    for i in range(8):
        prompt = random_prompt(target, 300 + i, with_image=i % 2 == 0)
        config = GenerationConfig(max_new_tokens=12 + 3 * i)
        plain = plain_generate(EagerRuntime(no_eos), prompt, config)
        assert plain_generate(engine, prompt, config).token_ids == plain.token_ids
        for name, tree in TREES.items():
            eager = speculative_generate(EagerRuntime(no_eos, draft), prompt, config, tree)
            graphed_advances.clear()
            fast = speculative_generate(engine, prompt, config, tree)
            assert fast.token_ids == plain.token_ids, name
            assert fast.stats.accepted == eager.stats.accepted, name
            assert took_every_commit(graphed_advances, fast), name  # every step's draft advance took the graphed path
            deep += max(fast.stats.accepted) >= 3
        # a stop string taken from the plain text, so that it lands inside an accepted path
        text = plain.text
        k = next((k for k in range(3, len(text) - 2) if text[k : k + 2] not in text[: k + 1]), None)
        if k is not None:
            until = GenerationConfig(max_new_tokens=config.max_new_tokens, until=(text[k : k + 2],))
            fast = speculative_generate(engine, prompt, until, TREES["opt"])
            assert fast.text == plain_generate(EagerRuntime(no_eos), prompt, until).text == text[:k]
    # an EOS inside the output
    eos = plain.token_ids[5]
    with_stop = with_eos(target, eos)
    config = GenerationConfig(max_new_tokens=40)
    expected = plain_generate(EagerRuntime(with_stop), prompt, config).token_ids
    assert speculative_generate(StaticEngine(with_stop, draft, max_length=256), prompt, config, TREES["opt"]).token_ids == expected
    if draft_kind == "following":
        assert deep >= 8, "the following draft should have paths of 3+ accepted tokens"


def test_static_engine_sampling_equals_eager():
    """Same seed, same draws: the static engine samples exactly what the eager loop samples."""
    target = with_eos(tiny_target(5, context_scale=0.05), 10_000)
    draft = following_draft(target)
    engine = StaticEngine(target, draft, max_length=256)
    config = GenerationConfig(max_new_tokens=25, do_sample=True, temperature=1.0, top_p=0.9)
    for i in range(4):
        prompt = random_prompt(target, 700 + i)
        eager = speculative_generate(EagerRuntime(target, draft), prompt, config, TREES["opt"], generator=torch.Generator().manual_seed(i))
        fast = speculative_generate(engine, prompt, config, TREES["opt"], generator=torch.Generator().manual_seed(i))
        assert fast.token_ids == eager.token_ids
        plain_eager = plain_generate(EagerRuntime(target), prompt, config, generator=torch.Generator().manual_seed(i))
        plain_fast = plain_generate(engine, prompt, config, generator=torch.Generator().manual_seed(i))
        assert plain_fast.token_ids == plain_eager.token_ids


def walk_greedy(tree: Tree, logits: torch.Tensor) -> tuple[list[int], int]:
    """The greedy rule read literally: from the root, follow the child equal to the argmax."""
    best = logits.argmax(dim=-1).tolist()
    tokens, children = tree.tokens.tolist(), children_lists(tree.parents.tolist())
    path = [0]
    while True:
        match = [c for c in children[path[-1]] if tokens[c] == best[path[-1]]]
        if not match:
            return path, best[path[-1]]
        path.append(match[0])


def test_acceptance_on_the_device_follows_the_argmax_walk():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(1, 30, (1,), generator=g))
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
        depths = [0] * n
        for i in range(1, n):
            depths[i] = depths[parents[i]] + 1
        # distinct tokens among siblings, from a 6-token vocabulary so that matches are common
        tokens, used = [3], {}
        for i in range(1, n):
            taken = used.setdefault(parents[i], set())
            free = [t for t in range(6) if t not in taken] or [0]
            token = free[int(torch.randint(0, len(free), (1,), generator=g))]
            taken.add(token)
            tokens.append(token)
        tree = Tree(
            tokens=torch.tensor(tokens), parents=torch.tensor(parents), depths=torch.tensor(depths), scores=torch.zeros(n)
        )
        logits = torch.randn(n, 6, generator=g)
        result = accept_greedy(tree, logits, tree.ancestor_mask(max(depths) + 1))
        path, bonus = walk_greedy(tree, logits)
        assert (result.path, result.bonus) == (path, bonus), trial
        assert result.path_tokens == [tokens[i] for i in path[1:]]


def test_greedy_acceptance_inside_the_verification_equals_verify_then_accept():
    """`StaticEngine.verify_greedy` (acceptance in the verification's graph, over rows padded to their bucket:
    20 and up to 25 nodes in 32 rows) gives `verify` then `accept_greedy`'s outcome, and the path, committed tokens
    and hidden states `commit` takes, equal to the ones the loop made from them before."""
    target = tiny_target(3, context_scale=0.05)
    draft = following_draft(target)
    engine = StaticEngine(target, draft, max_length=256)
    lengths = []
    for i, tree_spec in enumerate([TREES["eagle2"], TREES["opt"]] * 3):
        prompt = random_prompt(target, 400 + i)
        sequence, hidden, logits = engine.prefill(prompt, 64)
        token = int(logits[-1].argmax())
        root = engine.prefill_draft(sequence, prompt, hidden, token, False)
        tree, ancestors = engine.draft_tree(sequence, tree_spec, token, root)
        assert 16 < len(tree) < 32  # padded rows in the bucket of 32
        verified = engine.verify_greedy(sequence, tree, ancestors)
        got = (verified.acceptance, verified.path.tolist(), verified.next_tokens.tolist(), verified.path_hidden.clone())
        tree_hidden, tree_logits = engine.verify(sequence, tree, ancestors)
        expected = accept_greedy(tree, tree_logits, ancestors)
        assert got[0] == expected and torch.equal(verified.logits, tree_logits)
        assert got[1] == expected.path and got[2] == expected.path_tokens + [expected.bonus]
        assert torch.equal(got[3], tree_hidden[expected.path])
        lengths.append(len(expected.path))
    assert max(lengths) >= 3, lengths  # paths past the root's first child


@pytest.mark.parametrize(("mode", "variant"), [("weight", "frontier"), ("weight", "upstream"), ("tilt", "upstream")])
def test_calibrated_tree_with_visual_attention_equals_eager(mode, variant, graphed_advances):
    """The bundled pair with its calibrator (attention bins need the draft's visual attention), scoring
    nodes as weights or as the thesis's logit tilt, under either OPT-Tree selection rule."""
    from lmms_msd.calibration.isotonic import GroupedIsotonicCalibrator
    from lmms_msd.calibration.scorer import calibrated_tree
    from lmms_msd.calibration.token_types import token_type_table
    from lmms_msd.models.draft import load_draft
    from lmms_msd.models.loading import load_target
    from lmms_msd.testbed.bundled import bundled_calibrator, bundled_paths

    target_dir, draft_dir = bundled_paths()
    target = load_target(str(target_dir), dtype=torch.float32)
    draft = load_draft(str(draft_dir))
    calibrator = GroupedIsotonicCalibrator.load(bundled_calibrator())
    types = token_type_table(target.tokenizer, target.vocab_size)
    tree = calibrated_tree(
        OptTree(node_budget=40, stop_delta=0.3, max_depth=8, top_k=8, variant=variant), calibrator, types, "cpu", mode
    )
    engine = StaticEngine(target, draft, max_length=1024)  # the bundled prompt: 576 image positions and the text
    config = GenerationConfig(max_new_tokens=40)
    from PIL import Image

    for i, colour in enumerate(["white", "navy"]):
        prompt = target.prepare(f"Describe the chart, part {i}.", [Image.new("RGB", (64, 64), colour)])
        eager = speculative_generate(EagerRuntime(target, draft), prompt, config, tree, track_visual=True)
        graphed_advances.clear()
        fast = speculative_generate(engine, prompt, config, tree, track_visual=True)
        assert fast.token_ids == eager.token_ids == plain_generate(EagerRuntime(target), prompt, config).token_ids
        assert fast.stats.accepted == eager.stats.accepted
        assert took_every_commit(graphed_advances, fast)


@pytest.mark.parametrize("track_visual", [False, True])
def test_graphed_advance_gives_the_eager_outputs(track_visual, graphed_advances):
    """`StaticDrafter.advance` (one graph per m and width, the prefix a device tensor) gives exactly what the
    `Drafter.advance` it replaces gives on a `StaticDrafter` (fuse, `_append_block`, then `_run`'s padded
    head): the same root hidden and visual intensity and the same cache, over steps of m = 1..17 (row
    buckets 1 to 32, m on a bucket and past one), a tree's slots in between (overwritten by the next
    advance), a prefix crossing the attention width 256, and m = 70 past the largest row bucket (run
    eagerly). (An eager `Drafter` attends over P + m slots, not a bucketed width: the same up to rounding.)"""
    from lmms_msd.speculative.drafting import Drafter
    from lmms_msd.speculative.fast.static_drafter import StaticDrafter

    target = tiny_target(3)
    draft = random_draft(target, 11)
    g = torch.Generator().manual_seed(0)
    prompt = random_prompt(target, 5)
    hidden_size, length = draft.config.hidden_size, prompt.input_ids.shape[0]
    eager, static = (StaticDrafter(draft, target.lm_head, 512, track_visual, cuda_graphs=False) for _ in range(2))
    eager.advance = partial(Drafter.advance, eager)  # the path before the graphed advance
    prompt_hidden = torch.randn(length, hidden_size, generator=g)
    roots = [d.prefill(prompt, prompt_hidden, 3) for d in (eager, static)]

    steps = [1, 3, 2, 4, 5, 8, 9, 17, 1, 16, 7] * 3 + [70, 6]
    for step, m in enumerate(steps):
        assert torch.equal(roots[0].hidden, roots[1].hidden), step
        if track_visual:
            assert torch.equal(roots[0].visual, roots[1].visual), step
        else:
            assert roots[0].visual is None and roots[1].visual is None
        if step % 3 == 1:  # a tree's first level in the slots after the prefix, which the advance overwrites
            tokens, parents = torch.randint(0, 40, (3,), generator=g), torch.randn(3, hidden_size, generator=g)
            for d in (eager, static):
                d.expand(tokens, parents, 1, torch.zeros(3, 0, dtype=torch.bool))
        tokens, hidden = torch.randint(0, 40, (m,), generator=g), torch.randn(m, hidden_size, generator=g)
        roots = [d.advance(tokens, hidden) for d in (eager, static)]
        assert eager.committed == static.committed and static.tree_used == 0
    assert static.committed > 256, "the prefix should cross an attention width"
    assert graphed_advances == steps  # every advance took the new path (m = 70 calls its function directly)
    for mine, theirs in zip(static.cache, eager.cache, strict=True):
        assert torch.equal(mine.keys[:, :, : static.committed], theirs.keys[:, :, : eager.committed])
        assert torch.equal(mine.values[:, :, : static.committed], theirs.values[:, :, : eager.committed])


@pytest.mark.parametrize("track_visual", [False, True])
def test_a_long_prompt_fills_the_draft_cache_through_a_padded_graph(track_visual, monkeypatch):
    """The one-request engine's drafter (`graph_prompts`) pads a prompt longer than its row buckets to a multiple
    of PROMPT_STEP for its graph (padding rows write the scratch slot): the root and the cache at the prompt's
    slots are those of the same drafter running the prompt at its own length, up to rounding."""
    from lmms_msd.speculative.fast.graphs import PROMPT_STEP
    from lmms_msd.speculative.fast.static_drafter import ROW_BUCKETS, StaticDrafter

    target = tiny_target(3)
    draft = random_draft(target, 11)
    g = torch.Generator().manual_seed(1)
    prompt = target.embed(torch.randint(0, target.vocab_size - 1, (ROW_BUCKETS[-1] + 19,), generator=g), None)
    length = prompt.input_ids.shape[0]
    assert length > ROW_BUCKETS[-1] and length % PROMPT_STEP
    hidden = torch.randn(length, draft.config.hidden_size, generator=g)
    drafters = [StaticDrafter(draft, target.lm_head, 256, track_visual, cuda_graphs=False, graph_prompts=graphs) for graphs in (False, True)]
    rows = []
    for d in drafters:
        monkeypatch.setattr(d, "_prompt_graphed", lambda *a, real=d._prompt_graphed: rows.append(a[0].shape[0]) or real(*a))
    own, padded = (d.prefill(prompt, hidden, 5) for d in drafters)
    assert rows == [-(-length // PROMPT_STEP) * PROMPT_STEP]  # the padded drafter's; the other ran its own length eagerly
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded.hidden, own.hidden, **tol)
    if track_visual:
        torch.testing.assert_close(padded.visual, own.visual, **tol)
    for mine, theirs in zip(drafters[1].cache, drafters[0].cache, strict=True):
        torch.testing.assert_close(mine.keys[:, :, :length], theirs.keys[:, :, :length], **tol)
        torch.testing.assert_close(mine.values[:, :, :length], theirs.values[:, :, :length], **tol)


def test_a_padded_prompt_forward_computes_the_prompts_own(monkeypatch):
    """`StaticTarget.prefill` pads a prompt to a multiple of PROMPT_STEP (the graphed forward's shape) and gives
    what transformers' forward over the prompt alone gives: the hidden states of every prompt position, the
    logits at the last one ([1, V]) and the cache at the prompt's slots; a prompt whose padding would not fit
    the cache runs at its own length (without graphs), the same."""
    from lmms_msd.speculative.fast.graphs import PROMPT_STEP
    from lmms_msd.speculative.fast.static_target import StaticTarget

    target = tiny_target(2)
    for seed in range(4):
        prompt = random_prompt(target, 40 + seed, with_image=seed % 2 == 0)
        length = prompt.input_ids.shape[0]
        assert length % PROMPT_STEP, "a prompt that needs padding"
        want_hidden, want_logits = EagerRuntime(target).prefill(prompt, 8)[1:]
        for capacity in (128, length + 1):  # padding fits; it does not (usable: capacity - 1)
            static = StaticTarget(target, capacity)
            shapes = []
            monkeypatch.setattr(static, "_graphed_prompt", lambda x, last, real=static._graphed_prompt: shapes.append(x.shape[0]) or real(x, last))
            hidden, logits = static.prefill(prompt.inputs_embeds[0])
            assert shapes == ([-(-length // PROMPT_STEP) * PROMPT_STEP] if capacity == 128 else [])
            assert hidden.shape == want_hidden.shape and logits.shape == (1, target.vocab_size)
            torch.testing.assert_close(hidden, want_hidden, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(logits[0], want_logits[-1], rtol=1e-4, atol=1e-4)
            eager_runtime = EagerRuntime(target)
            sequence = eager_runtime.prefill(prompt, 8)[0]
            keys = torch.stack([layer.keys[0] for layer in sequence.cache.layers])  # [layers, kv_heads, L, D]
            torch.testing.assert_close(static.keys[:, :, :length], keys, rtol=1e-4, atol=1e-4)


def test_a_tree_forward_makes_its_slots_and_mask_inside_the_graph(monkeypatch):
    """`StaticTarget.forward_tokens` pads only the tokens, positions and tree mask; the graphed `_forward_padded`
    makes the slots and the additive mask from the prefix and the count. The docstring's example, written out:
    P = 5, n = 2 in a bucket of T = 2 (here 2: TOKEN_BUCKETS holds 2), and n = 3 in T = 4; S = 256."""
    from lmms_msd.speculative.fast.static_target import StaticTarget

    static = StaticTarget(tiny_target(0), 300)
    seen = {}
    monkeypatch.setattr(static, "_forward_tokens", lambda tokens, positions, slots, mask: seen.update(locals()) or (tokens, tokens))
    scratch, low = 299, torch.finfo(static.lm_head.dtype).min
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)  # a root and two children
    static.forward_tokens(torch.tensor([7, 8, 9]), torch.tensor([5, 6, 6]), 5, tree)
    assert seen["tokens"].tolist() == [7, 8, 9, 0] and seen["positions"].tolist() == [5, 6, 6, 0]
    assert seen["slots"].tolist() == [5, 6, 7, scratch]
    visible = torch.zeros(4, 256, dtype=torch.bool)
    visible[:3, :5] = True
    visible[:3, 5:8] = tree
    visible[3, 0] = True
    assert torch.equal(seen["mask"] == 0, visible) and bool((seen["mask"][~visible] == low).all())
    static.forward_tokens(torch.tensor([7, 8]), torch.tensor([5, 6]), 5)  # causal
    assert seen["slots"].tolist() == [5, 6]
    assert torch.equal(seen["mask"][:, :8] == 0, torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool))
    assert not bool((seen["mask"][:, 8:] == 0).any())


def test_a_graph_with_static_inputs_reads_the_tensors_of_its_capture():
    """GraphedFunction(static_inputs=True) reads its arguments in place: each call computes from the values the
    caller wrote into them; a call with other tensors of the same shape raises, on CPU as on CUDA."""
    from lmms_msd.speculative.fast.graphs import GraphedFunction

    def double(x):
        return (x * 2,)

    graphed = GraphedFunction(double, enabled=torch.cuda.is_available(), device=torch.device("cuda") if torch.cuda.is_available() else None, static_inputs=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.tensor([1, 2], device=device)
    assert graphed(x)[0].tolist() == [2, 4]
    x.fill_(5)
    assert graphed(x)[0].tolist() == [10, 10]
    assert graphed(torch.tensor([1, 2, 3], device=device))[0].tolist() == [2, 4, 6]  # another shape: its own graph
    with pytest.raises(ValueError, match="double.*static_inputs"):
        graphed(torch.tensor([1, 2], device=device))


def test_too_long_generation_names_the_sizes():
    target = tiny_target(0)
    engine = StaticEngine(target, random_draft(target, 1), max_length=64)
    prompt = random_prompt(target, 1)
    with pytest.raises(ValueError, match="raise max_length"):
        speculative_generate(engine, prompt, GenerationConfig(max_new_tokens=60), TREES["opt"])


def test_a_second_prefill_invalidates_the_first_sequence():
    """The engine's caches hold one generation: a prefill starts a new one and the old one refuses to go on."""
    target = tiny_target(0)
    engine = StaticEngine(target, random_draft(target, 1), max_length=128)
    first, _, _ = engine.prefill(random_prompt(target, 1), 8)
    second, _, logits = engine.prefill(random_prompt(target, 2), 8)
    with pytest.raises(RuntimeError, match="no longer live"):
        engine.forward_next(first, logits[-1].argmax()[None])
    committed = second.committed
    engine.forward_next(second, logits[-1].argmax()[None])
    assert second.committed == committed + 1


def cuda_pair():
    """The tiny target (no EOS) and a following draft, on CUDA."""
    target = tiny_target(3, context_scale=0.05)
    target.model.to("cuda")
    return with_eos(target, 10_000), following_draft(target).to("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_change_nothing():
    target, draft = cuda_pair()
    graphs = StaticEngine(target, draft, max_length=256, cuda_graphs=True)
    eager = StaticEngine(target, draft, max_length=256, cuda_graphs=False)
    for i in range(4):
        prompt = random_prompt(target, 900 + i)
        config = GenerationConfig(max_new_tokens=30)
        want = plain_generate(EagerRuntime(target), prompt, config).token_ids
        assert plain_generate(graphs, prompt, config).token_ids == want
        for tree in TREES.values():
            a = speculative_generate(graphs, prompt, config, tree)
            b = speculative_generate(eager, prompt, config, tree)
            assert a.token_ids == b.token_ids == want and a.stats.accepted == b.stats.accepted
    # greedy: the trees were verified by the graph with the acceptance inside (`forward_tree_greedy`), plain decoding's
    # steps by their own graph, and the draft's advances by graphs of their own
    assert len(graphs.static_target._graphed_greedy) > 0 and len(graphs.static_target._graphed_next) > 0
    assert len(graphs._drafters[False]._advancing) > 0


def test_the_engine_runs_the_vision_tower_through_a_graphed_function():
    """A static engine routes the target's image features through a `GraphedFunction` (here disabled, so
    under `CaptureRules`: the vision tower and projector must be capturable); the prompts it embeds are the
    ones embedded without it, and training (with gradients) still runs the tower directly."""
    target = tiny_target(3, context_scale=0.05)
    want = [random_prompt(target, 950 + i, with_image=True).inputs_embeds for i in range(2)]
    assert target.vision_runner is None
    StaticEngine(target, None, max_length=256)
    assert target.vision_runner is not None and not target.vision_runner.enabled
    calls = []
    runner = target.vision_runner

    def counting(pixel_values):
        calls.append(pixel_values.shape[0])
        return runner(pixel_values)

    target.vision_runner = counting
    for i in range(2):
        assert torch.equal(random_prompt(target, 950 + i, with_image=True).inputs_embeds, want[i])
    assert calls == [1, 1]
    pixels = torch.rand(2, 3, 28, 28)  # random_prompt's size
    with torch.enable_grad():
        target.image_features(pixels)
    assert calls == [1, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_vision_gives_the_eager_features():
    target, draft = cuda_pair()
    pixels = torch.rand(2, 3, 28, 28, device="cuda")  # random_prompt's size
    with torch.inference_mode():
        want = [target.vision_forward(pixels[:n].to(target.dtype)) for n in (1, 2)]
        StaticEngine(target, draft, max_length=256)
        assert target.vision_runner.enabled
        for _ in range(2):  # captured, then replayed
            for n, features in zip((1, 2), want):
                assert torch.equal(target.image_features(pixels[:n]), features)


@pytest.fixture
def inside_graphed(monkeypatch):
    """A function telling whether the caller runs inside a `GraphedFunction` call (graphs on or off)."""
    from lmms_msd.speculative.fast.graphs import GraphedFunction

    def counted_call(self, *args):
        depth[0] += 1
        try:
            return graphed_call(self, *args)
        finally:
            depth[0] -= 1

    depth, graphed_call = [0], GraphedFunction.__call__
    monkeypatch.setattr(GraphedFunction, "__call__", counted_call)
    return lambda: depth[0] > 0


@pytest.fixture
def attention_calls(monkeypatch, inside_graphed):
    """Every SDPA call as (inside a `GraphedFunction`, cuDNN's backend allowed), in order."""

    def spy(*args, **kwargs):
        calls.append((inside_graphed(), torch.backends.cuda.cudnn_sdp_enabled()))
        return sdpa(*args, **kwargs)

    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def test_forwards_of_varying_shapes_run_without_cudnn_attention(attention_calls):
    """cuDNN's SDPA builds a plan for every new shape (36-318 ms each on the H200): the static engines'
    eager forwards (prompts, the batched draft's advance) run without it (`varying_shapes`), and the graphed
    ones, whose shapes are bucketed, keep it. Checked on both engines, the batched one with batched drafting."""
    from lmms_msd.speculative.batching import BatchRequest, generate_batched
    from lmms_msd.speculative.fast.batched_engine import BatchedStaticEngine

    target = tiny_target(3)
    draft = following_draft(target)
    config = GenerationConfig(max_new_tokens=10)
    prompts = [random_prompt(target, 400 + i, with_image=i % 2 == 0) for i in range(3)]
    attention_calls.clear()  # the vision tower's, preparing the prompts (one shape per image count: cuDNN pays)
    speculative_generate(StaticEngine(target, draft, max_length=256), prompts[0], config, TREES["opt"])
    engine = BatchedStaticEngine(target, draft, max_batch=3, max_length=256, batched_drafting=True)
    for _ in generate_batched(engine, [BatchRequest(p, config, tree=TREES["eagle2"]) for p in prompts], 3):
        pass
    eager = [cudnn for graphed, cudnn in attention_calls if not graphed]
    graphed = [cudnn for graphed, cudnn in attention_calls if graphed]
    assert eager and graphed, "both kinds of forward ran"
    assert not any(eager), f"{sum(eager)} of {len(eager)} eager attention calls allowed cuDNN"
    assert all(graphed), f"{graphed.count(False)} of {len(graphed)} graphed attention calls lost cuDNN"
