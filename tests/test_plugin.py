"""The lmms-eval model `llava_msd_calibrated`, in process: registration, model_args, gen_kwargs, request
handling, bad input, statistics. Tiny checkpoints from conftest; drafts are random MSD heads saved
with conftest's `save_random_draft`. End-to-end runs of `python -m lmms_eval` are in test_plugin_e2e.py.
"""

from __future__ import annotations

import io
import json
import threading
from importlib import metadata
from pathlib import Path

import pytest
from conftest import random_image, save_random_draft
from lmms_eval.api.instance import Instance
from PIL import Image

from lmms_msd.lmms_eval.model_args import MODEL_ID
from lmms_msd.lmms_eval.plugin import LlavaMsdCalibrated, model_manifest
from lmms_msd.lmms_eval.requests import generation_config, request_seed
from lmms_msd.lmms_eval.statistics import lmms_eval_output_path
from lmms_msd.testbed.inflate import TextShape

TASK, SPLIT = "t", "test"


def chartqa_doc_to_visual(doc):
    """lmms-eval's `lmms_eval.tasks.chartqa.utils.chartqa_doc_to_visual`, copied: importing
    `lmms_eval.tasks` sets PIL's global LOAD_TRUNCATED_IMAGES, which would leak into other test modules."""
    return [doc["image"].convert("RGB")]


SHORT = {"max_new_tokens": 6, "temperature": 0, "do_sample": False}


@pytest.fixture(scope="module")
def tiny_draft_dir(tiny_hf_target, tmp_path_factory) -> Path:
    return save_random_draft(tiny_hf_target, tmp_path_factory.mktemp("draft") / "msd-tiny")


@pytest.fixture(scope="module")
def docs():
    """Four ChartQA-schema documents with seeded noise images of different sizes."""
    return [
        {
            "image": random_image(40 + 5 * i, 30, seed=i),
            "question": f"What is shown in chart {i}?",
            "answer": "1",
            "type": "human_test",
        }
        for i in range(4)
    ]


@pytest.fixture(scope="module")
def model(tiny_hf_dir, tiny_draft_dir, tmp_path_factory):
    lm = LlavaMsdCalibrated(
        pretrained=str(tiny_hf_dir), msd_model_path=str(tiny_draft_dir), use_msd=True,
        stats_path=str(tmp_path_factory.mktemp("stats") / "msd_stats.json"),
    )  # fmt: skip
    lm.task_dict = {}
    return lm


@pytest.fixture(scope="module")
def plain_model(tiny_hf_dir, tmp_path_factory):
    lm = LlavaMsdCalibrated(
        pretrained=str(tiny_hf_dir), use_msd="false", stats_path=str(tmp_path_factory.mktemp("stats") / "plain.json")
    )
    lm.task_dict = {}
    return lm


def request(
    doc_id: int,
    gen_kwargs=None,
    context: str | None = None,
    doc_to_visual=chartqa_doc_to_visual,
    task=TASK,
    metadata=None,
):
    context = f"What is shown in chart {doc_id}?" if context is None else context
    meta = {"task": task, "doc_id": doc_id, "repeats": 1, **(metadata or {})}
    args = (context, dict(SHORT if gen_kwargs is None else gen_kwargs), doc_to_visual, doc_id, task, SPLIT)
    return Instance(request_type="generate_until", arguments=args, idx=0, metadata=meta)


def run(lm, requests, docs, task=TASK):
    lm.task_dict = {task: {SPLIT: docs}}
    return lm.generate_until(requests)


# ---- registration ----------------------------------------------------------------------------------------
def test_manifest():
    manifest = model_manifest()
    assert manifest.model_id == MODEL_ID == "llava_msd_calibrated"
    assert manifest.simple_class_path == "lmms_msd.lmms_eval.plugin.LlavaMsdCalibrated"


def test_entry_point_registers_the_model():
    try:
        metadata.distribution("lmms-msd")
    except metadata.PackageNotFoundError:
        pytest.skip("lmms-msd is not installed (pip install .): entry points exist only after installing")
    names = [ep.name for ep in metadata.entry_points(group="lmms_eval.models")]
    assert MODEL_ID in names
    from lmms_eval.models import get_model

    assert get_model(MODEL_ID) is LlavaMsdCalibrated


