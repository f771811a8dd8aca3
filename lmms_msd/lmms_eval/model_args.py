"""The model_args of `llava_msd_calibrated`: coerced, checked against each other, and turned into the
pipeline's settings (`lmms_msd.pipeline`).

lmms-eval parses `--model_args` loosely ("-1" arrives as -1.0, "None" as the string "None"), so every
value is coerced here, and a combination that would be silently ignored is an error that says what to
change. The model_args themselves are documented on `lmms_msd.lmms_eval.plugin.LlavaMsdCalibrated`.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loguru import logger as eval_logger

from lmms_msd.calibration.online import OnlineCalibration
from lmms_msd.calibration.scorer import CALIBRATOR_MODES
from lmms_msd.models.checkpoints import could_be_hub_id, missing_folder_message
from lmms_msd.models.target import Target
from lmms_msd.pipeline import (
    PairSettings,
    RuntimeSettings,
    TreeSettings,
    TreeSetup,
    default_device,
    default_dtype,
    fitted_calibrator,
    inflation_shape,
    online_calibration,
    resolve_pair,
    uses_bundled_pair,
)
from lmms_msd.speculative.cost import STOPS
from lmms_msd.speculative.tree import OPT_VARIANTS
from lmms_msd.testbed.inflate import TextShape

MODEL_ID = "llava_msd_calibrated"
CALIBRATOR_LABELS = ("auto", "hard", "soft")
STATIC_MAX_LENGTH = 4096  # engine=static: cache slots (the engine clips them to the target's maximum length)


@dataclass(frozen=True)
class ModelArgs:
    """model_args after coercion; the statistics report records them as they are here."""

    pretrained: str
    msd_model_path: str | None
    use_msd: bool  # the draft is loaded and a tree built (true and auto)
    use_msd_auto: bool  # use_msd=auto: each request plain or speculative by the measured costs (cost.PathChoice)
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
    depth_edges: tuple[int, ...]  # the online calibrator's depth buckets (GroupedIsotonicCalibrator.depth_edges)
    inflate: TextShape | None  # the testbed shape the loaded pair is embedded into, or None
    engine: str  # "static" (lmms_msd.speculative.fast: static caches, CUDA graphs) or "eager" (lmms_msd.speculative.decoding)
    stop: str  # OPT-Tree's stop rule: "delta" (stop_delta) or "cost" (lmms_msd.speculative.cost)


def unknown_model_args_message(unknown: dict[str, Any], valid: Sequence[str], generation_settings: Sequence[str]) -> str:
    """The error for model_args that the model does not take: each with a hint where one fits (one of
    `generation_settings`, the gen_kwargs keys the model reads, belongs in --gen_kwargs; a near miss names the
    model_arg it resembles), then the valid ones.
    Example: {"temperature": 1, "stopdelta": 0.5} -> "unknown model_args ['stopdelta', 'temperature'] for
    llava_msd_calibrated (stopdelta: did you mean stop_delta?; temperature: a generation setting, pass it as --gen_kwargs
    temperature=1); valid ones: [...]"."""
    hints = []
    for name in sorted(unknown):
        if name in generation_settings:
            hints.append(f"{name}: a generation setting, pass it as --gen_kwargs {name}={unknown[name]}")
        elif close := difflib.get_close_matches(name, valid, n=1, cutoff=0.75):
            hints.append(f"{name}: did you mean {close[0]}?")
    hint = f" ({'; '.join(hints)})" if hints else ""
    return f"unknown model_args {sorted(unknown)} for {MODEL_ID}{hint}; valid ones: {list(valid)}"


def as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ValueError(f"{name} must be true or false, got {value!r}")


def as_int(name: str, value: Any) -> int:
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


def as_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def as_optional_str(value: Any) -> str | None:
    """None and "None" mean unset; numbers parsed by lmms-eval go back to text."""
    if value is None or value == "None":
        return None
    return str(value)


