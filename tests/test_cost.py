"""The cost model and OPT-Tree's stop=cost (lmms_msd.speculative.cost): the rule against the literal
numbers of its worked example, the JSON cache, and decoding with it equal to plain decoding."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from decoding_fixtures import following_draft, random_draft, random_prompt, tiny_target
from test_fast_engine import capture_rules, with_eos  # noqa: F401  (capture_rules: autouse, graphed code under CaptureRules)
from test_tree_bookkeeping import OPT_TABLE, MarkovDrafter

from lmms_msd.speculative import cost as cost_module
from lmms_msd.speculative import tree as tree_module
from lmms_msd.speculative.cost import (
    CostKey,
    CostModel,
    best_size,
    cached_cost_model,
    describe,
    load_cost_model,
    save_cost_model,
)
from lmms_msd.speculative.decoding import plain_generate, speculative_generate
from lmms_msd.speculative.fast import StaticEngine
from lmms_msd.speculative.runtime import EagerRuntime
from lmms_msd.speculative.sampling import GenerationConfig
from lmms_msd.speculative.tree import OptTree, Tree, grow_tree
from lmms_msd.speculative.verify import accept_sampling

KEY = CostKey(
    runtime="EagerRuntime", device="cpu test", dtype="float32", hidden_size=64, layers=2, vocab_size=48,
    image_positions=4, top_k=2, frontier_only=True, scorer="DraftConfidence", track_visual=False,
)  # fmt: skip
# float32 rates of sums of a few weights over a few seconds: relative rounding ~1e-7; the literals
# below are rounded to 4 decimals, so they are compared to 1e-4
LITERAL = 1e-4


def literal_cost(verify_s, widths=(1, 4, 8), bucketed=True, key=KEY) -> CostModel:
    return CostModel(
        key=key, prefix_len=100, widths=widths, verify_s=verify_s, bucketed=bucketed, draft_root_s=0.1,
        draft_level_s=0.1, step_s=0.0, plain_step_s=0.9,
    )  # fmt: skip


def test_step_seconds_bucketed_or_linear():
    # CostModel._verify's example: widths 1, 4, 8 at 1.0, 1.0, 1.3; a tree of 6 tokens (5 nodes)
    bucketed = literal_cost((1.0, 1.0, 1.3)).step_seconds(levels=2, max_nodes=7)
    assert bucketed.tolist() == pytest.approx([1.2, 1.2, 1.2, 1.2, 1.5, 1.5, 1.5, 1.5], abs=1e-6)
    linear = literal_cost((1.0, 1.0, 1.3), bucketed=False).step_seconds(levels=1, max_nodes=5)
    assert linear[5].item() == pytest.approx(0.1 + 1.15, abs=1e-6)
    with pytest.raises(ValueError, match="lower node_budget"):
        literal_cost((1.0, 1.0, 1.3)).step_seconds(levels=1, max_nodes=8)  # 9 tokens, 8 timed


def test_best_size_example():
    # best_size's docstring: weights .6, .3 over 1.1 s each: rates 1/1.1, 1.6/1.1, 1.9/1.1
    rate, size = best_size(torch.tensor([0.6, 0.3]).log(), torch.tensor([1.1, 1.1, 1.1])).tolist()
    assert (rate, size) == (pytest.approx(1.9 / 1.1, rel=1e-6), 2.0)
    # a tie keeps the smaller tree: 1/1 and 2/2
    assert best_size(torch.tensor([0.0]), torch.tensor([1.0, 2.0])).tolist() == [1.0, 0.0]


def grow_recording(monkeypatch, tree: OptTree):
    """Build `tree` on the worked example's draft; return the tree, the drafter and every (rate, size)."""
    seen = []

    def recording(pool_scores, levels, budget, cost):
        result = cost_module.cost_aware_size(pool_scores, levels, budget, cost)
        seen.append(result)
        return result

    monkeypatch.setattr(tree_module, "cost_aware_size", recording)
    drafter = MarkovDrafter(OPT_TABLE)
    built = grow_tree(drafter, tree, 0, torch.nn.functional.one_hot(torch.tensor(0), 4).float())
    return built, drafter, seen


