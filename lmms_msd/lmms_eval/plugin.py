"""The lmms-eval model `llava_msd_calibrated`: the lmms-eval API over `lmms_msd.pipeline`.

Registered through the entry-point group `lmms_eval.models` (see setup.cfg), so after `pip install`
both `python -m lmms_eval --model llava_msd_calibrated` and `accelerate launch -m lmms_eval ...` find
it. The class holds the lmms-eval API only; the rest of the adapter is beside it:

- `model_args`: coercion and checks of the model_args, and the pipeline settings they make;
- `requests`: gen_kwargs -> generation settings, doc_to_visual -> the image, a seed per request;
- `statistics`: the speculative statistics of every request, gathered from all processes and written,
  per task, to a JSON report and a table in the log.

A request becomes a question and at most one image -> an embedded prompt -> `lmms_msd.pipeline.
decode_requests` (speculative decoding, or plain decoding with `use_msd=false`, the baseline: same
target, same prompt). Answers come back in request order. A request is prepared in two stages: its
image and pixel values on the CPU (`_load`), run ahead on a background thread (model_arg `prefetch`),
then its tokens and embedded prompt on the main thread at its turn (`_prepare`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import sys
import time
from datetime import UTC, datetime
from functools import partial
from typing import Any

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger

from lmms_msd.lmms_eval.model_args import (
    MODEL_ID,
    as_bool,
    as_optional_str,
    calibrates_online,
    coerce_model_args,
    is_auto,
    pair_settings,
    runtime_settings,
    start_online_calibration,
    train_ratio_note,
    tree_settings,
    unknown_model_args_message,
)
from lmms_msd.lmms_eval.requests import (
    GEN_KWARGS,
    Job,
    gen_kwargs_notes,
    generation_config,
    jobs_of,
    preprocess_prompt,
    request_images,
    request_seed,
)
from lmms_msd.lmms_eval.statistics import (
    RunReport,
    SampleRecord,
    file_calibration_meta,
    format_table,
    gather_records,
    online_calibration_meta,
    report_path,
    run_meta,
)
from lmms_msd.models.target import EmbeddedPrompt, PromptInputs
from lmms_msd.pipeline import (
    Request,
    build_decoder,
    build_tree,
    decode_requests,
    drop_unused_draft,
    load_pair,
)
from lmms_msd.speculative.batching import PLAIN_FROM, NodeBudgets
from lmms_msd.speculative.sampling import GenerationConfig


def whole_number(name: str, value: Any, minimum: int = 1, note: str = " (e.g. 16)") -> int:
    """A model_arg that counts something: a whole number >= `minimum`, given as a string or a float too
    (model_args are parsed loosely: "4" may come as 4.0). The error names the model_arg and the rule,
    then `note`: what it counts, an example."""
    try:
        number = float(str(value).strip())
    except ValueError:
        number = minimum - 1.0  # no number: refused below, as one out of range is
    if not math.isfinite(number) or number < minimum or number != int(number):
        raise ValueError(f"{name}={value!r}: {MODEL_ID} needs a whole number >= {minimum} here{note}")
    return int(number)


def requests_at_once(batch_size: Any, max_batch: Any) -> int:
    """Requests decoded at once: model_args max_batch when given, else lmms-eval's batch_size."""
    if as_optional_str(max_batch) is not None:
        return whole_number("max_batch", max_batch)
    return whole_number("batch_size", batch_size)


def requests_ahead(prefetch: Any, max_batch: int) -> int:
    """Requests whose image loading and preprocessing may run ahead of their turn (model_args prefetch):
    a whole number >= 0 (0: each at its turn), or unset: max(2, max_batch), enough for a batch's rows
    that free together."""
    unset = max(2, max_batch)
    if as_optional_str(prefetch) is None:
        return unset
    note = f", the requests whose images are loaded ahead of their turn (e.g. 4; 0 turns it off; unset: max(2, max_batch) = {unset})"
    return whole_number("prefetch", prefetch, minimum=0, note=note)