# ---- model_args --------------------------------------------------------------------------------------------
def test_unknown_model_args_are_rejected_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown model_args \['use_calibration'\].*valid ones: \[.*'msd_model_path'"):
        LlavaMsdCalibrated.create_from_arg_string("pretrained=x,msd_model_path=y,use_calibration=true")


def test_unknown_model_args_say_where_they_belong_or_what_they_resemble():
    """A generation setting passed as a model_arg points to --gen_kwargs; a near miss names the model_arg (the
    docstring's example of `unknown_model_args_message`); a name like nothing gets no hint."""
    with pytest.raises(ValueError) as raised:
        LlavaMsdCalibrated.create_from_arg_string("pretrained=x,msd_model_path=y,temperature=1,stopdelta=0.5,zzz=1")
    message = str(raised.value)
    assert message.startswith(
        "unknown model_args ['stopdelta', 'temperature', 'zzz'] for llava_msd_calibrated (stopdelta: did you mean "
        "stop_delta?; temperature: a generation setting, pass it as --gen_kwargs temperature=1); valid ones: ["
    ), message


@pytest.mark.parametrize(
    "arg_string, message",
    [
        ("msd_model_path=y", "needs model_args pretrained="),
        ("pretrained=None,msd_model_path=y", "needs model_args pretrained="),
        ("pretrained=x", "needs model_args msd_model_path=.*or use_msd=false"),
        ("pretrained=x,msd_model_path=y,tree=opt,node_budget=0", "OPT-Tree needs node_budget >= 1"),
        ("pretrained=x,msd_model_path=y,tree=opt,stop_delta=-1", "OPT-Tree needs .*stop_delta >= 0"),
        ("pretrained=x,msd_model_path=y,calibrator=online", "calibrator=online drives OPT-Tree.*add tree=opt"),
        ("pretrained=x,use_msd=false,tree=opt,calibrator=c.json", "needs speculative decoding"),
        ("pretrained=x,msd_model_path=y,tree=opt,train_ratio=1.5", r"train_ratio must be in \(0, 1\], got 1.5"),
        ("pretrained=x,msd_model_path=y,tree=opt,calibrator=none,train_ratio=0.3", "cannot go with calibrator=none"),
        ("pretrained=x,msd_model_path=y,tree=opt,attention_bins=0", "attention_bins must be at least 1"),
        ("pretrained=x,msd_model_path=y,tree=opt,depth_edges=1", r"depth_edges must be increasing integers >= 2 .* got 1$"),
        ("pretrained=x,msd_model_path=y,tree=opt,depth_edges=4;2", "depth_edges must be increasing"),
        ("pretrained=x,msd_model_path=y,tree=opt,calibrator_mode=bias", r"calibrator_mode must be one of \['weight', 'tilt'\], got 'bias'"),
        ("pretrained=x,msd_model_path=y,calibrator_mode=tilt", "calibrator_mode=tilt says how .* needs use_msd=true, tree=opt"),
        ("pretrained=x,msd_model_path=y,tree=opt,calibrator=none,calibrator_mode=tilt", "got tree=opt, calibrator=none"),
        ("pretrained=x,msd_model_path=y,tree=opt,calibrator_label=maybe", "calibrator_label must be one of"),
        ("pretrained=x,msd_model_path=y,tree=opt,calibrator=c.json,calibrator_label=soft", "calibrator_label=soft is the online"),
        ("pretrained=x,msd_model_path=y,tree=medusa", r"unknown tree 'medusa'; valid: \['eagle2', 'opt'\]"),
        ("pretrained=x,msd_model_path=y,tree=opt,opt_variant=wide", r"unknown opt_variant 'wide'; valid: \['upstream', 'frontier'\]"),
        ("pretrained=x,msd_model_path=y,use_msd=maybe", "use_msd must be true or false, got 'maybe'"),
        ("pretrained=x,msd_model_path=y,depth=2.5", "depth must be an integer, got 2.5"),
        ("pretrained=x,msd_model_path=y,total_tokens=1", "EAGLE-2 tree needs total_tokens >= 2"),
        ("pretrained=x,msd_model_path=y,engine=turbo", "engine must be auto, static or eager, got 'turbo'"),
        ("pretrained=x,msd_model_path=y,inflate=13b", "inflate=13b: unknown shape '13b': use \"7b\" or HIDDENxLAYERS"),
        ("pretrained=x,msd_model_path=y,prefetch=-1", r"prefetch=-1(\.0)?: llava_msd_calibrated needs a whole number >= 0 .*0 turns it off"),
        ("pretrained=x,msd_model_path=y,prefetch=ahead", "prefetch='ahead': llava_msd_calibrated needs a whole number >= 0"),
        ("pretrained=x,msd_model_path=y,engine=eager,torch_compile=true", "torch_compile=true compiles the static engine's forwards; engine is 'eager'"),
        ("pretrained=x,msd_model_path=y,engine=static,torch_compile=often", "torch_compile must be true or false, got 'often'"),
    ],
)
def test_bad_model_args(arg_string, message):
    with pytest.raises(ValueError, match=message):
        LlavaMsdCalibrated.create_from_arg_string(arg_string)


@pytest.mark.parametrize("batch", [{"batch_size": "auto"}, {"batch_size": 0}, {"batch_size": "2.5"}])
def test_batch_size_that_is_no_whole_number_is_refused(batch):
    with pytest.raises(ValueError, match="batch_size=.*needs a whole number >= 1"):
        LlavaMsdCalibrated.create_from_arg_string("pretrained=x,msd_model_path=y", batch)


def test_model_args_are_coerced(tiny_hf_dir, tiny_draft_dir):
    lm = LlavaMsdCalibrated.create_from_arg_string(
        f"pretrained={tiny_hf_dir},msd_model_path={tiny_draft_dir},total_tokens=30,depth=3.0,top_k=4,"
        "seed=-1,use_msd=True,system_prompt=None,conv_template=vicuna_v1",
        {"batch_size": 1, "max_batch_size": None, "device": None},
    )
    a = lm.args
    assert (a.total_tokens, a.depth, a.top_k, a.seed, a.use_msd) == (30, 3, 4, -1, True)
    assert type(a.depth) is int and a.system_prompt is None and a.conv_template == "vicuna_v1"
    assert (a.device, a.dtype) == ("cpu", "float32")
    assert (lm.tree.builder.total_tokens, lm.tree.builder.depth, lm.tree.builder.top_k) == (30, 3, 4)


@pytest.mark.parametrize("value", ["auto", "-1"])
def test_total_tokens_auto_times_the_target(tiny_hf_dir, tiny_draft_dir, tmp_path, docs, value):
    lm = LlavaMsdCalibrated.create_from_arg_string(
        f"pretrained={tiny_hf_dir},msd_model_path={tiny_draft_dir},total_tokens={value},stats_path={tmp_path / 's.json'}"
    )
    assert lm.args.total_tokens is None and lm.tree.builder.total_tokens in (40, 48, 50, 56, 60)
    lm.task_dict = {TASK: {SPLIT: docs}}
    lm.generate_until([request(0)])
    auto = json.loads((tmp_path / "s.json").read_text())["tree"]["total_tokens_auto"]
    assert auto["candidates"] == [40, 48, 50, 56, 60] and len(auto["seconds"]) == 5
    assert auto["chosen"] == lm.tree.builder.total_tokens


def test_draft_that_does_not_fit_the_target(tiny_hf_dir, tiny_hf_target, tmp_path):
    wrong = save_random_draft(tiny_hf_target, tmp_path / "wrong", hidden_size=32)
    with pytest.raises(ValueError, match=r"cannot draft for pretrained=.*hidden size: draft 32, target 64"):
        LlavaMsdCalibrated(pretrained=str(tiny_hf_dir), msd_model_path=str(wrong))


def test_plain_baseline_needs_no_draft(plain_model):
    assert plain_model.decoder.draft is None and plain_model.tree is None


# ---- gen_kwargs --------------------------------------------------------------------------------------------
def test_generation_config_defaults_follow_lmms_eval():
    config = generation_config({})
    assert (config.max_new_tokens, config.greedy, config.until) == (1024, True, ())
    sampled = generation_config({"temperature": 0.7, "top_p": 0.9, "top_k": 5.0, "until": "\n\n"})
    assert (sampled.do_sample, sampled.temperature, sampled.top_p, sampled.top_k, sampled.until) == (
        True,
        0.7,
        0.9,
        5,
        ("\n\n",),
    )
    assert generation_config({"temperature": 0.7, "do_sample": False}).greedy
    assert generation_config({"do_sample": True}).temperature == 1.0
    # greedy requests ignore top_p/top_k, so lmms-eval's `temperature=0,top_p=0` is valid
    assert generation_config({"temperature": 0, "top_p": 0, "top_k": 0, "num_beams": 1}).greedy
    # None means unset, as in many task YAMLs
    assert generation_config({"top_p": None, "repetition_penalty": None, "max_new_tokens": 8}).max_new_tokens == 8


@pytest.mark.parametrize(
    "gen_kwargs, message",
    [
        ({"num_beams": 2}, "num_beams=2: beam search is not supported"),
        ({"repetition_penalty": 1.2}, r"repetition_penalty=1.2 is not supported"),
        ({"max_new_tokens": 0}, "max_new_tokens must be at least 1, got 0"),
        ({"max_new_tokens": "many"}, "max_new_tokens must be an integer"),
        ({"length_penalty": 1.0}, r"gen_kwargs \['length_penalty'\] are not supported.*supported: \['max_new_tokens'"),
        ({"until": 3}, "until must be a string or a list of strings"),
        ({"temperature": 0.5, "top_p": 0}, r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_gen_kwargs(gen_kwargs, message):
    with pytest.raises(ValueError, match=message):
        generation_config(gen_kwargs)


def test_request_seed_depends_on_every_part():
    seeds = {request_seed(0, "t", 1, 0), request_seed(1, "t", 1, 0), request_seed(0, "u", 1, 0),
             request_seed(0, "t", 2, 0), request_seed(0, "t", 1, 1)}  # fmt: skip
    assert len(seeds) == 5 and all(0 <= s < 2**63 for s in seeds)
    assert request_seed(0, "t", 1, 0) == request_seed(0, "t", 1, 0)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["/venv/lib/python3.11/site-packages/lmms_eval/__main__.py", "--model", "m", "--output_path", "out"], "out"),
        (["/venv/bin/lmms-eval", "eval", "--output_path=logs/"], "logs/"),
        (["/venv/lib/python3.11/site-packages/lmms_eval/__main__.py", "--model", "m"], None),
        (["/venv/bin/pytest", "--output_path", "elsewhere"], None),
        ([], None),
    ],
)
def test_lmms_eval_output_path(argv, expected):
    assert lmms_eval_output_path(argv) == expected


# ---- requests --------------------------------------------------------------------------------------------
def test_speculative_equals_plain_greedy_in_request_order(model, plain_model, docs):
    requests = [request(i) for i in (2, 0, 3, 1)]
    speculative = run(model, requests, docs)
    plain = run(plain_model, requests, docs)
    assert speculative == plain
    assert all(isinstance(text, str) for text in speculative)
    # the same answer per document whatever the order of the requests
    again = run(model, [request(i) for i in (0, 1, 2, 3)], docs)
    assert dict(zip((2, 0, 3, 1), speculative)) == dict(zip((0, 1, 2, 3), again))


def test_static_engine_gives_the_eager_answers(tiny_hf_dir, tiny_draft_dir, model, docs, tmp_path):
    """engine=static (static caches; CUDA graphs where CUDA is) answers as the eager loop does, greedy and
    sampled, plain and speculative; on CPU the default engine is the eager one."""
    from lmms_msd.speculative.fast import StaticEngine
    from lmms_msd.speculative.runtime import EagerRuntime

    assert model.args.engine == "eager" and isinstance(model.decoder.runtime, EagerRuntime)
    static = LlavaMsdCalibrated(
        pretrained=str(tiny_hf_dir), msd_model_path=str(tiny_draft_dir), use_msd=True, engine="static", stats_path=str(tmp_path / "s.json")
    )
    static_plain = LlavaMsdCalibrated(
        pretrained=str(tiny_hf_dir), use_msd="false", engine="static", stats_path=str(tmp_path / "p.json")
    )
    assert isinstance(static.decoder.runtime, StaticEngine)
    sampled = {"max_new_tokens": 6, "temperature": 1.0, "do_sample": True}
    for gen_kwargs in (None, sampled):
        requests = [request(i, gen_kwargs) for i in range(4)]
        expected = run(model, requests, docs)
        assert run(static, requests, docs) == expected
        if gen_kwargs is None:
            assert run(static_plain, requests, docs) == expected


def test_images_load_on_the_prefetch_thread_with_the_same_answers(tiny_hf_dir, tiny_draft_dir, model, docs, tmp_path):
    """The default (prefetch 2) reads each document's image on the prefetch thread, ahead of its turn;
    prefetch=0 reads it on the main thread at its turn; the answers are the same, greedy and sampled."""
    from lmms_msd.prefetch import THREAD_NAME

    threads: list[str] = []

    def recording_doc_to_visual(doc):
        threads.append(threading.current_thread().name)
        return chartqa_doc_to_visual(doc)

    in_turn = LlavaMsdCalibrated(pretrained=str(tiny_hf_dir), msd_model_path=str(tiny_draft_dir), use_msd=True, prefetch="0",
                                 stats_path=str(tmp_path / "s.json"))  # fmt: skip
    assert (model.prefetch, in_turn.prefetch) == (2, 0)
    sampled = {"max_new_tokens": 6, "temperature": 1.0, "do_sample": True}
    for gen_kwargs in (None, sampled):
        requests = [request(i, gen_kwargs, doc_to_visual=recording_doc_to_visual) for i in (2, 0, 3, 1)]
        threads.clear()
        ahead = run(model, requests, docs)
        assert len(threads) == 4 and all(name.startswith(THREAD_NAME) for name in threads)
        threads.clear()
        assert run(in_turn, requests, docs) == ahead
        assert threads == [threading.current_thread().name] * 4


def test_sampling_is_reproducible_and_order_independent(model, docs):
    sampled = {"max_new_tokens": 6, "temperature": 1.0, "do_sample": True}
    first = run(model, [request(i, sampled) for i in range(4)], docs)
    second = run(model, [request(i, sampled) for i in (3, 2, 1, 0)], docs)
    assert first == second[::-1]


def test_empty_context_with_an_image_is_a_valid_request(model, docs):
    [text] = run(model, [request(0, context="")], docs)
    assert isinstance(text, str)


def test_padding_requests_are_not_decoded_or_counted(model, docs):
    padding = request(1, metadata={"__padding_only__": True})
    texts = run(model, [request(0), padding], docs)
    assert texts[1] == ""
    report = json.loads(model.report.path.read_text())
    assert report["decoding"] == "speculative"


def test_statistics_report(tiny_hf_dir, tiny_draft_dir, tmp_path, docs):
    lm = LlavaMsdCalibrated(
        pretrained=str(tiny_hf_dir), msd_model_path=str(tiny_draft_dir), use_msd=True, stats_path=str(tmp_path / "s.json")
    )
    lm.task_dict = {TASK: {SPLIT: docs}, "other": {SPLIT: docs}}
    lm.generate_until([request(1), request(0), request(0, task="other")])
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["decoding"] == "speculative" and report["processes"] == 1
    assert report["tree"] == {"kind": "eagle2", "total_tokens": 59, "depth": 5, "top_k": 10}
    assert report["model_args"]["pretrained"] == str(tiny_hf_dir)
    rows = report["tasks"][TASK]["samples"]
    assert [r["doc_id"] for r in rows] == [0, 1]
    summary = report["tasks"][TASK]["summary"]
    assert summary["samples"] == 2
    assert summary["new_tokens"] == sum(r["new_tokens"] for r in rows)
    assert summary["steps"] == sum(r["steps"] for r in rows) == sum(summary["accepted_histogram"].values())
    assert report["overall"]["samples"] == 3
    # a second generate_until call of the same run adds to the same report
    run(lm, [request(2)], docs)
    assert json.loads((tmp_path / "s.json").read_text())["overall"]["samples"] == 4


def test_loglikelihood_and_multi_round_are_not_implemented(model):
    with pytest.raises(NotImplementedError, match="generate_until only"):
        model.loglikelihood([])
    with pytest.raises(NotImplementedError, match="generate_until only"):
        model.generate_until_multi_round([])


# ---- bad input ----------------------------------------------------------------------------------------------
class ReadFailsAfterOpen(io.BytesIO):
    """An image file whose reads fail once its header has been parsed, as a damaged file's or a broken
    mount's do. PIL's LOAD_TRUNCATED_IMAGES (which lmms-eval sets process-wide) lets short or garbled
    image data decode, grey where it is missing, and PIL releases differ in which garbled headers they
    refuse at open; an OSError from the file itself fails decoding on every release, with or without it."""

    failing = False

    def read(self, size=-1):
        if self.failing:
            raise OSError("the image data cannot be read")
        return super().read(size)


def corrupt_jpeg(image: Image.Image) -> Image.Image:
    """A JPEG that opens (its header is whole) but cannot be decoded (its data cannot be read)."""
    buffer = ReadFailsAfterOpen()
    image.save(buffer, format="JPEG")
    buffer.seek(0)
    opened = Image.open(buffer)
    buffer.failing = True
    return opened


def as_is(doc):
    """A doc_to_visual that hands the stored image over without decoding it first."""
    return [doc["image"]]


@pytest.mark.parametrize(
    "doc_change, doc_to_visual, message",
    [
        (
            {"image": None},
            chartqa_doc_to_visual,
            r"the task.s doc_to_visual failed \(AttributeError: .*\); is the document's image missing or corrupt",
        ),
        ({"image": None}, as_is, "the image is missing: doc_to_visual returned None"),
        (
            {"image": "corrupt"},
            chartqa_doc_to_visual,
            r"the task.s doc_to_visual failed \(OSError: [^)]+\)",
        ),
        ({"image": "corrupt"}, as_is, "could not decode the image .*corrupt or not an image"),
        (
            {},
            lambda doc: [doc["image"], doc["image"]],
            "the request has 2 images; llava_msd_calibrated takes one image or none",
        ),
        ({}, lambda doc: ["video.mp4"], "the visual is a str, not a PIL image"),
    ],
)
def test_bad_images(model, docs, doc_change, doc_to_visual, message):
    doc = {**docs[0], **doc_change}
    if doc["image"] == "corrupt":
        doc["image"] = corrupt_jpeg(docs[0]["image"])
    with pytest.raises(ValueError, match=r"llava_msd_calibrated: request 0 \(task 't', doc_id 0\): " + message):
        run(model, [request(0, doc_to_visual=doc_to_visual)], [doc])


def test_empty_context_without_image(model, docs):
    with pytest.raises(ValueError, match="request 0 .*the context is empty and there is no image"):
        run(model, [request(0, context="  ", doc_to_visual=lambda doc: [])], docs)


def test_context_longer_than_the_target_allows(model, docs):
    long_context = "What is the value of the largest bar? " * 200
    with pytest.raises(
        ValueError, match=r"request 0 .*the prompt is \d+ tokens long but the target's maximum length is 512"
    ):
        run(model, [request(0, context=long_context)], docs)


def test_max_new_tokens_zero(model, docs):
    with pytest.raises(ValueError, match=r"request 1 \(task 't', doc_id 3\): max_new_tokens must be at least 1, got 0"):
        run(model, [request(0), request(3, {"max_new_tokens": 0})], docs)


def test_train_ratio_is_accepted(model, docs):
    [text] = run(model, [request(0, {**SHORT, "train_ratio": 0.3})], docs)
    assert isinstance(text, str)


# ---- OPT-Tree and the calibrator --------------------------------------------------------------------------
def opt_model(tiny_hf_dir, tiny_draft_dir, stats_path, **model_args):
    lm = LlavaMsdCalibrated(
        pretrained=str(tiny_hf_dir), msd_model_path=str(tiny_draft_dir), tree="opt", stats_path=str(stats_path),
        **{"use_msd": True, **model_args},
    )  # fmt: skip
    lm.task_dict = {}
    return lm


def test_opt_tree_model_args(tiny_hf_dir, tiny_draft_dir):
    lm = LlavaMsdCalibrated.create_from_arg_string(
        f"pretrained={tiny_hf_dir},msd_model_path={tiny_draft_dir},tree=opt,node_budget=20,stop_delta=0.5,max_depth=4.0,top_k=3,"
        "opt_variant=Upstream"
    )
    from lmms_msd.speculative.tree import OptTree, draft_confidence

    assert lm.tree.builder == OptTree(node_budget=20, stop_delta=0.5, max_depth=4, top_k=3, scorer=draft_confidence, variant="upstream")
    assert lm.args.calibrator is None and lm.args.train_ratio is None


def test_online_calibration_from_gen_kwargs_is_lossless(tiny_hf_dir, tiny_draft_dir, plain_model, docs, tmp_path):
    lm = opt_model(tiny_hf_dir, tiny_draft_dir, tmp_path / "s.json", node_budget=12, top_k=3, max_depth=4, min_group_size=3)
    requests = [request(i, {**SHORT, "train_ratio": 0.5}) for i in range(4)]
    answers = run(lm, requests, docs)
    assert answers == run(plain_model, [request(i) for i in range(4)], docs)
    calibration = json.loads((tmp_path / "s.json").read_text())["tree"]["calibrator"]
    assert calibration["mode"] == "online" and calibration["train_ratio"] == 0.5 and calibration["requests"] == 4
    assert len(calibration["observed_requests"]) == 2 and calibration["observations"] > 0 and calibration["fitted"]
    assert calibration["label"] in ("hard", "soft")


def test_calibrator_file(tiny_hf_dir, tiny_draft_dir, plain_model, docs, tmp_path):
    import numpy as np

    from lmms_msd.calibration.isotonic import GroupedIsotonicCalibrator
    from lmms_msd.calibration.scorer import CalibratedScorer

    rng = np.random.default_rng(0)
    X = np.stack([rng.uniform(size=300), rng.integers(0, 3, 300), rng.uniform(size=300)], axis=1)
    path = GroupedIsotonicCalibrator(attention_bins=2, min_group_size=20).fit(X, (X[:, 0] > 0.5) * 1.0).save(tmp_path / "c.json")
    lm = opt_model(tiny_hf_dir, tiny_draft_dir, tmp_path / "s.json", calibrator=str(path), node_budget=12, top_k=3)
    assert isinstance(lm.tree.builder.scorer, CalibratedScorer) and lm.tree.track_visual
    assert run(lm, [request(i) for i in range(3)], docs) == run(plain_model, [request(i) for i in range(3)], docs)
    calibration = json.loads((tmp_path / "s.json").read_text())["tree"]["calibrator"]
    settings = {"attention_bins": 2, "min_group_size": 20, "label": "hard", "n_types": 3, "depth_edges": []}
    assert calibration == {"mode": "file", "path": str(path), **settings}
    with pytest.raises(FileNotFoundError, match="lmms-msd calibrate"):
        opt_model(tiny_hf_dir, tiny_draft_dir, tmp_path / "t.json", calibrator=str(tmp_path / "missing.json"))


def test_tilt_mode_with_a_file_and_online_is_lossless(tiny_hf_dir, tiny_draft_dir, plain_model, docs, tmp_path):
    """calibrator_mode=tilt (the thesis's calibrated tree), from a calibrator file and online on the soft label."""
    import numpy as np

    from lmms_msd.calibration.isotonic import GroupedIsotonicCalibrator
    from lmms_msd.calibration.scorer import TiltScorer

    rng = np.random.default_rng(0)
    X = np.stack([rng.uniform(size=300), rng.integers(0, 3, 300), rng.uniform(size=300)], axis=1)
    path = GroupedIsotonicCalibrator(attention_bins=2, min_group_size=20).fit(X, (X[:, 0] > 0.5) * 1.0).save(tmp_path / "c.json")
    plain = run(plain_model, [request(i) for i in range(4)], docs)
    lm = opt_model(tiny_hf_dir, tiny_draft_dir, tmp_path / "s.json", calibrator=str(path), calibrator_mode="tilt", node_budget=12, top_k=3)
    assert isinstance(lm.tree.builder.scorer, TiltScorer) and lm.tree.track_visual
    assert run(lm, [request(i) for i in range(3)], docs) == plain[:3]
    assert json.loads((tmp_path / "s.json").read_text())["tree"]["calibrator_mode"] == "tilt"
    online = opt_model(
        tiny_hf_dir, tiny_draft_dir, tmp_path / "o.json", calibrator="online", train_ratio=0.5, calibrator_mode="tilt",
        calibrator_label="soft", node_budget=12, top_k=3, max_depth=4, min_group_size=3,
    )  # fmt: skip
    assert run(online, [request(i) for i in range(4)], docs) == plain
    tree = json.loads((tmp_path / "o.json").read_text())["tree"]
    assert tree["calibrator_mode"] == "tilt" and tree["calibrator"]["fitted"] and tree["calibrator"]["label"] == "soft"
    assert tree["calibrator"]["depth_edges"] == [2]  # depth 1 apart from deeper nodes, as `lmms-msd calibrate` fits


def test_depth_edges_model_arg():
    from lmms_msd.lmms_eval.model_args import as_depth_edges

    assert as_depth_edges(2) == as_depth_edges("2") == (2,) and as_depth_edges("2;4") == (2, 4)
    assert as_depth_edges("none") == as_depth_edges(None) == ()
    for bad in ("1", "4;2", "two", "2;2"):
        with pytest.raises(ValueError, match="depth_edges must be"):
            as_depth_edges(bad)


def test_online_calibrator_needs_a_train_ratio(tiny_hf_dir, tiny_draft_dir, docs, tmp_path):
    lm = opt_model(tiny_hf_dir, tiny_draft_dir, tmp_path / "s.json", calibrator="online")
    with pytest.raises(ValueError, match="calibrator=online needs train_ratio"):
        run(lm, [request(0)], docs)
    with pytest.raises(ValueError, match="different train_ratio values"):
        run(lm, [request(0, {**SHORT, "train_ratio": 0.5}), request(1, {**SHORT, "train_ratio": 0.2})], docs)


def test_no_pretrained_and_no_draft_use_the_bundled_pair():
    from lmms_msd.testbed.bundled import bundled_paths

    target, draft = bundled_paths()
    lm = LlavaMsdCalibrated.create_from_arg_string("", {"batch_size": 1, "max_batch_size": None, "device": None})
    assert (lm.args.pretrained, lm.args.msd_model_path) == (str(target), str(draft))
    assert lm.args.use_msd


def test_opt_tree_with_the_bundled_pair_defaults_to_its_calibrator():
    from lmms_msd.testbed.bundled import bundled_calibrator

    lm = LlavaMsdCalibrated.create_from_arg_string("tree=opt", {"batch_size": 1, "max_batch_size": None, "device": None})
    assert lm.args.calibrator == str(bundled_calibrator())
    raw = LlavaMsdCalibrated.create_from_arg_string("tree=opt,calibrator=none", {"batch_size": 1, "max_batch_size": None, "device": None})
    assert raw.args.calibrator == "none"


def test_inflate_embeds_the_loaded_pair_into_the_shape():
    # use_msd=true: the default (auto) drops the draft where the measured costs decode every request plainly
    lm = LlavaMsdCalibrated.create_from_arg_string("inflate=512x6,use_msd=true", {"batch_size": 1, "max_batch_size": None, "device": None})
    assert lm.args.inflate == TextShape(512, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
                                        intermediate_size=1376)  # fmt: skip
    target, draft = lm.decoder.target, lm.decoder.draft
    text = target.model.config.text_config
    assert (target.hidden_size, text.num_hidden_layers, draft.config.hidden_size) == (512, 6, 512)
