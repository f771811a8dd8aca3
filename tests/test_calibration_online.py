"""Observations from real decoding, and online calibration: observe the first share of the requests
(outputs identical to plain decoding), then fit and decode with the calibrator (still identical)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from decoding_fixtures import following_draft, random_prompt, tiny_target
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from lmms_msd.calibration.isotonic import GroupedIsotonicCalibrator
from lmms_msd.calibration.observations import CalibrationObserver
from lmms_msd.calibration.online import OnlineCalibration
from lmms_msd.speculative.decoding import plain_generate, speculative_generate
from lmms_msd.speculative.runtime import EagerRuntime
from lmms_msd.speculative.sampling import GenerationConfig
from lmms_msd.speculative.tree import OptTree


def no_eos(target):
    import dataclasses

    from decoding_fixtures import CharTokenizer

    return dataclasses.replace(target, tokenizer=CharTokenizer(target.tokenizer.vocab_size, 10_000))


def test_greedy_observations_agree_with_the_acceptances():
    """Greedy: at every step exactly the accepted nodes have hard label 1 (each reached node has at
    most one child equal to the target's argmax, and the path follows it)."""
    target = no_eos(tiny_target(5, context_scale=0.05))
    observer = CalibrationObserver(torch.arange(target.vocab_size) % 3)
    accepted = []

    def record(tree, logits, acceptance):
        observer(tree, logits, acceptance)
        accepted.append(acceptance.accepted)

    config = GenerationConfig(max_new_tokens=25)
    for request in range(2):
        observer.start_request(request, config)
        speculative_generate(
            EagerRuntime(target, following_draft(target)), random_prompt(target, 40 + request), config,
            OptTree(node_budget=20, stop_delta=0.2, max_depth=6, top_k=4), observer=record, track_visual=True,
        )  # fmt: skip
    obs = observer.observations()
    hard_per_step = np.bincount(obs.step, weights=obs.hard, minlength=len(accepted))
    assert hard_per_step.tolist() == accepted
    assert sum(accepted) > 10  # the following draft is accepted often
    assert set(np.unique(obs.request)) == {0, 1}
    assert ((obs.visual >= 0) & (obs.visual <= 1)).all() and (obs.depth >= 1).all()
    assert np.array_equal(obs.soft[obs.hard == 1] > 0, np.ones(int(obs.hard.sum()), dtype=bool))


@pytest.mark.parametrize("mode, scorer", [("weight", "CalibratedScorer"), ("tilt", "TiltScorer")])
def test_online_calibration_is_lossless_before_and_after_fitting(mode, scorer):
    target = no_eos(tiny_target(6, context_scale=0.05))
    draft = following_draft(target)
    types = torch.arange(target.vocab_size) % 3
    n = 6
    estimator = GroupedIsotonicCalibrator(attention_bins=2, min_group_size=5)
    online = OnlineCalibration(
        n, train_ratio=0.5, tree=OptTree(node_budget=20, stop_delta=0.2, max_depth=6, top_k=4), token_types=types,
        calibrator=estimator, seed=3, mode=mode,
    )  # fmt: skip
    assert sorted(online.order) == list(range(n)) and online.order != list(range(n))
    assert online.order == OnlineCalibration(n, 0.5, OptTree(), types, GroupedIsotonicCalibrator(), seed=3).order
    phases = []
    for i in online.order:
        prompt = random_prompt(target, 70 + i, with_image=i % 2 == 0)
        config = GenerationConfig(max_new_tokens=15 + i)
        plan = online.plan(i, config)
        phases.append("observe" if plan.observer is not None else type(plan.tree.scorer).__name__)
        spec = speculative_generate(EagerRuntime(target, draft), prompt, config, plan.tree, None, plan.observer, plan.track_visual)
        assert spec.token_ids == plain_generate(EagerRuntime(target), prompt, config).token_ids, (i, phases[-1])
        online.done()
    assert phases == ["observe"] * 3 + [scorer] * 3
    assert online.calibrated.node_budget == 20
    assert online.calibrator.n_samples_ == len(online.observer.observations()) > 0
    # label "auto": both labels were fitted on half of the observed requests and scored on the rest
    assert online.label_report is not None and online.calibrator.label == online.label_report["winner"]
    # the estimator passed in only gave the settings: a clone was fitted, it is as it was (unfitted)
    assert online.calibrator is not estimator
    assert estimator.get_params() == GroupedIsotonicCalibrator(attention_bins=2, min_group_size=5).get_params()
    with pytest.raises(NotFittedError):
        check_is_fitted(estimator)
