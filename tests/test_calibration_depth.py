"""Depth buckets of the grouped isotonic calibrator: a first level accepted more often is predicted
higher, the fall-backs, files of format 1 (pooled over depth) read and predicting as before, and the
torch evaluation equal to numpy's with depth buckets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.isotonic import IsotonicRegression

from lmms_msd.calibration.isotonic import (
    GroupedIsotonicCalibrator,
    interpolate_thresholds,
)
from lmms_msd.calibration.scorer import CalibratedScorer
from lmms_msd.calibration.token_types import CONTENT, FUNCTION, NUMBER

# calibrators/miniature.json as bundled before depth buckets (format version 1), kept as a fixture
FORMAT1 = Path(__file__).parent / "data" / "calibrator_format1.json"


def depth_synthetic(n: int, seed: int):
    """X [n, 4] (confidence, type, visual, depth 1..4) and hard labels: acceptance confidence^0.5 at depth 1,
    confidence^2 deeper, so at equal confidence the first level is accepted more often."""
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(0, 1, n)
    types = rng.integers(0, 3, n)
    visual = rng.uniform(0, 1, n)
    depth = rng.integers(1, 5, n)
    p = np.where(depth == 1, confidence**0.5, confidence**2)
    y = (rng.uniform(0, 1, n) < p).astype(np.float64)
    return np.stack([confidence, types.astype(np.float64), visual, depth.astype(np.float64)], axis=1), y


def sklearn_fit(x, y):
    return IsotonicRegression(increasing=True, out_of_bounds="clip", y_min=0, y_max=1).fit(x, y)


def test_first_level_accepted_more_often_is_predicted_higher():
    X, y = depth_synthetic(4000, 1)
    calibrator = GroupedIsotonicCalibrator(attention_bins=1, min_group_size=50, depth_edges=(2,)).fit(X, y)
    pooled = GroupedIsotonicCalibrator(attention_bins=1, min_group_size=50).fit(X, y)
    grid = np.linspace(0.2, 0.8, 7)
    for t in (NUMBER, FUNCTION, CONTENT):
        first = calibrator.predict(np.stack([grid, np.full(7, t), np.zeros(7), np.ones(7)], axis=1))
        for deeper_depth in (2, 4):
            deeper = calibrator.predict(np.stack([grid, np.full(7, t), np.zeros(7), np.full(7, deeper_depth)], axis=1))
            # true rates: sqrt(c) - c^2 >= 0.19 on this grid, far above the fits' noise at ~330 samples a group
            assert np.all(first > deeper + 0.1), (t, first, deeper)
        # each group's fit is scikit-learn's on its rows (depth 1 x type t)
        rows = (X[:, 3] == 1) & (X[:, 1] == t)
        assert np.array_equal(first, sklearn_fit(X[rows, 0], y[rows]).predict(grid))
        # pooled over depth: one prediction whatever the depth, the 3-column prediction
        Q = np.stack([grid, np.full(7, t), np.zeros(7)], axis=1)
        for depth in (1, 3):
            assert np.array_equal(pooled.predict(np.concatenate([Q, np.full((7, 1), depth)], axis=1)), pooled.predict(Q))


def test_fall_backs_within_a_depth_bucket():
    """A depth x type group below min_group_size uses its depth bucket's fit; a small depth bucket the
    global fit. Depth buckets (2, 4): 1, 2-3, >=4."""
    X, y = depth_synthetic(3000, 2)
    keep = ~((X[:, 3] == 1) & (X[:, 1] == NUMBER) & (np.arange(len(y)) % 10 != 0))  # ~25 depth-1 numbers
    keep &= ~((X[:, 3] == 4) & (np.arange(len(y)) % 40 != 0))  # ~19 nodes at depth >= 4
    X, y = X[keep], y[keep]
    calibrator = GroupedIsotonicCalibrator(attention_bins=1, min_group_size=50, depth_edges=(2, 4)).fit(X, y)
    names = [[calibrator.models_[i]["name"] for i in row[:, 0]] for row in calibrator.group_model_]
    assert names == [
        ["depth=1", "depth=1,type=punctuation/function", "depth=1,type=content"],
        ["depth=2-3,type=number", "depth=2-3,type=punctuation/function", "depth=2-3,type=content"],
        ["global", "global", "global"],
    ]
    depth1 = X[:, 3] == 1
    q = np.linspace(0, 1, 11)
    got = calibrator.predict(np.stack([q, np.full(11, NUMBER), np.zeros(11), np.ones(11)], axis=1))
    assert np.array_equal(got, sklearn_fit(X[depth1, 0], y[depth1]).predict(q))
    got = calibrator.predict(np.stack([q, np.full(11, CONTENT), np.zeros(11), np.full(11, 7)], axis=1))
    assert np.array_equal(got, sklearn_fit(X[:, 0], y).predict(q))


def test_pooled_fit_is_format_one():
    """Without depth_edges the fitted models, their names and order are those of the pooled calibrator:
    a depth column changes nothing."""
    X, y = depth_synthetic(2000, 3)
    with_depth = GroupedIsotonicCalibrator(attention_bins=3, min_group_size=80).fit(X, y)
    without = GroupedIsotonicCalibrator(attention_bins=3, min_group_size=80).fit(X[:, :3], y)
    assert [m["name"] for m in with_depth.models_] == [m["name"] for m in without.models_]
    assert [m["name"] for m in with_depth.models_][:3] == ["global", "type=number", "type=number,bin=0"]
    assert all(np.array_equal(a["y"], b["y"]) for a, b in zip(with_depth.models_, without.models_))


def test_format_one_file_loads_and_predicts_as_before(tmp_path):
    data = json.loads(FORMAT1.read_text())
    assert data["version"] == 1 and "depth_edges" not in data["settings"]
    calibrator = GroupedIsotonicCalibrator.load(FORMAT1)
    assert calibrator.depth_edges == () and calibrator.group_model_.shape == (1, 3, 3)
    Q = np.array([[0.05, NUMBER, 0.1], [0.3, FUNCTION, 0.35], [0.55, CONTENT, 0.5], [0.95, FUNCTION, 0.2]])
    # predicted by lmms-msd before depth buckets (main at 0a03daa) from this file
    before = [0.05414551607445008, 0.18120805369127516, 0.5297297297297298, 0.6056338028169014]
    assert calibrator.predict(Q).tolist() == before
    # the format-1 rule read straight from the file: group_model[type][bin], whatever the depth
    rng = np.random.default_rng(4)
    R = np.stack([rng.uniform(0, 1, 500), rng.integers(0, 3, 500), rng.uniform(0.2, 0.6, 500)], axis=1)
    bins = np.searchsorted(np.array(data["bin_edges"]), R[:, 2], side="right")
    which = np.array(data["group_model"])[R[:, 1].astype(int), bins]
    expected = np.array([
        interpolate_thresholds(np.array(data["models"][m]["x"]), np.array(data["models"][m]["y"]), R[i : i + 1, 0])[0]
        for i, m in enumerate(which)
    ])  # fmt: skip
    assert np.array_equal(calibrator.predict(R), expected)
    for depth in (1, 2, 6):
        assert np.array_equal(calibrator.predict(np.concatenate([R, np.full((500, 1), depth)], axis=1)), expected)
    # the torch path: no depth needed, and any depth ignored
    evaluate = calibrator.to_torch("cpu", torch.float64)
    args = torch.tensor(R[:, 0]), torch.tensor(R[:, 1]).long(), torch.tensor(R[:, 2])
    assert np.array_equal(evaluate(*args).numpy(), expected)
    assert np.array_equal(evaluate(*args, 3).numpy(), expected)
    # written again, it is format 2 with one depth bucket and predicts the same
    again = GroupedIsotonicCalibrator.load(calibrator.save(tmp_path / "c.json"))
    assert json.loads((tmp_path / "c.json").read_text())["version"] == 2
    assert np.array_equal(again.predict(R), expected)


def test_torch_evaluation_equals_numpy_with_depth_buckets():
    X, y = depth_synthetic(6000, 5)
    calibrator = GroupedIsotonicCalibrator(attention_bins=3, min_group_size=80, depth_edges=(2, 3)).fit(X, y)
    assert {m["level"] for m in calibrator.models_} == {"global", "depth", "type", "group"}
    rng = np.random.default_rng(6)
    Q = np.stack(
        [rng.uniform(-0.1, 1.1, 1000), rng.integers(0, 3, 1000), rng.uniform(0, 1, 1000), rng.integers(1, 7, 1000)], axis=1
    )
    Q[:30, 0] = calibrator.models_[1]["x"][:30]  # exactly on thresholds
    Q[30:40, 2] = calibrator.bin_edges_[0]  # exactly on a bin edge
    expected = calibrator.predict(Q)
    confidence, types, visual, depth = (
        torch.tensor(Q[:, 0]),
        torch.tensor(Q[:, 1]).long(),
        torch.tensor(Q[:, 2]),
        torch.tensor(Q[:, 3]).long(),
    )
    evaluate64 = calibrator.to_torch("cpu", torch.float64)
    assert np.array_equal(evaluate64(confidence, types, visual, depth).numpy(), expected)
    for d in range(1, 7):  # one int for a whole level, as the tree builders pass it
        rows = Q[:, 3] == d
        assert np.array_equal(evaluate64(confidence[rows], types[rows], visual[rows], d).numpy(), expected[rows])
    got = evaluate64(confidence.view(100, 10), types.view(100, 10), visual.view(100, 10), depth.view(100, 10))
    assert got.shape == (100, 10) and np.array_equal(got.flatten().numpy(), expected)


def test_calibrated_scorer_scores_by_the_level_depth():
    X, y = depth_synthetic(4000, 7)
    calibrator = GroupedIsotonicCalibrator(attention_bins=2, min_group_size=100, depth_edges=(2,)).fit(X, y)
    token_types = torch.tensor([NUMBER, FUNCTION, CONTENT, NUMBER])
    scorer = CalibratedScorer(calibrator, token_types)
    # one child per row: no sibling normalisation in the way
    logprobs = torch.log(torch.tensor([[0.3], [0.2], [0.4], [0.25]]))
    tokens = torch.tensor([[0], [2], [1], [3]])
    visual = torch.tensor([0.1, 0.1, 0.9, 0.9])
    evaluate32 = calibrator.to_torch("cpu", torch.float32)  # the scorer's own evaluation (equal to numpy's in float64: above)
    for depth in (1, 2, 5):
        expected = evaluate32(logprobs.exp(), token_types[tokens], visual[:, None], depth).clamp(1e-6, 1).log()
        assert torch.equal(scorer(logprobs, tokens, depth, visual), expected), depth
    assert (scorer(logprobs, tokens, 1, visual) > scorer(logprobs, tokens, 2, visual)).all()


def test_depth_buckets_need_the_depth():
    X, y = depth_synthetic(500, 8)
    with pytest.raises(ValueError, match="depth_edges"):
        GroupedIsotonicCalibrator(depth_edges=(2,)).fit(X[:, :3], y)
    calibrator = GroupedIsotonicCalibrator(attention_bins=1, depth_edges=(2,)).fit(X, y)
    with pytest.raises(ValueError, match="needs each node's depth"):
        calibrator.to_torch()(torch.tensor([0.5]), torch.tensor([0]), None)
    X[0, 3] = 0
    with pytest.raises(ValueError, match="integers >= 1"):
        calibrator.predict(X)
    for edges in ((1,), (3, 2), (2.5,)):
        with pytest.raises(ValueError, match="depth_edges must be"):
            GroupedIsotonicCalibrator(depth_edges=edges).fit(X, y)
