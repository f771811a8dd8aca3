"""Online calibration: observe the first `train_ratio` of a run's requests, then fit and switch."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.base import clone

from lmms_msd.calibration.isotonic import (
    GroupedIsotonicCalibrator,
)
from lmms_msd.calibration.observations import (
    LABELS,
    CalibrationObserver,
)
from lmms_msd.calibration.quality import (
    choose_label,
)
from lmms_msd.calibration.scorer import (
    CALIBRATOR_MODES,
    calibrated_tree,
)
from lmms_msd.speculative.sampling import GenerationConfig
from lmms_msd.speculative.tree import TreeSpec

log = logging.getLogger(__name__)


@dataclass
class RequestPlan:
    """How to decode one request: pass these to `speculative_generate`."""

    tree: TreeSpec
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

    calibrator: the estimator's settings (attention bins, group size); it is cloned
    (`sklearn.base.clone`) and the clone fitted, `self.calibrator`, so the one passed stays unfitted.

        online = OnlineCalibration(n, 0.3, OptTree(), token_types, GroupedIsotonicCalibrator(), seed=0)
        for i in online.order:
            plan = online.plan(i, config)
            result = speculative_generate(runtime, prompts[i], config, plan.tree, generator, plan.observer, plan.track_visual)
            online.done()
    """

    def __init__(
        self,
        n_requests: int,
        train_ratio: float,
        tree: TreeSpec,
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
        self.estimator = calibrator  # the settings, never fitted
        self.calibrator: GroupedIsotonicCalibrator | None = None  # its fitted clone, once fitted
        self.token_types = token_types
        self.order = np.random.default_rng(seed).permutation(n_requests).tolist()
        self.n_observe = min(n_requests, math.ceil(train_ratio * n_requests))
        self.observer = CalibrationObserver(token_types)
        self.finished = 0
        self.calibrated: TreeSpec | None = None  # the tree scored by the calibrator, once fitted

    @property
    def observing(self) -> bool:
        return self.finished < self.n_observe

    def plan(self, request: int, config: GenerationConfig) -> RequestPlan:
        if self.observing:
            self.observer.start_request(request, config)
            return RequestPlan(self.tree, self.observer, track_visual=True)
        if self.calibrated is None:
            return RequestPlan(self.tree, None, track_visual=False)
        return RequestPlan(self.calibrated, None, track_visual=self.calibrated.needs_visual)

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
                observations, self.estimator.attention_bins, self.estimator.min_group_size, self.seed, self.estimator.depth_edges
            )
        self.calibrator = clone(self.estimator).set_params(label=label).fit_observations(observations)
        self.calibrated = calibrated_tree(self.tree, self.calibrator, self.token_types, self.device, self.mode)
        log.info("online calibration fitted on %d nodes from %d requests: %r", len(observations), self.n_observe, self.calibrator)