def as_depth_edges(value: Any) -> tuple[int, ...]:
    """depth_edges: "none" -> () (pooled over depth); 2 or "2" -> (2,); "2;4" -> (2, 4) (lmms-eval splits
    model_args at commas, so edges are joined by ";"); increasing integers >= 2, as the calibrator requires."""
    text = as_optional_str(value)
    if text is None or text.strip().lower() in ("none", ""):
        return ()
    try:
        edges = tuple(int(part) for part in text.replace(",", ";").split(";") if part.strip())
    except ValueError:
        edges = None
    if not edges or any(e < 2 for e in edges) or any(a >= b for a, b in zip(edges, edges[1:])):
        raise ValueError(f"depth_edges must be increasing integers >= 2 joined by ';' (e.g. 2 or 2;4) or none, got {value!r}")
    return edges


def _as_total_tokens(value: Any) -> int | None:
    """None for "auto" or -1 (MSD's `total_token=-1`); else an integer."""
    if str(value).strip().lower() == "auto" or (not isinstance(value, bool) and value in (-1, "-1")):
        return None
    return as_int("total_tokens", value)


def _as_shape(name: str, value: Any) -> TextShape | None:
    """None for "", "none" or None; else the shape `inflation_shape` reads: "7b" or "HIDDENxLAYERS"."""
    text = as_optional_str(value)
    try:
        return inflation_shape(text)
    except ValueError as error:
        raise ValueError(f"{name}={text}: {error}") from None


OPT_STOP_DELTA = 0.3  # OPT-Tree's stop_delta when the tree is named (tree=opt) and stop_delta is not given
DEVICE_STOP_DELTA = 0.6  # tree=auto on CUDA: chosen by ms/token on the development split (device_default_tree)


def device_default_tree(device: str, use_msd: bool) -> tuple[str, float]:
    """What `tree=auto` (the default) decodes with on this device: (tree, stop_delta), with stop "delta" and the
    raw draft confidence (no calibrator, also with the bundled pair), the configuration measured fastest on the
    device's kind.

    On a GPU, OPT-Tree on the raw draft confidence with stop_delta 0.6 (no calibrator): on the H200
    7B-shaped testbed (`scripts/compare_trees.py --engine static --inflate 7b`, README "Cost-aware trees"),
    twice, the development split chose 0.6 and 0.8 among 0.1-1.5, and on the test documents the tuned raw
    tree was the fastest of every scorer and stop rule at both temperatures (2.17-2.20 ms/token against
    2.22-2.34 for the calibrated trees, 2.32-2.35 for EAGLE-2); 0.6 is the choice further from the cliff
    at 1.0 (3.2-3.4 ms/token, too few levels). Checked again on the faster engine through lmms-eval (40 documents,
    `benchmarks/h200_7b_calibrated_default/`): the bundled calibrator's tree at 0.6 was 4-10% slower (tau 6.09
    against 6.44), though the bench's 5 requests time it 2-5% faster. Elsewhere EAGLE-2's tree (`eagle2`, its depth and width): on a
    CPU no tree beats a plain step, so `use_msd=auto` decodes plainly and the tree only prices the ceiling.
    Without speculative decoding (use_msd=false) no tree is grown; EAGLE-2 names it.
    """
    if use_msd and device.startswith("cuda"):
        return "opt", DEVICE_STOP_DELTA
    return "eagle2", OPT_STOP_DELTA


def is_auto(use_msd: bool | str) -> bool:
    """use_msd as given names "auto" (any case, spaces around)."""
    return isinstance(use_msd, str) and use_msd.strip().lower() == "auto"


