"""The calibrator: draft confidence -> predicted acceptance probability (DESIGN 4.4).

Four parts, in the order data flows through them:

1. **Observations** (`CalibrationObserver`, `Observations`). A step observer that, after every
   verification, records each tree node whose parent lies on the accepted path (the parent was
   reached, so the target's distribution there is known exactly) with its features and two labels,
   from the verification logits of that same step: no extra target forward, nothing written anywhere
   but the observer's own arrays.

   Features: the draft's probability of the node (its *confidence*), its token type
   (`lmms_msd.token_types`), the visual attention intensity of the draft row that produced its
   distribution (its parent's row; `lmms_msd.drafting` explains why that row), and its depth.

   Labels, with p the target's distribution at the parent:
   - **hard**: what the acceptance rule in use gives. Greedy: 1 if the token is the target's argmax
     at the parent, else 0. Sampling: p(x), the processed probability (temperature, top-k, top-p) of
     the token. Under the multi-child rule of `lmms_msd.verify` a child x is accepted exactly when
     the emitted token is x, which happens with probability p(x) whatever the child's rank among
     its siblings (each emitted token is distributed as p), so p(x) is the node's exact acceptance
     probability given its parent; recording it, rather than the one realised 0/1 outcome, gives the
     same expectation with less noise.
   - **soft** (the thesis's): min(1, p(x) / q(x)), q(x) the draft's probability. Under greedy
     decoding p is the target's softmax at temperature 1 (the processed distribution is one-hot
     there, which would make soft equal hard).

2. **The model** (`GroupedIsotonicCalibrator`): one isotonic regression of the label on the
   confidence per group, a group being a token type x an attention bin (bins are quantiles of the
   visual intensity, fixed at fit time), falling back to the token type's fit and then to a global
   fit when a group has fewer than `min_group_size` samples. Follows the scikit-learn estimator
   contract; persisted as JSON (thresholds, bin edges, settings, label), never pickled.

3. **Use in the tree**, two modes (`calibrator_mode`, `calibrated_scorer`), both `NodeScorer`s
   evaluating the fitted piecewise-linear functions in torch on the device, exactly as
   scikit-learn's `IsotonicRegression.predict` does:
   - `weight` (`CalibratedScorer`, this project's): the predicted acceptance is the node's weight;
   - `tilt` (`TiltScorer`, the thesis's): the prediction tilts the draft's logits of the proposed
     children, and the re-normalised draft probability is the node's weight.
   OPT-Tree's weights and its stopping rule then use them. `OnlineCalibration` observes the first
   `train_ratio` of a run's requests, then fits and switches.

4. **Quality** (`expected_calibration_error`, `brier_score`, `evaluate`, `reliability_diagram`):
   raw confidence vs calibrated prediction against held-out hard labels.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator

from lmms_msd.sampling import GenerationConfig, processed_probs
from lmms_msd.token_types import NUMBER, TYPE_NAMES
from lmms_msd.tree import OptTree, Tree
from lmms_msd.verify import Acceptance

log = logging.getLogger(__name__)

LABELS = ("hard", "soft")
FEATURES = ("confidence", "token_type", "visual")  # the columns of X for fit / predict
FORMAT = "lmms-msd-calibrator"
FORMAT_VERSION = 1
OBSERVATION_FIELDS = ("confidence", "token_type", "visual", "depth", "hard", "soft", "token", "step", "request")
ECE_BINS = 10


# ---- 1. observations ----------------------------------------------------------------------------------
@dataclass
class Observations:
    """Labelled tree nodes, one entry per node whose parent was on an accepted path. Arrays of length n."""

    confidence: np.ndarray  # [n] float64; the draft's probability of the node
    token_type: np.ndarray  # [n] int64; lmms_msd.token_types (NUMBER, FUNCTION, CONTENT)
    visual: np.ndarray  # [n] float64; visual intensity of the row that produced the node (NaN: not tracked)
    depth: np.ndarray  # [n] int64; the node's depth in its tree (1 = a child of the root)
    hard: np.ndarray  # [n] float64; the acceptance rule's label (module docstring)
    soft: np.ndarray  # [n] float64; min(1, p_target / p_draft)
    token: np.ndarray  # [n] int64; the node's token id
    step: np.ndarray  # [n] int64; which verification (counted over the whole collection)
    request: np.ndarray  # [n] int64; which request (the caller's numbering)
    meta: dict[str, Any] = field(default_factory=dict)  # how they were collected (JSON-able)

    def __post_init__(self) -> None:
        n = len(self.confidence)
        for name in OBSERVATION_FIELDS:
            dtype = np.float64 if name in ("confidence", "visual", "hard", "soft") else np.int64
            value = np.asarray(getattr(self, name), dtype=dtype)
            assert value.shape == (n,), f"Observations.{name} has shape {value.shape}, expected ({n},)"
            setattr(self, name, value)

    def __len__(self) -> int:
        return len(self.confidence)

    @classmethod
    def empty(cls, meta: dict[str, Any] | None = None) -> Observations:
        return cls(*[np.zeros(0) for _ in OBSERVATION_FIELDS], meta=dict(meta or {}))

    @classmethod
    def concatenate(cls, parts: Sequence[Observations]) -> Observations:
        if not parts:
            return cls.empty()
        return cls(*[np.concatenate([getattr(p, f) for p in parts]) for f in OBSERVATION_FIELDS], meta=dict(parts[0].meta))

    def features(self) -> np.ndarray:
        """X for the calibrator: [n, 3] float64 columns (confidence, token_type, visual)."""
        return np.stack([self.confidence, self.token_type.astype(np.float64), self.visual], axis=1)

    def label(self, name: str) -> np.ndarray:
        if name not in LABELS:
            raise ValueError(f"unknown label {name!r}; valid: {list(LABELS)}")
        return getattr(self, name)

    def subset(self, mask: np.ndarray) -> Observations:
        return Observations(*[getattr(self, f)[mask] for f in OBSERVATION_FIELDS], meta=dict(self.meta))

    def save(self, path: str | Path) -> Path:
        """Write to `.npz` (numpy arrays, no pickled objects) or `.json`, by the file's suffix."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f: getattr(self, f) for f in OBSERVATION_FIELDS}
        if path.suffix == ".npz":
            np.savez_compressed(path, meta=np.array(json.dumps(self.meta)), **arrays)
        elif path.suffix == ".json":
            data = {"meta": self.meta, **{f: _json_list(v) for f, v in arrays.items()}}
            path.write_text(json.dumps(data) + "\n")
        else:
            raise ValueError(f"observations are written as .npz or .json, not {path.suffix!r} ({path})")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Observations:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no observations file {path}; write one with `lmms-msd calibrate --save_observations`")
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                missing = sorted(set(OBSERVATION_FIELDS) - set(data.files))
                if missing:
                    raise ValueError(f"{path} lacks the observation arrays {missing}")
                meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
                return cls(*[data[f] for f in OBSERVATION_FIELDS], meta=meta)
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            missing = sorted(set(OBSERVATION_FIELDS) - set(data))
            if missing:
                raise ValueError(f"{path} lacks the observation fields {missing}")
            arrays = [np.array([np.nan if v is None else v for v in data[f]]) for f in OBSERVATION_FIELDS]
            return cls(*arrays, meta=data.get("meta", {}))
        raise ValueError(f"observations are read from .npz or .json, not {path.suffix!r} ({path})")