def model_manifest():
    """The payload of the `lmms_eval.models` entry point: a `ModelManifest`.

    Imported here, not at the top: importing `lmms_eval.models.registry_v2` runs
    `lmms_eval.models/__init__`, which loads the entry points, which import this module; were this
    module being imported first, it would be found half-initialised and the model not registered.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="lmms_msd.lmms_eval.plugin.LlavaMsdCalibrated")


class LlavaMsdCalibrated(lmms):
    """LLaVA-1.5 with lossless MSD speculative decoding, as an lmms-eval model.

    model_args (defaults in brackets):
      pretrained           the LLaVA-1.5 target: folder or hub id, HF or original layout [bundled miniature]
      msd_model_path       the MSD draft head: folder or hub id [bundled miniature's, with no pretrained]
      use_msd              true: speculative decoding; false: plain decoding, the baseline; auto: each request
                           plainly or speculatively, whichever commits more tokens per second by the runtime's
                           measured costs (the cost model of stop=cost, cached alike; plain when no tree could
                           beat a plain step even if every draft token were accepted, and then the draft is
                           dropped once the costs are read, so the run is use_msd=false's (not when tree=opt
                           may calibrate online, which decodes every request speculatively); else by the
                           realised speculative steps so far: lmms_msd.speculative.cost.PathChoice); with
                           8 or more requests at once (batch_size, max_batch) and no batch_node_budgets, plain
                           decoding (the default schedule would grow trees only in the run's last steps) [auto]
      tree                 "eagle2" (the EAGLE-2 dynamic tree), "opt" (OPT-Tree with early stopping) or "auto":
                           the device's fastest measured: on CUDA opt on the raw draft confidence with
                           stop_delta 0.6, eagle2 elsewhere (model_args.device_default_tree) [auto]
      total_tokens, depth  the EAGLE-2 tree, as upstream: total_tokens nodes counting the root, depth draft
                           forwards after the root's children, so nodes reach depth + 1 [59, 5]; total_tokens
                           "auto" (or -1, as MSD's total_token=-1): chosen once the target is loaded among
                           upstream's 40, 48, 50, 56, 60 by timing a target forward over each
                           (lmms_msd.speculative.tree.choose_total_tokens), logged and recorded in the statistics
      top_k                frontier width and children proposed per frontier node, both trees [10]
      node_budget, stop_delta, max_depth   OPT-Tree's draft nodes (root not counted), early-stop threshold
                           (absolute, on the expected accepted length) and deepest node depth [60, 0.3 (0.6
                           with tree=auto on CUDA), 10]
      opt_variant          OPT-Tree's rule (lmms_msd.speculative.tree.OptTree): "upstream" (Jikai0Wang/OPT-Tree: a level
                           stores its top_k frontier; upstream's own setting is top_k = node_budget) or
                           "frontier" (every top_k x top_k proposal is a candidate) [frontier]
      calibrator           tree=opt only: a calibrator JSON file (`lmms-msd calibrate`), "online" (observe the
                           first train_ratio of the requests, then fit), or "none" (raw draft confidence)
                           [unset: online when a train_ratio is given, here or in gen_kwargs; with the bundled
                           pair, a named tree=opt and no train_ratio here, the calibrator fitted for it; else none]
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
      depth_edges          the online calibrator's depth buckets, as `lmms-msd calibrate --depth_edges`: "2"
                           (depth 1 apart from deeper nodes), edges joined by ";" such as "2;4", or "none"
                           (pooled over depth, as the thesis fits) [2]
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
      max_batch            requests decoded at once (lmms_msd.speculative.batching: continuous batching, one
                           target forward per step for all of them); the same answers per doc_id at T=0 as
                           one at a time, and each sampled request draws from its own seeded generator.
                           A request's wall_s in the statistics is then its share of the batched loop's
                           time, so the summed tokens/s is the batch's throughput [lmms-eval's --batch_size]
      max_length           engine=static: KV cache slots per request in flight (prompt, max_new_tokens and one
                           tree must fit); with a batch the cache holds max_batch of them, so lower it to fit
                           the device [4096, clipped to the target's maximum length]
      batch_node_budgets   the tree's node budget by requests in flight, "B:N;..." (batch size from which a
                           budget holds, budget; 0: plain steps), e.g. 1:60;16:20;64:0 [the tree's own below 8
                           requests in flight, plain steps from 8: PlainFrom(8); on an H200 trees paid at 4, lost at 16]
      batched_drafting     engine=static with a batch: every tree level of all requests in flight is one draft
                           forward, replayed from a CUDA graph, over a draft cache with a row per request
                           (BatchedStaticEngine, lmms_msd.speculative.fast.batched_growth) [false]
      torch_compile        engine=static: the target's layers (and, one request at a time, the draft's head)
                           through torch.compile: fused norms, RoPE and gating; each new shape compiles
                           first (about 24 s in all at batch 1 on an H200 host): for whole benchmarks [false]
      prefetch             requests whose image is loaded and preprocessed (doc_to_visual, the image processor)
                           ahead of their turn, on a background thread, while the device decodes
                           (lmms_msd.prefetch); the same answers; 0: each when its turn comes [max(2, max_batch)]
    lmms-eval also passes batch_size (requests at once, unless max_batch says) and max_batch_size (unused).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        msd_model_path: str | None = None,
        use_msd: bool | str = "auto",
        tree: str = "auto",
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
        stop_delta: float | str | None = None,
        max_depth: int = 10,
        opt_variant: str = "frontier",
        calibrator: str | None = None,
        calibrator_mode: str = "weight",
        calibrator_label: str = "auto",
        train_ratio: float | None = None,
        min_group_size: int = 50,
        attention_bins: int = 3,
        depth_edges: str | int | None = 2,
        inflate: str | None = "",
        engine: str = "auto",
        stop: str = "delta",
        max_batch: int | None = None,
        batch_node_budgets: str | None = None,
        batched_drafting: bool | str = False,
        torch_compile: bool | str = False,
        max_length: int | None = None,
        prefetch: int | str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            valid = [p for p in inspect.signature(type(self).__init__).parameters if p not in ("self", "unknown")]
            raise ValueError(unknown_model_args_message(unknown, valid, GEN_KWARGS))
        self.max_batch = requests_at_once(batch_size, max_batch)
        self.prefetch = requests_ahead(prefetch, self.max_batch)
        budgets = as_optional_str(batch_node_budgets)
        self.schedule = PLAIN_FROM if budgets is None else NodeBudgets.parse(budgets)
        if budgets is None and self.max_batch >= PLAIN_FROM.batch and is_auto(use_msd):
            # the default schedule would take plain steps at this batch but for the run's last steps, whose trees
            # cost their graphs' capture: more than they saved (`benchmarks/h200_7b_batch_default/`)
            eval_logger.info(
                f"{MODEL_ID}: use_msd=auto with {self.max_batch} requests at once: plain decoding, without the draft (set "
                f"use_msd=true for trees once fewer than {PLAIN_FROM.batch} are in flight, or batch_node_budgets)"
            )
            use_msd = "false"
        self.accelerator = Accelerator()
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        self.args = coerce_model_args(
            pretrained, msd_model_path, use_msd, tree, total_tokens, depth, top_k, device, dtype,
            attn_implementation, conv_template, system_prompt, vision_tower, stats_path, seed,
            node_budget, stop_delta, max_depth, opt_variant, calibrator, calibrator_mode, calibrator_label,
            train_ratio, min_group_size, attention_bins, depth_edges, inflate, engine, stop,
            world_size=self._world_size, local_rank=self.accelerator.local_process_index,
        )  # fmt: skip
        settings = tree_settings(self.args)  # checked before anything is loaded
        if not self.args.use_msd and self.args.msd_model_path is not None:
            eval_logger.info(f"{MODEL_ID}: use_msd=false, plain decoding; msd_model_path is not loaded")
        if self.args.inflate is not None:
            eval_logger.info(f"{MODEL_ID}: inflating the loaded pair to {self.args.inflate}: the same function at a bigger model's cost")
        runtime = dataclasses.replace(
            runtime_settings(self.args), max_batch=self.max_batch, batched_drafting=as_bool("batched_drafting", batched_drafting)
        )
        compiled = as_bool("torch_compile", torch_compile)
        try:
            runtime = dataclasses.replace(runtime, compile=compiled)
        except ValueError as error:  # valid without it: RuntimeSettings refused torch_compile (compile there)
            raise ValueError(
                f"torch_compile=true compiles the static engine's forwards; engine is {runtime.engine!r}: set engine=static (on CUDA)"
            ) from error
        if as_optional_str(max_length) is not None:
            runtime = dataclasses.replace(runtime, max_length=whole_number("max_length", max_length))
        self.decoder = build_decoder(load_pair(pair_settings(self.args)), runtime)
        self.tree = None if settings is None else build_tree(settings, self.decoder)
        if self.tree is not None and self.tree.total_tokens_auto is not None:
            auto = self.tree.total_tokens_auto
            timings = ", ".join(f"{n}: {t:.4f} s" for n, t in zip(auto["candidates"], auto["seconds"]))
            eval_logger.info(f"{MODEL_ID}: total_tokens=auto chose {auto['chosen']} (timed target forwards per candidate: {timings})")
        if self.tree is not None and self.tree.path_choice is not None:
            choice = self.tree.path_choice
            eval_logger.info(
                f"{MODEL_ID}: use_msd=auto: plain steps {choice.plain_rate:.1f} tokens/s, the best any tree could commit "
                f"{choice.ceiling_rate:.1f} tokens/s: "
                + ("plain decoding, without the draft" if choice.plain_only else "speculative decoding first, then by the realised steps")
            )
            if not calibrates_online(self.args):  # online calibration decodes every request speculatively
                self.decoder = drop_unused_draft(self.decoder, self.tree, runtime)
        if self.tree is not None and self.tree.cost_model is not None:
            cost = self.tree.cost_model
            eval_logger.info(f"{MODEL_ID}: stop=cost, cost model {'measured now' if cost['measured_now'] else 'read'}: {cost['file']}")
        self._calibration = None if settings is None or settings.calibrator is None else file_calibration_meta(settings.calibrator, self.tree)
        self.report = RunReport(report_path(self.args.stats_path, sys.argv))
        self._noted: set[str] = set()  # gen_kwargs keys whose note was logged
        self._run_started = datetime.now(UTC).isoformat(timespec="seconds")
        self._generate_s, self._documents = 0.0, 0  # this process's generate_until calls: their time and requests

    @property
    def device(self) -> torch.device:
        return self.decoder.target.device

    # ---- lmms-eval API -----------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        jobs = jobs_of(requests)
        requested = [job.gen_kwargs.get("train_ratio") for job in jobs]
        online = start_online_calibration(self.args, requested, self.tree, self.decoder.target)
        decodes = [Request(job.name, partial(self._prepare, job), request_seed(self.args.seed, job.task, job.doc_id, job.repeat),
                           load=partial(self._load, job)) for job in jobs]  # fmt: skip
        started = time.perf_counter()
        results = decode_requests(self.decoder, decodes, self.tree, online, max_batch=self.max_batch, schedule=self.schedule,
                                  prefetch=self.prefetch, progress=self.rank == 0, desc=MODEL_ID)  # fmt: skip
        self._generate_s += time.perf_counter() - started  # the answers are on the host: the device is done
        self._documents += len(jobs)
        outputs = [""] * len(requests)  # padding requests' answers are dropped by lmms-eval
        for job, result in zip(jobs, results):
            outputs[job.index] = result.text.strip()
        if online is not None:
            observed = [[jobs[i].task, jobs[i].doc_id, jobs[i].repeat] for i in online.order[: online.n_observe]]
            self._calibration = online_calibration_meta(online, observed)
        records = [SampleRecord.from_decode_stats(job.task, job.doc_id, result.stats, rank=self.rank, repeat=job.repeat)
                   for job, result in zip(jobs, results)]  # fmt: skip
        self._write_statistics(gather_records(records, self._world_size))
        return outputs

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            f"{MODEL_ID} implements generate_until only: speculative decoding speeds up generation, and "
            "loglikelihood tasks (multiple choice scored by likelihood) generate nothing; run a generate_until "
            "variant of the task, or lmms-eval's llava_hf model for likelihood scoring"
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(f"{MODEL_ID} implements generate_until only; multi-round tasks are not supported yet")

    # ---- what generate_until hands to the library ------------------------------------------------------------
    def _load(self, job: Job) -> PromptInputs:
        """A request's CPU stage, from the document lmms-eval put in `task_dict`: its image and the prompt's
        text and pixel values. It may run on the prefetch thread: it reads neither the tokenizer nor the device."""
        images = request_images(job.doc_to_visual, self.task_dict[job.task][job.split][job.doc_id])
        return preprocess_prompt(self.decoder.target, job.context, images)

    def _prepare(self, job: Job, inputs: PromptInputs) -> tuple[EmbeddedPrompt, GenerationConfig]:
        """A request's prompt and settings, on the main thread at its turn, from its CPU stage (`_load`)."""
        prompt = self.decoder.target.embed_inputs(inputs)
        config = generation_config(job.gen_kwargs)
        for key, note in gen_kwargs_notes(job.gen_kwargs, train_ratio_note(self.args)).items():
            if key not in self._noted:
                self._noted.add(key)
                eval_logger.info(f"{MODEL_ID}: gen_kwargs {note}")
        return prompt, config

    def _write_statistics(self, records: list[SampleRecord]) -> None:
        """Rank 0 adds every process's records of this call to the run's report and logs its table."""
        if self.rank != 0:
            return
        if self.report.overwrites_an_earlier_run:
            eval_logger.warning(
                f"{MODEL_ID}: overwriting the statistics of an earlier run in {self.report.path}; set stats_path to keep both"
            )
        meta = run_meta(MODEL_ID, self.args, self.tree, self._calibration, self.decoder.target, self._world_size, self._run_started)
        # with many requests in flight, a request's wall_s is its time in the batch, shared with the others
        meta |= {
            "max_batch": self.max_batch, "batch_node_budgets": repr(self.schedule),
            "batched_drafting": getattr(self.decoder.runtime, "batched_drafting", False), "prefetch": self.prefetch,
            "torch_compile": getattr(self.decoder.runtime, "compile", False),
            # rank 0's generate_until calls end to end (loading, preparing, prefills, decoding): its share of the documents per second
            "generate_until_s": self._generate_s, "documents_per_s": self._documents / self._generate_s if self._generate_s > 0 else 0.0,
        }  # fmt: skip
        report = self.report.add(records, meta)
        eval_logger.info(f"{MODEL_ID} statistics ({report['decoding']}), written to {self.report.path}:\n{format_table(report)}")
