"""`lmms_msd.pipeline`: which pair, the fit check, the tree and the runtime built from settings, and the
one dispatch of the decoding loops. Tiny checkpoints, random drafts and the pair they make from conftest."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import random_image, save_random_draft

from lmms_msd.pipeline import (
    Decoder,
    Pair,
    PairPaths,
    Request,
    RuntimeSettings,
    TreeSettings,
    build_decoder,
    build_tree,
    decode,
    decode_requests,
    default_device,
    fitted_calibrator,
    inflation_shape,
    load_decoder,
    load_pair,
    online_calibration,
    resolve_pair,
    tree_builder,
    uses_bundled_pair,
)
from lmms_msd.speculative.fast import StaticEngine
from lmms_msd.speculative.runtime import EagerRuntime
from lmms_msd.speculative.sampling import GenerationConfig
from lmms_msd.speculative.tree import EagleTree, OptTree
from lmms_msd.testbed.bundled import bundled_calibrator, bundled_paths
from lmms_msd.testbed.inflate import TextShape

SHORT = GenerationConfig(max_new_tokens=6)


@pytest.fixture(scope="module")
def eager(tiny_pair) -> Decoder:
    return build_decoder(tiny_pair, RuntimeSettings())


@pytest.fixture(scope="module")
def prompts(tiny_pair):
    return [tiny_pair.target.prepare(f"What is shown in chart {i}?", [random_image(40, 30, seed=i)]) for i in range(3)]


# ---- which pair ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pretrained, msd_model_path, bundled",
    [(None, None, True), ("t", "d", False), ("t", None, False), (None, "d", False)],
)
def test_naming_neither_means_the_bundled_pair(pretrained, msd_model_path, bundled):
    assert uses_bundled_pair(pretrained, msd_model_path) is bundled


def test_resolve_pair():
    target, draft = bundled_paths()
    assert resolve_pair(None, None) == PairPaths(str(target), str(draft), bundled=True)
    assert resolve_pair("t", "d") == PairPaths("t", "d", bundled=False)
    assert resolve_pair("t", None, need_draft=False) == PairPaths("t", None, bundled=False)
    for named in (("t", None), (None, "d")):
        with pytest.raises(ValueError, match=r"name both --pretrained and --msd_model_path, or neither \(the bundled pair\)"):
            resolve_pair(*named)
    with pytest.raises(ValueError, match="name both"):
        resolve_pair(None, "d", need_draft=False)  # a draft alone never goes with the bundled target


def test_the_bundled_pair_comes_with_its_calibrator():
    assert fitted_calibrator(resolve_pair(None, None)) == str(bundled_calibrator())
    assert fitted_calibrator(resolve_pair("t", "d")) is None


def test_a_missing_bundled_pair_says_how_to_name_one(monkeypatch, tmp_path):
    monkeypatch.setattr("lmms_msd.testbed.bundled.BUNDLED", tmp_path)
    with pytest.raises(FileNotFoundError, match="the bundled miniature pair is missing .*pass pretrained=... and msd_model_path="):
        resolve_pair(None, None)


# ---- load and check ----------------------------------------------------------------------------------------
def test_load_pair(tiny_pair, tiny_pair_settings):
    assert tiny_pair.draft is not None and tiny_pair.draft.config.hidden_size == tiny_pair.target.hidden_size == 64
    assert load_pair(dataclasses.replace(tiny_pair_settings, msd_model_path=None)).draft is None


def test_a_draft_that_does_not_fit_names_both_sizes(tiny_pair_settings, tiny_hf_target, tmp_path):
    wrong = save_random_draft(tiny_hf_target, tmp_path / "wrong", hidden_size=32)
    settings = dataclasses.replace(tiny_pair_settings, msd_model_path=str(wrong))
    message = (
        rf"msd_model_path='{wrong}' cannot draft for pretrained='{tiny_pair_settings.pretrained}': the draft does not fit the "
        r"target \(hidden size: draft 32, target 64\); use the MSD head trained for this target"
    )
    with pytest.raises(ValueError, match=message):
        load_pair(settings)


def test_inflation_shape():
    for unset in (None, "", "none", " None "):
        assert inflation_shape(unset) is None
    assert inflation_shape("512x6") == TextShape(512, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
                                                 intermediate_size=1376)  # fmt: skip
    with pytest.raises(ValueError, match="unknown shape '13b'"):
        inflation_shape("13b")


# ---- the runtime ----------------------------------------------------------------------------------------------
def test_the_engine_setting_picks_the_runtime(tiny_pair, eager):
    assert isinstance(eager.runtime, EagerRuntime) and (eager.target, eager.draft) == (tiny_pair.target, tiny_pair.draft)
    static = build_decoder(tiny_pair, RuntimeSettings("static", max_length=256))
    assert isinstance(static.runtime, StaticEngine) and not static.runtime.cuda_graphs  # CPU: no graphs
    assert static.runtime.static_target.capacity == 256
    with pytest.raises(ValueError, match=r"engine must be one of \['eager', 'static'\], got 'turbo'"):
        build_decoder(tiny_pair, RuntimeSettings("turbo"))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"engine": "turbo"}, r"engine must be one of \['eager', 'static'\], got 'turbo'"),
        ({"max_batch": 0}, "max_batch must be at least 1, got 0"),
        ({"compile": True}, "compile=True compiles the static engine's forwards; engine is 'eager': set engine 'static'"),
        ({"engine": "turbo", "compile": True}, "engine must be one of"),  # the engine first: compile's rule reads it
    ],
)
def test_runtime_settings_are_checked_when_made(fields, message):
    with pytest.raises(ValueError, match=message):
        RuntimeSettings(**fields)
    with pytest.raises(ValueError, match=message):  # a replace makes them again
        dataclasses.replace(RuntimeSettings("static"), **({"engine": "eager"} | fields))
    assert RuntimeSettings("static", max_batch=4, compile=True).compile


def test_load_decoder_puts_the_named_pair_on_the_runtime(tiny_pair_settings):
    paths = PairPaths(tiny_pair_settings.pretrained, tiny_pair_settings.msd_model_path, bundled=False)
    decoder = load_decoder(paths, RuntimeSettings("static", max_length=256))
    assert isinstance(decoder.runtime, StaticEngine) and decoder.runtime.static_target.capacity == 256
    assert decoder.draft is not None and decoder.target.device.type == default_device()  # device None: the default


# ---- the tree -------------------------------------------------------------------------------------------------
def test_tree_settings_default_to_the_builders_defaults():
    assert tree_builder(TreeSettings()) == EagleTree(total_tokens=59, depth=5, top_k=10)
    assert tree_builder(TreeSettings("opt")) == OptTree(node_budget=60, stop_delta=0.3, max_depth=10, top_k=10, variant="frontier")
    given = TreeSettings("opt", node_budget=20, stop_delta=0.5, max_depth=4, top_k=3, opt_variant="upstream", total_tokens=7)
    assert tree_builder(given) == OptTree(node_budget=20, stop_delta=0.5, max_depth=4, top_k=3, variant="upstream")
    assert tree_builder(TreeSettings(total_tokens=30, depth=3, top_k=4, node_budget=1)) == EagleTree(30, 3, 4)
    # total_tokens auto: the largest of upstream's candidates until timed
    assert tree_builder(TreeSettings(total_tokens=None)).total_tokens == 60


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"kind": "medusa"}, r"unknown tree 'medusa'; valid: \['eagle2', 'opt'\]"),
        ({"kind": "opt", "node_budget": 0}, "OPT-Tree needs node_budget >= 1"),
        ({"kind": "opt", "opt_variant": "wide"}, "OPT-Tree variant 'wide'"),
        ({"total_tokens": 1}, "EAGLE-2 tree needs total_tokens >= 2"),
        ({"calibrator": "c.json"}, "a calibrator scores OPT-Tree's nodes; tree 'eagle2' does not read one"),
        ({"stop": "cost"}, "only OPT-Tree stops otherwise than by delta"),
        ({"kind": "opt", "stop": "fast"}, r"stop='fast': one of \['delta', 'cost'\]"),
    ],
)
def test_bad_tree_settings_fail_on_construction(settings, message):
    with pytest.raises(ValueError, match=message):
        TreeSettings(**settings)


def test_a_calibrator_file_scores_opt_trees(eager):
    path = str(bundled_calibrator())
    weight = build_tree(TreeSettings("opt", top_k=3, calibrator=path), eager)
    assert type(weight.builder.scorer).__name__ == "CalibratedScorer" and weight.builder.top_k == 3
    assert weight.track_visual == weight.builder.scorer.needs_visual
    assert weight.calibrator.get_params()["label"] in ("hard", "soft")
    tilt = build_tree(TreeSettings("opt", calibrator=path, calibrator_mode="tilt"), eager)
    assert type(tilt.builder.scorer).__name__ == "TiltScorer"
    raw = build_tree(TreeSettings("opt"), eager)
    assert raw.builder == OptTree() and not raw.track_visual and raw.calibrator is None


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_total_tokens_auto_is_timed_on_the_runtime(tiny_pair, engine):
    decoder = build_decoder(tiny_pair, RuntimeSettings(engine, max_length=256))
    tree = build_tree(TreeSettings(total_tokens=None, depth=2, top_k=4), decoder)
    auto = tree.total_tokens_auto
    assert auto["candidates"] == [40, 48, 50, 56, 60] and len(auto["seconds"]) == 5 and min(auto["seconds"]) > 0
    assert tree.builder == EagleTree(auto["chosen"], 2, 4)


# ---- decoding ---------------------------------------------------------------------------------------------------
def test_decode_dispatches_plain_and_speculative_on_either_runtime(tiny_pair, eager, prompts):
    static = build_decoder(tiny_pair, RuntimeSettings("static", max_length=256))
    tree = EagleTree(total_tokens=10, depth=2, top_k=3)
    for prompt in prompts:
        plain = decode(eager, prompt, SHORT)
        assert plain.stats.steps == len(plain.token_ids) - 1 and plain.stats.alpha == 0.0
        for decoder in (eager, static):
            assert decode(decoder, prompt, SHORT).token_ids == plain.token_ids
            speculative = decode(decoder, prompt, SHORT, tree=tree, profile=True)
            assert speculative.token_ids == plain.token_ids and speculative.stats.draft_s > 0  # drafted: a tree was built
    assert decode(eager, prompts[0], SHORT, profile=True).stats.draft_s == 0.0  # plain decoding drafts nothing
    plain_only = build_decoder(Pair(tiny_pair.target, None), RuntimeSettings())
    with pytest.raises(ValueError, match="speculative decoding needs a draft"):
        decode(plain_only, prompts[0], SHORT, tree=tree)


def test_decode_requests_returns_results_in_request_order(eager, prompts):
    tree = build_tree(TreeSettings("opt", node_budget=8, top_k=3, max_depth=3), eager)
    expected = [decode(eager, prompt, SHORT).token_ids for prompt in prompts]
    prepared: list[int] = []

    def request(i: int) -> Request:
        def prepare():
            prepared.append(i)
            return prompts[i], SHORT

        return Request(f"request {i}", prepare, seed=i)

    results = decode_requests(eager, [request(i) for i in range(3)], tree, progress=False)
    assert [r.token_ids for r in results] == expected and prepared == [0, 1, 2]
    # online calibration decodes in its seeded order (seed 0: [2, 0, 1]); the results still come back in request order
    prepared.clear()
    online = online_calibration(3, 0.5, tree, eager.target, seed=0, label="hard", mode="weight", attention_bins=1,
                                min_group_size=3)  # fmt: skip
    results = decode_requests(eager, [request(i) for i in range(3)], tree, online, progress=False)
    assert [r.token_ids for r in results] == expected and prepared == online.order == [2, 0, 1] and online.finished == 3
    assert decode_requests(eager, [request(i) for i in range(3)], None, progress=False)[2].token_ids == expected[2]


def test_a_failing_request_is_named(eager, prompts):
    def broken():
        raise ValueError("the image is missing")

    requests = [Request("r0", lambda: (prompts[0], SHORT), 0), Request("request 1 (doc 7)", broken, 1)]
    with pytest.raises(ValueError, match=r"^request 1 \(doc 7\): the image is missing$"):
        decode_requests(eager, requests, None, progress=False)
