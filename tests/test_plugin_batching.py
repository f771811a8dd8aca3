"""The lmms-eval model decodes many requests at once (`--batch_size`, or model_args max_batch): the same
answers per doc_id as one at a time at T=0, and each sampled request its batch-1 answer with its seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_plugin import docs, request, run, tiny_draft_dir  # noqa: F401  (fixtures)

from lmms_msd.lmms_eval.plugin import (
    LlavaMsdCalibrated,
    requests_ahead,
    requests_at_once,
    whole_number,
)
from lmms_msd.speculative.batching import PLAIN_FROM, NodeBudgets

SAMPLED = {"max_new_tokens": 6, "temperature": 1.0, "do_sample": True}
LONGER = {"max_new_tokens": 12, "temperature": 0, "do_sample": False}


def models(target_dir, draft_dir, tmp_path, **model_args):
    """The speculative model and the plain one on the tiny pair, with these model_args."""
    stats = {name: str(tmp_path / f"{name}.json") for name in ("spec", "plain")}
    return (
        LlavaMsdCalibrated(pretrained=str(target_dir), msd_model_path=str(draft_dir), use_msd="true", stats_path=stats["spec"], **model_args),
        LlavaMsdCalibrated(pretrained=str(target_dir), use_msd="false", stats_path=stats["plain"], **model_args),
    )


def test_batched_answers_equal_batch_one(tiny_hf_dir, tiny_draft_dir, docs, tmp_path):  # noqa: F811
    one = models(tiny_hf_dir, tiny_draft_dir, tmp_path / "one")
    many = models(tiny_hf_dir, tiny_draft_dir, tmp_path / "many", batch_size=3)
    assert [m.max_batch for m in many] == [3, 3] and many[0].schedule is PLAIN_FROM  # the default: trees below 8 requests in flight
    # mixed answer lengths, so requests leave the batch at different steps and waiting ones join
    requests = [request(i, LONGER if i % 2 else None) for i in (2, 0, 3, 1, 0, 2)]
    expected = run(one[1], requests, docs)  # plain decoding, one at a time
    for model in (*one, *many):
        assert run(model, requests, docs) == expected
    sampled = [request(i, SAMPLED) for i in (2, 0, 3, 1)]
    assert run(many[0], sampled, docs) == run(one[0], sampled, docs)
    assert run(many[1], sampled, docs) == run(one[1], sampled, docs)


def test_auto_decodes_plainly_from_the_batch_where_the_default_schedule_takes_plain_steps(tiny_hf_dir, tiny_draft_dir, tmp_path):  # noqa: F811
    def model(name, **model_args):
        return LlavaMsdCalibrated(pretrained=str(tiny_hf_dir), msd_model_path=str(tiny_draft_dir), stats_path=str(tmp_path / name), **model_args)

    assert not model("a", batch_size=PLAIN_FROM.batch).args.use_msd  # use_msd=auto, the default schedule: plain
    assert model("b", batch_size=PLAIN_FROM.batch - 1).args.use_msd  # trees at every step below it
    assert model("c", batch_size=PLAIN_FROM.batch, use_msd="true").args.use_msd  # asked for
    assert model("d", batch_size=PLAIN_FROM.batch, batch_node_budgets="1:58;16:0").args.use_msd  # a schedule of one's own


def test_max_batch_and_node_budgets(tiny_hf_dir, tiny_draft_dir, docs, tmp_path):  # noqa: F811
    spec, _ = models(tiny_hf_dir, tiny_draft_dir, tmp_path, max_batch="4", batch_node_budgets="1:58;2:3;4:0",
                     engine="static", max_length="256", batched_drafting="true")  # fmt: skip
    assert spec.decoder.runtime.static_target.capacity == 256 and spec.decoder.runtime.max_batch == 4
    assert spec.decoder.runtime.batched_drafting is True
    assert spec.max_batch == 4 and spec.schedule == NodeBudgets(((1, 58), (2, 3), (4, 0)))
    run(spec, [request(0)], docs)
    meta = json.loads(Path(spec.report.path).read_text())
    assert '"max_batch": 4' in json.dumps(meta) and "NodeBudgets" in json.dumps(meta) and '"batched_drafting": true' in json.dumps(meta)
    assert spec.prefetch == 4 and '"prefetch": 4' in json.dumps(meta)  # the default: max(2, max_batch)
    # the generate_until call end to end: its time, and its documents per second
    assert meta["generate_until_s"] > 0 and meta["documents_per_s"] == pytest.approx(1 / meta["generate_until_s"])
    _, plain = models(tiny_hf_dir, tiny_draft_dir, tmp_path / "p")
    requests = [request(i, LONGER) for i in range(4)]
    assert run(spec, requests, docs) == run(plain, requests, docs)


@pytest.mark.parametrize("batch_size, max_batch, expected", [(1, None, 1), ("16", None, 16), (4.0, None, 4), (1, "8", 8), (64, 2.0, 2)])
def test_requests_at_once(batch_size, max_batch, expected):
    assert requests_at_once(batch_size, max_batch) == expected


@pytest.mark.parametrize("prefetch, max_batch, expected", [(None, 1, 2), ("None", 16, 16), (0, 4, 0), ("0", 1, 0), ("3", 8, 3), (5.0, 1, 5)])
def test_requests_ahead(prefetch, max_batch, expected):
    assert requests_ahead(prefetch, max_batch) == expected


@pytest.mark.parametrize("prefetch", [-1, 1.5, "x", "true", "nan", "inf", float("inf")])
def test_bad_prefetch_is_named(prefetch):
    with pytest.raises(ValueError, match=rf"prefetch={prefetch!r}: llava_msd_calibrated needs a whole number >= 0 .*unset: max\(2, max_batch\) = 3"):
        requests_ahead(prefetch, 3)


def test_bad_max_batch_is_named():
    with pytest.raises(ValueError, match="max_batch='x'"):
        requests_at_once(1, "x")
    with pytest.raises(ValueError, match="max_length=0.5"):
        whole_number("max_length", 0.5)


def test_static_engine_batches_with_the_eager_answers(tiny_hf_dir, tiny_draft_dir, docs, tmp_path):  # noqa: F811
    from lmms_msd.speculative.fast import BatchedStaticEngine

    static = models(tiny_hf_dir, tiny_draft_dir, tmp_path / "static", engine="static", batch_size=3)
    eager = models(tiny_hf_dir, tiny_draft_dir, tmp_path / "eager")
    assert all(isinstance(m.decoder.runtime, BatchedStaticEngine) and m.decoder.runtime.max_batch == 3 for m in static)
    for gen_kwargs in (LONGER, SAMPLED):
        requests = [request(i, gen_kwargs) for i in (2, 0, 3, 1, 0)]
        expected = run(eager[0], requests, docs)
        assert run(static[0], requests, docs) == expected
        if gen_kwargs is LONGER:
            assert run(static[1], requests, docs) == expected


TREES = {
    "cost, calibrated": {"tree": "opt", "stop": "cost"},  # the bundled pair's calibrator weights (named tree=opt)
    "the CUDA default": {"tree": "opt", "calibrator": "none", "stop_delta": "0.6"},  # what tree=auto resolves to there
}


@pytest.mark.parametrize("trees", list(TREES))
def test_batched_opt_answers_equal_batch_one(trees, docs, tmp_path):  # noqa: F811
    """OPT-Tree under batching on the bundled pair (whose draft is accepted, so trees are grown and
    verified), sized by the measured costs with the calibrator's weights and as tree=auto's CUDA default
    (raw confidence, stop_delta 0.6): plain decoding's answers at T=0, and each sampled request its batch-1
    answer with its seed."""
    plain = LlavaMsdCalibrated(use_msd="false", stats_path=str(tmp_path / "plain.json"))
    one, many = (
        LlavaMsdCalibrated(use_msd="true", **TREES[trees], stats_path=str(tmp_path / f"{name}.json"), batch_size=size)
        for name, size in (("one", 1), ("many", 3))
    )
    assert (many.args.tree, many.args.stop, many.max_batch) == ("opt", TREES[trees].get("stop", "delta"), 3)
    assert (many.args.calibrator == "none") == (trees == "the CUDA default")
    requests = [request(i, LONGER if i % 2 else None) for i in (2, 0, 3, 1)]
    assert run(many, requests, docs) == run(plain, requests, docs)
    assert json.loads(Path(many.report.path).read_text())["overall"]["accepted_tokens"] > 0  # not only plain steps
    sampled = [request(i, SAMPLED) for i in (2, 0, 3)]
    assert run(many, sampled, docs) == run(one, sampled, docs)
