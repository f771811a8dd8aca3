"""The grouped isotonic calibrator: equality with scikit-learn, the torch evaluation, fall-backs,
JSON persistence, labels from verification logits, metrics, and its use in OPT-Tree."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.isotonic import IsotonicRegression

from lmms_msd.calibration.isotonic import GroupedIsotonicCalibrator
from lmms_msd.calibration.observations import (
    CalibrationObserver,
    Observations,
    split_by_request,
)
from lmms_msd.calibration.quality import (
    brier_score,
    compare_labels,
    evaluate,
    expected_calibration_error,
    reliability_diagram,
)
from lmms_msd.calibration.scorer import CalibratedScorer
from lmms_msd.calibration.token_types import CONTENT, FUNCTION, NUMBER
from lmms_msd.speculative.sampling import GenerationConfig
from lmms_msd.speculative.tree import OptTree, Tree, grow_tree
from lmms_msd.speculative.verify import Acceptance


def synthetic(n: int, seed: int, visual_effect: bool = True):
    """Features and hard labels where acceptance = confidence^2, lower for numbers and, for
    numbers, lower still when the row looks at the image."""
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(0, 1, n)
    types = rng.integers(0, 3, n)
    visual = rng.uniform(0, 1, n)
    p = confidence**2
    p = np.where(types == NUMBER, p * (0.3 if visual_effect else 1) * np.where(visual > 0.5, 0.5, 1.0), p)
    y = (rng.uniform(0, 1, n) < p).astype(np.float64)
    return np.stack([confidence, types.astype(np.float64), visual], axis=1), y


def sklearn_fit(x, y):
    return IsotonicRegression(increasing=True, out_of_bounds="clip", y_min=0, y_max=1).fit(x, y)


def test_estimator_contract():
    calibrator = GroupedIsotonicCalibrator(attention_bins=2, min_group_size=7, label="soft")
    assert calibrator.get_params() == {"attention_bins": 2, "min_group_size": 7, "label": "soft", "n_types": 3, "depth_edges": ()}
    X, y = synthetic(200, 0)
    assert calibrator.fit(X, y) is calibrator
    assert hasattr(calibrator, "models_") and not hasattr(clone(calibrator), "models_")
    with pytest.raises(RuntimeError, match="not fitted"):
        GroupedIsotonicCalibrator().predict(X)
    with pytest.raises(ValueError, match="label must be one of"):
        GroupedIsotonicCalibrator(label="fuzzy").fit(X, y)


def test_global_fit_predicts_exactly_what_sklearn_predicts():
    X, y = synthetic(500, 1)
    calibrator = GroupedIsotonicCalibrator(attention_bins=1, min_group_size=10**9).fit(X, y)
    assert calibrator.group_model_.tolist() == [[[0], [0], [0]]]  # one depth bucket
    queries = np.concatenate([np.linspace(-0.5, 1.5, 401), X[:50, 0]])
    Q = np.stack([queries, np.zeros_like(queries), np.zeros_like(queries)], axis=1)
    assert np.array_equal(calibrator.predict(Q), sklearn_fit(X[:, 0], y).predict(queries))


def test_groups_and_fallbacks_match_per_group_sklearn_fits():
    X, y = synthetic(3000, 2)
    # make CONTENT rare: it falls back to the global fit
    keep = (X[:, 1] != CONTENT) | (np.arange(len(y)) % 100 == 0)
    X, y = X[keep], y[keep]
    calibrator = GroupedIsotonicCalibrator(attention_bins=3, min_group_size=100).fit(X, y)
    edges = np.quantile(X[:, 2], [1 / 3, 2 / 3])
    assert np.array_equal(calibrator.bin_edges_, edges)
    bins = np.searchsorted(edges, X[:, 2], side="right")
    levels = [[calibrator.models_[i]["level"] for i in row] for row in calibrator.group_model_[0]]
    assert levels[NUMBER] == ["group"] * 3 and levels[FUNCTION] == ["group"] * 3 and levels[CONTENT] == ["global"] * 3
    rng = np.random.default_rng(3)
    q = rng.uniform(-0.2, 1.2, 300)
    for t, b in [(NUMBER, 0), (NUMBER, 2), (FUNCTION, 1)]:
        rows = (X[:, 1] == t) & (bins == b)
        v = {0: edges[0] - 0.01, 1: edges[0], 2: edges[1] + 0.01}[b]  # an edge belongs to the upper bin
        Q = np.stack([q, np.full_like(q, t), np.full_like(q, v)], axis=1)
        assert np.array_equal(calibrator.predict(Q), sklearn_fit(X[rows, 0], y[rows]).predict(q)), (t, b)
    Q = np.stack([q, np.full_like(q, CONTENT), np.full_like(q, 0.5)], axis=1)
    assert np.array_equal(calibrator.predict(Q), sklearn_fit(X[:, 0], y).predict(q))


def test_small_group_falls_back_to_its_token_type():
    X, y = synthetic(2000, 4)
    visual = X[:, 2]
    # numbers almost never in the top attention bin
    drop = (X[:, 1] == NUMBER) & (visual > 0.6) & (np.arange(len(y)) % 50 != 0)
    X, y = X[~drop], y[~drop]
    calibrator = GroupedIsotonicCalibrator(attention_bins=3, min_group_size=60).fit(X, y)
    number_models = [calibrator.models_[i] for i in calibrator.group_model_[0, NUMBER]]
    assert [m["level"] for m in number_models][:2] == ["group", "group"]
    assert number_models[2]["level"] == "type" and number_models[2]["name"] == "type=number"
    type_rows = X[:, 1] == NUMBER
    q = np.linspace(0, 1, 50)
    Q = np.stack([q, np.full_like(q, NUMBER), np.full_like(q, 0.99)], axis=1)
    assert np.array_equal(calibrator.predict(Q), sklearn_fit(X[type_rows, 0], y[type_rows]).predict(q))


def test_torch_evaluation_equals_numpy():
    X, y = synthetic(2000, 5)
    calibrator = GroupedIsotonicCalibrator(attention_bins=3, min_group_size=80).fit(X, y)
    rng = np.random.default_rng(6)
    Q = np.stack([rng.uniform(-0.1, 1.1, 1000), rng.integers(0, 3, 1000), rng.uniform(0, 1, 1000)], axis=1)
    Q[:30, 0] = calibrator.models_[0]["x"][:30]  # exactly on thresholds
    Q[30:40, 2] = calibrator.bin_edges_[0]  # exactly on a bin edge
    expected = calibrator.predict(Q)
    evaluate64 = calibrator.to_torch("cpu", torch.float64)
    got = evaluate64(torch.tensor(Q[:, 0]), torch.tensor(Q[:, 1]).long(), torch.tensor(Q[:, 2]))
    assert np.array_equal(got.numpy(), expected)
    evaluate32 = calibrator.to_torch("cpu", torch.float32)
    got32 = evaluate32(torch.tensor(Q[:, 0]).float().view(100, 10), torch.tensor(Q[:, 1]).long().view(100, 10), torch.tensor(Q[:, 2]).float().view(100, 10))
    assert got32.shape == (100, 10)
    assert np.allclose(got32.flatten().numpy(), expected, atol=1e-5)


def test_torch_segment_tables_worked_example():
    """TorchCalibrator's docstring example: thresholds x = (0.2, 0.6), y = (0.1, 0.5) -> 0.1 below x[0]
    (segment 0), 0.3 at t = 0.4 (segment 1), 0.5 above x[-1] (the clipped value); a row's visual
    intensity given once per row ([n, 1]) is broadcast over its children."""
    X = np.array([[0.2, 0, 0.0], [0.6, 0, 0.0]])
    calibrator = GroupedIsotonicCalibrator(attention_bins=1).fit(X, np.array([0.1, 0.5]))
    assert calibrator.models_[0]["x"].tolist() == [0.2, 0.6] and calibrator.models_[0]["y"].tolist() == [0.1, 0.5]
    evaluate = calibrator.to_torch("cpu", torch.float64)
    t = torch.tensor([[0.1, 0.2, 0.4], [0.6, 0.9, 1.0]], dtype=torch.float64)
    got = evaluate(t, torch.zeros(2, 3, dtype=torch.long), torch.tensor([[0.3], [0.7]], dtype=torch.float64))
    assert torch.allclose(got, torch.tensor([[0.1, 0.1, 0.3], [0.5, 0.5, 0.5]], dtype=torch.float64), rtol=0, atol=1e-15)
    assert np.array_equal(got.flatten().numpy(), calibrator.predict(np.stack([t.flatten().numpy(), np.zeros(6), np.zeros(6)], 1)))
    # attention bins: [n, 1] rows broadcast exactly as the same values spelled out per child
    X2, y2 = synthetic(2000, 9)
    binned = GroupedIsotonicCalibrator(attention_bins=3, min_group_size=80).fit(X2, y2).to_torch("cpu", torch.float32)
    rng = np.random.default_rng(2)
    confidence = torch.tensor(rng.uniform(0, 1, (6, 4)), dtype=torch.float32)
    types = torch.tensor(rng.integers(0, 3, (6, 4)))
    visual = torch.tensor(rng.uniform(0, 1, (6, 1)), dtype=torch.float32)
    assert torch.equal(binned(confidence, types, visual), binned(confidence, types, visual.expand(6, 4).contiguous()))


def test_torch_evaluation_of_a_constant_fit():
    X = np.array([[0.5, 0, 0.1], [0.5, 1, 0.2], [0.5, 2, 0.3]])
    calibrator = GroupedIsotonicCalibrator(attention_bins=1).fit(X, np.array([1.0, 0.0, 1.0]))
    assert len(calibrator.models_[0]["x"]) == 1
    q = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    expected = sklearn_fit(X[:, 0], np.array([1.0, 0.0, 1.0])).predict(q.numpy())
    assert np.array_equal(calibrator.to_torch("cpu", torch.float64)(q, torch.zeros(3, dtype=torch.long), None).numpy(), expected)


def test_json_round_trip_is_exact_and_plain_json(tmp_path):
    X, y = synthetic(1500, 7)
    calibrator = GroupedIsotonicCalibrator(attention_bins=2, min_group_size=50, label="soft").fit(X, y)
    path = calibrator.save(tmp_path / "calibrators" / "c.json", extra={"pair": "tiny"})
    data = json.loads(path.read_text())
    assert data["format"] == "lmms-msd-calibrator" and data["fitted_on"] == "soft" and data["info"] == {"pair": "tiny"}
    assert data["settings"] == {"attention_bins": 2, "min_group_size": 50, "label": "soft", "n_types": 3, "depth_edges": []}
    assert len(data["bin_edges"]) == 1
    loaded = GroupedIsotonicCalibrator.load(path)
    assert loaded.get_params() == calibrator.get_params()
    assert np.array_equal(loaded.predict(X), calibrator.predict(X))


def test_loading_refuses_what_is_not_a_calibrator(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not an lmms-msd calibrator"):
        GroupedIsotonicCalibrator.load(tmp_path / "x.json")
    (tmp_path / "p.json").write_bytes(b"\x80\x04\x95")  # a pickle's first bytes: not JSON, never unpickled
    with pytest.raises(ValueError):
        GroupedIsotonicCalibrator.load(tmp_path / "p.json")
    with pytest.raises(FileNotFoundError, match="lmms-msd calibrate"):
        GroupedIsotonicCalibrator.load(tmp_path / "missing.json")


def test_visual_bins_need_the_visual_feature():
    X, y = synthetic(100, 8)
    X[:, 2] = np.nan
    with pytest.raises(ValueError, match="track_visual=True"):
        GroupedIsotonicCalibrator(attention_bins=3).fit(X, y)
    GroupedIsotonicCalibrator(attention_bins=1).fit(X, y)  # token type only: fine


def test_metrics_by_hand():
    predicted = np.array([0.15, 0.15, 0.85, 0.85])
    label = np.array([0.0, 1.0, 1.0, 1.0])
    # bins 1 and 8: 0.5 * |0.5 - 0.15| + 0.5 * |1 - 0.85|
    assert expected_calibration_error(predicted, label) == pytest.approx(0.25)
    assert brier_score(predicted, label) == pytest.approx((0.15**2 + 0.85**2 + 0.15**2 + 0.15**2) / 4)
    assert expected_calibration_error(np.array([1.0]), np.array([1.0])) == 0.0  # 1.0 falls in the last bin


# ---- labels from the verification logits ------------------------------------------------------------
def small_tree() -> Tree:
    # root(5) -> node 1 (token 1) -> node 3 (token 3); root -> node 2 (token 2); node 2 -> node 4 (token 0)
    return Tree(
        tokens=torch.tensor([5, 1, 2, 3, 0]),
        parents=torch.tensor([-1, 0, 0, 1, 2]),
        depths=torch.tensor([0, 1, 1, 2, 2]),
        scores=torch.zeros(5),
        confidence=torch.tensor([1.0, 0.5, 0.4, 0.8, 0.9]),
        visual=torch.tensor([0.0, 0.2, 0.2, 0.7, 0.1]),
    )


def test_observer_greedy_labels_nodes_under_the_accepted_path():
    logits = torch.zeros(5, 6)
    logits[0, 1] = 2.0  # root's argmax: token 1 (node 1 accepted)
    logits[1, 4] = 3.0  # node 1's argmax: token 4 (node 3 rejected); node 2 was never reached
    observer = CalibrationObserver(torch.tensor([NUMBER, FUNCTION, CONTENT, NUMBER, CONTENT, FUNCTION]))
    observer.start_request(7, GenerationConfig())
    observer(small_tree(), logits, Acceptance(path=[0, 1], bonus=4))
    obs = observer.observations()
    # labelled: nodes 1, 2 (parent root), 3 (parent node 1); not node 4 (parent node 2, not reached)
    assert obs.token.tolist() == [1, 2, 3]
    assert obs.hard.tolist() == [1.0, 0.0, 0.0]
    p_root = torch.softmax(logits[0], -1)
    p_one = torch.softmax(logits[1], -1)
    expected_soft = [min(1, float(p_root[1]) / 0.5), min(1, float(p_root[2]) / 0.4), min(1, float(p_one[3]) / 0.8)]
    assert np.allclose(obs.soft, expected_soft, atol=1e-6)
    assert obs.token_type.tolist() == [FUNCTION, CONTENT, NUMBER]
    assert np.allclose(obs.confidence, [0.5, 0.4, 0.8]) and np.allclose(obs.visual, [0.2, 0.2, 0.7])
    assert obs.depth.tolist() == [1, 1, 2] and obs.request.tolist() == [7] * 3 and obs.step.tolist() == [0] * 3


def test_observer_sampling_labels_are_the_processed_probability():
    logits = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=4)
    observer = CalibrationObserver(torch.zeros(6, dtype=torch.long))
    observer.start_request(0, config)
    observer(small_tree(), logits, Acceptance(path=[0, 2, 4], bonus=1))
    obs = observer.observations()
    # labelled: 1, 2 (root), 4 (node 2); node 4's children: none
    assert obs.token.tolist() == [1, 2, 0]
    from lmms_msd.speculative.sampling import processed_probs

    p = processed_probs(logits, config)
    expected = [float(p[0, 1]), float(p[0, 2]), float(p[2, 0])]
    assert np.allclose(obs.hard, expected, atol=1e-6)
    assert np.allclose(obs.soft, np.minimum(1, np.array(expected) / np.array([0.5, 0.4, 0.9])), atol=1e-6)


def test_observations_round_trip(tmp_path):
    obs = Observations(
        confidence=np.array([0.5, 0.25]), token_type=np.array([0, 2]), visual=np.array([np.nan, 0.5]),
        depth=np.array([1, 2]), hard=np.array([1.0, 0.0]), soft=np.array([1.0, 0.3]), token=np.array([4, 9]),
        step=np.array([0, 0]), request=np.array([3, 3]), meta={"temperature": 0},
    )  # fmt: skip
    for name in ("o.npz", "o.json"):
        back = Observations.load(obs.save(tmp_path / name))
        for field in ("confidence", "token_type", "visual", "depth", "hard", "soft", "token", "step", "request"):
            assert np.array_equal(getattr(back, field), getattr(obs, field), equal_nan=True), (name, field)
        assert back.meta == {"temperature": 0}
    with pytest.raises(ValueError, match=".npz or .json"):
        obs.save(tmp_path / "o.pkl")


def test_split_by_request_is_seeded_and_keeps_requests_whole():
    X, y = synthetic(400, 9)
    request = np.repeat(np.arange(20), 20)
    obs = Observations(X[:, 0], X[:, 1], X[:, 2], np.ones(400), y, y, np.zeros(400), np.arange(400), request)
    fit, held = split_by_request(obs, 0.5, seed=1)
    again, _ = split_by_request(obs, 0.5, seed=1)
    assert np.array_equal(fit.request, again.request)
    assert set(fit.request) & set(held.request) == set() and len(set(fit.request)) == 10
    assert len(fit) + len(held) == 400


def test_calibration_beats_raw_confidence_on_held_out_data(tmp_path):
    X, y = synthetic(6000, 10)
    request = np.arange(6000) // 60
    obs = Observations(X[:, 0], X[:, 1], X[:, 2], np.ones(6000), y, np.minimum(1, y + 0.2), np.zeros(6000), np.arange(6000), request)
    fit, held = split_by_request(obs, 0.5, seed=0)
    fitted, report = compare_labels(fit, held, attention_bins=2, min_group_size=100)
    hard = report["hard"]["all"]
    assert hard["calibrated"]["ece"] < 0.5 * hard["raw"]["ece"]
    assert hard["calibrated"]["brier"] < hard["raw"]["brier"]
    assert report["winner"] == "hard"  # the soft label here is biased upwards by construction
    assert set(report["hard"]) == {"all", "number", "punctuation/function", "content", "depth 1"}  # no deeper nodes here
    assert evaluate(fitted["hard"], held) == report["hard"]
    png = reliability_diagram(
        {"raw": (held.confidence, held.hard), "calibrated": (fitted["hard"].predict_observations(held), held.hard)},
        tmp_path / "r.png",
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- use in OPT-Tree --------------------------------------------------------------------------------
def test_calibrated_scorer_gives_log_predictions():
    X, y = synthetic(3000, 11)
    calibrator = GroupedIsotonicCalibrator(attention_bins=2, min_group_size=100).fit(X, y)
    token_types = torch.tensor([NUMBER, FUNCTION, CONTENT, NUMBER])
    scorer = CalibratedScorer(calibrator, token_types)
    logprobs = torch.log(torch.tensor([[0.6, 0.3], [0.9, 0.05]]))
    tokens = torch.tensor([[0, 2], [1, 3]])
    visual = torch.tensor([0.1, 0.9])
    got = scorer(logprobs, tokens, 1, visual)
    X_rows = np.array([[0.6, NUMBER, 0.1], [0.3, CONTENT, 0.1], [0.9, FUNCTION, 0.9], [0.05, NUMBER, 0.9]])
    expected = np.log(np.clip(calibrator.predict(X_rows), 1e-6, 1)).reshape(2, 2)
    assert np.allclose(got.numpy(), expected, atol=1e-5)
    with pytest.raises(ValueError, match="track_visual=True"):
        scorer(logprobs, tokens, 1, None)


def test_calibrated_siblings_are_scored_on_their_own():
    """Each child's weight is its own floored prediction, whatever its siblings': a row predicted .9, .5, .1
    (sum 1.5) keeps .9, .5, .1 (CalibratedScorer's docstring: scaling such rows down biased the predicted
    accepted length low); 0 is floored at 1e-6."""
    X, y = synthetic(3000, 11)
    scorer = CalibratedScorer(GroupedIsotonicCalibrator(attention_bins=1, min_group_size=100).fit(X, y), torch.zeros(4, dtype=torch.long))
    predicted = torch.tensor([[0.9, 0.5, 0.1], [0.6, 0.3, 0.0]])
    scorer.predictor = lambda confidence, types, visual, depth: predicted
    got = scorer(torch.full((2, 3), -1.0), torch.zeros(2, 3, dtype=torch.long), 1, None)
    assert torch.equal(got, predicted.clamp(min=1e-6).log())


def test_calibrated_tree_children_weigh_at_most_their_parent():
    """Over a grown tree, every node weighs at most its parent (a score is the parent's plus a log
    prediction <= 0, exactly in float32), even with a calibrator that predicts certain acceptance."""
    from test_tree_bookkeeping import OPT_TABLE, MarkovDrafter

    confidence = np.repeat(np.linspace(0.05, 0.95, 19), 200)
    X = np.stack([confidence, np.zeros_like(confidence), np.zeros_like(confidence)], axis=1)
    calibrator = GroupedIsotonicCalibrator(attention_bins=1, n_types=1).fit(X, np.ones_like(confidence))  # predicts 1
    scorer = CalibratedScorer(calibrator, torch.zeros(4, dtype=torch.long))
    root_hidden = torch.nn.functional.one_hot(torch.tensor(0), 4).float()
    tree = grow_tree(MarkovDrafter(OPT_TABLE), OptTree(node_budget=6, stop_delta=0.0, max_depth=3, top_k=2, scorer=scorer), 0, root_hidden)
    weights = tree.scores.exp()
    for node in range(1, len(tree)):
        assert float(weights[node]) <= float(weights[tree.parents[node]])
    assert weights[tree.parents == 0].tolist() == [1.0, 1.0]  # two children predicted 1 each, scored on their own


def test_opt_tree_weights_are_products_of_calibrated_predictions():
    from test_tree_bookkeeping import OPT_TABLE, MarkovDrafter

    # a one-bin calibrator that predicts half the confidence (fitted on labels 0/1 at that rate)
    confidence = np.repeat(np.linspace(0.05, 0.95, 19), 200)
    rng = np.random.default_rng(0)
    y = (rng.uniform(size=confidence.shape) < confidence / 2).astype(float)
    X = np.stack([confidence, np.zeros_like(confidence), np.zeros_like(confidence)], axis=1)
    calibrator = GroupedIsotonicCalibrator(attention_bins=1, n_types=1).fit(X, y)
    scorer = CalibratedScorer(calibrator, torch.zeros(4, dtype=torch.long))
    root_hidden = torch.nn.functional.one_hot(torch.tensor(0), 4).float()
    tree = grow_tree(MarkovDrafter(OPT_TABLE), OptTree(node_budget=6, stop_delta=0.0, max_depth=3, top_k=2, scorer=scorer), 0, root_hidden)
    predicted = calibrator.predict(np.stack([tree.confidence.numpy(), np.zeros(len(tree)), np.zeros(len(tree))], axis=1))
    for node in range(1, len(tree)):
        weight, i = 0.0, node
        while i > 0:
            weight += math.log(max(predicted[i], 1e-6))
            i = int(tree.parents[i])
        assert float(tree.scores[node]) == pytest.approx(weight, abs=1e-5)
