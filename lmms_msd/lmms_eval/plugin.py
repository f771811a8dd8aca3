"""The lmms-eval model `llava_msd_calibrated`: a thin adapter from lmms-eval requests to the library.

Registered through the entry-point group `lmms_eval.models` (see setup.cfg), so after `pip install`
both `python -m lmms_eval --model llava_msd_calibrated` and `accelerate launch -m lmms_eval ...` find
it. This is the only module of the package that imports lmms-eval.

A request (context, gen_kwargs, doc_to_visual, doc_id, task, split) becomes a question and at most one
image -> `Target.prepare` -> `speculative_generate` (or `plain_generate` with `use_msd=false`, the
baseline: same target, same prompt). Answers come back in request order; the speculative statistics
of every request are gathered from all processes and written, per task, to a JSON report and a table
in the log (`lmms_msd.lmms_eval.statistics`).

Sampling is reproducible: each request draws from its own `torch.Generator` seeded from `seed`, the
task name, the doc_id and the repeat index, so an answer does not depend on the order of requests or
on which process decodes it.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger
from PIL import Image
from tqdm import tqdm

from lmms_msd.lmms_eval.statistics import (
    SampleRecord,
    build_report,
    format_table,
    write_report,
)
from lmms_msd.models.checkpoints import could_be_hub_id, missing_folder_message
from lmms_msd.speculative.cost import STOPS
from lmms_msd.speculative.decoding import (
    GenerationResult,
    plain_generate,
    speculative_generate,
)
from lmms_msd.speculative.sampling import GenerationConfig
from lmms_msd.speculative.tree import (
    AUTO_TOTAL_TOKENS,
    OPT_VARIANTS,
    EagleTree,
    OptTree,
    choose_total_tokens,
)
from lmms_msd.testbed.bundled import bundled_calibrator, bundled_paths
from lmms_msd.testbed.inflate import (
    TextShape,
    inflate_pair,
    inflate_target,
    shape_from_name,
)

MODEL_ID = "llava_msd_calibrated"
TREES = ("eagle2", "opt")
CALIBRATOR_LABELS = ("auto", "hard", "soft")
DEFAULT_MAX_NEW_TOKENS = 1024  # what lmms-eval's llava models use when a task sets none
STATS_FILE = "msd_stats.json"

# gen_kwargs keys lmms-eval tasks send that this model understands (anything else is an error, so a
# setting that would change the answers is never silently ignored)
GEN_KWARGS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "do_sample",
    "until",
    "num_beams",  # 1 only
    "repetition_penalty",  # 1.0 only
    "use_cache",  # caches are always used
    "image_aspect_ratio",  # the checkpoint's own preprocessing is used, as lmms-eval's llava does for LLaVA-1.5
    "train_ratio",  # the thesis's online-calibration share (see the model's docstring)
)
NOTED_GEN_KWARGS = {
    "image_aspect_ratio": "is ignored: the checkpoint's own image preprocessing is used "
    "(LLaVA-1.5: pad to a square), as lmms-eval's llava model does for LLaVA-1.5 checkpoints",
    "use_cache": "is ignored: speculative and plain decoding always use KV caches",
}


def model_manifest():
    """The payload of the `lmms_eval.models` entry point: a `ModelManifest`.

    Imported here, not at the top: importing `lmms_eval.models.registry_v2` runs
    `lmms_eval.models/__init__`, which loads the entry points, which import this module; were this
    module being imported first, it would be found half-initialised and the model not registered.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="lmms_msd.lmms_eval.plugin.LlavaMsdCalibrated")


# ---- model_args ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelArgs:
    """model_args after coercion (lmms-eval parses `--model_args` loosely: "-1" arrives as -1.0,
    "None" as the string "None")."""

    pretrained: str
    msd_model_path: str | None
    use_msd: bool
    tree: str
    total_tokens: int | None  # None: auto (chosen by timing once the target is loaded)
    depth: int
    top_k: int
    device: str
    dtype: str
    attn_implementation: str | None
    conv_template: str | None
    system_prompt: str | None
    vision_tower: str | None
    stats_path: str | None
    seed: int
    node_budget: int
    stop_delta: float
    max_depth: int
    opt_variant: str  # OptTree.variant: "upstream" or "frontier"
    calibrator: str | None  # "none", "online", a JSON path, or None (unset: online when a train_ratio arrives)
    calibrator_mode: str  # how the calibrator scores nodes: "weight" or "tilt" (lmms_msd.calibration)
    calibrator_label: str  # the online calibrator's label: "auto", "hard" or "soft"
    train_ratio: float | None
    min_group_size: int
    attention_bins: int
    inflate: TextShape | None  # the testbed shape the loaded pair is embedded into, or None
    engine: str  # "static" (lmms_msd.speculative.fast: static caches, CUDA graphs) or "eager" (lmms_msd.speculative.decoding)
    stop: str  # OPT-Tree's stop rule: "delta" (stop_delta) or "cost" (lmms_msd.speculative.cost)


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError(f"{name} must be an integer, got {value!r}")


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def _as_optional_str(value: Any) -> str | None:
    """None and "None" mean unset; numbers parsed by lmms-eval go back to text."""
    if value is None or value == "None":
        return None
    return str(value)


