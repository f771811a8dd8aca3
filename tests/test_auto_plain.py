"""use_msd=auto when its ceiling rule decodes every request plainly (`PathChoice.plain_only`): the plugin's
default is then use_msd=false, object for object and operator for operator. Issue 14 asks that the default
be at least as fast as use_msd=false on the bundled pair on a CPU, where the rule holds; these tests state
why it is, without timing anything: the same runtime without a draft, the same aten operators on the same
shapes and dtypes for every request, the same answers."""

from __future__ import annotations

import json

import pytest
import torch
from test_path_choice import CPU
from test_plugin import docs, request, run, tiny_draft_dir  # noqa: F401  (fixtures)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lmms_msd import pipeline
from lmms_msd.lmms_eval.plugin import LlavaMsdCalibrated
from lmms_msd.speculative.runtime import EagerRuntime


class AtenLog(TorchDispatchMode):
    """Every aten operator run inside it, with its tensors' shapes and dtypes, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self.ops.append((str(func), tuple((tuple(t.shape), t.dtype) for t in tensors)))
        return func(*args, **(kwargs or {}))


def aten_ops(lm: LlavaMsdCalibrated, doc_id: int, docs) -> tuple[list[str], list[tuple[str, tuple]]]:  # noqa: F811
    """The answers of one request through the plugin's generate_until and the operators it ran."""
    log = AtenLog()
    with log:
        answers = run(lm, [request(doc_id)], docs)
    return answers, log.ops


@pytest.fixture
def cpu_costs(monkeypatch, tmp_path):
    """The cost model of the bundled pair measured on this project's CPU (a draft level costs more than a
    plain step: the ceiling rule decodes every request plainly), whatever machine runs the test."""
    monkeypatch.setattr(pipeline, "cached_cost_model", lambda *args: (CPU, tmp_path / "cost.json", False))


def test_default_on_the_bundled_pair_is_use_msd_false(cpu_costs, docs, tmp_path):  # noqa: F811
    """The default holds no draft and runs, request by request, exactly use_msd=false's operators."""
    auto = LlavaMsdCalibrated(stats_path=str(tmp_path / "auto.json"))
    plain = LlavaMsdCalibrated(use_msd="false", stats_path=str(tmp_path / "plain.json"))
    assert auto.tree.path_choice.plain_only
    assert auto.decoder.draft is None and plain.decoder.draft is None
    assert type(auto.decoder.runtime) is type(plain.decoder.runtime) is EagerRuntime and auto.decoder.runtime.draft is None
    for doc_id in range(3):
        auto_answers, auto_ops = aten_ops(auto, doc_id, docs)
        plain_answers, plain_ops = aten_ops(plain, doc_id, docs)
        assert auto_answers == plain_answers
        assert len(auto_ops) > 100 and auto_ops == plain_ops, f"request {doc_id}: {len(auto_ops)} operators against {len(plain_ops)}"
    report = json.loads((tmp_path / "auto.json").read_text())
    assert report["decoding"] == "auto" and report["use_msd_auto"]["requests"] == {"plain (ceiling)": 3}


def test_a_run_that_may_calibrate_online_keeps_its_draft(cpu_costs, tiny_hf_dir, tiny_draft_dir, tmp_path):  # noqa: F811
    """OPT-Tree without a calibrator file calibrates online when a request's gen_kwargs give a train_ratio,
    and online calibration decodes every request speculatively: the draft stays, whatever the costs."""
    lm = LlavaMsdCalibrated(pretrained=str(tiny_hf_dir), msd_model_path=str(tiny_draft_dir), tree="opt", stats_path=str(tmp_path / "s.json"))
    assert lm.tree.path_choice.plain_only and lm.decoder.draft is not None and lm.decoder.runtime.draft is not None