def coerce_model_args(
    pretrained, msd_model_path, use_msd, tree, total_tokens, depth, top_k, device, dtype, attn_implementation,
    conv_template, system_prompt, vision_tower, stats_path, seed, node_budget, stop_delta, max_depth, opt_variant,
    calibrator, calibrator_mode, calibrator_label, train_ratio, min_group_size, attention_bins, depth_edges, inflate,
    engine, stop, *, world_size: int, local_rank: int,
) -> ModelArgs:  # fmt: skip
    """The plugin's keyword arguments, coerced and checked. world_size and local_rank (accelerate's):
    under data parallelism device cuda becomes cuda:<local_rank>."""
    pretrained = as_optional_str(pretrained)
    use_msd_auto = is_auto(use_msd)
    try:
        use_msd = use_msd_auto or as_bool("use_msd", use_msd)
    except ValueError as error:
        raise ValueError(f"{error} (or auto: whichever of the two the measured costs make faster)") from None
    msd_model_path = as_optional_str(msd_model_path)
    bundled = uses_bundled_pair(pretrained, msd_model_path)
    if bundled:
        eval_logger.info(f"{MODEL_ID}: no pretrained/msd_model_path given: using the bundled miniature pair")
    elif pretrained is None:
        raise ValueError(
            f"{MODEL_ID} needs model_args pretrained=<LLaVA-1.5 folder or hub id> for "
            f"msd_model_path={msd_model_path!r}; leave out both to use the bundled miniature pair"
        )
    elif use_msd and msd_model_path is None:
        # a folder that is not there is the first thing to say, before asking for the draft
        missing = missing_folder_message(pretrained, "pretrained")
        if missing is not None and not could_be_hub_id(pretrained):
            raise FileNotFoundError(f"{MODEL_ID}: {missing}")
        raise ValueError(
            (f"{MODEL_ID}: {missing} (if you meant a folder, check the path); as such it " if missing else f"{MODEL_ID} ")
            + f"needs model_args msd_model_path=<MSD draft folder or hub id> for pretrained={pretrained!r} "
            "(the bundled draft fits only the bundled target); or use_msd=false for plain decoding"
        )
    pair = resolve_pair(pretrained, msd_model_path, need_draft=use_msd)
    device = as_optional_str(device) or default_device()
    if device == "cuda" and world_size > 1:
        device = f"cuda:{local_rank}"
    tree = str(as_optional_str(tree) or "auto").lower()  # checked by TreeSettings (`tree_settings`), before anything is loaded
    tree_by_device = tree == "auto"
    tree, default_delta = device_default_tree(device, use_msd) if tree_by_device else (tree, OPT_STOP_DELTA)
    opt_variant = str(opt_variant).strip().lower()
    if opt_variant not in OPT_VARIANTS:
        raise ValueError(f"unknown opt_variant {opt_variant!r}; valid: {list(OPT_VARIANTS)}")
    calibrator = as_optional_str(calibrator)
    if calibrator is not None and calibrator.lower() in ("none", "online"):
        calibrator = calibrator.lower()
    if calibrator not in (None, "none") and tree != "opt":
        raise ValueError(f"calibrator={calibrator} drives OPT-Tree's node weights; add tree=opt (or drop calibrator)")
    if calibrator not in (None, "none") and not use_msd:
        raise ValueError(f"calibrator={calibrator} needs speculative decoding; drop it with use_msd=false")
    train_ratio = None if as_optional_str(train_ratio) is None else as_float("train_ratio", train_ratio)
    if tree == "opt" and not tree_by_device and calibrator is None and train_ratio is None:
        calibrator = fitted_calibrator(pair)  # a named tree=opt: the bundled pair's own; None for a named pair
    if train_ratio is not None and not 0 < train_ratio <= 1:
        raise ValueError(f"train_ratio must be in (0, 1], got {train_ratio}")
    if train_ratio is not None and calibrator not in (None, "online"):
        raise ValueError(f"train_ratio={train_ratio} is for online calibration; it cannot go with calibrator={calibrator}")
    calibrator_mode, calibrator_label = _coerce_calibrator_use(calibrator_mode, calibrator_label, calibrator, tree, use_msd)
    for name, value in (("min_group_size", min_group_size), ("attention_bins", attention_bins)):
        if as_int(name, value) < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    engine = str(as_optional_str(engine) or "auto").lower()
    if engine not in ("auto", "static", "eager"):
        raise ValueError(f"engine must be auto, static or eager, got {engine!r}")
    if engine == "auto":
        engine = "static" if device.startswith("cuda") else "eager"
    stop = str(as_optional_str(stop) or "delta").lower()
    if stop not in STOPS or (stop == "cost" and (tree != "opt" or not use_msd)):
        raise ValueError(f"stop must be one of {list(STOPS)}, and cost sizes OPT-Tree (use_msd=true, tree=opt); got "
                         f"stop={stop}, tree={tree}, use_msd={use_msd}")  # fmt: skip
    return ModelArgs(
        pretrained=pair.pretrained,
        msd_model_path=pair.msd_model_path,
        use_msd=use_msd,
        use_msd_auto=use_msd_auto,
        tree=tree,
        total_tokens=_as_total_tokens(total_tokens),
        depth=as_int("depth", depth),
        top_k=as_int("top_k", top_k),
        device=device,
        dtype=as_optional_str(dtype) or default_dtype(device),
        attn_implementation=as_optional_str(attn_implementation),
        conv_template=as_optional_str(conv_template),
        system_prompt=as_optional_str(system_prompt),
        vision_tower=as_optional_str(vision_tower),
        stats_path=as_optional_str(stats_path),
        seed=as_int("seed", seed),
        node_budget=as_int("node_budget", node_budget),
        stop_delta=default_delta if as_optional_str(stop_delta) is None else as_float("stop_delta", stop_delta),
        max_depth=as_int("max_depth", max_depth),
        opt_variant=opt_variant,
        calibrator=calibrator,
        calibrator_mode=calibrator_mode,
        calibrator_label=calibrator_label,
        train_ratio=train_ratio,
        min_group_size=as_int("min_group_size", min_group_size),
        attention_bins=as_int("attention_bins", attention_bins),
        depth_edges=as_depth_edges(depth_edges),
        inflate=_as_shape("inflate", inflate),
        engine=engine,
        stop=stop,
    )


