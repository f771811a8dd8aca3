"""Node scorers that put a fitted calibrator into the tree (`calibrator_mode`, `calibrated_scorer`).

- `weight` (`CalibratedScorer`, this project's): the predicted acceptance is the node's weight;
- `tilt` (`TiltScorer`, the thesis's): the prediction tilts the draft's logits of the proposed
  children, and the re-normalised draft probability is the node's weight.

Both implement the `lmms_msd.speculative.tree.NodeScorer` protocol; OPT-Tree's weights and its stopping rule use them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch

from lmms_msd.calibration.isotonic import (
    GroupedIsotonicCalibrator,
)
from lmms_msd.calibration.token_types import NUMBER
from lmms_msd.speculative.tree import TreeSpec


class CalibratedScorer:
    """A `NodeScorer`: log of the calibrator's predicted acceptance for each proposed child.

    Predictions are floored at `floor` (an isotonic fit can predict 0; a log weight of -inf would
    tie unrelated nodes) and are at most 1, so weights never grow along a path. Each child is scored on
    its own, its siblings' predictions left as they are. At most one child of a node is accepted, so a
    row of siblings whose predictions add up to more than 1 over-states some of them; but the calibrator
    is fitted per node, so over the steps its per-node predictions are right on average, rows summing
    over 1 and rows summing under 1 alike, and scaling down only the first kind biases the sum of a tree's
    weights (its predicted accepted length) low. Measured (README, "Sibling predictions normalised"; the
    depth-bucket calibrator, the first 6 documents of the five long-answer tasks): scaling each row down to
    sum 1 predicted 0.943 to 0.964 of the realised accepted tokens per step; scoring each child on its own,
    0.995 to 1.014, small cost trees and wide 60-node trees alike.
    token_types: [V] long
    """

    def __init__(
        self,
        calibrator: GroupedIsotonicCalibrator,
        token_types: torch.Tensor,
        device: torch.device | str = "cpu",
        floor: float = 1e-6,
    ) -> None:
        self.calibrator = calibrator
        self.predictor = calibrator.to_torch(device, torch.float32)
        self.token_types = token_types.to(device=device, dtype=torch.long)
        self.floor = floor

    @property
    def needs_visual(self) -> bool:
        """Whether the calibrator's groups read the visual attention (it was fitted with attention bins)."""
        return self.predictor.needs_visual

    def __call__(self, logprobs: torch.Tensor, tokens: torch.Tensor, depth: int, visual: torch.Tensor | None) -> torch.Tensor:
        """logprobs, tokens: [n, k]; visual: [n] (the producing row of each parent's children) -> [n, k]"""
        assert logprobs.shape == tokens.shape and logprobs.dim() == 2, (
            f"logprobs {tuple(logprobs.shape)}, tokens {tuple(tokens.shape)}"
        )
        row_visual = None if visual is None else visual[:, None]  # the predictor broadcasts it over the k children
        predicted = self.predictor(logprobs.exp(), self.token_types[tokens], row_visual, depth).clamp(min=self.floor, max=1.0)
        return predicted.log().to(logprobs.dtype)

    def __repr__(self) -> str:
        return f"CalibratedScorer({self.calibrator!r}, fitted on {self.calibrator.label!r} labels)"