def _json_list(values: np.ndarray) -> list:
    """NaN is not JSON: written as null."""
    return [None if isinstance(v, float) and math.isnan(v) else v for v in values.tolist()]


class CalibrationObserver:
    """A `StepObserver` collecting `Observations` (labels from the step's own verification logits).

    Call `start_request(request, config)` before each request: the labels depend on the decoding
    rule (greedy or sampling, and the sampling processors), which is the request's own.
    token_types: [V] long, `lmms_msd.token_types.token_type_table`
    """

    def __init__(self, token_types: torch.Tensor) -> None:
        assert token_types.dim() == 1, f"token_types must be [V], got {tuple(token_types.shape)}"
        self.token_types = token_types.to(torch.long)
        self.request = 0
        self.config: GenerationConfig | None = None
        self.steps = 0
        self._parts: list[dict[str, np.ndarray]] = []
        self._meta: dict[str, Any] = {}

    def start_request(self, request: int, config: GenerationConfig) -> None:
        self.request, self.config = int(request), config
        rule = "greedy"
        if not config.greedy:
            rule = f"sampling(temperature={config.temperature}, top_p={config.top_p}, top_k={config.top_k})"
        self._meta.setdefault("rules", [])
        if rule not in self._meta["rules"]:
            self._meta["rules"].append(rule)

    @torch.inference_mode()
    def __call__(self, tree: Tree, logits: torch.Tensor, acceptance: Acceptance) -> None:
        """logits: [N, V], the target's at every node of `tree` (verification of this step)."""
        assert self.config is not None, "call start_request(request, config) before decoding a request"
        assert tree.confidence is not None, "the tree carries no draft confidences; build it with lmms_msd.tree's builders"
        n = len(tree)
        assert logits.shape[0] == n, f"logits {tuple(logits.shape)} for a tree of {n} nodes"
        device = logits.device
        path = torch.tensor(acceptance.path, device=device)  # [a + 1]
        row_of = torch.full((n,), -1, dtype=torch.long, device=device)
        row_of[path] = torch.arange(path.shape[0], device=device)  # path node -> its row in `rows`
        parents = tree.parents.to(device)
        labelled = (parents >= 0) & (row_of[parents.clamp(min=0)] >= 0)  # [N]: the parent was reached
        nodes = labelled.nonzero().flatten()  # [m]
        tokens = tree.tokens.to(device)[nodes]
        parent_rows = row_of[parents[nodes]]
        rows = logits[path].float()  # [a + 1, V], the target at each reached node
        if self.config.greedy:
            hard = (rows.argmax(dim=-1)[parent_rows] == tokens).double()
            p = rows.softmax(dim=-1)[parent_rows, tokens].double()
        else:
            p = processed_probs(rows, self.config)[parent_rows, tokens].double()
            hard = p
        confidence = tree.confidence.to(device)[nodes].double()
        soft = (p / confidence.clamp(min=torch.finfo(torch.float64).tiny)).clamp(max=1.0)
        if tree.visual is not None:
            visual = tree.visual.to(device)[nodes].double()
        else:
            visual = torch.full_like(confidence, math.nan)
        m = nodes.shape[0]
        part = {
            "confidence": confidence,
            "token_type": self.token_types.to(device)[tokens],
            "visual": visual,
            "depth": tree.depths.to(device)[nodes],
            "hard": hard,
            "soft": soft,
            "token": tokens,
        }
        part = {k: v.cpu().numpy() for k, v in part.items()}
        part["step"] = np.full(m, self.steps, dtype=np.int64)
        part["request"] = np.full(m, self.request, dtype=np.int64)
        self._parts.append(part)
        self.steps += 1

    def observations(self) -> Observations:
        if not self._parts:
            return Observations.empty(self._meta)
        return Observations(*[np.concatenate([p[f] for p in self._parts]) for f in OBSERVATION_FIELDS], meta=dict(self._meta))


