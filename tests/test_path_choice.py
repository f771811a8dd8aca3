"""use_msd=auto (lmms_msd.speculative.cost.PathChoice): each request plain or speculative by the measured
costs. The rule on the cost models measured on this project's CPU and on the H200 7B-shaped testbed, and
decoding through the pipeline and the plugin: every request equals the chosen path's own decoding."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from decoding_fixtures import following_draft, random_prompt, tiny_target
from test_fast_engine import with_eos
from test_plugin import docs, tiny_draft_dir  # noqa: F401  (fixtures)

from lmms_msd.speculative.cost import CostKey, CostModel, PathChoice, ceiling_rate
from lmms_msd.speculative.decoding import plain_generate, speculative_generate
from lmms_msd.speculative.runtime import EagerRuntime
from lmms_msd.speculative.sampling import GenerationConfig
from lmms_msd.speculative.tree import EagleTree, Tree

KEY = CostKey(
    runtime="EagerRuntime", device="cpu test", dtype="float32", hidden_size=128, layers=4, vocab_size=32000,
    image_positions=576, top_k=10, frontier_only=False, scorer="DraftConfidence", track_visual=False,
)  # fmt: skip
MS = 1e-3
# The bundled pair on this project's CPU (benchmarks/cpu_compare_trees/compare_trees.md, "opt frontier raw")
CPU = CostModel(
    key=KEY, prefix_len=672, widths=(1, 2, 4, 8, 16, 32, 64), bucketed=False,
    verify_s=tuple(t * MS for t in (7.1463, 9.4257, 9.4257, 9.4257, 10.5611, 14.1936, 19.3883)),
    draft_root_s=3.1705 * MS, draft_level_s=7.2546 * MS, step_s=2.7514 * MS, plain_step_s=6.6445 * MS,
)  # fmt: skip
# The H200 7B-shaped testbed, static engine (benchmarks/h200_7b_576/bench.md, opt_cost's cost model)
H200 = CostModel(
    key=dataclasses.replace(KEY, runtime="StaticEngine", device="NVIDIA H200", dtype="float16", hidden_size=4096, layers=32),
    prefix_len=672, widths=(1, 2, 4, 8, 16, 32, 64), bucketed=True,
    verify_s=tuple(t * MS for t in (5.73, 6.33, 6.33, 6.34, 6.49, 6.62, 6.86)),
    draft_root_s=0.39 * MS, draft_level_s=0.56 * MS, step_s=1.31 * MS, plain_step_s=5.33 * MS,
)  # fmt: skip
EAGLE2 = EagleTree()  # 58 draft nodes over 6 levels


def eagle2_step(depth: int = 6, nodes: int = 58) -> Tree:
    """A tree of `nodes` draft nodes whose deepest is at `depth` (its shape is all PathChoice reads)."""
    depths = torch.tensor([0] + [min(i + 1, depth) for i in range(nodes)])
    return Tree(torch.zeros(nodes + 1, dtype=torch.long), torch.arange(-1, nodes), depths, torch.zeros(nodes + 1))


def feed(choice: PathChoice, accepted: list[int], **tree) -> None:
    """One speculative request of len(accepted) steps, each verifying the same tree."""
    for _ in accepted:
        choice.observer(eagle2_step(**tree), torch.zeros(1), None)
    choice.record(len(accepted), accepted)


def test_cpu_costs_choose_plain_before_any_request():
    """A draft level costs more than a plain step: even trees accepted whole (L + 1 tokens for L levels)
    commit fewer tokens per second than plain steps (ceiling_rate's worked example)."""
    assert ceiling_rate(CPU, 10, 60) == pytest.approx(8 / 58.8747e-3, rel=1e-5)  # L = 7
    choice = PathChoice(CPU, EAGLE2.max_depth, EAGLE2.budget)
    assert choice.plain_rate == pytest.approx(150.50, abs=0.01) and choice.ceiling_rate < choice.plain_rate
    decisions = [choice.choose() for _ in range(3)]
    assert {(d.path, d.reason) for d in decisions} == {("plain", "ceiling")} and choice.estimated_rate is None


def test_h200_costs_choose_speculative():
    """Plain 5.33 ms a token; EAGLE-2 trees (58 nodes, 6 levels) cost 6.86 + 0.39 + 5 x 0.56 + 1.31 =
    11.36 ms and commit tau 3.9 on the testbed: speculative (PathChoice's worked example)."""
    choice = PathChoice(H200, EAGLE2.max_depth, EAGLE2.budget)
    first = choice.choose()
    assert (first.path, first.reason, first.estimated_rate) == ("speculative", "exploring", None)
    feed(choice, [3, 2, 3, 3, 3, 3, 3, 3, 3, 3])  # tau 3.9
    assert choice.seconds == pytest.approx(10 * 11.36 * MS, rel=1e-5)
    assert choice.estimated_rate == pytest.approx(3.9 / 11.36e-3, rel=1e-5)  # 343 tokens/s
    second = choice.choose()
    assert (second.path, second.reason) == ("speculative", "estimate") and second.estimated_rate > second.plain_rate


def test_h200_costs_with_a_draft_never_right_turn_plain():
    """The same costs with nothing accepted: 1 token per 11.36 ms loses to plain steps; shallower
    trees (deepest node 2: 6.86 + 0.39 + 0.56 + 1.31 ms) are counted at their own levels."""
    choice = PathChoice(H200, EAGLE2.max_depth, EAGLE2.budget)
    choice.choose()
    feed(choice, [0] * 4, depth=2)
    assert choice.seconds == pytest.approx(4 * 9.12 * MS, rel=1e-5)
    decision = choice.choose()
    assert (decision.path, decision.reason) == ("plain", "estimate")
    assert decision.estimated_rate == pytest.approx(1 / 9.12e-3, rel=1e-5)
    assert choice.describe()["requests"] == {"speculative (exploring)": 1, "plain (estimate)": 1}


def test_record_checks_the_observed_steps():
    choice = PathChoice(H200, EAGLE2.max_depth, EAGLE2.budget)
    choice.observer(eagle2_step(), torch.zeros(1), None)
    with pytest.raises(AssertionError, match="2 steps decoded but 1 observed"):
        choice.record(2, [1, 1])


# ---- decoding -------------------------------------------------------------------------------------------------
def tiny_decoder():
    from lmms_msd.pipeline import Decoder

    target = with_eos(tiny_target(3, context_scale=0.05), 10_000)
    draft = following_draft(target)
    return Decoder(target, draft, EagerRuntime(target, draft))


def requests_of(target, config: GenerationConfig, n: int):
    from lmms_msd.pipeline import Request

    prompts = [random_prompt(target, 700 + i, with_image=i % 2 == 0) for i in range(n)]
    return [Request(f"request {i}", lambda p=p: (p, config), seed=10 + i) for i, p in enumerate(prompts)], prompts


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("costs", ["cpu", "h200", "h200, never right"])
def test_decode_requests_equal_the_chosen_paths_own_decoding(costs, temperature):
    """Every request's tokens are those of the path chosen for it, decoded alone with the request's seed:
    at T=0 plain decoding's (both paths), at T > 0 an exact sampler's draw (the choice reads only earlier
    requests, never the request's own generator). The H200 costs with a draft that looks never right
    (every step recorded as accepting nothing) turn plain after the first request."""
    from lmms_msd.pipeline import TreeSetup, decode_requests, request_generator

    decoder = tiny_decoder()
    target, tree = decoder.target, EagleTree(total_tokens=12, depth=3, top_k=4)
    choice = PathChoice(CPU if costs == "cpu" else H200, tree.max_depth, tree.budget)
    if costs == "h200, never right":
        record = choice.record
        choice.record = lambda steps, accepted: record(steps, [0] * steps)
    config = GenerationConfig(max_new_tokens=24, do_sample=temperature > 0, temperature=temperature or 1.0)
    requests, prompts = requests_of(target, config, 4)
    results = decode_requests(decoder, requests, TreeSetup(tree, track_visual=False, path_choice=choice), progress=False)
    want = {"cpu": ["plain"] * 4, "h200": ["speculative"] * 4, "h200, never right": ["speculative"] + ["plain"] * 3}[costs]
    assert [d.path for d in choice.decisions] == want
    assert [r.stats.speculative for r in results] == [p == "speculative" for p in want]
    for request, prompt, path, result in zip(requests, prompts, want, results):
        generator = request_generator(config, request.seed, target.device)
        alone = (plain_generate(decoder.runtime, prompt, config, generator) if path == "plain"
                 else speculative_generate(decoder.runtime, prompt, config, tree, generator))  # fmt: skip
        assert result.token_ids == alone.token_ids
        if config.greedy:
            assert result.token_ids == plain_generate(decoder.runtime, prompt, config).token_ids
    speculative = [r for r, p in zip(results, want) if p == "speculative"]
    assert choice.steps == sum(r.stats.steps for r in speculative)
    if costs == "h200":
        assert choice.tokens == sum(r.stats.steps + sum(r.stats.accepted) for r in speculative)


# ---- the plugin ---------------------------------------------------------------------------------------------
def coerced(**model_args):
    """The plugin's model_args with its defaults, coerced (one process)."""
    from lmms_msd.lmms_eval.model_args import coerce_model_args
    from lmms_msd.lmms_eval.plugin import LlavaMsdCalibrated

    params = inspect.signature(LlavaMsdCalibrated.__init__).parameters
    plugin_only = ("self", "batch_size", "max_batch_size", "max_batch", "batch_node_budgets", "batched_drafting", "max_length", "prefetch", "torch_compile",
                   "unknown")  # fmt: skip
    names = [n for n in params if n not in plugin_only]
    return coerce_model_args(**({n: params[n].default for n in names} | model_args), world_size=1, local_rank=0)


def test_use_msd_auto_is_the_default_and_parsed():
    from lmms_msd.lmms_eval.model_args import tree_settings

    default, auto, true, false = coerced(), coerced(use_msd="auto"), coerced(use_msd="true"), coerced(use_msd="false")
    assert default == auto and (auto.use_msd, auto.use_msd_auto) == (True, True) and tree_settings(auto).choose_path
    assert (true.use_msd, true.use_msd_auto) == (True, False) and not tree_settings(true).choose_path
    assert (false.use_msd, false.use_msd_auto) == (False, False) and tree_settings(false) is None
    with pytest.raises(ValueError, match="use_msd must be true or false, got 'maybe' \\(or auto"):
        coerced(use_msd="maybe")


@pytest.mark.parametrize("costs", ["cpu", "h200"])
def test_plugin_default_reports_the_path_and_why(costs, tiny_hf_dir, tiny_draft_dir, docs, tmp_path, monkeypatch):  # noqa: F811
    """The plugin's default (use_msd=auto) on the CPU's costs decodes every request plainly, as
    use_msd=false answers; on the H200's, speculatively; the report says which path ran and why."""
    import json

    from test_plugin import request, run

    from lmms_msd import pipeline
    from lmms_msd.lmms_eval.plugin import LlavaMsdCalibrated

    model = CPU if costs == "cpu" else H200
    monkeypatch.setattr(pipeline, "cached_cost_model", lambda *args: (model, tmp_path / "cost.json", False))
    lm = LlavaMsdCalibrated(pretrained=str(tiny_hf_dir), msd_model_path=str(tiny_draft_dir), stats_path=str(tmp_path / "auto.json"))
    plain = LlavaMsdCalibrated(pretrained=str(tiny_hf_dir), use_msd="false", stats_path=str(tmp_path / "plain.json"))
    requests = [request(i) for i in range(3)]
    assert run(lm, requests, docs) == run(plain, [request(i) for i in range(3)], docs)
    report = json.loads((tmp_path / "auto.json").read_text())
    assert report["decoding"] == "auto" and report["model_args"]["use_msd_auto"] is True
    auto, decisions = report["use_msd_auto"], lm.tree.path_choice.decisions
    if costs == "cpu":
        assert auto["requests"] == {"plain (ceiling)": 3} and auto["estimated_tok_s"] is None
    else:  # the first request explores; the others go by the tiny random draft's realised steps
        assert (decisions[0].path, decisions[0].reason) == ("speculative", "exploring")
        estimate = auto["estimated_tok_s"]
        assert [(d.path, d.reason) for d in decisions[1:]] == [("speculative" if estimate > auto["plain_tok_s"] else "plain", "estimate")] * 2
    assert auto["plain_tok_s"] == round(1 / model.plain_step_s, 2) and auto["cost_model"]["plain_step_ms"] == round(model.plain_step_s / MS, 4)
    assert [row["path"] for body in report["tasks"].values() for row in body["samples"]] == [d.path for d in decisions]
    assert json.loads((tmp_path / "plain.json").read_text())["decoding"] == "plain"


def test_the_default_tree_is_the_devices_fastest(monkeypatch):
    """tree=auto (the default): on CUDA OPT-Tree on the raw draft confidence with stop_delta 0.6 (no
    calibrator, also with the bundled pair); EAGLE-2 elsewhere and without speculative decoding; a named
    tree keeps its own defaults (tree=opt: stop_delta 0.3 and, with the bundled pair, its calibrator)."""
    from lmms_msd.lmms_eval import model_args

    cpu = coerced(device="cpu")
    assert (cpu.tree, cpu.stop) == ("eagle2", "delta") and cpu.calibrator is None
    cuda = coerced(device="cuda")  # coercion loads nothing: no GPU needed
    assert (cuda.tree, cuda.stop, cuda.stop_delta, cuda.engine, cuda.calibrator) == ("opt", "delta", 0.6, "static", None)
    assert (coerced(device="cuda", use_msd="false").tree, coerced(device="cuda", use_msd="false").stop) == ("eagle2", "delta")
    named = coerced(device="cuda", tree="opt")
    assert (named.stop, named.stop_delta) == ("delta", 0.3) and named.calibrator is not None
    assert coerced(device="cuda", tree="eagle2").tree == "eagle2"
    assert coerced(device="cuda", stop_delta="0.45").stop_delta == 0.45 and coerced(device="cuda", calibrator="none").calibrator == "none"
    assert coerced(device="cuda", stop="cost").stop == "cost" and coerced(device="cpu", tree="opt", stop="cost").stop == "cost"
    assert model_args.device_default_tree("cuda:1", True) == ("opt", 0.6) and model_args.device_default_tree("cpu", True)[0] == "eagle2"
    monkeypatch.setattr(model_args, "default_device", lambda: "cuda")
    assert coerced().tree == "opt"  # the default device decides when none is named
