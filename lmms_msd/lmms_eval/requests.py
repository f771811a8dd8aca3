"""lmms-eval requests -> what the pipeline decodes: generation settings from gen_kwargs, at most one
image from doc_to_visual, the embedded prompt, and a seed per request.

A request's arguments are (context, gen_kwargs, doc_to_visual, doc_id, task, split). Sampling is
reproducible: each request draws from its own generator seeded from `seed`, the task name, the doc_id
and the repeat index (`request_seed`), so an answer does not depend on the order of the requests or on
which process decodes it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from lmms_msd.lmms_eval.model_args import MODEL_ID, as_bool, as_float, as_int
from lmms_msd.models.target import EmbeddedPrompt, PromptInputs, Target
from lmms_msd.speculative.sampling import GenerationConfig

DEFAULT_MAX_NEW_TOKENS = 1024  # what lmms-eval's llava models use when a task sets none

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
    num_beams = as_int("num_beams", kwargs.get("num_beams", 1))
    if num_beams != 1:
        raise ValueError(
            f"num_beams={num_beams}: beam search is not supported (speculative decoding reproduces greedy "
            "decoding or sampling exactly); set num_beams=1"
        )
    repetition_penalty = as_float("repetition_penalty", kwargs.get("repetition_penalty", 1.0))
    if repetition_penalty != 1.0:
        raise ValueError(f"repetition_penalty={repetition_penalty} is not supported; only 1.0 (none)")
    if "do_sample" in kwargs:
        do_sample = as_bool("do_sample", kwargs["do_sample"])
        temperature = as_float("temperature", kwargs.get("temperature", 1.0 if do_sample else 0.0))
    else:
        temperature = as_float("temperature", kwargs.get("temperature", 0.0))
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
        max_new_tokens=as_int("max_new_tokens", kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
        do_sample=do_sample,
        temperature=temperature,
        top_p=as_float("top_p", kwargs.get("top_p", 1.0)) if sampling else 1.0,
        top_k=as_int("top_k", kwargs.get("top_k", 0)) if sampling else 0,
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


def prepare_prompt(target: Target, context: Any, images: list[Image.Image]) -> EmbeddedPrompt:
    """The embedded prompt of a request's context (a question without `<image>`) and its images."""
    return target.embed_inputs(preprocess_prompt(target, context, images))


def preprocess_prompt(target: Target, context: Any, images: list[Image.Image]) -> PromptInputs:
    """The CPU stage of `prepare_prompt` (`Target.preprocess`: no tokenizer, no device), which may run
    ahead on another thread; `Target.embed_inputs` finishes it."""
    if not isinstance(context, str):
        raise TypeError(f"the context must be a string, got {type(context).__name__}")
    if not context.strip() and not images:
        raise ValueError("the context is empty and there is no image: there is nothing to ask the model")
    return target.preprocess(context, images)


@dataclass(frozen=True)
class Job:
    """A request to decode: its place among generate_until's requests, its arguments, and which repeat
    of its (task, doc_id) it is."""

    index: int
    context: Any
    gen_kwargs: Mapping[str, Any]
    doc_to_visual: Callable[[Any], Any]
    doc_id: int
    task: str
    split: str
    repeat: int

    @property
    def name(self) -> str:
        """How errors name it."""
        return f"{MODEL_ID}: request {self.index} (task {self.task!r}, doc_id {self.doc_id})"


def jobs_of(requests: Sequence[Any]) -> list[Job]:
    """The requests to decode (`lmms_eval.api.instance.Instance`s), in request order, repeats counted
    in that order. lmms-eval evens out the processes' request counts with copies marked
    `__padding_only__` whose answers it drops: those are left out."""
    repeats: Counter[tuple[str, int]] = Counter()
    jobs = []
    for index, request in enumerate(requests):
        if (request.metadata or {}).get("__padding_only__"):
            continue
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
        jobs.append(Job(index, context, gen_kwargs, doc_to_visual, doc_id, task, split, repeats[(task, doc_id)]))
        repeats[(task, doc_id)] += 1
    return jobs


def gen_kwargs_notes(gen_kwargs: Mapping[str, Any], train_ratio_note: str) -> dict[str, str]:
    """What each gen_kwarg this model accepts but does not apply as given does, for the log:
    key -> "key=value note"."""
    notes = {**NOTED_GEN_KWARGS, "train_ratio": train_ratio_note}
    return {key: f"{key}={gen_kwargs[key]!r} {note}" for key, note in notes.items() if gen_kwargs.get(key) is not None}