def _coerce_calibrator_use(mode: Any, label: Any, calibrator: str | None, tree: str, use_msd: bool) -> tuple[str, str]:
    """calibrator_mode and calibrator_label, checked against the calibrator they would apply to."""
    mode = str(as_optional_str(mode) or "weight").lower()
    if mode not in CALIBRATOR_MODES:
        raise ValueError(f"calibrator_mode must be one of {list(CALIBRATOR_MODES)}, got {mode!r}")
    if mode != "weight" and (tree != "opt" or calibrator == "none" or not use_msd):
        raise ValueError(
            f"calibrator_mode={mode} says how a calibrator scores OPT-Tree's nodes; it needs use_msd=true, "
            f"tree=opt and a calibrator (a file or online), got tree={tree}, calibrator={calibrator}"
        )
    label = str(as_optional_str(label) or "auto").lower()
    if label not in CALIBRATOR_LABELS:
        raise ValueError(f"calibrator_label must be one of {list(CALIBRATOR_LABELS)}, got {label!r}")
    if label != "auto" and calibrator not in (None, "online"):
        raise ValueError(
            f"calibrator_label={label} is the online calibrator's label; calibrator={calibrator} was fitted "
            "on its own (drop calibrator_label, or use calibrator=online with a train_ratio)"
        )
    return mode, label


# ---- the pipeline's settings ---------------------------------------------------------------------------------
def pair_settings(args: ModelArgs) -> PairSettings:
    """What to load: the draft only with use_msd."""
    return PairSettings(
        args.pretrained, args.msd_model_path if args.use_msd else None, args.device, args.dtype,
        attn_implementation=args.attn_implementation, conv_template=args.conv_template,
        system_prompt=args.system_prompt, vision_tower=args.vision_tower, inflate=args.inflate,
    )  # fmt: skip


