"""Which tasks `lmms-msd reproduce` runs when it is given none: the real benchmarks' lmms-eval tasks when
their datasets are in the Hugging Face cache, else the five local task families.

The thesis's tables are on ChartQA, MathVista, AI2D, MathVerse and TextVQA. lmms-eval keeps each in a folder
of its name under `lmms_eval/tasks/`, where a name is a task or a group of tasks, and reproduce measures
tasks (a group's results are its members'): `BENCHMARK_TASKS` names, per folder, the one task the column
is, as lmms-eval 0.7.3 names it (`THESIS_TASKS`). In that release `mathvista` is a group (`mathvista_testmini`,
itself a group of the _cot, _solution and _format prompts, + `mathvista_test`), as are `mathverse` (testmini
and its versions) and `textvqa` (`textvqa_val` + `textvqa_test`); the test splits score nothing (their
metric is `submission`), so the columns are testmini and validation, with the prompts the local families
copy (MathVista's and MathVerse's format-prompt). Each task's YAML names the dataset it reads
(`dataset_path`, a hub id, and `dataset_name`, its configuration); `benchmark_dataset` reads it.

A hub dataset is in the cache (`dataset_cached`) when huggingface_hub has a snapshot of it
(`<HF_HUB_CACHE>/datasets--<org>--<name>/snapshots/<revision>`) or `datasets` has prepared it
(`<HF_DATASETS_CACHE>/<org>___<snake_case name>/<config>/<version>/<hash>`, the folders `datasets`
falls back to when the hub cannot be reached). The check reads folders only: nothing is downloaded or
contacted.

When any benchmark's dataset is missing, the default is the local families' long-answer tasks
(`LOCAL_TASKS`, the repository's tasks/: ChartQA's, MathVista's, AI2D's, MathVerse's and TextVQA's
schemas and scorers, on the bundled eval data), whose answers are long enough for speculative
decoding to matter.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# lmms-eval's folder under lmms_eval/tasks/ (and the local family's name) -> the task of the thesis's column there,
# as lmms-eval 0.7.3's YAMLs name it (lmms_eval/tasks/<folder>/<file>.yaml)
BENCHMARK_TASKS = {
    "chartqa": "chartqa",  # chartqa/chartqa.yaml
    "mathvista": "mathvista_testmini_format",  # mathvista/mathvista_testmini_format.yaml: testmini, shot_type format-prompt
    "ai2d": "ai2d",  # ai2d/ai2d.yaml
    "mathverse": "mathverse_testmini",  # mathverse/mathverse_testmini.yaml: testmini, format-prompt, query_wo
    "textvqa": "textvqa_val",  # textvqa/textvqa_val.yaml: the validation split (textvqa_test's answers are withheld)
}
THESIS_TASKS = tuple(BENCHMARK_TASKS.values())
LOCAL_TASKS = tuple(f"msd_{family}_synth_long" for family in BENCHMARK_TASKS)


def lmms_eval_tasks_dir() -> Path:
    """lmms-eval's own tasks folder (found without importing lmms-eval)."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("lmms-eval is not installed (pip install lmms-eval); reproduce runs through it")
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


def benchmark_dataset(task: str, folder: Path) -> str:
    """The hub id of the dataset lmms-eval's task `task` reads: the dataset_path of its YAML in `folder`
    (lmms-eval's loader, `include:` resolved). Raises LookupError when `folder` has no task called `task`,
    or when `task` is a group there (its members are named in the message).

    Example: ("textvqa_val", lmms_eval/tasks/textvqa) -> "lmms-lab-encoder/textvqa" (textvqa_val.yaml includes
    _default_template_textvqa_yaml, which holds the dataset_path); ("textvqa", the same folder) raises.
    """
    from lmms_eval.utils import load_yaml_config

    for path in sorted(folder.glob("*.yaml")):
        config = load_yaml_config(str(path), mode="simple")
        if isinstance(config.get("task"), list) and config.get("group") == task:
            raise LookupError(f"{task!r} is a group of lmms-eval tasks in {folder} ({', '.join(config['task'])}); name one of its tasks")
        if config.get("task") == task:
            if "/" not in str(config.get("dataset_path", "")):
                raise LookupError(f"lmms-eval's task {task!r} ({path}) reads no hub dataset (dataset_path {config.get('dataset_path')!r})")
            return config["dataset_path"]
    raise LookupError(f"lmms-eval has no task {task!r} in {folder}")


def snake_case(name: str) -> str:
    """`datasets`' cache name of a dataset: "ChartQA" -> "chart_qa", "MathVerse-lmmseval" -> "math_verse-lmmseval"."""
    from datasets.naming import camelcase_to_snakecase

    return camelcase_to_snakecase(name)


def dataset_cached(hub_id: str, hub_cache: Path, datasets_cache: Path) -> bool:
    """Whether the hub dataset `hub_id` ("org/name") has a huggingface_hub snapshot or a prepared `datasets`
    copy (module docstring)."""
    org, _, name = hub_id.partition("/")
    snapshots = hub_cache / f"datasets--{org}--{name}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return True
    prepared = datasets_cache / f"{org}___{snake_case(name)}"
    return any(p.is_dir() for p in prepared.glob("*/*/*"))


def default_caches() -> tuple[Path, Path]:
    """huggingface_hub's and `datasets`' cache folders, as they resolve HF_HOME, HF_HUB_CACHE and HF_DATASETS_CACHE."""
    import datasets.config
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE), Path(datasets.config.HF_DATASETS_CACHE)


def missing_datasets(tasks: Mapping[str, str], tasks_dir: Path, hub_cache: Path, datasets_cache: Path) -> dict[str, str]:
    """task -> the hub id it reads when that is not in the cache, for each folder -> task of `tasks` (tasks
    whose dataset is cached left out); a task that lmms-eval does not have in tasks_dir/<folder> maps to
    "<not an lmms-eval task: why>"."""
    missing = {}
    for folder, task in tasks.items():
        try:
            dataset = benchmark_dataset(task, tasks_dir / folder)
        except LookupError as error:
            missing[task] = f"<not an lmms-eval task: {error}>"
            continue
        if not dataset_cached(dataset, hub_cache, datasets_cache):
            missing[task] = dataset
    return missing


@dataclass(frozen=True)
class DefaultTasks:
    tasks: tuple[str, ...]
    local: bool  # the local families (run with --include_path <repository>/tasks)
    why: str  # one sentence for the log and the report


def default_tasks(tasks_dir: Path | None = None, hub_cache: Path | None = None, datasets_cache: Path | None = None) -> DefaultTasks:
    """The real benchmarks when every dataset they read is cached, else the local families (module docstring).
    The folders default to lmms-eval's tasks and the Hugging Face caches of this environment."""
    if hub_cache is None or datasets_cache is None:
        hub_cache, datasets_cache = default_caches()
    missing = missing_datasets(BENCHMARK_TASKS, tasks_dir or lmms_eval_tasks_dir(), hub_cache, datasets_cache)
    if not missing:
        return DefaultTasks(THESIS_TASKS, local=False, why=f"the real benchmarks' datasets are in the Hugging Face cache ({hub_cache})")
    listed = "; ".join(f"{task}: {dataset}" for task, dataset in missing.items())
    why = (
        f"the real benchmarks cannot run offline, their datasets are not in the Hugging Face cache ({hub_cache}, {datasets_cache}): "
        f"{listed}; running the local task families instead (name the benchmarks with --tasks to download them)"
    )
    return DefaultTasks(LOCAL_TASKS, local=True, why=why)
