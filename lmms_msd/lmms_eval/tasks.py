"""A local lmms-eval task's documents read outside an lmms-eval run, as the requests the plugin would decode.

`find_task_yaml` finds a task's YAML in a folder of task YAMLs; `load_task` builds lmms-eval's own
`ConfigurableTask` from it (with `include:`, `!function` and relative data_files resolved by lmms-eval's
loader), optionally on another parquet file of the same schema (a `lmms-msd make-data` folder's);
`task_prompts` turns its documents into what the plugin decodes (the context from doc_to_text, the image
from doc_to_visual, as lmms-eval sends them; `task_generation_config`: the YAML's generation_kwargs, as
lmms-eval sends them), and `task_documents` adds a scorer of an answer: the task's own process_results and
primary metric (`lmms_msd.lmms_eval.metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from lmms_msd.lmms_eval.metrics import primary_metric_name
from lmms_msd.lmms_eval.model_args import MODEL_ID
from lmms_msd.lmms_eval.requests import generation_config, request_images
from lmms_msd.speculative.sampling import GenerationConfig

if TYPE_CHECKING:
    from lmms_eval.api.task import ConfigurableTask

log = logging.getLogger(__name__)


# ---- a local task's documents ------------------------------------------------------------------------------
def find_task_yaml(task: str, include_path: Path) -> Path:
    """The YAML under `include_path` (searched recursively, in sorted order) whose `task:` is `task`; YAMLs
    that lmms-eval's loader cannot read are skipped."""
    from lmms_eval.utils import load_yaml_config

    if not include_path.is_dir():
        raise FileNotFoundError(f"--include_path {include_path}: no such folder")
    for path in sorted(include_path.rglob("*.yaml")):
        try:
            config = load_yaml_config(str(path), mode="simple")
        except (OSError, ValueError, TypeError, AttributeError, ImportError) as error:
            log.debug("skipping %s: %s", path, error)
            continue
        if isinstance(config, dict) and config.get("task") == task:
            return path
    raise FileNotFoundError(f"no task {task!r} in the YAML files under {include_path}; pass --include_path <folder of its YAML>")


def load_task(yaml_path: Path, data_file: Path | None = None) -> ConfigurableTask:
    """lmms-eval's ConfigurableTask of the task YAML at `yaml_path` (`include:` and `!function` resolved as
    lmms-eval resolves them); `data_file` replaces the parquet file its dataset_kwargs name."""
    from lmms_eval.api.task import ConfigurableTask
    from lmms_eval.utils import load_yaml_config

    if not yaml_path.is_file():
        raise FileNotFoundError(f"no task YAML at {yaml_path}; pass the folder of the repository's tasks/ (--tasks_dir)")
    config = load_yaml_config(str(yaml_path), mode="full")
    if data_file is not None:
        if config.get("dataset_path") != "parquet":
            raise ValueError(f"{yaml_path.name} does not read a parquet file (dataset_path {config.get('dataset_path')!r}); it cannot take {data_file}")
        config["dataset_kwargs"] = {**config.get("dataset_kwargs", {}), "data_files": {config["test_split"]: str(data_file)}}
    if config.get("output_type") != "generate_until":
        raise ValueError(f"{yaml_path.name} is a {config.get('output_type')!r} task; only generate_until tasks are decoded")
    return ConfigurableTask(config=config, model_name=MODEL_ID)


def data_file_name(yaml_path: Path) -> str:
    """The file name of the parquet file a task YAML reads (its data_files for its test split), e.g.
    tasks/msd_ai2d_synth_long.yaml -> "ai2d_test.parquet"."""
    from lmms_eval.utils import load_yaml_config

    config = load_yaml_config(str(yaml_path), mode="simple")
    files = config.get("dataset_kwargs", {}).get("data_files")
    if config.get("dataset_path") != "parquet" or not files:
        raise ValueError(f"{yaml_path} does not read a local parquet file (dataset_path {config.get('dataset_path')!r})")
    return Path(files[config["test_split"]] if isinstance(files, Mapping) else files).name


@dataclass(frozen=True)
class TaskPrompt:
    """One document of a task, as the plugin would get it to decode."""

    doc_id: int
    context: str  # doc_to_text: the question without `<image>`
    images: list[Image.Image]  # doc_to_visual: none or one


@dataclass(frozen=True)
class TaskDocument:
    """One document of a local task, as the plugin would decode it."""

    doc_id: int
    context: str  # doc_to_text: the question without `<image>`
    images: list[Image.Image]  # doc_to_visual: none or one
    config: GenerationConfig  # the YAML's generation_kwargs, as lmms-eval sends them
    score: Callable[[str], float]  # the task's primary metric of an answer (process_results on the stripped text)


def task_prompts(task: ConfigurableTask, limit: int | None) -> list[TaskPrompt]:
    """The first `limit` (None: all) documents of the task's evaluation split, as the plugin gets them
    (doc_to_text with the task's lmms_eval_specific_kwargs, doc_to_visual)."""
    docs = task.eval_docs
    return [
        TaskPrompt(doc_id, task.doc_to_text(docs[doc_id]), request_images(task.doc_to_visual, docs[doc_id]))
        for doc_id in range(len(docs) if limit is None else min(limit, len(docs)))
    ]


def task_generation_config(task: ConfigurableTask) -> GenerationConfig:
    """The settings of the task's generation_kwargs, as lmms-eval sends them (with its default stop string,
    the fewshot delimiter, when the YAML names none)."""
    return generation_config(task.config.generation_kwargs)


def task_documents(task: ConfigurableTask, limit: int | None) -> list[TaskDocument]:
    """`task_prompts` with their generation settings and scorers. A task's score is the mean of its
    documents' scores on the raw answer, so it may have no filters and its primary metric must aggregate
    by mean."""
    if task.config.filter_list:
        raise ValueError(f"task {task.config.task} has filters ({task.config.filter_list}); only tasks scored on the raw answer are read here")
    metric = primary_metric_name(vars(task.config))
    aggregation = task.config.metric_list[0].get("aggregation")
    if aggregation != "mean":
        raise ValueError(f"task {task.config.task}: its primary metric {metric!r} aggregates by {aggregation!r}; only mean is supported here")
    config = task_generation_config(task)
    docs = task.eval_docs
    out = []
    for prompt in task_prompts(task, limit):
        doc = docs[prompt.doc_id]

        def score(answer: str, doc: dict[str, Any] = doc) -> float:
            values = task.process_results(doc, [answer.strip()])
            if metric not in values:
                raise ValueError(f"task {task.config.task}: process_results returned {sorted(values)}, not its primary metric {metric!r}")
            return float(values[metric])

        out.append(TaskDocument(prompt.doc_id, prompt.context, prompt.images, config, score))
    return out