def test_cost_stop_worked_example(monkeypatch):
    """OptTree's docstring, stop "cost": grows levels 2 and 3, stops when level 3's rate falls, keeps 3 nodes."""
    settings = dict(node_budget=6, max_depth=4, top_k=2, variant="upstream", stop="cost")
    built, drafter, seen = grow_recording(monkeypatch, OptTree(**settings, cost=literal_cost((1.0, 1.0, 1.3))))
    assert [size for _, size in seen] == [2, 3, 3]
    assert [rate for rate, _ in seen] == pytest.approx([1.7273, 1.8083, 1.6692], abs=LITERAL)
    assert built.tokens.tolist() == [0, 1, 2, 0] and built.parents.tolist() == [-1, 0, 0, 1]
    assert drafter.tree_used == 4  # levels 1 and 2 fed (two forwards of 2 nodes); level 3 came from the second
    # verification at 3.0 for any tree: level 1's best is the plain step, before any forward
    built, drafter, seen = grow_recording(monkeypatch, OptTree(**settings, cost=literal_cost((1.0, 3.0, 3.0))))
    assert seen == [(pytest.approx(1 / 1.1, abs=LITERAL), 0)]
    assert built.tokens.tolist() == [0] and built.parents.tolist() == [-1] and drafter.tree_used == 0


def test_cost_stop_needs_a_model_wide_enough():
    with pytest.raises(ValueError, match="'cost' a cost model"):
        OptTree(stop="cost")
    with pytest.raises(ValueError, match="'cost' a cost model"):
        OptTree(cost=literal_cost((1.0, 1.0, 1.3)))
    with pytest.raises(ValueError, match="stop is one of"):
        OptTree(stop="fast")
    with pytest.raises(ValueError, match="lower node_budget"):
        OptTree(node_budget=8, top_k=2, stop="cost", cost=literal_cost((1.0, 1.0, 1.3)))
    spec = OptTree(stop_delta=0.5, stop="cost", cost=literal_cost((1.0,) * 7, widths=(1, 2, 4, 8, 16, 32, 64)))
    assert spec.stop_delta is None and OptTree(**spec.settings()) == spec  # stop "cost" reads no stop_delta


# ---- the cache -------------------------------------------------------------------------------------------------
def test_cache_round_trip_is_keyed(tmp_path):
    model = literal_cost((1.0, 1.0, 1.3))
    path = tmp_path / KEY.file_name()
    save_cost_model(model, path)
    assert load_cost_model(path, KEY) == model
    assert torch.equal(load_cost_model(path).verify_table, model.verify_table)
    assert json.loads(path.read_text())["key"]["device"] == "cpu test"
    # every field of the key names a different file, and a file read for another key is refused
    for f in dataclasses.fields(CostKey):
        value = getattr(KEY, f.name)
        other = dataclasses.replace(KEY, **{f.name: (not value) if isinstance(value, bool) else value + (1 if isinstance(value, int) else "x")})
        assert other.file_name() != KEY.file_name(), f.name
        with pytest.raises(ValueError, match="delete it to measure again"):
            load_cost_model(path, other)
    assert describe(model)["verify_ms"] == {"1": 1000.0, "4": 1000.0, "8": 1300.0}


def tiny_pair(draft_kind: str):
    target = with_eos(tiny_target(3, context_scale=0.05 if draft_kind == "following" else 1.0), 10_000)
    return target, following_draft(target) if draft_kind == "following" else random_draft(target, 11)


def test_cached_cost_model_measures_once(tmp_path, monkeypatch):
    target, draft = tiny_pair("following")
    runtime, tree = EagerRuntime(target, draft), OptTree(node_budget=12, max_depth=4, top_k=4)
    model, path, measured = cached_cost_model(runtime, tree, folder=tmp_path)
    assert measured and path.is_file() and path.parent == tmp_path
    assert model.widths == (1, 2, 4, 8, 16)  # the buckets up to the first holding 13 tokens
    assert (model.key.runtime, model.key.hidden_size, model.key.layers, model.key.vocab_size) == ("EagerRuntime", 64, 2, 48)
    assert model.key.image_positions == 4  # 28 px, patch 14, no class token
    assert list(model.verify_s) == sorted(model.verify_s)  # made non-decreasing in the width
    assert min(model.verify_s) > 0 and model.draft_root_s > 0 and model.step_s > 0 and model.plain_step_s > 0

    def fail(*args, **kwargs):
        raise AssertionError("the cached model should have been read")

    monkeypatch.setattr(cost_module, "measure_cost_model", fail)
    again, same_path, measured = cached_cost_model(runtime, tree, folder=tmp_path)
    assert (again, same_path, measured) == (model, path, False)


# ---- decoding ------------------------------------------------------------------------------------------------
def record_trees(trees: list):
    def observer(tree, logits, acceptance):
        trees.append((tree.tokens.tolist(), tree.parents.tolist(), acceptance.accepted))

    return observer