# ---- 2. the model --------------------------------------------------------------------------------------
def interpolate_thresholds(x: np.ndarray, y: np.ndarray, t: np.ndarray) -> np.ndarray:
    """scikit-learn's `IsotonicRegression.predict` (out_of_bounds="clip") on its fitted thresholds.

    Clip to [x[0], x[-1]], then scipy's `interp1d(kind="linear")` formula, operation for operation,
    so the result is the same float for float. x: [T] increasing, y: [T]; t: [n] -> [n]
    """
    t = np.clip(np.asarray(t, dtype=x.dtype), x[0], x[-1])
    if len(x) == 1:
        return np.repeat(y, t.shape)
    hi = np.searchsorted(x, t).clip(1, len(x) - 1)
    lo = hi - 1
    slope = (y[hi] - y[lo]) / (x[hi] - x[lo])
    return slope * (t - x[lo]) + y[lo]


class GroupedIsotonicCalibrator(BaseEstimator):
    """One isotonic regression per (token type, attention bin) group, with fall-backs.

    Settings (scikit-learn's contract: stored as given, validated in `fit`):
      attention_bins   quantile bins of the visual intensity (1: token type only)
      min_group_size   fewest samples a group needs for its own fit; smaller groups use their
                       token type's fit, or the global fit when the token type is small too
      label            which label `fit_observations` fits ("hard" or "soft"), recorded in the file
      n_types          how many token types (lmms_msd.token_types)
    Every fit is `IsotonicRegression(increasing=True, out_of_bounds="clip", y_min=0, y_max=1)` of the
    label on the confidence. X is [n, 3] with columns (confidence, token_type, visual).

    Learned state: bin_edges_ [attention_bins - 1] (interior quantiles; a value equal to an edge
    falls in the upper bin), models_ (thresholds of each fitted regression and what it covers),
    group_model_ [n_types, attention_bins] (which model serves each group), n_samples_.
    """

    def __init__(
        self, attention_bins: int = 3, min_group_size: int = 50, label: str = "hard", n_types: int = len(TYPE_NAMES)
    ) -> None:
        self.attention_bins = attention_bins
        self.min_group_size = min_group_size
        self.label = label
        self.n_types = n_types

    def _check_settings(self) -> None:
        if int(self.attention_bins) != self.attention_bins or self.attention_bins < 1:
            raise ValueError(f"attention_bins must be an integer >= 1, got {self.attention_bins!r}")
        if int(self.min_group_size) != self.min_group_size or self.min_group_size < 1:
            raise ValueError(f"min_group_size must be an integer >= 1, got {self.min_group_size!r}")
        if self.label not in LABELS:
            raise ValueError(f"label must be one of {list(LABELS)}, got {self.label!r}")

    # -- fitting
    def fit(self, X: np.ndarray, y: np.ndarray) -> GroupedIsotonicCalibrator:
        """X: [n, 3] (confidence, token_type, visual); y: [n] labels in [0, 1]."""
        from sklearn.isotonic import IsotonicRegression

        self._check_settings()
        confidence, types, visual = self._columns(X)
        y = np.asarray(y, dtype=np.float64)
        if y.shape != confidence.shape:
            raise ValueError(f"y has shape {y.shape}, X has {len(confidence)} rows")
        if len(y) == 0:
            raise ValueError("no observations to fit: collect some first (a run whose trees were verified at least once)")
        if self.attention_bins > 1:
            quantiles = np.linspace(0, 1, self.attention_bins + 1)[1:-1]
            self.bin_edges_ = np.quantile(visual, quantiles)
        else:
            self.bin_edges_ = np.zeros(0)
        bins = self._bins(visual)

        def fit_one(mask: np.ndarray, name: str, level: str) -> int:
            regression = IsotonicRegression(increasing=True, out_of_bounds="clip", y_min=0.0, y_max=1.0)
            regression.fit(confidence[mask], y[mask])
            self.models_.append(
                {"name": name, "level": level, "n": int(mask.sum()),
                 "x": regression.X_thresholds_.astype(np.float64), "y": regression.y_thresholds_.astype(np.float64)}
            )  # fmt: skip
            return len(self.models_) - 1

        self.models_: list[dict[str, Any]] = []
        global_model = fit_one(np.ones(len(y), dtype=bool), "global", "global")
        self.group_model_ = np.full((self.n_types, self.attention_bins), global_model, dtype=np.int64)
        for t in range(self.n_types):
            in_type = types == t
            if in_type.sum() < self.min_group_size:
                continue
            type_model = fit_one(in_type, f"type={_type_name(t)}", "type")
            for b in range(self.attention_bins):
                in_group = in_type & (bins == b)
                if self.attention_bins > 1 and in_group.sum() >= self.min_group_size:
                    self.group_model_[t, b] = fit_one(in_group, f"type={_type_name(t)},bin={b}", "group")
                else:
                    self.group_model_[t, b] = type_model
        self.n_samples_ = len(y)
        return self

    def fit_observations(self, observations: Observations) -> GroupedIsotonicCalibrator:
        """`fit` on observations' features and their `label` label."""
        return self.fit(observations.features(), observations.label(self.label))

    def _columns(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != len(FEATURES):
            raise ValueError(f"X must be [n, {len(FEATURES)}] with columns {FEATURES}, got shape {X.shape}")
        confidence, types, visual = X[:, 0], X[:, 1], X[:, 2]
        if np.any((types < 0) | (types >= self.n_types) | (types != np.round(types))):
            raise ValueError(f"token types must be integers in [0, {self.n_types}), got {sorted(set(types.tolist()))[:10]}")
        if self.attention_bins > 1 and np.isnan(visual).any():
            raise ValueError(
                f"attention_bins={self.attention_bins} needs the visual attention intensity, but {int(np.isnan(visual).sum())} "
                "rows lack it: collect observations with track_visual=True, or use attention_bins=1"
            )
        return confidence, types.astype(np.int64), visual

    def _bins(self, visual: np.ndarray) -> np.ndarray:
        if self.attention_bins == 1:
            return np.zeros(len(visual), dtype=np.int64)
        return np.searchsorted(self.bin_edges_, visual, side="right")

    # -- prediction
    def _check_fitted(self) -> None:
        if not hasattr(self, "models_"):
            raise RuntimeError("this calibrator is not fitted: call fit (or load a fitted one) first")

    def predict(self, X: np.ndarray) -> np.ndarray:
        """X: [n, 3] (confidence, token_type, visual) -> predicted acceptance probabilities [n] float64."""
        self._check_fitted()
        confidence, types, visual = self._columns(X)
        which = self.group_model_[types, self._bins(visual)]
        out = np.empty(len(confidence), dtype=np.float64)
        for index in np.unique(which):
            rows = which == index
            model = self.models_[index]
            out[rows] = interpolate_thresholds(model["x"], model["y"], confidence[rows])
        return out

    def predict_observations(self, observations: Observations) -> np.ndarray:
        return self.predict(observations.features())

    def to_torch(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> TorchCalibrator:
        self._check_fitted()
        return TorchCalibrator(self, torch.device(device), dtype)

    # -- persistence
    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "settings": self.get_params(),
            "fitted_on": self.label,
            "features": list(FEATURES),
            "type_names": list(TYPE_NAMES[: self.n_types]) if self.n_types == len(TYPE_NAMES) else None,
            "n_samples": self.n_samples_,
            "bin_edges": self.bin_edges_.tolist(),
            "group_model": self.group_model_.tolist(),
            "models": [{**m, "x": m["x"].tolist(), "y": m["y"].tolist()} for m in self.models_],
        }

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the fitted calibrator as JSON (floats round-trip exactly); `extra` goes under "info"."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        if extra:
            data["info"] = extra
        path.write_text(json.dumps(data, indent=1) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "calibrator") -> GroupedIsotonicCalibrator:
        if data.get("format") != FORMAT:
            raise ValueError(f"{source} is not an lmms-msd calibrator (format {data.get('format')!r}, expected {FORMAT!r})")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{source} has calibrator format version {data.get('version')}; this lmms-msd reads {FORMAT_VERSION}"
            )
        calibrator = cls(**data["settings"])
        calibrator._check_settings()
        calibrator.bin_edges_ = np.array(data["bin_edges"], dtype=np.float64)
        calibrator.group_model_ = np.array(data["group_model"], dtype=np.int64)
        calibrator.models_ = [
            {**m, "x": np.array(m["x"], dtype=np.float64), "y": np.array(m["y"], dtype=np.float64)} for m in data["models"]
        ]
        calibrator.n_samples_ = int(data["n_samples"])
        shape = (calibrator.n_types, calibrator.attention_bins)
        if calibrator.group_model_.shape != shape or calibrator.bin_edges_.shape != (calibrator.attention_bins - 1,):
            raise ValueError(f"{source}: group_model / bin_edges do not match the settings {data['settings']}")
        if not all(0 <= i < len(calibrator.models_) for i in calibrator.group_model_.flatten()):
            raise ValueError(f"{source}: group_model names models that are not in the file")
        return calibrator

    @classmethod
    def load(cls, path: str | Path) -> GroupedIsotonicCalibrator:
        """Read a calibrator JSON file (plain JSON: loading never runs or unpickles anything)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no calibrator file {path}; fit one with `lmms-msd calibrate --output {path}`")
        return cls.from_dict(json.loads(path.read_text()), source=str(path))


def _type_name(t: int) -> str:
    return TYPE_NAMES[t] if t < len(TYPE_NAMES) else str(t)


class TorchCalibrator:
    """A fitted calibrator's functions as padded tensors, evaluated in batch on the device.

    x_, y_: [models, T] thresholds, each row padded by repeating its last point (so it stays sorted
    and `searchsorted` finds the same segment); sizes_: [models] true lengths.
    """

    def __init__(self, calibrator: GroupedIsotonicCalibrator, device: torch.device, dtype: torch.dtype) -> None:
        models = calibrator.models_
        width = max(2, *(len(m["x"]) for m in models))  # at least one segment, even for constant fits

        def padded(key: str) -> torch.Tensor:
            rows = [np.concatenate([m[key], np.repeat(m[key][-1:], width - len(m[key]))]) for m in models]
            return torch.tensor(np.stack(rows), dtype=dtype, device=device)

        self.x, self.y = padded("x"), padded("y")
        self.sizes = torch.tensor([len(m["x"]) for m in models], device=device)
        self.group_model = torch.tensor(calibrator.group_model_, device=device)  # [types, bins]
        self.bin_edges = torch.tensor(calibrator.bin_edges_, dtype=dtype, device=device)
        self.attention_bins = calibrator.attention_bins

    @property
    def needs_visual(self) -> bool:
        return self.attention_bins > 1

    def __call__(self, confidence: torch.Tensor, types: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
        """confidence, types (long), visual: same shape [...] (visual may be None with one bin) -> [...]"""
        if self.needs_visual:
            if visual is None:
                raise ValueError(
                    f"this calibrator has {self.attention_bins} attention bins and needs the draft's visual attention: "
                    "decode with speculative_generate(..., track_visual=True)"
                )
            bins = torch.searchsorted(self.bin_edges, visual.to(self.bin_edges.dtype).contiguous(), right=True)
        else:
            bins = torch.zeros_like(types)
        which = self.group_model[types, bins].flatten()  # [n]
        t = confidence.to(self.x.dtype).flatten()
        x, y, size = self.x[which], self.y[which], self.sizes[which]  # [n, T], [n, T], [n]
        t = torch.minimum(torch.maximum(t, x[:, 0]), x[:, -1])  # rows are padded with their last point
        hi = torch.searchsorted(x, t[:, None]).squeeze(1)
        hi = torch.minimum(hi.clamp(min=1), (size - 1).clamp(min=1))
        lo = hi - 1
        x_lo, x_hi = x.gather(1, lo[:, None])[:, 0], x.gather(1, hi[:, None])[:, 0]
        y_lo, y_hi = y.gather(1, lo[:, None])[:, 0], y.gather(1, hi[:, None])[:, 0]
        single = size == 1
        slope = (y_hi - y_lo) / torch.where(single, torch.ones_like(x_hi), x_hi - x_lo)
        out = torch.where(single, y[:, 0], slope * (t - x_lo) + y_lo)
        return out.view(confidence.shape)


class CalibratedScorer:
    """A `NodeScorer`: log of the calibrator's predicted acceptance for each proposed child.

    Predictions are floored at `floor` (an isotonic fit can predict 0; a log weight of -inf would
    tie unrelated nodes) and are at most 1, so weights never grow along a path.
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
        return self.predictor.needs_visual

    def __call__(self, logprobs: torch.Tensor, tokens: torch.Tensor, depth: int, visual: torch.Tensor | None) -> torch.Tensor:
        """logprobs, tokens: [n, k]; visual: [n] (the producing row of each parent's children) -> [n, k]"""
        assert logprobs.shape == tokens.shape and logprobs.dim() == 2, (
            f"logprobs {tuple(logprobs.shape)}, tokens {tuple(tokens.shape)}"
        )
        row_visual = None if visual is None else visual[:, None].expand_as(logprobs)
        predicted = self.predictor(logprobs.exp(), self.token_types[tokens], row_visual)
        return predicted.clamp(min=self.floor, max=1.0).log().to(logprobs.dtype)

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
      the row that produced the candidate's distribution (its parent's, `lmms_msd.drafting`; DESIGN
      4.4). That is a share of the row's attention mass, the thesis's a mean over image columns (the
      share / the number of image columns); the percentile normalisation does not see the scale.
      Untracked (visual None), all attentions are equal and the factor is 1, as the thesis's formula
      gives for a constant batch.
    - p_cal is this project's calibrator's (same features and kind of model as the thesis's
      `GroupedIsotonicCalibrator`; the thesis fits 5 attention bins, 200 samples per group, soft labels:
      calibrators.py 803-833).
    - number tokens are `lmms_msd.token_types`' NUMBER (digits, possibly with . , % - +); the thesis
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

    predictor: (confidence, token types, visual) of shape [n, k] -> p_cal [n, k] (a `TorchCalibrator`)
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
        predictor: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
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
        p_cal = self.predictor(logprobs.exp(), types, row_visual).double()  # [n, k]
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
    tree: OptTree, calibrator: GroupedIsotonicCalibrator, token_types: torch.Tensor, device: torch.device | str, mode: str = "weight"
) -> OptTree:
    """The same OPT-Tree settings, scored by the calibrator in `mode` (`calibrated_scorer`)."""
    return replace(tree, scorer=calibrated_scorer(calibrator, token_types, device, mode))


