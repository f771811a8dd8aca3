"""The thesis's calibrated tree (`TiltScorer`): the worked example of its docstring with literal values.

The expected values were computed apart from this code: the thesis's own numpy formulas
(`_compute_adaptive_alpha`, cnets.py 826-927: `np.nanpercentile`, the clips) applied to the example's
explicit full-vocabulary distributions, the bias added to those logits at the children's ids and the
softmax taken over the whole vocabulary again (cnets.py 1316-1328), in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmms_msd.calibration.isotonic import GroupedIsotonicCalibrator
from lmms_msd.calibration.scorer import (
    TiltScorer,
    calibrated_scorer,
    calibrated_tree,
    percentile,
)
from lmms_msd.calibration.token_types import CONTENT, FUNCTION, NUMBER
from lmms_msd.speculative.fast.graphs import CaptureRules
from lmms_msd.speculative.tree import OptTree

# Token ids 2..4 are words, 5..7 numbers (0, 1: punctuation).
TOKEN_TYPES = torch.tensor([FUNCTION, FUNCTION, CONTENT, CONTENT, CONTENT, NUMBER, NUMBER, NUMBER])

# The worked example: one level at depth 2, 3 parents x 2 children.
PROBS = torch.tensor([[0.5, 0.3], [0.4, 0.3], [0.7, 0.1]])  # full vocabulary: the rest is 0.2, 0.3, 0.2
TOKENS = torch.tensor([[2, 5], [3, 6], [4, 7]])
VISUAL = torch.tensor([0.3, 0.1, 0.5])
P_CAL = torch.tensor([[0.9, 0.02], [0.99, 0.3], [0.6, 0.0]])
EXPECTED_ALPHA = [[0.493333339133, 0.690666674787], [0.733333333333, 0.8], [0.2, 0.2]]
EXPECTED = [[-0.149160404312, -3.815950190001], [-0.118044823358, -3.283565184119], [-0.289496073427, -2.916499244104]]
# Tolerance: float32 inputs (relative rounding 6e-8) through a dozen operations on values of magnitude
# at most 10 (the logit clip is 3, alpha at most 0.8): well under 1e-5 on log-probabilities.
ATOL = 1e-5


def close(actual: torch.Tensor, expected, atol: float) -> None:
    torch.testing.assert_close(actual.double(), torch.tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


class FixedPredictor:
    """Returns the example's p_cal and keeps what it was given."""

    def __init__(self, p_cal: torch.Tensor) -> None:
        self.p_cal = p_cal
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]] = []

    def __call__(self, confidence, types, visual, depth):
        self.calls.append((confidence, types, visual, depth))
        return self.p_cal


def test_worked_example_of_a_level():
    predictor = FixedPredictor(P_CAL)
    scorer = TiltScorer(predictor, TOKEN_TYPES)
    scores = scorer(PROBS.log(), TOKENS, 2, VISUAL)
    assert scores.dtype == torch.float32 and scores.shape == (3, 2)
    close(scores, EXPECTED, ATOL)
    # the calibrator sees the untilted draft probability, the token type, the parent row's intensity and the depth
    (confidence, types, visual, depth), = predictor.calls
    assert depth == 2
    close(confidence, PROBS.tolist(), 1e-7)
    assert types.tolist() == [[CONTENT, NUMBER]] * 3
    assert torch.equal(visual, VISUAL[:, None].expand(3, 2))


def test_worked_example_alpha():
    scorer = TiltScorer(FixedPredictor(P_CAL), TOKEN_TYPES)
    number = TOKEN_TYPES[TOKENS] == NUMBER
    alpha = scorer.alpha(PROBS.log().double(), 2, VISUAL[:, None].expand(3, 2).double(), number)
    close(alpha, EXPECTED_ALPHA, 1e-7)


