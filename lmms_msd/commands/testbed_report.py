"""`lmms-msd testbed-report`: what a pair (the bundled miniature by default) does on each task family.

    lmms-msd testbed-report --limit 20 --output build/reports/testbed_report

For each family (chartqa, mathvista, ai2d, mathverse, textvqa) it reads the local lmms-eval tasks
`msd_<family>_synth` (short answers) and `msd_<family>_synth_long` (long answers) from the repository's
tasks/ (`--tasks_dir`), each through lmms-eval's own task code: the same prompt, image, generation
settings and scorer as an lmms-eval run, the score being the task's primary metric (the first of its
YAML's metric_list). The documents are the tasks' own parquet files (tasks/data), or those of a
`lmms-msd make-data` folder (`--data_dir`: a family's folder, or the folder of `--family all`, whose
family folders are charts/, mathvista/, ...). `lmms_msd.testbed.report` says what is measured.

Writes OUTPUT.json (every figure, and each answer by doc_id) and OUTPUT.md (the tables).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from lmms_msd.commands.reproduce import parse_temperatures

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
# family -> its folder in a `make-data --family all` output
FAMILIES = {"chartqa": "charts", "mathvista": "mathvista", "ai2d": "ai2d", "mathverse": "mathverse", "textvqa": "textvqa"}


def family_tasks(family: str) -> tuple[str, str]:
    """The short- and long-answer tasks of a family: "ai2d" -> ("msd_ai2d_synth", "msd_ai2d_synth_long")."""
    return f"msd_{family}_synth", f"msd_{family}_synth_long"


def find_data_file(data_dir: Path, family: str, name: str) -> Path:
    """The parquet file `name` of a make-data folder: data_dir/name (one family's folder) or
    data_dir/<family folder>/name (the folder of `--family all`)."""
    candidates = [data_dir / name, data_dir / FAMILIES[family] / name]
    for path in candidates:
        if path.is_file():
            return path
    raise SystemExit(
        f"lmms-msd testbed-report: no {name} for family {family} at {' or '.join(map(str, candidates))}; write it with "
        f"`lmms-msd make-data --family {FAMILIES[family]} --out DIR --n 0 --n-test 60` (needs the `datasets` package), "
        "or leave out --data_dir to read the tasks' own data"
    )


def parse_families(text: str) -> list[str]:
    names = [f.strip() for f in text.split(",") if f.strip()]
    unknown = sorted(set(names) - set(FAMILIES))
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"--families takes names from {list(FAMILIES)} separated by commas; got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser):
    from lmms_msd.pipeline import default_device

    parser.add_argument("--pretrained", default=None, help="target folder (default: the bundled miniature)")
    parser.add_argument("--msd_model_path", default=None, help="draft folder (default: the bundled miniature's)")
    parser.add_argument("--tasks_dir", type=Path, default=REPO / "tasks", help="the repository's tasks/ (the task YAMLs) [%(default)s]")
    parser.add_argument(
        "--data_dir", type=Path, default=None,
        help="a `lmms-msd make-data` folder whose eval parquet files replace the tasks' own (default: the tasks' data, tasks/data)",
    )  # fmt: skip
    parser.add_argument("--families", type=parse_families, default=list(FAMILIES), help=f"comma-separated (default {','.join(FAMILIES)})")
    parser.add_argument("--limit", type=int, default=20, help="documents per task, the first ones (0: all) [20]")
    parser.add_argument("--temperatures", type=parse_temperatures, default=[0.0], help="speculative decoding's temperatures (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling: document d draws from a generator seeded with seed + d [0]")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--output", type=Path, default=Path("testbed_report"), help="writes OUTPUT.json and OUTPUT.md")
    return run


def load_family(tasks_dir: Path, family: str, data_dir: Path | None, limit: int | None) -> tuple[str, list[Any], list[Any]]:
    """(the primary metric, the short-answer documents, the long-answer documents) of a family's tasks."""
    from lmms_msd.lmms_eval.metrics import primary_metric_name
    from lmms_msd.lmms_eval.tasks import data_file_name, load_task, task_documents

    documents, metrics = [], []
    for name in family_tasks(family):
        yaml_path = tasks_dir / f"{name}.yaml"
        data_file = None if data_dir is None else find_data_file(data_dir, family, data_file_name(yaml_path))
        task = load_task(yaml_path, data_file)
        documents.append(task_documents(task, limit))
        metrics.append(primary_metric_name(vars(task.config)))
    if metrics[0] != metrics[1]:
        raise SystemExit(f"lmms-msd testbed-report: {family}'s tasks score by different metrics {metrics}; the report puts them in one column")
    return metrics[0], documents[0], documents[1]


def run(args: argparse.Namespace) -> int:
    from lmms_msd.pipeline import (
        RuntimeSettings,
        load_decoder,
        resolve_pair,
    )
    from lmms_msd.testbed.report import TREE, family_report, to_markdown

    if args.limit < 0:
        raise SystemExit(f"lmms-msd testbed-report: --limit must be >= 0 (0: all), got {args.limit}")
    if not args.tasks_dir.is_dir():
        raise SystemExit(f"lmms-msd testbed-report: no tasks folder at {args.tasks_dir}; pass the repository's tasks/ with --tasks_dir")
    try:
        pair = resolve_pair(args.pretrained, args.msd_model_path)
    except ValueError as error:
        raise SystemExit(f"lmms-msd testbed-report: {error}") from error
    decoder = load_decoder(pair, RuntimeSettings(), args.device, "float32")
    report: dict[str, Any] = {
        "pretrained": pair.pretrained, "msd_model_path": pair.msd_model_path, "tasks_dir": str(args.tasks_dir),
        "data_dir": None if args.data_dir is None else str(args.data_dir), "limit": args.limit or None,
        "temperatures": args.temperatures, "seed": args.seed, "tree": f"eagle2 (total_tokens {TREE.total_tokens}, depth {TREE.depth}, top_k {TREE.top_k})", "families": {},
    }  # fmt: skip
    for family in args.families:
        started = time.perf_counter()
        metric, short, long = load_family(args.tasks_dir, family, args.data_dir, args.limit or None)
        figures = family_report(decoder, short, long, args.temperatures, args.seed)
        report["families"][family] = {"tasks": list(family_tasks(family)), "metric": metric, **figures, "seconds": round(time.perf_counter() - started, 1)}
        log.info("%s: done in %.0f s", family, time.perf_counter() - started)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = to_markdown(report)
    args.output.with_suffix(".md").write_text(markdown)
    print(markdown)
    return 0