def _as_total_tokens(value: Any) -> int | None:
    """None for "auto" or -1 (MSD's `total_token=-1`); else an integer."""
    if str(value).strip().lower() == "auto" or (not isinstance(value, bool) and value in (-1, "-1")):
        return None
    return _as_int("total_tokens", value)


def _as_shape(name: str, value: Any) -> TextShape | None:
    """None for "", "none" or None; else `shape_from_name`'s "7b" or "HIDDENxLAYERS"."""
    text = _as_optional_str(value)
    if text is None or text.strip().lower() in ("", "none"):
        return None
    try:
        return shape_from_name(text)
    except ValueError as error:
        raise ValueError(f"{name}={text}: {error}") from None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- requests --------------------------------------------------------------------------------------------
def generation_config(gen_kwargs: Mapping[str, Any]) -> GenerationConfig:
    """lmms-eval's gen_kwargs -> a validated GenerationConfig.

    Follows lmms-eval's llava models: temperature defaults to 0 and sampling is on when the temperature
    is positive, unless `do_sample` says otherwise (do_sample=true without a temperature samples at 1,
    as transformers does). top_p / top_k only matter when sampling, so greedy requests ignore them
    (`--gen_kwargs temperature=0,top_p=0` is common and valid).
    """
    kwargs = {k: v for k, v in gen_kwargs.items() if v is not None}
    unknown = sorted(set(kwargs) - set(GEN_KWARGS))
    if unknown:
        raise ValueError(f"gen_kwargs {unknown} are not supported by {MODEL_ID}; supported: {list(GEN_KWARGS)}")
    num_beams = _as_int("num_beams", kwargs.get("num_beams", 1))
    if num_beams != 1:
        raise ValueError(
            f"num_beams={num_beams}: beam search is not supported (speculative decoding reproduces greedy "
            "decoding or sampling exactly); set num_beams=1"
        )
    repetition_penalty = _as_float("repetition_penalty", kwargs.get("repetition_penalty", 1.0))
    if repetition_penalty != 1.0:
        raise ValueError(f"repetition_penalty={repetition_penalty} is not supported; only 1.0 (none)")
    if "do_sample" in kwargs:
        do_sample = _as_bool("do_sample", kwargs["do_sample"])
        temperature = _as_float("temperature", kwargs.get("temperature", 1.0 if do_sample else 0.0))
    else:
        temperature = _as_float("temperature", kwargs.get("temperature", 0.0))
        do_sample = temperature > 0
    until = kwargs.get("until", ())
    if isinstance(until, str):
        until = (until,)
    elif isinstance(until, (list, tuple)) and all(isinstance(s, str) for s in until):
        until = tuple(until)
    else:
        raise ValueError(f"until must be a string or a list of strings, got {until!r}")
    sampling = do_sample and temperature > 0
    return GenerationConfig(
        max_new_tokens=_as_int("max_new_tokens", kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
        do_sample=do_sample,
        temperature=temperature,
        top_p=_as_float("top_p", kwargs.get("top_p", 1.0)) if sampling else 1.0,
        top_k=_as_int("top_k", kwargs.get("top_k", 0)) if sampling else 0,
        until=until,
    )


def request_images(doc_to_visual: Callable[[Any], Any], doc: Any) -> list[Image.Image]:
    """The request's images through the task's doc_to_visual: none or one PIL image."""
    try:
        visuals = doc_to_visual(doc)
    except Exception as error:  # task code may raise anything; re-raised with what it means here
        raise ValueError(
            f"the task's doc_to_visual failed ({type(error).__name__}: {error}); is the document's image missing or corrupt?"
        ) from error
    if visuals is None:
        return []
    if isinstance(visuals, Image.Image):
        visuals = [visuals]
    visuals = list(visuals)
    if len(visuals) > 1:
        raise ValueError(
            f"the request has {len(visuals)} images; {MODEL_ID} takes one image or none per request "
            "(LLaVA-1.5 was trained on single images)"
        )
    for visual in visuals:
        if visual is None:
            raise ValueError("the image is missing: doc_to_visual returned None in place of an image")
        if not isinstance(visual, Image.Image):
            raise ValueError(
                f"the visual is a {type(visual).__name__}, not a PIL image; {MODEL_ID} takes images only "
                "(no video or audio)"
            )
    return visuals


def request_seed(seed: int, task: str, doc_id: int, repeat: int) -> int:
    """A 63-bit seed for one request, the same on every process and in every request order."""
    digest = hashlib.sha256(f"{seed}\x00{task}\x00{doc_id}\x00{repeat}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def lmms_eval_output_path(argv: Sequence[str]) -> str | None:
    """lmms-eval's `--output_path` when this process is an lmms-eval command line run.

    lmms-eval does not hand its output path to the model, so it is read from the command line of
    `python -m lmms_eval` / `accelerate launch -m lmms_eval` / `lmms-eval`.
    """
    if not argv:
        return None
    program = Path(argv[0])
    if program.name != "lmms-eval" and program.parent.name != "lmms_eval":
        return None
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--output_path")
    known, _ = parser.parse_known_args(list(argv[1:]))
    return known.output_path


# ---- the model -----------------------------------------------------------------------------------------
class LlavaMsdCalibrated(lmms):
    """LLaVA-1.5 with lossless MSD speculative decoding, as an lmms-eval model.

    model_args (defaults in brackets):
      pretrained           the LLaVA-1.5 target: folder or hub id, HF or original layout [bundled miniature]
      msd_model_path       the MSD draft head: folder or hub id [bundled miniature's, with no pretrained]
      use_msd              speculative decoding; false runs plain decoding, the baseline [true]
      tree                 "eagle2" (the EAGLE-2 dynamic tree) or "opt" (OPT-Tree with early stopping) [eagle2]
      total_tokens, depth  the EAGLE-2 tree, as upstream: total_tokens nodes counting the root, depth draft
                           forwards after the root's children, so nodes reach depth + 1 [59, 5]; total_tokens
                           "auto" (or -1, as MSD's total_token=-1): chosen once the target is loaded among
                           upstream's 40, 48, 50, 56, 60 by timing a target forward over each
                           (lmms_msd.speculative.tree.choose_total_tokens), logged and recorded in the statistics
      top_k                frontier width and children proposed per frontier node, both trees [10]
      node_budget, stop_delta, max_depth   OPT-Tree's draft nodes (root not counted), early-stop threshold
                           (absolute, on the expected accepted length) and deepest node depth [60, 0.3, 10]
      opt_variant          OPT-Tree's rule (lmms_msd.speculative.tree.OptTree): "upstream" (Jikai0Wang/OPT-Tree: a level
                           stores its top_k frontier; upstream's own setting is top_k = node_budget) or
                           "frontier" (every top_k x top_k proposal is a candidate) [frontier]
      calibrator           tree=opt only: a calibrator JSON file (`lmms-msd calibrate`), "online" (observe the
                           first train_ratio of the requests, then fit), or "none" (raw draft confidence)
                           [unset: online when a train_ratio is given, here or in gen_kwargs; with the bundled
                           pair and no train_ratio here, the calibrator fitted for it; else none]
      calibrator_mode      how the calibrator scores OPT-Tree's nodes: "weight" (its predicted acceptance is
                           the node's weight) or "tilt" (the thesis's: it tilts the draft's logits of the
                           proposed children, whose re-normalised probabilities are the weights;
                           lmms_msd.calibration.scorer.TiltScorer) [weight]
      calibrator_label     the online calibrator's label: "hard", "soft" (the thesis's) or "auto" (the one
                           that predicts held-out acceptance better) [auto]
      train_ratio          online calibration: the share of a generate_until call's requests (in a random
                           order seeded by `seed`) observed before fitting; also read from gen_kwargs, as
                           the thesis passes it [none]
      min_group_size, attention_bins   the online calibrator's settings [50, 3]
      inflate              embed the loaded pair into a bigger shape computing the same function, to measure
                           at a real model's cost (lmms_msd.testbed.inflate): "7b" (LLaVA-1.5-7B's text
                           sizes) or HIDDENxLAYERS such as "512x6"; the vocabulary is kept [none]
      engine               "static": static KV caches and CUDA graphs (lmms_msd.speculative.fast), the fast loop on a GPU;
                           "eager": transformers' forward with a growing cache (lmms_msd.speculative.decoding); the same
                           outputs either way [auto: static on cuda, eager on cpu]
      stop                 OPT-Tree's stop and size rule: "delta" (stop_delta) or "cost" (the tree with the most
                           expected committed tokens per second on this runtime's costs, measured at start-up or
                           read from $XDG_CACHE_HOME (~/.cache)/lmms_msd/cost_models; a plain step when no tree
                           pays: lmms_msd.speculative.cost) [delta]
      device               [cuda if available, else cpu; cuda:<local rank> under data parallelism]
      dtype                float16 / bfloat16 / float32 / auto (the checkpoint's) [auto on cuda, float32 on cpu]
      attn_implementation  the target's attention [sdpa]
      conv_template        the prompt's conversation template: vicuna_v1 (LLaVA-1.5's evaluation), llava_v1,
                           msd (vicuna_v1 with an empty system prompt: what released MSD heads were trained
                           and evaluated on) or llava_hf (the llava-hf model cards') [vicuna_v1]
      system_prompt        overrides the template's system prompt [the template's]
      vision_tower         original layout only: the CLIP tower, overriding mm_vision_tower [config's]
      stats_path           the JSON statistics report [<lmms-eval --output_path>/msd_stats.json,
                           else ./msd_stats.json]
      seed                 seeds every sampled request (with the task, doc_id and repeat index) [0]
    lmms-eval also passes batch_size (1 only: one request at a time) and max_batch_size (unused).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        msd_model_path: str | None = None,
        use_msd: bool = True,
        tree: str = "eagle2",
        total_tokens: int = 59,
        depth: int = 5,
        top_k: int = 10,
        device: str | None = None,
        dtype: str | None = None,
        attn_implementation: str | None = "sdpa",
        conv_template: str | None = None,
        system_prompt: str | None = None,
        vision_tower: str | None = None,
        stats_path: str | None = None,
        seed: int = 0,
        node_budget: int = 60,
        stop_delta: float = 0.3,
        max_depth: int = 10,
        opt_variant: str = "frontier",
        calibrator: str | None = None,
        calibrator_mode: str = "weight",
        calibrator_label: str = "auto",
        train_ratio: float | None = None,
        min_group_size: int = 50,
        attention_bins: int = 3,
        inflate: str | None = "",
        engine: str = "auto",
        stop: str = "delta",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            valid = [p for p in inspect.signature(type(self).__init__).parameters if p not in ("self", "unknown")]
            raise ValueError(f"unknown model_args {sorted(unknown)} for {MODEL_ID}; valid ones: {valid}")
        if str(batch_size).strip() not in ("1", "1.0"):
            raise ValueError(
                f"batch_size={batch_size}: {MODEL_ID} decodes one request at a time (one tree per target "
                "forward); use --batch_size 1 and data parallelism (accelerate launch) for throughput"
            )
        from accelerate import Accelerator

        self.accelerator = Accelerator()
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        self.args = self._coerce_args(
            pretrained, msd_model_path, use_msd, tree, total_tokens, depth, top_k, device, dtype,
            attn_implementation, conv_template, system_prompt, vision_tower, stats_path, seed,
            node_budget, stop_delta, max_depth, opt_variant, calibrator, calibrator_mode, calibrator_label,
            train_ratio, min_group_size, attention_bins, inflate, engine, stop,
        )  # fmt: skip
        self.tree_builder = self._tree_builder() if self.args.use_msd else None
        self.target, self.draft = self._load()
        self.engine = self._static_engine() if self.args.engine == "static" else None
        self._auto_total_tokens: dict[str, Any] | None = None  # total_tokens=auto: what was timed and chosen
        if isinstance(self.tree_builder, EagleTree) and self.args.total_tokens is None:
            self._choose_total_tokens()
        self.token_types = None  # [V] long, once a calibrator needs them
        self.track_visual = False  # whether the tree's scorer needs the draft's visual attention
        self._calibration_meta: dict[str, Any] | None = None
        if self.args.calibrator not in (None, "none", "online"):
            self._load_calibrator(self.args.calibrator)
        self._cost_meta: dict[str, Any] | None = None  # stop=cost: the cost model in use
        if self.args.stop == "cost":
            self._use_cost_model()
        self._records: list[SampleRecord] = []  # every process's records, on rank 0
        self._noted: set[str] = set()
        self._run_started = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def _coerce_args(
        self, pretrained, msd_model_path, use_msd, tree, total_tokens, depth, top_k, device, dtype,
        attn_implementation, conv_template, system_prompt, vision_tower, stats_path, seed,
        node_budget, stop_delta, max_depth, opt_variant, calibrator, calibrator_mode, calibrator_label, train_ratio,
        min_group_size, attention_bins, inflate, engine, stop,
    ) -> ModelArgs:  # fmt: skip
        pretrained = _as_optional_str(pretrained)
        use_msd = _as_bool("use_msd", use_msd)
        msd_model_path = _as_optional_str(msd_model_path)
        bundled = False
        if pretrained is None and msd_model_path is None:
            # the embedded default: the miniature chart LLaVA and its draft (lmms_msd.testbed)
            bundled_target, bundled_draft = bundled_paths()
            pretrained, msd_model_path = str(bundled_target), str(bundled_draft)
            bundled = True
            eval_logger.info(f"{MODEL_ID}: no pretrained/msd_model_path given: using the bundled miniature pair")
        if pretrained is None:
            raise ValueError(
                f"{MODEL_ID} needs model_args pretrained=<LLaVA-1.5 folder or hub id> for "
                f"msd_model_path={msd_model_path!r}; leave out both to use the bundled miniature pair"
            )
        if use_msd and msd_model_path is None:
            # a folder that is not there is the first thing to say, before asking for the draft
            missing = missing_folder_message(pretrained, "pretrained")
            if missing is not None and not could_be_hub_id(pretrained):
                raise FileNotFoundError(f"{MODEL_ID}: {missing}")
            raise ValueError(
                (f"{MODEL_ID}: {missing} (if you meant a folder, check the path); as such it " if missing else f"{MODEL_ID} ")
                + f"needs model_args msd_model_path=<MSD draft folder or hub id> for pretrained={pretrained!r} "
                "(the bundled draft fits only the bundled target); or use_msd=false for plain decoding"
            )
        tree = str(tree).lower()
        if tree not in TREES:
            raise ValueError(f"unknown tree {tree!r}; valid: {list(TREES)}")
        opt_variant = str(opt_variant).strip().lower()
        if opt_variant not in OPT_VARIANTS:
            raise ValueError(f"unknown opt_variant {opt_variant!r}; valid: {list(OPT_VARIANTS)}")
        calibrator = _as_optional_str(calibrator)
        if calibrator is not None and calibrator.lower() in ("none", "online"):
            calibrator = calibrator.lower()
        if calibrator not in (None, "none") and tree != "opt":
            raise ValueError(f"calibrator={calibrator} drives OPT-Tree's node weights; add tree=opt (or drop calibrator)")
        if calibrator not in (None, "none") and not use_msd:
            raise ValueError(f"calibrator={calibrator} needs speculative decoding; drop it with use_msd=false")
        train_ratio = None if _as_optional_str(train_ratio) is None else _as_float("train_ratio", train_ratio)
        if bundled and tree == "opt" and calibrator is None and train_ratio is None:
            calibrator = str(bundled_calibrator())  # the calibrator fitted for the bundled pair
        if train_ratio is not None and not 0 < train_ratio <= 1:
            raise ValueError(f"train_ratio must be in (0, 1], got {train_ratio}")
        if train_ratio is not None and calibrator not in (None, "online"):
            raise ValueError(f"train_ratio={train_ratio} is for online calibration; it cannot go with calibrator={calibrator}")
        calibrator_mode, calibrator_label = self._coerce_calibrator_use(calibrator_mode, calibrator_label, calibrator, tree, use_msd)
        for name, value in (("min_group_size", min_group_size), ("attention_bins", attention_bins)):
            if _as_int(name, value) < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        device = _as_optional_str(device) or default_device()
        if device == "cuda" and self._world_size > 1:
            device = f"cuda:{self.accelerator.local_process_index}"
        dtype = _as_optional_str(dtype) or ("auto" if device.startswith("cuda") else "float32")
        engine = str(_as_optional_str(engine) or "auto").lower()
        if engine not in ("auto", "static", "eager"):
            raise ValueError(f"engine must be auto, static or eager, got {engine!r}")
        if engine == "auto":
            engine = "static" if device.startswith("cuda") else "eager"
        stop = str(_as_optional_str(stop) or "delta").lower()
        if stop not in STOPS or (stop == "cost" and (tree != "opt" or not use_msd)):
            raise ValueError(f"stop must be one of {list(STOPS)}, and cost sizes OPT-Tree (use_msd=true, tree=opt); got "
                             f"stop={stop}, tree={tree}, use_msd={use_msd}")  # fmt: skip
        return ModelArgs(
            pretrained=pretrained,
            msd_model_path=msd_model_path,
            use_msd=use_msd,
            tree=tree,
            total_tokens=_as_total_tokens(total_tokens),
            depth=_as_int("depth", depth),
            top_k=_as_int("top_k", top_k),
            device=device,
            dtype=dtype,
            attn_implementation=_as_optional_str(attn_implementation),
            conv_template=_as_optional_str(conv_template),
            system_prompt=_as_optional_str(system_prompt),
            vision_tower=_as_optional_str(vision_tower),
            stats_path=_as_optional_str(stats_path),
            seed=_as_int("seed", seed),
            node_budget=_as_int("node_budget", node_budget),
            stop_delta=_as_float("stop_delta", stop_delta),
            max_depth=_as_int("max_depth", max_depth),
            opt_variant=opt_variant,
            calibrator=calibrator,
            calibrator_mode=calibrator_mode,
            calibrator_label=calibrator_label,
            train_ratio=train_ratio,
            min_group_size=_as_int("min_group_size", min_group_size),
            attention_bins=_as_int("attention_bins", attention_bins),
            inflate=_as_shape("inflate", inflate),
            engine=engine,
            stop=stop,
        )

    @staticmethod
    def _coerce_calibrator_use(mode: Any, label: Any, calibrator: str | None, tree: str, use_msd: bool) -> tuple[str, str]:
        """calibrator_mode and calibrator_label, checked against the calibrator they would apply to."""
        from lmms_msd.calibration.scorer import CALIBRATOR_MODES

        mode = str(_as_optional_str(mode) or "weight").lower()
        if mode not in CALIBRATOR_MODES:
            raise ValueError(f"calibrator_mode must be one of {list(CALIBRATOR_MODES)}, got {mode!r}")
        if mode != "weight" and (tree != "opt" or calibrator == "none" or not use_msd):
            raise ValueError(
                f"calibrator_mode={mode} says how a calibrator scores OPT-Tree's nodes; it needs use_msd=true, "
                f"tree=opt and a calibrator (a file or online), got tree={tree}, calibrator={calibrator}"
            )
        label = str(_as_optional_str(label) or "auto").lower()
        if label not in CALIBRATOR_LABELS:
            raise ValueError(f"calibrator_label must be one of {list(CALIBRATOR_LABELS)}, got {label!r}")
        if label != "auto" and calibrator not in (None, "online"):
            raise ValueError(
                f"calibrator_label={label} is the online calibrator's label; calibrator={calibrator} was fitted "
                "on its own (drop calibrator_label, or use calibrator=online with a train_ratio)"
            )
        return mode, label

    def _tree_builder(self) -> EagleTree | OptTree:
        a = self.args
        if a.tree == "opt":
            return OptTree(
                node_budget=a.node_budget, stop_delta=a.stop_delta, max_depth=a.max_depth, top_k=a.top_k, variant=a.opt_variant
            )
        # total_tokens=auto: the largest candidate until `_choose_total_tokens` times the loaded target
        return EagleTree(a.total_tokens or AUTO_TOTAL_TOKENS[-1], a.depth, a.top_k)

    def _types(self):
        from lmms_msd.calibration.token_types import token_type_table

        if self.token_types is None:
            self.token_types = token_type_table(self.target.tokenizer, self.target.vocab_size)
        return self.token_types

    def _load_calibrator(self, path: str) -> None:
        from lmms_msd.calibration.isotonic import GroupedIsotonicCalibrator
        from lmms_msd.calibration.scorer import calibrated_tree

        calibrator = GroupedIsotonicCalibrator.load(path)
        self.tree_builder = calibrated_tree(
            self.tree_builder, calibrator, self._types(), self.target.device, self.args.calibrator_mode
        )
        self.track_visual = self.tree_builder.scorer.needs_visual
        self._calibration_meta = {"mode": "file", "path": path, **calibrator.get_params()}

    def _use_cost_model(self) -> None:
        """stop=cost: OPT-Tree sized by this runtime's costs (`cached_cost_model`: read from the cache, or
        measured now and cached), for the tree's scorer; online calibration keeps the observation phase's."""
        from lmms_msd.speculative.cost import cached_cost_model, describe, summary_line
        from lmms_msd.speculative.runtime import EagerRuntime

        runtime = self.engine or EagerRuntime(self.target, self.draft)
        model, path, measured = cached_cost_model(runtime, self.target, self.tree_builder, self.track_visual)
        self.tree_builder = replace(self.tree_builder, stop="cost", cost=model)
        self._cost_meta = {"file": str(path), "measured_now": measured, **describe(model)}
        eval_logger.info(f"{MODEL_ID}: stop=cost, cost model {'measured now' if measured else 'read'} ({path}): {summary_line(model)}")

    def _load(self):
        from lmms_msd.models.draft import check_draft_fits, load_draft
        from lmms_msd.models.loading import load_target

        a = self.args
        target = load_target(
            a.pretrained, vision_tower=a.vision_tower, device=a.device, dtype=a.dtype,
            attn_implementation=a.attn_implementation, conv_template=a.conv_template, system_prompt=a.system_prompt,
        )  # fmt: skip
        if not a.use_msd:
            if a.msd_model_path is not None:
                eval_logger.info(f"{MODEL_ID}: use_msd=false, plain decoding; msd_model_path is not loaded")
            return self._inflate(target, None)
        draft = load_draft(a.msd_model_path, device=target.device, dtype=target.dtype)
        try:
            check_draft_fits(draft, target.hidden_size, target.vocab_size)
        except ValueError as error:
            raise ValueError(
                f"msd_model_path={a.msd_model_path!r} cannot draft for pretrained={a.pretrained!r}: {error}"
            ) from error
        return self._inflate(target, draft)

    def _inflate(self, target, draft):
        """The loaded pair embedded into model_args inflate's shape (DESIGN 4.5), or as it is."""
        shape = self.args.inflate
        if shape is None:
            return target, draft
        eval_logger.info(f"{MODEL_ID}: inflating the loaded pair to {shape}: the same function at a bigger model's cost")
        return inflate_pair(target, draft, shape) if draft is not None else (inflate_target(target, shape), None)

    def _static_engine(self):
        """The static-cache engine for this pair: its caches cover the target's maximum length (at
        most 4096 slots); CUDA graphs are captured by the first requests of each shape."""
        from lmms_msd.speculative.fast import StaticEngine

        return StaticEngine(self.target, self.draft, max_length=min(self.target.max_length, 4096))

    def _choose_total_tokens(self, repeats: int = 20) -> None:
        """total_tokens=auto as MSD's total_token=-1: time `repeats` target forwards over each candidate
        count of tokens from an empty cache (after one untimed warm-up each, which upstream does not
        do: its first candidate pays the warm-up), on the runtime that will decode, and keep the
        candidate `choose_total_tokens` picks."""
        device = self.target.device
        generator = torch.Generator().manual_seed(0)
        seconds = []
        for n in AUTO_TOTAL_TOKENS:
            ids = torch.randint(0, self.target.vocab_size, (n,), generator=generator).to(device)
            positions = torch.arange(n, device=device)
            self._target_forward(ids, positions)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                self._target_forward(ids, positions)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
        chosen = choose_total_tokens(seconds)
        self.tree_builder = replace(self.tree_builder, total_tokens=chosen)
        self._auto_total_tokens = {"candidates": list(AUTO_TOTAL_TOKENS), "seconds": seconds, "chosen": chosen}
        timings = ", ".join(f"{n}: {t / repeats * 1000:.2f} ms" for n, t in zip(AUTO_TOTAL_TOKENS, seconds))
        eval_logger.info(f"{MODEL_ID}: total_tokens=auto chose {chosen} (target forward per candidate: {timings})")

    def _target_forward(self, ids: torch.Tensor, positions: torch.Tensor) -> None:
        """One target forward over ids [n] at positions [n] from an empty cache, on the decoding runtime."""
        if self.engine is not None:
            self.engine.static_target.forward_tokens(ids, positions, 0)
        else:
            self.target.forward(self.target.embed_tokens(ids), self.target.new_cache(), positions)

    @property
    def device(self) -> torch.device:
        return self.target.device

    # ---- lmms-eval API -----------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        outputs = [""] * len(requests)
        records: dict[int, SampleRecord] = {}
        repeats: Counter[tuple[str, int]] = Counter()
        jobs = []  # (request index, request, repeat index), in request order: repeats do not depend on the order
        for index, request in enumerate(requests):
            if (request.metadata or {}).get("__padding_only__"):
                # lmms-eval evens out the processes' request counts with copies whose answers it drops
                continue
            _, _, _, doc_id, task, _ = request.args
            jobs.append((index, request, repeats[(task, doc_id)]))
            repeats[(task, doc_id)] += 1
        online = self._online_calibration(jobs)
        order = [jobs[i] for i in online.order] if online is not None else jobs
        observed = []
        for index, request, repeat in tqdm(order, desc=MODEL_ID, disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            if online is not None and online.observing:
                observed.append([task, doc_id, repeat])
            try:
                result = self._generate(
                    context, gen_kwargs, doc_to_visual, self.task_dict[task][split][doc_id], task, doc_id, repeat, online, index
                )
            except (ValueError, TypeError, OSError) as error:
                raise ValueError(f"{MODEL_ID}: request {index} (task {task!r}, doc_id {doc_id}): {error}") from error
            outputs[index] = result.text.strip()
            records[index] = SampleRecord.from_decode_stats(task, doc_id, result.stats, rank=self.rank, repeat=repeat)
        if online is not None:
            self._calibration_meta = self._online_meta(online, observed)
        self._report([records[i] for i in sorted(records)])
        return outputs

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            f"{MODEL_ID} implements generate_until only: speculative decoding speeds up generation, and "
            "loglikelihood tasks (multiple choice scored by likelihood) generate nothing; run a generate_until "
            "variant of the task, or lmms-eval's llava_hf model for likelihood scoring"
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(f"{MODEL_ID} implements generate_until only; multi-round tasks are not supported yet")

    # ---- one request ---------------------------------------------------------------------------------------
    def _generate(
        self, context: str, gen_kwargs: Mapping[str, Any], doc_to_visual, doc: Any, task: str, doc_id: int, repeat: int,
        online: Any = None, index: int = 0,
    ) -> GenerationResult:  # fmt: skip
        images = request_images(doc_to_visual, doc)
        if not isinstance(context, str):
            raise TypeError(f"the context must be a string, got {type(context).__name__}")
        if not context.strip() and not images:
            raise ValueError("the context is empty and there is no image: there is nothing to ask the model")
        config = generation_config(gen_kwargs)
        self._note_gen_kwargs(gen_kwargs)
        prompt = self.target.prepare(context, images)
        generator = None
        if not config.greedy:
            generator = torch.Generator(device=self.target.device)
            generator.manual_seed(request_seed(self.args.seed, task, doc_id, repeat))
        engine = self.engine
        if self.draft is None:
            if engine is not None:
                return engine.plain_generate(prompt, config, generator)
            return plain_generate(self.target, prompt, config, generator)
        if online is None:
            tree_builder, observer, track_visual = self.tree_builder, None, self.track_visual
        else:
            plan = online.plan(index, config)
            tree_builder, observer, track_visual = plan.tree_builder, plan.observer, plan.track_visual
        if engine is not None:
            result = engine.speculative_generate(
                prompt, config, tree_builder, generator, observer=observer, track_visual=track_visual
            )
        else:
            result = speculative_generate(
                self.target, self.draft, prompt, config, tree_builder, generator, observer, track_visual
            )
        if online is not None:
            online.done()
        return result

    def _note_gen_kwargs(self, gen_kwargs: Mapping[str, Any]) -> None:
        notes = {**NOTED_GEN_KWARGS, "train_ratio": self._train_ratio_note()}
        for key, note in notes.items():
            if gen_kwargs.get(key) is not None and key not in self._noted:
                self._noted.add(key)
                eval_logger.info(f"{MODEL_ID}: gen_kwargs {key}={gen_kwargs[key]!r} {note}")

    # ---- online calibration ------------------------------------------------------------------------------
    def _train_ratio_note(self) -> str:
        a = self.args
        if self.draft is None:
            return "is ignored: use_msd=false decodes without a draft"
        if a.tree != "opt":
            return "is ignored: calibration drives OPT-Tree; add tree=opt to the model_args to calibrate online"
        if a.calibrator not in (None, "online"):
            return f"is ignored: calibrator={a.calibrator} is already fitted"
        if a.train_ratio is not None:
            return f"is ignored: model_args train_ratio={a.train_ratio} is used"
        return "starts online calibration"

    def _online_calibration(self, jobs: list[tuple[int, Instance, int]]):
        """An `OnlineCalibration` over this call's requests, or None when the run does not calibrate online."""
        a = self.args
        if self.draft is None or a.tree != "opt" or a.calibrator not in (None, "online"):
            return None
        ratio = a.train_ratio
        if ratio is None:
            given = [r.args[1].get("train_ratio") for _, r, _ in jobs]
            asked = {_as_float("train_ratio", value) for value in given if value is not None}
            if len(asked) > 1:
                raise ValueError(
                    f"the requests ask for different train_ratio values {sorted(asked)}; set train_ratio in model_args"
                )
            ratio = asked.pop() if asked else None
        if ratio is None:
            if a.calibrator == "online":
                raise ValueError(
                    "calibrator=online needs train_ratio (model_args or gen_kwargs): the share of the requests to "
                    "observe before fitting"
                )
            return None
        if not 0 < ratio <= 1:
            raise ValueError(f"train_ratio must be in (0, 1], got {ratio}")
        from lmms_msd.calibration.isotonic import GroupedIsotonicCalibrator
        from lmms_msd.calibration.online import OnlineCalibration

        calibrator = GroupedIsotonicCalibrator(attention_bins=a.attention_bins, min_group_size=a.min_group_size)
        return OnlineCalibration(
            len(jobs), ratio, self.tree_builder, self._types(), calibrator, seed=a.seed, device=self.target.device,
            label=a.calibrator_label, mode=a.calibrator_mode,
        )  # fmt: skip

    def _online_meta(self, online, observed: list[list[Any]]) -> dict[str, Any]:
        fitted = online.calibrated is not None
        return {
            "mode": "online",
            "train_ratio": online.train_ratio,
            "requests": len(online.order),
            "observed_requests": observed,  # [task, doc_id, repeat] decoded with raw confidence while observing
            "observations": len(online.observer.observations()),
            "fitted": fitted,
            **(online.calibrator.get_params() if fitted else {}),
            "label_comparison": online.label_report,
        }

    # ---- statistics ----------------------------------------------------------------------------------------
    def _gather(self, records: list[SampleRecord]) -> list[SampleRecord]:
        """Every process's records (on every process); all processes must call this together."""
        dist = torch.distributed
        if self._world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return records
        gathered: list[list[SampleRecord] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, records)
        return [r for part in gathered for r in part or []]

    def _report(self, records: list[SampleRecord]) -> None:
        records = self._gather(records)
        if self.rank != 0:
            return
        first_write = not self._records
        self._records.extend(records)
        report = build_report(self._records, self._meta())
        path = self.stats_path
        if first_write and path.exists():
            eval_logger.warning(
                f"{MODEL_ID}: overwriting the statistics of an earlier run in {path}; set stats_path to keep both"
            )
        write_report(report, path)
        eval_logger.info(f"{MODEL_ID} statistics ({report['decoding']}), written to {path}:\n{format_table(report)}")

    @property
    def stats_path(self) -> Path:
        if self.args.stats_path is not None:
            return Path(self.args.stats_path)
        output_path = lmms_eval_output_path(sys.argv)
        return Path(output_path) / STATS_FILE if output_path else Path.cwd() / STATS_FILE

    def _meta(self) -> dict[str, Any]:
        tree = None
        if isinstance(self.tree_builder, EagleTree):
            tree = {"kind": self.args.tree, **asdict(self.tree_builder)}
            if self._auto_total_tokens is not None:
                tree["total_tokens_auto"] = self._auto_total_tokens
        elif isinstance(self.tree_builder, OptTree):
            b = self.tree_builder
            tree = {"kind": "opt", "opt_variant": b.variant, "node_budget": b.node_budget, "stop_delta": b.stop_delta,
                    "max_depth": b.max_depth, "top_k": b.top_k, "calibrator_mode": self.args.calibrator_mode,
                    "stop": b.stop, "cost_model": self._cost_meta,
                    "calibrator": self._calibration_meta or {"mode": "none"}}  # fmt: skip
        return {
            "model": MODEL_ID,
            "decoding": "speculative" if self.draft is not None else "plain",
            "tree": tree,
            "model_args": asdict(self.args),
            "target_layout": self.target.layout,
            "torch_dtype": str(self.target.dtype).removeprefix("torch."),
            "processes": self._world_size,
            "started": self._run_started,
        }