# ---- online calibration ----------------------------------------------------------------------------------
@dataclass
class RequestPlan:
    """How to decode one request: pass these to `speculative_generate`."""

    tree_builder: OptTree
    observer: CalibrationObserver | None
    track_visual: bool


class OnlineCalibration:
    """Observe the first `train_ratio` of a run's requests, then fit and decode with the calibrator.

    The requests are taken in a seeded random order (`order`), so the observed share is a sample of
    the run, not its first task. During observation the tree uses the raw draft confidence and an
    observer records labels from the verification logits: decoding is unchanged (still lossless).
    When the last observed request is done (`done`), the calibrator is fitted and every later
    request's tree uses it. Under data parallelism each process calibrates on its own requests.

    label "auto" fits on the label that predicts acceptance better: both are fitted on half of the
    observed requests and scored on the other half (`choose_label`); the winner is then refitted on
    all of them. "hard" or "soft" fits that label directly. `mode` is how the fitted calibrator scores
    the tree's nodes (`calibrated_scorer`: "weight" or "tilt").

        online = OnlineCalibration(n, 0.3, OptTree(), token_types, GroupedIsotonicCalibrator(), seed=0)
        for i in online.order:
            plan = online.plan(i, config)
            result = speculative_generate(..., plan.tree_builder, generator, plan.observer, plan.track_visual)
            online.done()
    """

    def __init__(
        self,
        n_requests: int,
        train_ratio: float,
        tree: OptTree,
        token_types: torch.Tensor,
        calibrator: GroupedIsotonicCalibrator,
        seed: int = 0,
        device: torch.device | str = "cpu",
        label: str = "auto",
        mode: str = "weight",
    ) -> None:
        if not 0 < train_ratio <= 1:
            raise ValueError(f"train_ratio must be in (0, 1], got {train_ratio}")
        if label not in ("auto", *LABELS):
            raise ValueError(f"label must be auto, hard or soft, got {label!r}")
        if mode not in CALIBRATOR_MODES:
            raise ValueError(f"calibrator_mode must be one of {list(CALIBRATOR_MODES)}, got {mode!r}")
        self.label = label
        self.mode = mode
        self.seed = seed
        self.train_ratio = train_ratio
        self.label_report: dict[str, Any] | None = None  # choose_label's, when label is auto
        self.tree = tree
        self.device = device
        self.calibrator = calibrator
        self.token_types = token_types
        self.order = np.random.default_rng(seed).permutation(n_requests).tolist()
        self.n_observe = min(n_requests, math.ceil(train_ratio * n_requests))
        self.observer = CalibrationObserver(token_types)
        self.finished = 0
        self.calibrated: OptTree | None = None  # set once fitted

    @property
    def observing(self) -> bool:
        return self.finished < self.n_observe

    def plan(self, request: int, config: GenerationConfig) -> RequestPlan:
        if self.observing:
            self.observer.start_request(request, config)
            return RequestPlan(self.tree, self.observer, track_visual=True)
        if self.calibrated is None:
            return RequestPlan(self.tree, None, track_visual=False)
        return RequestPlan(self.calibrated, None, track_visual=self.calibrated.scorer.needs_visual)

    def done(self) -> None:
        """Call after each request; fits the calibrator after the last observed one."""
        self.finished += 1
        if self.finished != self.n_observe:
            return
        observations = self.observer.observations()
        if len(observations) == 0:
            log.warning("online calibration observed no labelled nodes; the rest of the run uses raw draft confidence")
            return
        label = self.label
        if label == "auto":
            label, self.label_report = choose_label(
                observations, self.calibrator.attention_bins, self.calibrator.min_group_size, self.seed
            )
        self.calibrator.set_params(label=label).fit_observations(observations)
        self.calibrated = calibrated_tree(self.tree, self.calibrator, self.token_types, self.device, self.mode)
        log.info("online calibration fitted on %d nodes from %d requests: %r", len(observations), self.n_observe, self.calibrator)


