"""The estimator: draft confidence -> predicted acceptance probability (DESIGN 4.4).

`GroupedIsotonicCalibrator`: one isotonic regression of the label on the confidence per group, a group
being a depth bucket x a token type x an attention bin (bins are quantiles of the visual intensity, fixed
at fit time; depth buckets are fixed by the settings), falling back to the depth bucket's token type's
fit, then to the depth bucket's fit, then to a global fit when a group has fewer than `min_group_size`
samples. Follows the scikit-learn estimator contract; persisted as JSON (thresholds, bin edges,
settings, label), never pickled.

Depth: a root's children are drafted from the target's own hidden state, deeper nodes from the draft's
own output, so at equal draft confidence the first level is accepted more often (README, "Sibling
predictions normalised"). `depth_edges=(2,)` fits depth 1 apart from deeper nodes; `()` pools every
depth, as files of format version 1 (written before depth buckets existed) do.

`TorchCalibrator`: the fitted piecewise-linear functions as segment tables, evaluated in batch on the
device exactly as scikit-learn's `IsotonicRegression.predict` does, in a few kernels.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator

from lmms_msd.calibration.observations import (
    LABELS,
    Observations,
)
from lmms_msd.calibration.token_types import TYPE_NAMES

log = logging.getLogger(__name__)

FEATURES = ("confidence", "token_type", "visual", "depth")  # the columns of X for fit / predict
FORMAT = "lmms-msd-calibrator"
FORMAT_VERSION = 2  # 2: depth buckets (group_model [depth buckets, types, bins]); 1: pooled over depth, still read
READABLE_VERSIONS = (1, 2)


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
    """One isotonic regression per (depth bucket, token type, attention bin) group, with fall-backs.

    Settings (scikit-learn's contract: stored as given, validated in `fit`):
      attention_bins   quantile bins of the visual intensity (1: token type only)
      min_group_size   fewest samples a group needs for its own fit; a smaller group uses the fit of the
                       level above it: depth bucket x token type, then depth bucket, then global
      label            which label `fit_observations` fits ("hard" or "soft"), recorded in the file
      n_types          how many token types (lmms_msd.calibration.token_types)
      depth_edges      increasing depths >= 2 that start a new depth bucket: () pools every depth (one
                       bucket; the fits and their fall-backs are then exactly format 1's); (2,) is depth 1
                       against depth >= 2; (2, 3) is 1, 2, >= 3. Depth 1 is a child of the root.
    Every fit is `IsotonicRegression(increasing=True, out_of_bounds="clip", y_min=0, y_max=1)` of the
    label on the confidence. X is [n, 4] with columns (confidence, token_type, visual, depth); a
    calibrator without depth buckets also takes [n, 3] (no depth column).

    Learned state: bin_edges_ [attention_bins - 1] (interior quantiles; a value equal to an edge
    falls in the upper bin), models_ (thresholds of each fitted regression and what it covers),
    group_model_ [depth buckets, n_types, attention_bins] (which model serves each group), n_samples_.
    """

    def __init__(
        self,
        attention_bins: int = 3,
        min_group_size: int = 50,
        label: str = "hard",
        n_types: int = len(TYPE_NAMES),
        depth_edges: tuple[int, ...] = (),
    ) -> None:
        self.attention_bins = attention_bins
        self.min_group_size = min_group_size
        self.label = label
        self.n_types = n_types
        self.depth_edges = depth_edges

    def _check_settings(self) -> None:
        if int(self.attention_bins) != self.attention_bins or self.attention_bins < 1:
            raise ValueError(f"attention_bins must be an integer >= 1, got {self.attention_bins!r}")
        if int(self.min_group_size) != self.min_group_size or self.min_group_size < 1:
            raise ValueError(f"min_group_size must be an integer >= 1, got {self.min_group_size!r}")
        if self.label not in LABELS:
            raise ValueError(f"label must be one of {list(LABELS)}, got {self.label!r}")
        edges = list(self.depth_edges)
        if any(int(e) != e or e < 2 for e in edges) or any(a >= b for a, b in itertools.pairwise(edges)):
            raise ValueError(
                f"depth_edges must be increasing integers >= 2 (depth 1: the root's children), got {self.depth_edges!r}"
            )

    @property
    def n_depth_buckets(self) -> int:
        return len(self.depth_edges) + 1

    # -- fitting
    def fit(self, X: np.ndarray, y: np.ndarray) -> GroupedIsotonicCalibrator:
        """X: [n, 4] (confidence, token_type, visual, depth), or [n, 3] without depth buckets; y: [n] labels in [0, 1]."""
        from sklearn.isotonic import IsotonicRegression

        self._check_settings()
        confidence, types, visual, buckets = self._columns(X)
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
        self.group_model_ = np.full((self.n_depth_buckets, self.n_types, self.attention_bins), global_model, dtype=np.int64)
        for d in range(self.n_depth_buckets):
            if self.n_depth_buckets == 1:  # pooled over depth: format 1's fits, names and order
                in_depth, prefix, depth_model = np.ones(len(y), dtype=bool), "", global_model
            else:
                in_depth, prefix = buckets == d, f"depth={self._depth_name(d)},"
                if in_depth.sum() < self.min_group_size:
                    continue
                depth_model = fit_one(in_depth, prefix[:-1], "depth")
                self.group_model_[d] = depth_model
            for t in range(self.n_types):
                in_type = in_depth & (types == t)
                if in_type.sum() < self.min_group_size:
                    continue
                type_model = fit_one(in_type, f"{prefix}type={_type_name(t)}", "type")
                for b in range(self.attention_bins):
                    in_group = in_type & (bins == b)
                    if self.attention_bins > 1 and in_group.sum() >= self.min_group_size:
                        self.group_model_[d, t, b] = fit_one(in_group, f"{prefix}type={_type_name(t)},bin={b}", "group")
                    else:
                        self.group_model_[d, t, b] = type_model
        self.n_samples_ = len(y)
        return self

    def fit_observations(self, observations: Observations) -> GroupedIsotonicCalibrator:
        """`fit` on observations' features and their `label` label."""
        return self.fit(observations.features(), observations.label(self.label))

    def _columns(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """-> confidence, token types (int64), visual, depth buckets (int64), each [n]"""
        X = np.asarray(X, dtype=np.float64)
        pooled = self.n_depth_buckets == 1
        if X.ndim != 2 or X.shape[1] not in ((len(FEATURES) - 1, len(FEATURES)) if pooled else (len(FEATURES),)):
            raise ValueError(
                f"X must be [n, {len(FEATURES)}] with columns {FEATURES} (a calibrator without depth_edges also takes "
                f"[n, {len(FEATURES) - 1}], no depth), got shape {X.shape}"
            )
        confidence, types, visual = X[:, 0], X[:, 1], X[:, 2]
        if pooled:
            buckets = np.zeros(len(confidence), dtype=np.int64)
        else:
            depth = X[:, 3]
            if np.any((depth < 1) | (depth != np.round(depth))):
                raise ValueError(f"depths must be integers >= 1 (1: a child of the root), got {sorted(set(depth.tolist()))[:10]}")
            buckets = np.searchsorted(np.asarray(self.depth_edges, dtype=np.float64), depth, side="right")
        if np.any((types < 0) | (types >= self.n_types) | (types != np.round(types))):
            raise ValueError(f"token types must be integers in [0, {self.n_types}), got {sorted(set(types.tolist()))[:10]}")
        if self.attention_bins > 1 and np.isnan(visual).any():
            raise ValueError(
                f"attention_bins={self.attention_bins} needs the visual attention intensity, but {int(np.isnan(visual).sum())} "
                "rows lack it: collect observations with track_visual=True, or use attention_bins=1"
            )
        return confidence, types.astype(np.int64), visual, buckets

    def _depth_name(self, d: int) -> str:
        """Bucket d's depths: with depth_edges (2, 4): "1", "2-3", ">=4"."""
        bounds = [1, *(int(e) for e in self.depth_edges)]
        if d == len(bounds) - 1:
            return f">={bounds[d]}"
        low, high = bounds[d], bounds[d + 1] - 1
        return str(low) if low == high else f"{low}-{high}"

    def _bins(self, visual: np.ndarray) -> np.ndarray:
        if self.attention_bins == 1:
            return np.zeros(len(visual), dtype=np.int64)
        return np.searchsorted(self.bin_edges_, visual, side="right")

    # -- prediction
    def _check_fitted(self) -> None:
        if not hasattr(self, "models_"):
            raise RuntimeError("this calibrator is not fitted: call fit (or load a fitted one) first")

    def predict(self, X: np.ndarray) -> np.ndarray:
        """X: [n, 4] (confidence, token_type, visual, depth), or [n, 3] without depth buckets -> predicted
        acceptance probabilities [n] float64."""
        self._check_fitted()
        confidence, types, visual, buckets = self._columns(X)
        which = self.group_model_[buckets, types, self._bins(visual)]
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
            "settings": {**self.get_params(), "depth_edges": [int(e) for e in self.depth_edges]},
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
        if data.get("version") not in READABLE_VERSIONS:
            raise ValueError(
                f"{source} has calibrator format version {data.get('version')}; this lmms-msd reads {list(READABLE_VERSIONS)}"
            )
        settings = dict(data["settings"])
        settings["depth_edges"] = tuple(settings.get("depth_edges", ()))  # version 1: pooled over depth
        calibrator = cls(**settings)
        calibrator._check_settings()
        calibrator.bin_edges_ = np.array(data["bin_edges"], dtype=np.float64)
        calibrator.group_model_ = np.array(data["group_model"], dtype=np.int64)
        if data["version"] == 1:
            calibrator.group_model_ = calibrator.group_model_[None]  # [types, bins] -> one depth bucket
        calibrator.models_ = [
            {**m, "x": np.array(m["x"], dtype=np.float64), "y": np.array(m["y"], dtype=np.float64)} for m in data["models"]
        ]
        calibrator.n_samples_ = int(data["n_samples"])
        shape = (calibrator.n_depth_buckets, calibrator.n_types, calibrator.attention_bins)
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
    """A fitted calibrator's functions as segment tables, evaluated in batch on the device.

    The same floats as `interpolate_thresholds` (scikit-learn's predict) in the tensors' dtype, with few
    operations, since a tree level evaluates it once per level inside a graph of small kernels (every
    kernel of a level costs time at a 7B draft's size). Per model m of T_m thresholds x, y:

    - x_: [models, T] the thresholds, each row padded by repeating its last point (sorted, so that
      `searchsorted` finds the segment): a confidence t finds s = the number of thresholds below it
      (searchsorted, side left), 0..T;
    - segment s of model m is (x_lo, y_lo, slope), and the prediction is slope * (t - x_lo) + y_lo:
      s = 0 (t <= x[0]): (x[0], y[0], 0), i.e. y[0], the clipped value; 1 <= s < T_m: x[s-1], y[s-1] and
      (y[s] - y[s-1]) / (x[s] - x[s-1]), scipy's formula; s >= T_m (t > x[-1]): the constant value at
      x[-1] that scikit-learn's clipping gives (the last segment evaluated at x[-1]; y[0] for T_m = 1).

    Worked example: x = (0.2, 0.6), y = (0.1, 0.5): t = 0.1 -> s 0 -> 0.1; t = 0.4 -> s 1 -> 1 * 0.2 +
    0.1 = 0.3; t = 0.9 -> s 2 -> the value at 0.6, 0.5.
    """

    def __init__(self, calibrator: GroupedIsotonicCalibrator, device: torch.device, dtype: torch.dtype) -> None:
        models = calibrator.models_
        width = max(2, *(len(m["x"]) for m in models))  # at least one segment, even for constant fits
        self.x = torch.tensor(
            np.stack([np.concatenate([m["x"], np.repeat(m["x"][-1:], width - len(m["x"]))]) for m in models]), dtype=dtype
        )
        x_lo, y_lo, slope = (torch.zeros(len(models), width + 1, dtype=dtype) for _ in range(3))
        for i, m in enumerate(models):
            x, y = torch.tensor(m["x"], dtype=dtype), torch.tensor(m["y"], dtype=dtype)
            n = x.shape[0]
            x_lo[i, 0], y_lo[i, 0] = x[0], y[0]
            x_lo[i, 1:n], y_lo[i, 1:n] = x[:-1], y[:-1]
            slope[i, 1:n] = (y[1:] - y[:-1]) / (x[1:] - x[:-1])
            last = y[:1] if n == 1 else slope[i, n - 1 : n] * (x[-1:] - x[-2:-1]) + y[-2:-1]
            x_lo[i, n:], y_lo[i, n:] = x[-1], last  # slope 0: the clipped value
        self.x = self.x.to(device)
        self.x_lo, self.y_lo, self.slope = (t.flatten().to(device) for t in (x_lo, y_lo, slope))
        self.segments = width + 1
        self.group_model = torch.tensor(calibrator.group_model_, device=device)  # [depth buckets, types, bins]
        self.bin_edges = torch.tensor(calibrator.bin_edges_, dtype=dtype, device=device)
        self.depth_edges = tuple(int(e) for e in calibrator.depth_edges)
        self.depth_edges_tensor = torch.tensor(self.depth_edges, dtype=torch.long, device=device)
        self.attention_bins = calibrator.attention_bins

    @property
    def needs_visual(self) -> bool:
        return self.attention_bins > 1

    @property
    def needs_depth(self) -> bool:
        return len(self.depth_edges) > 0

    def depth_bucket(self, depth: int) -> int:
        """The bucket of one depth, on the host (a tree level's depth is a Python int: no device read)."""
        return bisect.bisect_right(self.depth_edges, depth)

    def __call__(
        self, confidence: torch.Tensor, types: torch.Tensor, visual: torch.Tensor | None, depth: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """confidence, types (long): same shape [...]; visual: broadcastable to it, e.g. [n, 1] for a row's
        children (may be None with one bin); depth: one int for every entry, or a long tensor of the shape
        [...] (None without depth buckets) -> [...]"""
        if self.needs_visual:
            if visual is None:
                raise ValueError(
                    f"this calibrator has {self.attention_bins} attention bins and needs the draft's visual attention: "
                    "decode with speculative_generate(..., track_visual=True)"
                )
            bins = torch.searchsorted(self.bin_edges, visual.to(self.bin_edges.dtype).contiguous(), right=True)
        else:
            bins = 0
        if not self.needs_depth:
            which = self.group_model[0][types, bins]
        elif depth is None:
            raise ValueError(f"this calibrator has depth buckets (depth_edges {self.depth_edges}) and needs each node's depth")
        elif isinstance(depth, torch.Tensor):
            buckets = torch.searchsorted(self.depth_edges_tensor, depth.to(torch.long).contiguous(), right=True)
            which = self.group_model[buckets, types, bins]
        else:
            which = self.group_model[self.depth_bucket(depth)][types, bins]
        which = which.expand(confidence.shape).reshape(-1)
        t = confidence.to(self.x.dtype).reshape(-1, 1)
        segment = torch.searchsorted(self.x.index_select(0, which), t).view(-1).add_(which, alpha=self.segments)
        out = self.slope[segment] * (t.view(-1) - self.x_lo[segment]) + self.y_lo[segment]
        return out.view(confidence.shape)
