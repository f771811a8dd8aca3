"""`lmms-msd make-data`: the testbed's training and eval data, for one task family or all five.

    lmms-msd make-data --family all --out data/mix --seed 0 --n 40000 --workers 16

Families: charts (ChartQA-like, `lmms_msd.testbed.charts`) and the four in `lmms_msd.testbed.families`
(mathvista, ai2d, mathverse, textvqa). One family writes its data folder at --out (the layout of
`lmms-msd make-charts`: images/, llava_train.json, llava_test.json, the eval parquet, meta.json).
`--family all` writes each family's folder under --out/<family>/ and then the mix at --out itself:

    llava_train.json, llava_test.json   every family's conversations, image paths and ids prefixed
                                        with "<family>/" (relative to --out, as LLaVA's files name images),
                                        each record with its "family"
    meta.json                           image_size, seed, and each family's meta.json

so `lmms-msd train-target --data <out>` trains on the mix as it trains on one family's folder.
--n is the number of training images per family (train questions per image: charts 2 by default,
ai2d and textvqa 2, mathvista and mathverse 1), --n-test the number of eval documents per family.
All families are drawn at --image-size (default 336, LLaVA-1.5's input).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from lmms_msd.testbed.families import FAMILY_NAMES, get_family
from lmms_msd.testbed.families.common import (
    DESIGN_SIZE,
    build_family_dataset,
    write_json,
)

log = logging.getLogger(__name__)

ALL_FAMILIES = ("charts", *FAMILY_NAMES)


def build_one(
    family: str, out_dir: Path, n_train: int, n_test: int, seed: int, *, image_size: int, workers: int,
    write_parquet: bool, questions_per_chart: int = 2, progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """One family's data folder at out_dir; returns its meta.json content."""
    if family == "charts":
        from lmms_msd.testbed.charts import build_chart_dataset

        return build_chart_dataset(
            out_dir, n_train, n_test, seed, image_size=image_size, questions_per_chart=questions_per_chart,
            workers=workers, write_parquet=write_parquet, progress=progress,
        )  # fmt: skip
    return build_family_dataset(
        get_family(family), out_dir, n_train, n_test, seed, image_size=image_size, workers=workers,
        write_parquet=write_parquet, progress=progress,
    )  # fmt: skip


def build_mix(
    out_dir: str | Path, n_train: int, n_test: int, seed: int = 0, *, families: tuple[str, ...] = ALL_FAMILIES,
    image_size: int = DESIGN_SIZE, workers: int = 1, write_parquet: bool = True, questions_per_chart: int = 2,
    progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Every family's folder under out_dir/<family>, then the combined conversation files and meta.json
    at out_dir (module docstring); returns the combined meta.json content."""
    out = Path(out_dir)
    metas: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for family in families:
        started = time.perf_counter()
        metas[family] = build_one(
            family, out / family, n_train, n_test, seed, image_size=image_size, workers=workers,
            write_parquet=write_parquet, questions_per_chart=questions_per_chart, progress=progress,
        )  # fmt: skip
        timings[family] = round(time.perf_counter() - started, 2)
    counts = {}
    for split in ("train", "test"):
        records = []
        for family in families:
            for record in json.loads((out / family / f"llava_{split}.json").read_text()):
                records.append({**record, "id": f"{family}/{record['id']}", "image": f"{family}/{record['image']}", "family": family})
        write_json(out / f"llava_{split}.json", records)
        counts[split] = {"conversations": len(records)}
    meta = {"mix": list(families), "seed": seed, "image_size": image_size, "counts": counts, "seconds": timings, "families": metas}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("wrote the mix %s: %s", out, counts)
    return meta


# ---- command line ---------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    parser.add_argument("--family", required=True, choices=[*ALL_FAMILIES, "all"], help="one family, or all five and their mix")
    parser.add_argument("--out", required=True, help="output folder (with --family all: one subfolder per family, plus the mix)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=40_000, help="training images per family (default 40000)")
    parser.add_argument("--n-test", type=int, default=300, help="eval documents per family, balanced by problem (default 300)")
    parser.add_argument("--image-size", type=int, default=DESIGN_SIZE, help=f"pixels per side (default {DESIGN_SIZE})")
    parser.add_argument("--questions-per-chart", type=int, default=2, help="charts only: training questions per chart (default 2)")
    parser.add_argument("--workers", type=int, default=1, help="drawing processes (default 1; the output does not depend on it)")
    parser.add_argument("--no-parquet", action="store_true", help="skip the eval parquet files (no `datasets` needed)")
    return run


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    common = {"image_size": args.image_size, "workers": args.workers, "write_parquet": not args.no_parquet,
              "questions_per_chart": args.questions_per_chart}  # fmt: skip
    if args.family == "all":
        build_mix(args.out, args.n, args.n_test, args.seed, **common)
        n_families = len(ALL_FAMILIES)
    else:
        build_one(args.family, Path(args.out), args.n, args.n_test, args.seed, **common)
        n_families = 1
    seconds = time.perf_counter() - started
    images = n_families * (args.n + args.n_test)
    log.info("%d images in %.1f s (%.0f images/s on %d workers)", images, seconds, images / seconds, args.workers)
    return 0