def tree_settings(args: ModelArgs) -> TreeSettings | None:
    """The tree to decode with (checked on construction, before anything is loaded); None with
    use_msd=false; with use_msd=auto it chooses each request's path. calibrator "none" and "online" start
    from the raw draft confidence."""
    if not args.use_msd:
        return None
    calibrator = None if args.calibrator in (None, "none", "online") else args.calibrator
    return TreeSettings(
        kind=args.tree, total_tokens=args.total_tokens, depth=args.depth, top_k=args.top_k, node_budget=args.node_budget,
        stop_delta=args.stop_delta, max_depth=args.max_depth, opt_variant=args.opt_variant, calibrator=calibrator,
        calibrator_mode=args.calibrator_mode, stop=args.stop, choose_path=args.use_msd_auto,
    )  # fmt: skip


def runtime_settings(args: ModelArgs) -> RuntimeSettings:
    return RuntimeSettings(engine=args.engine, max_length=STATIC_MAX_LENGTH)


# ---- online calibration --------------------------------------------------------------------------------------
def calibrates_online(args: ModelArgs) -> bool:
    """Whether a generate_until call may calibrate online (OPT-Tree, no calibrator file): it does when a
    train_ratio is given, in model_args or in the requests' gen_kwargs (`online_train_ratio`)."""
    return args.use_msd and args.tree == "opt" and args.calibrator in (None, "online")


def online_train_ratio(args: ModelArgs, requested: Sequence[Any]) -> float | None:
    """The train_ratio online calibration uses over a generate_until call's requests, or None when the
    run does not calibrate online. requested: each request's gen_kwargs train_ratio (None where unset),
    read only when model_args set none."""
    if not calibrates_online(args):
        return None
    ratio = args.train_ratio
    if ratio is None:
        asked = {as_float("train_ratio", value) for value in requested if value is not None}
        if len(asked) > 1:
            raise ValueError(f"the requests ask for different train_ratio values {sorted(asked)}; set train_ratio in model_args")
        ratio = asked.pop() if asked else None
    if ratio is None:
        if args.calibrator == "online":
            raise ValueError(
                "calibrator=online needs train_ratio (model_args or gen_kwargs): the share of the requests to "
                "observe before fitting"
            )
        return None
    if not 0 < ratio <= 1:
        raise ValueError(f"train_ratio must be in (0, 1], got {ratio}")
    return ratio


def start_online_calibration(
    args: ModelArgs, requested: Sequence[Any], tree: TreeSetup | None, target: Target
) -> OnlineCalibration | None:
    """The `OnlineCalibration` over a generate_until call's requests, or None when the run does not
    calibrate online (`online_train_ratio`; requested: each request's gen_kwargs train_ratio)."""
    ratio = online_train_ratio(args, requested)
    if ratio is None:
        return None
    return online_calibration(
        len(requested), ratio, tree, target, seed=args.seed, label=args.calibrator_label, mode=args.calibrator_mode,
        attention_bins=args.attention_bins, min_group_size=args.min_group_size, depth_edges=args.depth_edges,
    )  # fmt: skip


def train_ratio_note(args: ModelArgs) -> str:
    """What a train_ratio in gen_kwargs does under these model_args (logged once per run)."""
    if not args.use_msd:
        return "is ignored: use_msd=false decodes without a draft"
    if args.tree != "opt":
        return "is ignored: calibration drives OPT-Tree; add tree=opt to the model_args to calibrate online"
    if args.calibrator not in (None, "online"):
        return f"is ignored: calibrator={args.calibrator} is already fitted"
    if args.train_ratio is not None:
        return f"is ignored: model_args train_ratio={args.train_ratio} is used"
    return "starts online calibration"
