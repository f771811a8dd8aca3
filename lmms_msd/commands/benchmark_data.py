"""Which tasks `lmms-msd reproduce` runs when it is given none: the real benchmarks' lmms-eval tasks when
their datasets are in the Hugging Face cache, else the five local task families.

The thesis's tables are on lmms-eval's `chartqa`, `mathvista`, `ai2d`, `mathverse` and `textvqa`
(`THESIS_TASKS`). lmms-eval keeps each in a folder of its name under `lmms_eval/tasks/`; a name is a task
or a group of tasks (`mathvista` = `mathvista_testmini` (itself a group) + `mathvista_test`), and each
task's YAML names the dataset it reads (`dataset_path`, a hub id, and `dataset_name`, its
configuration). `benchmark_datasets` follows the groups down to the tasks and collects those hub ids.

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
from dataclasses import dataclass
from pathlib import Path

THESIS_TASKS = ("chartqa", "mathvista", "ai2d", "mathverse", "textvqa")
LOCAL_TASKS = tuple(f"msd_{family}_synth_long" for family in THESIS_TASKS)


def lmms_eval_tasks_dir() -> Path:
    """lmms-eval's own tasks folder (found without importing lmms-eval)."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("lmms-eval is not installed (pip install lmms-eval); reproduce runs through it")
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


def benchmark_datasets(name: str, tasks_dir: Path) -> list[str]:
    """The hub ids of the datasets that lmms-eval's task or group `name` reads, sorted: the dataset_path of
    every task it is made of, read from the YAMLs in tasks_dir/<name>/ (lmms-eval's loader, `include:`
    resolved). Raises LookupError when that folder has no task or group called `name`."""
    from lmms_eval.utils import load_yaml_config

    configs: dict[str, dict] = {}
    for path in sorted((tasks_dir / name).glob("*.yaml")):
        config = load_yaml_config(str(path), mode="simple")
        key = config.get("group") if isinstance(config.get("task"), list) else config.get("task")
        if isinstance(key, str):
            configs[key] = config
    found: set[str] = set()

    def collect(task: str) -> None:
        if task not in configs:
            raise LookupError(f"lmms-eval has no task or group {task!r} in {tasks_dir / name}")
        config = configs[task]
        if isinstance(config.get("task"), list):
            for member in config["task"]:
                collect(member)
        elif "/" in str(config.get("dataset_path", "")):
            found.add(config["dataset_path"])

    collect(name)
    return sorted(found)


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


def missing_datasets(names: tuple[str, ...], tasks_dir: Path, hub_cache: Path, datasets_cache: Path) -> dict[str, list[str]]:
    """name -> the hub ids its tasks read that are not in the cache (names with nothing missing left out);
    a name lmms-eval does not have maps to ["<not an lmms-eval task>"]."""
    missing = {}
    for name in names:
        try:
            absent = [d for d in benchmark_datasets(name, tasks_dir) if not dataset_cached(d, hub_cache, datasets_cache)]
        except LookupError:
            absent = ["<not an lmms-eval task>"]
        if absent:
            missing[name] = absent
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
    missing = missing_datasets(THESIS_TASKS, tasks_dir or lmms_eval_tasks_dir(), hub_cache, datasets_cache)
    if not missing:
        return DefaultTasks(THESIS_TASKS, local=False, why=f"the real benchmarks' datasets are in the Hugging Face cache ({hub_cache})")
    listed = "; ".join(f"{name}: {', '.join(ids)}" for name, ids in missing.items())
    why = (
        f"the real benchmarks cannot run offline, their datasets are not in the Hugging Face cache ({hub_cache}, {datasets_cache}): "
        f"{listed}; running the local task families instead (name the benchmarks with --tasks to download them)"
    )
    return DefaultTasks(LOCAL_TASKS, local=True, why=why)