class TiltScorer:
    r"""A `NodeScorer` for the thesis's calibrated tree: the calibrator *tilts the draft's logits*.

    Source: ljc0359/Speculative-Decoding-For-Vision-Language-Model at e85f00d,
    `EAGLE/eagle/model/cnets.py` (line numbers below): `topK_genrate` (929-1574) with its
    `_compute_adaptive_alpha` (826-927). The calibrated probability is not a node weight there. At
    each level the candidates are the k children proposed by each of the n frontier nodes (n = 1 at
    the root; the preselection keeps `1 * top_k`, 1078 and 1211, i.e. the same k children as here).
    For candidate j of parent i, with p_j its draft probability (full-vocabulary softmax, 1076, 1209):

    1. Calibrated logit (1128-1136, 1293-1301): c = clip(p_cal, 1e-3, 1 - 1e-3),
       L = clip(log c - log(1 - c), -3, 3); p_cal the calibrator's prediction for the candidate.
    2. alpha = base_alpha * clip(clip(combo * boost, 0, 1.2), 0.2, 0.8) (915-919), base_alpha = 1
       (`topK_genrate`'s default `alpha=1`, 943; its callers `initialize_tree` and
       `update_inference_inputs`, utils.py 255-266 and 551-563, do not pass it), with
           combo = 0.2 * margin_factor + 0.4 * depth_factor + 0.4 * attention_factor
       - margin = the parent's draft top-1 minus top-2 probability among its k candidates (646-649,
         790-793), shared by its children; margin_factor = 1 - clip((margin - lo) / (hi - lo + 1e-8), 0, 1)
         with lo, hi the 10th and 90th percentiles (numpy's linear interpolation) of the level's n*k
         values (one per candidate, so each parent's margin counts k times); when hi <= lo (all equal,
         as at the root, n = 1) lo = min and hi = max + 1e-8 instead (870-883). A small margin (an
         unsure draft) gives a large factor.
       - depth_factor = clip(depth / 6, 0, 1), depth = the candidate's, 1 for the root's children (892;
         the depths come from 1094 and 1237).
       - attention_factor: the margin's normalisation applied to the candidates' visual attention
         (894-904): weak attention, large factor.
       - boost = 1.4 for a number token, else 1 (906-912).
       The docstring's "gate on high draft confidence" (835) does not exist: `conf_arr` (866) is unused.
    3. Tilt (1151-1163, 1316-1328): b = alpha * L is added (`scatter_add_`) to the draft's logits at
       the k candidates' ids, the softmax is taken again *over the full vocabulary*, and the
       candidate's new probability p'_j takes the place of its draft probability: frontier selection
       and stored weights use parent weight x p'_j (1331-1339), so a node's weight is the product of
       p' along its path, which the early stop and the final selection read (1401-1437).

    The other logits are untouched, so p'_j = p_j e^{b_j} / (1 - sum_i p_i + sum_i p_i e^{b_i}), the sums
    over the parent's k candidates: the k draft log-probabilities suffice, and `NodeScorer`'s inputs
    (log-probabilities, tokens, depth, the parent row's visual intensity) are unchanged. Returns log p'.

    Where this differs from the thesis, on purpose:
    - below the root's children (depth >= 2) the thesis hands its feature collection probabilities
      where it expects log-probabilities (`topk_p=preselect_probs`, 1272, then `torch.exp(topk_p...)`,
      785-801; the same in its labelling pass, 727 and 762): there its margin is e^{p_1} - e^{p_2} and
      the calibrator's confidence e^{p}, in [1, e]. Here the margin is p_1 - p_2 and the confidence p
      at every depth, as at its depth 1.
    - attention: the thesis gives candidate j (its rank among its parent's children) row j of the
      head-averaged attention of the draft forward over the *context* (the prompt, later the previous
      step's accepted tokens; 1003-1011), averaged over the image columns (516-575; `candidate_idx=
      child_idx`, 618 and 746), 0.0 where that row does not exist, and the same tensor at every
      level: not a row that has anything to do with the candidate. Here it is the visual intensity of
      the row that produced the candidate's distribution (its parent's, `lmms_msd.speculative.drafting`; DESIGN
      4.4). That is a share of the row's attention mass, the thesis's a mean over image columns (the
      share / the number of image columns); the percentile normalisation does not see the scale.
      Untracked (visual None), all attentions are equal and the factor is 1, as the thesis's formula
      gives for a constant batch.
    - p_cal is this project's calibrator's (same features and kind of model as the thesis's
      `GroupedIsotonicCalibrator`; the thesis fits 5 attention bins, 200 samples per group, soft labels:
      calibrators.py 803-833).
    - number tokens are `lmms_msd.calibration.token_types`' NUMBER (digits, possibly with . , % - +); the thesis
      tests the decoded piece against isdigit or ^\d+\.?\d*$ (466-468). They agree on LLaMA's
      single-digit number tokens.

    Worked example (one level at depth 2, depth_factor 1/3; n = 3 parents, k = 2; tested in
    `tests/test_calibration_tilt.py`):

        parent  p of its children   margin  visual  number?   p_cal       L (clipped)
        0       0.5, 0.3 (rest 0.2)  0.2     0.3     no, yes   0.9, 0.02   ln 9 = 2.1972, -3
        1       0.4, 0.3 (rest 0.3)  0.1     0.1     no, yes   0.99, 0.3   3, ln(3/7) = -0.8473
        2       0.7, 0.1 (rest 0.2)  0.6     0.5     no, yes   0.6, 0       ln 1.5 = 0.4055, -3

    Margins 0.1 0.1 0.2 0.2 0.6 0.6: lo 0.1, hi 0.6, margin_factor 0.8, 1, 0 (parents 0, 1, 2); visual
    0.1 0.1 0.3 0.3 0.5 0.5: lo 0.1, hi 0.5, attention_factor 0.5, 1, 0; combo 0.4933, 0.7333, 0.1333.
    alpha: parent 0: 0.4933, 0.6907 (x1.4); parent 1: 0.7333, 0.8 (1.0267 clipped); parent 2: 0.2, 0.2
    (0.1333 and 0.1867 clipped). b = alpha L: 1.0840, -2.0720; 2.2, -0.6778; 0.0811, -0.6. Parent 0:
    0.5 e^1.0840 = 1.4782 and 0.3 e^-2.0720 = 0.0378 over 0.2 + 1.4782 + 0.0378 = 1.7160 give
    p' = 0.8614, 0.0220 (log -0.1492, -3.8160); parent 1: 0.8887, 0.0375; parent 2: 0.7486, 0.0541.

    predictor: (confidence, token types, visual) of shape [n, k] and the children's depth (an int) -> p_cal [n, k]
    (a `TorchCalibrator`)
    token_types: [V] long
    """

    PROB_FLOOR = 1e-3  # cnets.py 1129
    MAX_LOGIT = 3.0  # 1135
    ALPHA_RANGE = (0.2, 0.8)  # 917
    COMBO_CAP = 1.2  # 916
    WEIGHTS = (0.2, 0.4, 0.4)  # margin, depth, attention: 915
    DEPTH_SCALE = 6.0  # 892
    NUMBER_BOOST = 1.4  # 910
    PERCENTILES = (10.0, 90.0)  # 878, 900
    EPS = 1e-8  # 880-881, 902-903

    def __init__(
        self,
        predictor: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, int], torch.Tensor],
        token_types: torch.Tensor,
        base_alpha: float = 1.0,
        calibrator: GroupedIsotonicCalibrator | None = None,
    ) -> None:
        assert token_types.dim() == 1, f"token_types must be [V], got {tuple(token_types.shape)}"
        self.predictor = predictor
        self.token_types = token_types.to(torch.long)
        self.base_alpha = base_alpha
        self.calibrator = calibrator  # for the record (repr) only

    @property
    def needs_visual(self) -> bool:
        """alpha's attention factor reads the draft's visual attention (and the calibrator may)."""
        return True

    def __call__(self, logprobs: torch.Tensor, tokens: torch.Tensor, depth: int, visual: torch.Tensor | None) -> torch.Tensor:
        """logprobs, tokens: [n, k]; visual: [n] (the producing row of each parent's children) -> log p' [n, k]"""
        assert logprobs.shape == tokens.shape and logprobs.dim() == 2, (
            f"logprobs {tuple(logprobs.shape)}, tokens {tuple(tokens.shape)}"
        )
        assert visual is None or visual.shape == logprobs.shape[:1], f"visual {tuple(visual.shape)} for {tuple(logprobs.shape)}"
        row_visual = None if visual is None else visual[:, None].expand_as(logprobs)
        types = self.token_types[tokens]  # [n, k]
        p_cal = self.predictor(logprobs.exp(), types, row_visual, depth).double()  # [n, k]
        c = p_cal.clamp(self.PROB_FLOOR, 1.0 - self.PROB_FLOOR)
        calibrated_logit = (c.log() - (1.0 - c).log()).clamp(-self.MAX_LOGIT, self.MAX_LOGIT)
        bias = self.alpha(logprobs.double(), depth, row_visual, types == NUMBER) * calibrated_logit
        return tilted_logprobs(logprobs.double(), bias).to(logprobs.dtype)

    def alpha(self, logprobs: torch.Tensor, depth: int, visual: torch.Tensor | None, number: torch.Tensor) -> torch.Tensor:
        """The thesis's adaptive alpha. logprobs [n, k] float64; visual [n, k] or None; number [n, k] bool -> [n, k]"""
        probs = logprobs.exp()
        if probs.shape[1] >= 2:
            top = probs.topk(2, dim=1).values  # [n, 2]
            margin = top[:, :1] - top[:, 1:]
        else:
            margin = probs  # no second candidate: the thesis takes top-2 = 0 (609, 793)
        margin = margin.expand_as(probs)
        attention = torch.zeros_like(probs) if visual is None else visual.double()
        w_margin, w_depth, w_attention = self.WEIGHTS
        combo = (
            w_margin * spread_factor(margin, self.PERCENTILES, self.EPS)
            + w_depth * min(max(depth / self.DEPTH_SCALE, 0.0), 1.0)
            + w_attention * spread_factor(attention, self.PERCENTILES, self.EPS)
        )
        boost = 1.0 + (self.NUMBER_BOOST - 1.0) * number.double()
        low, high = self.ALPHA_RANGE
        return self.base_alpha * (combo * boost).clamp(0.0, self.COMBO_CAP).clamp(low, high)

    def __repr__(self) -> str:
        fitted = "" if self.calibrator is None else f"{self.calibrator!r}, fitted on {self.calibrator.label!r} labels, "
        return f"TiltScorer({fitted}base_alpha={self.base_alpha})"


def percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """numpy's `percentile(values, q)` (method "linear") over all entries, as a 0-d tensor.

    The positions come from the shape alone (no host read of the values), so this runs inside a
    CUDA graph. Example: 0.1 0.1 0.2 0.2 0.6 0.6, q 10: position 0.1 * 5 = 0.5, halfway between the
    first two sorted values: 0.1; q 90: position 4.5: 0.6.
    """
    ordered = values.flatten().sort().values
    position = q / 100.0 * (ordered.shape[0] - 1)
    lo = math.floor(position)
    hi = min(lo + 1, ordered.shape[0] - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)


def spread_factor(values: torch.Tensor, percentiles: tuple[float, float], eps: float) -> torch.Tensor:
    """1 - clip((v - lo) / (hi - lo + eps), 0, 1), lo and hi the given percentiles of all entries, or the
    minimum and the maximum + eps when hi <= lo (the thesis's margin and attention factors). [...] -> [...]"""
    lo, hi = percentile(values, percentiles[0]), percentile(values, percentiles[1])
    flat = hi <= lo
    lo = torch.where(flat, values.min(), lo)
    hi = torch.where(flat, values.max() + eps, hi)
    return 1.0 - ((values - lo) / (hi - lo + eps)).clamp(0.0, 1.0)