COSTS = {
    # verification cheap next to drafting: trees of a few levels
    "trees": dict(verify_s=(1.0, 1.02, 1.05, 1.1, 1.2), widths=(1, 2, 4, 8, 16), bucketed=False),
    # any tree costs three plain steps: plain steps only
    "plain": dict(verify_s=(1.0, 3.0, 3.0, 3.0, 3.0), widths=(1, 2, 4, 8, 16), bucketed=False),
}


@pytest.mark.parametrize("draft_kind", ["following", "random"])
@pytest.mark.parametrize("costs", sorted(COSTS))
@pytest.mark.parametrize("variant", ["frontier", "upstream"])
def test_cost_aware_decoding_equals_plain_and_the_static_engine(draft_kind, costs, variant):
    target, draft = tiny_pair(draft_kind)
    model = literal_cost(key=dataclasses.replace(KEY, top_k=4, frontier_only=variant == "upstream"), **COSTS[costs])
    tree = OptTree(node_budget=12, max_depth=6, top_k=4, variant=variant, stop="cost", cost=model)
    runtime, engine = EagerRuntime(target, draft), StaticEngine(target, draft, max_length=256)
    sizes = []
    for i in range(4):
        prompt = random_prompt(target, 500 + i, with_image=i % 2 == 0)
        config = GenerationConfig(max_new_tokens=20 + 5 * i)
        plain = plain_generate(runtime, prompt, config)
        eager_trees, fast_trees = [], []
        eager = speculative_generate(runtime, prompt, config, tree, observer=record_trees(eager_trees))
        fast = speculative_generate(engine, prompt, config, tree, observer=record_trees(fast_trees))
        assert eager.token_ids == fast.token_ids == plain.token_ids
        assert fast_trees == eager_trees  # the graphed grower builds the eager grower's trees
        assert 1 + sum(a + 1 for a in eager.stats.accepted) == eager.stats.new_tokens
        sizes += [len(tokens) - 1 for tokens, _, _ in eager_trees]
    if costs == "plain":
        assert set(sizes) == {0}  # every step a plain one, counted as a step with nothing accepted
    elif draft_kind == "following":
        assert max(sizes) >= 4 and min(sizes) < 12  # real trees, sized below the budget at times


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cost_trees_under_cuda_graphs_change_nothing():
    """Replayed level and selection graphs (one per depth and kept size, the root alone included)."""
    target, draft = tiny_pair("following")
    target.model.to("cuda")
    draft = draft.to("cuda")
    graphs = StaticEngine(target, draft, max_length=256, cuda_graphs=True)
    eager = StaticEngine(target, draft, max_length=256, cuda_graphs=False)
    for costs in sorted(COSTS):
        model = literal_cost(key=dataclasses.replace(KEY, top_k=4, frontier_only=False), **COSTS[costs])
        tree = OptTree(node_budget=12, max_depth=6, top_k=4, stop="cost", cost=model)
        for i in range(3):
            prompt = random_prompt(target, 900 + i)
            config = GenerationConfig(max_new_tokens=30)
            want = plain_generate(EagerRuntime(target), prompt, config).token_ids
            a, b = speculative_generate(graphs, prompt, config, tree), speculative_generate(eager, prompt, config, tree)
            assert a.token_ids == b.token_ids == want and a.stats.accepted == b.stats.accepted


def test_plain_step_counts_as_a_step():
    target, draft = tiny_pair("random")
    tree = OptTree(node_budget=12, max_depth=6, top_k=4, stop="cost",
                   cost=literal_cost(key=dataclasses.replace(KEY, top_k=4, frontier_only=False), **COSTS["plain"]))  # fmt: skip
    config = GenerationConfig(max_new_tokens=15)
    result = speculative_generate(EagerRuntime(target, draft), random_prompt(target, 7), config, tree)
    assert result.stats.steps == 14 and result.stats.accepted == [0] * 14  # the first token comes from the prefill
    assert (result.stats.tau, result.stats.alpha) == (1.0, 0.0)


