"""Calibration quality: raw confidence vs calibrated prediction against held-out hard labels
(`expected_calibration_error`, `brier_score`, `evaluate`, `reliability_diagram`), and the choice of
label (`compare_labels`, `choose_label`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from lmms_msd.calibration.isotonic import (
    GroupedIsotonicCalibrator,
)
from lmms_msd.calibration.observations import (
    LABELS,
    Observations,
    split_by_request,
)
from lmms_msd.calibration.token_types import TYPE_NAMES

log = logging.getLogger(__name__)

ECE_BINS = 10


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
    """Raw confidence vs calibrated prediction against the held-out hard labels, overall, per token type,
    and for depth 1 (the root's children) and deeper (where the held-out steps have such nodes)."""
    calibrated = calibrator.predict_observations(held_out)
    out: dict[str, Any] = {}
    for name, rows in (
        [("all", np.ones(len(held_out), dtype=bool))]
        + [(TYPE_NAMES[t], held_out.token_type == t) for t in range(len(TYPE_NAMES))]
        + [(name, rows) for name, rows in (("depth 1", held_out.depth == 1), ("depth >= 2", held_out.depth >= 2)) if rows.any()]
    ):
        out[name] = {
            "raw": metrics(held_out.confidence[rows], held_out.hard[rows], n_bins),
            "calibrated": metrics(calibrated[rows], held_out.hard[rows], n_bins),
        }
    return out


def compare_labels(
    fit_part: Observations,
    held_out: Observations,
    attention_bins: int,
    min_group_size: int,
    n_bins: int = ECE_BINS,
    depth_edges: tuple[int, ...] = (),
) -> tuple[dict[str, GroupedIsotonicCalibrator], dict[str, Any]]:
    """Fit on each label, evaluate each against held-out hard labels; the winner has the lower Brier score.

    returns ({label: fitted calibrator}, {"winner": label, label: evaluate(...)})
    """
    fitted = {
        label: GroupedIsotonicCalibrator(attention_bins, min_group_size, label, depth_edges=depth_edges).fit_observations(
            fit_part
        )
        for label in LABELS
    }
    report: dict[str, Any] = {label: evaluate(c, held_out, n_bins) for label, c in fitted.items()}
    report["winner"] = min(LABELS, key=lambda label: report[label]["all"]["calibrated"]["brier"])
    return fitted, report


def choose_label(
    observations: Observations, attention_bins: int, min_group_size: int, seed: int = 0, depth_edges: tuple[int, ...] = ()
) -> tuple[str, dict[str, Any] | None]:
    """The label that predicts held-out acceptance better: fit each on half of the requests (seeded),
    score on the other half. With fewer than 2 requests there is nothing to hold out: "hard"."""
    if len(np.unique(observations.request)) < 2:
        return "hard", None
    fit_part, held_out = split_by_request(observations, 0.5, seed)
    _, report = compare_labels(fit_part, held_out, attention_bins, min_group_size, depth_edges=depth_edges)
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