def test_root_level_has_constant_margin_and_attention():
    """n = 1: every candidate shares the margin and the attention, both factors are 1 (the thesis's
    hi <= lo fall-back); depth 1: combo 0.2 + 0.4/6 + 0.4 = 0.6667, the number's 0.9333 clipped to 0.8.
    Draft probabilities 0.6, 0.25, 0.1 (rest 0.05), p_cal 0.7, 0.2, 0.95."""
    p_cal = torch.tensor([[0.7, 0.2, 0.95]])
    logprobs = torch.tensor([[0.6, 0.25, 0.1]]).log()
    tokens = torch.tensor([[2, 3, 5]])
    expected = [[-0.760941438964, -3.125471657323, -0.762014965117]]
    for visual in (torch.tensor([0.2]), None):
        scores = TiltScorer(FixedPredictor(p_cal), TOKEN_TYPES)(logprobs, tokens, 1, visual)
        close(scores, expected, ATOL)


def test_percentile_is_numpys_linear_percentile():
    values = torch.tensor([4.0, 1.0, 3.0, 2.0], dtype=torch.float64)
    assert float(percentile(values, 10)) == pytest.approx(1.3, abs=1e-12)  # position 0.3
    assert float(percentile(values, 90)) == pytest.approx(3.7, abs=1e-12)  # position 2.7
    repeated = torch.tensor([[0.1, 0.1], [0.2, 0.2], [0.6, 0.6]], dtype=torch.float64)
    assert float(percentile(repeated, 10)) == pytest.approx(0.1, abs=1e-12)
    assert float(percentile(repeated, 90)) == pytest.approx(0.6, abs=1e-12)
    assert float(percentile(torch.tensor([5.0]), 90)) == 5.0


def fitted_calibrator(label_value: float) -> GroupedIsotonicCalibrator:
    """A calibrator whose every fit predicts `label_value` (constant labels)."""
    g = np.random.default_rng(0)
    n = 400
    X = np.stack([g.uniform(0, 1, n), g.integers(0, 3, n).astype(np.float64), g.uniform(0, 0.5, n)], axis=1)
    return GroupedIsotonicCalibrator(attention_bins=2, min_group_size=20).fit(X, np.full(n, label_value))


def test_a_calibrator_predicting_one_half_leaves_the_draft_alone():
    """logit(0.5) = 0: no tilt, whatever alpha is; the scores are the draft's own log-probabilities."""
    scorer = calibrated_scorer(fitted_calibrator(0.5), TOKEN_TYPES, "cpu", mode="tilt")
    assert isinstance(scorer, TiltScorer) and scorer.needs_visual
    logprobs = PROBS.log()
    close(scorer(logprobs, TOKENS, 3, VISUAL), logprobs.tolist(), 1e-7)


def test_tilt_runs_under_cuda_graph_capture_rules():
    """No host scalar copied to the device and no synchronisation: the scorer runs inside graphed levels."""
    scorer = calibrated_scorer(fitted_calibrator(0.9), TOKEN_TYPES, "cpu", mode="tilt")
    logprobs = torch.randn(4, 6).log_softmax(dim=-1).topk(3).values
    tokens, visual = torch.tensor([[2, 5, 6]] * 4), torch.rand(4)
    with CaptureRules():
        scores = scorer(logprobs, tokens, 3, visual)
        root = scorer(logprobs[:1], tokens[:1], 1, visual[:1])
    assert scores.shape == (4, 3) and root.shape == (1, 3)


def test_modes_and_the_tree():
    calibrator = fitted_calibrator(0.7)
    tree = calibrated_tree(OptTree(node_budget=499, stop_delta=0.2), calibrator, TOKEN_TYPES, "cpu", mode="tilt")
    assert isinstance(tree.scorer, TiltScorer) and (tree.node_budget, tree.stop_delta) == (499, 0.2)
    assert repr(tree.scorer).startswith("TiltScorer(GroupedIsotonicCalibrator(")
    assert type(calibrated_tree(OptTree(), calibrator, TOKEN_TYPES, "cpu").scorer).__name__ == "CalibratedScorer"
    with pytest.raises(ValueError, match="calibrator_mode must be one of"):
        calibrated_scorer(calibrator, TOKEN_TYPES, "cpu", mode="bias")