def test_plain_step_samples_from_the_target():
    """A tree of the root alone verifies by drawing the bonus from the processed distribution itself."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    root = Tree(torch.tensor([0]), torch.tensor([-1]), torch.tensor([0]), torch.zeros(1))
    config = GenerationConfig(do_sample=True, temperature=1.0)
    generator = torch.Generator().manual_seed(0)
    n = 10_000
    draws = torch.tensor([accept_sampling(root, probs.log()[None], torch.ones(1, 1, dtype=torch.bool), config, generator).bonus for _ in range(n)])
    frequencies = torch.bincount(draws, minlength=4).float() / n
    # each frequency has standard deviation sqrt(p (1 - p) / n) <= 0.005: 0.025 is five of them
    assert torch.allclose(frequencies, probs, atol=0.025)


def test_cost_aware_decoding_on_the_bundled_pair(tmp_path):
    """Built by the pipeline on the eager runtime; raw, calibrated-weight and tilt scorers, each with its
    own cost model; plain decoding's tokens."""
    from PIL import Image

    from lmms_msd.pipeline import (
        PairSettings,
        RuntimeSettings,
        TreeSettings,
        build_decoder,
        build_tree,
        decode,
        load_pair,
    )
    from lmms_msd.testbed.bundled import bundled_calibrator, bundled_paths

    target_dir, draft_dir = bundled_paths()
    decoder = build_decoder(load_pair(PairSettings(str(target_dir), str(draft_dir), "cpu", "float32")), RuntimeSettings("eager"))
    calibrated = [{"calibrator": str(bundled_calibrator()), "calibrator_mode": mode} for mode in ("weight", "tilt")]
    trees = [build_tree(TreeSettings("opt", stop="cost", cost_cache=str(tmp_path), **c), decoder) for c in [{}, *calibrated]]
    for tree in trees:
        key = tree.cost_model["key"]
        assert tree.builder.stop == "cost" and tree.builder.stop_delta is None and tree.cost_model["measured_now"]
        assert key["image_positions"] == 576 and list(tree.cost_model["verify_ms"])[-1] == "64"  # 60 nodes and the root
        assert key["runtime"] == "EagerRuntime" and key["track_visual"] == tree.track_visual
    assert [t.cost_model["key"]["scorer"] for t in trees] == ["DraftConfidence", "CalibratedScorer", "TiltScorer"]
    config = GenerationConfig(max_new_tokens=48)
    for i, colour in enumerate(["white", "navy"]):
        prompt = decoder.target.prepare(f"Describe the chart, part {i}.", [Image.new("RGB", (64, 64), colour)])
        want = decode(decoder, prompt, config).token_ids
        for tree in trees:
            assert decode(decoder, prompt, config, tree=tree.builder, track_visual=tree.track_visual).token_ids == want


def test_rates_are_expected_tokens_per_second():
    # tree_rates by hand: weights .5, .25 over 2, 2.5, 3 s: 1/2, 1.5/2.5, 1.75/3
    rates = cost_module.tree_rates(torch.tensor([0.5, 0.25]).log(), torch.tensor([2.0, 2.5, 3.0, 9.0]))
    assert rates.tolist() == pytest.approx([0.5, 0.6, 1.75 / 3], rel=1e-6)
    assert math.isclose(float(rates.max()), 0.6, rel_tol=1e-6)


# ---- the plugin's model_arg ----------------------------------------------------------------------------------
def test_plugin_stop_cost_reads_the_cache_it_wrote(tmp_path, monkeypatch):
    from lmms_msd.lmms_eval.plugin import LlavaMsdCalibrated
    from lmms_msd.lmms_eval.statistics import run_meta

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = LlavaMsdCalibrated(tree="opt", stop="cost", stats_path=str(tmp_path / "s.json"))
    meta = run_meta("m", first.args, first.tree, first._calibration, first.decoder.target, 1, "now")["tree"]
    assert meta["stop"] == "cost" and meta["stop_delta"] is None and meta["cost_model"]["measured_now"] is True
    assert meta["cost_model"]["key"]["scorer"] == "CalibratedScorer"  # the bundled pair's calibrator, the default
    assert first.tree.builder.cost is not None and str(tmp_path) in meta["cost_model"]["file"]
    second = LlavaMsdCalibrated(tree="opt", stop="cost", stats_path=str(tmp_path / "s.json"))
    assert second.tree.cost_model["measured_now"] is False
    assert second.tree.builder.cost == first.tree.builder.cost


@pytest.mark.parametrize("args", [{"stop": "cost"}, {"stop": "cost", "tree": "opt", "use_msd": False}, {"stop": "fast", "tree": "opt"}])
def test_plugin_stop_cost_needs_opt_tree(args):
    from lmms_msd.lmms_eval.plugin import LlavaMsdCalibrated

    with pytest.raises(ValueError, match="stop must be one of"):
        LlavaMsdCalibrated(**args)
