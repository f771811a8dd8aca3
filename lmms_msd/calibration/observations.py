"""Observations: what the calibrator learns from (DESIGN 4.4).

`CalibrationObserver` is a step observer that, after every verification, records each tree node whose
parent lies on the accepted path (the parent was reached, so the target's distribution there is known
exactly) with its features and two labels, from the verification logits of that same step: no extra
target forward, nothing written anywhere but the observer's own arrays. `Observations` holds them.

Features: the draft's probability of the node (its *confidence*), its token type
(`lmms_msd.calibration.token_types`), the visual attention intensity of the draft row that produced its
distribution (its parent's row; `lmms_msd.speculative.drafting` explains why that row), and its depth.

Labels, with p the target's distribution at the parent:
- **hard**: what the acceptance rule in use gives. Greedy: 1 if the token is the target's argmax
  at the parent, else 0. Sampling: p(x), the processed probability (temperature, top-k, top-p) of
  the token. Under the multi-child rule of `lmms_msd.speculative.verify` a child x is accepted exactly
  when the emitted token is x, which happens with probability p(x) whatever the child's rank among
  its siblings (each emitted token is distributed as p), so p(x) is the node's exact acceptance
  probability given its parent; recording it, rather than the one realised 0/1 outcome, gives the
  same expectation with less noise.
- **soft** (the thesis's): min(1, p(x) / q(x)), q(x) the draft's probability. Under greedy
  decoding p is the target's softmax at temperature 1 (the processed distribution is one-hot
  there, which would make soft equal hard).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmms_msd.speculative.sampling import GenerationConfig, processed_probs
from lmms_msd.speculative.tree import Tree
from lmms_msd.speculative.verify import Acceptance

log = logging.getLogger(__name__)

LABELS = ("hard", "soft")
OBSERVATION_FIELDS = ("confidence", "token_type", "visual", "depth", "hard", "soft", "token", "step", "request")


@dataclass
class Observations:
    """Labelled tree nodes, one entry per node whose parent was on an accepted path. Arrays of length n."""

    confidence: np.ndarray  # [n] float64; the draft's probability of the node
    token_type: np.ndarray  # [n] int64; lmms_msd.calibration.token_types (NUMBER, FUNCTION, CONTENT)
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
        """X for the calibrator: [n, 4] float64 columns (confidence, token_type, visual, depth)."""
        return np.stack([self.confidence, self.token_type.astype(np.float64), self.visual, self.depth.astype(np.float64)], axis=1)

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
    token_types: [V] long, `lmms_msd.calibration.token_types.token_type_table`
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
        assert tree.confidence is not None, "the tree carries no draft confidences; build it with lmms_msd.speculative.tree's builders"
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