# ---- 4. quality ---------------------------------------------------------------------------------------
def expected_calibration_error(predicted: np.ndarray, label: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE with `n_bins` equal-width bins of the prediction over [0, 1] (the last bin includes 1):
    sum over bins of (share of samples) x |mean label - mean prediction|."""
    predicted, label = np.asarray(predicted, dtype=np.float64), np.asarray(label, dtype=np.float64)
    if len(predicted) == 0:
        return float("nan")
    bins = np.minimum((predicted * n_bins).astype(np.int64), n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        rows = bins == b
        total += rows.mean() * abs(label[rows].mean() - predicted[rows].mean())
    return float(total)


def brier_score(predicted: np.ndarray, label: np.ndarray) -> float:
    """Mean squared difference between prediction and label."""
    predicted, label = np.asarray(predicted, dtype=np.float64), np.asarray(label, dtype=np.float64)
    return float(np.mean((predicted - label) ** 2)) if len(predicted) else float("nan")


def metrics(predicted: np.ndarray, label: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, float]:
    return {
        "ece": expected_calibration_error(predicted, label, n_bins),
        "brier": brier_score(predicted, label),
        "mean_predicted": float(np.mean(predicted)) if len(predicted) else float("nan"),
        "mean_label": float(np.mean(label)) if len(label) else float("nan"),
        "n": len(label),
    }


def evaluate(calibrator: GroupedIsotonicCalibrator, held_out: Observations, n_bins: int = ECE_BINS) -> dict[str, Any]:
    """Raw confidence vs calibrated prediction against the held-out hard labels, overall and per token type."""
    calibrated = calibrator.predict_observations(held_out)
    out: dict[str, Any] = {}
    for name, rows in [("all", np.ones(len(held_out), dtype=bool))] + [
        (TYPE_NAMES[t], held_out.token_type == t) for t in range(len(TYPE_NAMES))
    ]:
        out[name] = {
            "raw": metrics(held_out.confidence[rows], held_out.hard[rows], n_bins),
            "calibrated": metrics(calibrated[rows], held_out.hard[rows], n_bins),
        }
    return out


def split_by_request(observations: Observations, fit_ratio: float, seed: int) -> tuple[Observations, Observations]:
    """Seeded split of whole requests: the first `fit_ratio` of a random order of requests to fit on."""
    if not 0 < fit_ratio < 1:
        raise ValueError(f"fit_ratio must be in (0, 1), got {fit_ratio}")
    requests = np.unique(observations.request)
    if len(requests) < 2:
        raise ValueError(f"the observations come from {len(requests)} request(s); fitting and reporting need at least 2")
    order = np.random.default_rng(seed).permutation(requests)
    n_fit = min(len(requests) - 1, max(1, round(fit_ratio * len(requests))))
    fit = np.isin(observations.request, order[:n_fit])
    return observations.subset(fit), observations.subset(~fit)


def compare_labels(
    fit_part: Observations, held_out: Observations, attention_bins: int, min_group_size: int, n_bins: int = ECE_BINS
) -> tuple[dict[str, GroupedIsotonicCalibrator], dict[str, Any]]:
    """Fit on each label, evaluate each against held-out hard labels; the winner has the lower Brier score.

    returns ({label: fitted calibrator}, {"winner": label, label: evaluate(...)})
    """
    fitted = {
        label: GroupedIsotonicCalibrator(attention_bins, min_group_size, label).fit_observations(fit_part) for label in LABELS
    }
    report: dict[str, Any] = {label: evaluate(c, held_out, n_bins) for label, c in fitted.items()}
    report["winner"] = min(LABELS, key=lambda label: report[label]["all"]["calibrated"]["brier"])
    return fitted, report


def choose_label(
    observations: Observations, attention_bins: int, min_group_size: int, seed: int = 0
) -> tuple[str, dict[str, Any] | None]:
    """The label that predicts held-out acceptance better: fit each on half of the requests (seeded),
    score on the other half. With fewer than 2 requests there is nothing to hold out: "hard"."""
    if len(np.unique(observations.request)) < 2:
        return "hard", None
    fit_part, held_out = split_by_request(observations, 0.5, seed)
    _, report = compare_labels(fit_part, held_out, attention_bins, min_group_size)
    return report["winner"], report


def reliability_curve(predicted: np.ndarray, label: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Per equal-width bin of the prediction: mean prediction, mean label and count (empty bins left out)."""
    predicted, label = np.asarray(predicted, dtype=np.float64), np.asarray(label, dtype=np.float64)
    bins = np.minimum((predicted * n_bins).astype(np.int64), n_bins - 1)
    curve: dict[str, list[float]] = {"predicted": [], "observed": [], "count": []}
    for b in range(n_bins):
        rows = bins == b
        if rows.any():
            curve["predicted"].append(float(predicted[rows].mean()))
            curve["observed"].append(float(label[rows].mean()))
            curve["count"].append(int(rows.sum()))
    return curve


def reliability_diagram(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "", n_bins: int = ECE_BINS
) -> Path:
    """A reliability diagram PNG: for each named (predicted, label) pair, observed vs predicted per
    equal-width bin (marker area ~ count), with the diagonal of perfect calibration and the ECE in
    the legend. Drawn on matplotlib's Agg canvas, no pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.5), dpi=120)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=1, label="perfect")
    for name, (predicted, label) in curves.items():
        curve = reliability_curve(predicted, label, n_bins)
        total = max(1, sum(curve["count"]))
        sizes = [10 + 300 * c / total for c in curve["count"]]
        ece = expected_calibration_error(predicted, label, n_bins)
        (line,) = ax.plot(curve["predicted"], curve["observed"], marker="", linewidth=1.5, label=f"{name} (ECE {ece:.3f})")
        ax.scatter(curve["predicted"], curve["observed"], s=sizes, color=line.get_color(), zorder=3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted acceptance probability")
    ax.set_ylabel("observed acceptance (held-out)")
    ax.set_title(title or f"reliability ({n_bins} equal-width bins)", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.print_png(str(path))
    return path