def tilted_logprobs(logprobs: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """log softmax of the full-vocabulary logits after adding `bias` at the k proposed children only.

    logprobs: [n, k], the draft's full-vocabulary log-probabilities of each row's k children; bias [n, k]
    -> [n, k]. The rest of the vocabulary keeps its mass 1 - sum p (clamped at 0 against rounding).
    """
    rest = (1.0 - logprobs.exp().sum(dim=1, keepdim=True)).clamp(min=0.0)  # [n, 1]
    tilted = logprobs + bias
    return tilted - (rest + tilted.exp().sum(dim=1, keepdim=True)).log()


CALIBRATOR_MODES = ("weight", "tilt")


def calibrated_scorer(
    calibrator: GroupedIsotonicCalibrator, token_types: torch.Tensor, device: torch.device | str, mode: str = "weight"
) -> CalibratedScorer | TiltScorer:
    """The node scorer of `mode`: "weight" (the prediction is the node's weight, `CalibratedScorer`) or
    "tilt" (the thesis's: the prediction tilts the draft's logits, `TiltScorer`)."""
    if mode == "weight":
        return CalibratedScorer(calibrator, token_types, device)
    if mode == "tilt":
        predictor = calibrator.to_torch(device, torch.float32)
        return TiltScorer(predictor, token_types.to(device=device, dtype=torch.long), calibrator=calibrator)
    raise ValueError(f"calibrator_mode must be one of {list(CALIBRATOR_MODES)}, got {mode!r}")


def calibrated_tree(
    tree: TreeSpec, calibrator: GroupedIsotonicCalibrator, token_types: torch.Tensor, device: torch.device | str, mode: str = "weight"
) -> TreeSpec:
    """The same OPT-Tree settings, scored by the calibrator in `mode` (`calibrated_scorer`)."""
    return replace(tree, scorer=calibrated_scorer(calibrator, token_types, device, mode))
