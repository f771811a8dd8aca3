"""The `lmms-msd` command line.

`lmms-msd --help` lists the subcommands; `lmms-msd --version` prints `lmms-msd <version>`.

Adding a subcommand: write, next to the code it drives, a builder

    def add_arguments(parser: argparse.ArgumentParser) -> Handler:
        parser.add_argument(...)
        return run          # run(args: argparse.Namespace) -> int, the exit status

and name it in the table inside `_subcommands`. Builders should import only what defining the
arguments needs, and leave heavy imports (torch, transformers) to the handler, so `--help` stays fast.

Usage errors (unknown options, a missing subcommand) go to stderr with exit status 2, as argparse does.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, NamedTuple, Sequence

from lmms_msd import __version__

Handler = Callable[[argparse.Namespace], int]
Builder = Callable[[argparse.ArgumentParser], Handler]

PROG = "lmms-msd"


class Subcommand(NamedTuple):
    """One entry of the subcommand table."""

    help: str  # one line, shown in `lmms-msd --help`
    build: Builder  # adds the subcommand's arguments and returns its handler


def _subcommands() -> dict[str, Subcommand]:
    """The subcommand table: name -> Subcommand, in the order `--help` lists them."""
    from lmms_msd.commands import (
        bench,
        calibrate,
        compare_runs,
        demo,
        regression,
        reproduce,
    )
    from lmms_msd.testbed import (
        charts,
        draft_training,
        make_data,
        report,
        target_training,
    )

    return {
        "demo": Subcommand("plain vs speculative decoding on a tiny LLaVA made on the spot (no downloads)", demo.add_demo_arguments),
        "generate": Subcommand("plain vs speculative decoding on a target and MSD draft you name", demo.add_generate_arguments),
        "make-data": Subcommand("write the testbed's synthetic data: charts, mathvista, ai2d, mathverse, textvqa or all (LLaVA conversations, benchmark-schema parquet)", make_data.add_arguments),
        "make-charts": Subcommand("the chart family alone, with its own options (make-data --family charts at 128 px by default)", charts.add_arguments),
        "train-target": Subcommand("train the testbed's miniature LLaVA target on the chart data", target_training.add_arguments),
        "train-draft": Subcommand("train an MSD draft head for a target on LLaVA conversation data", draft_training.add_arguments),
        "calibrate": Subcommand("fit the acceptance calibrator on a pair's observations; report ECE/Brier raw vs calibrated", calibrate.add_arguments),
        "regression": Subcommand("CI regression: the bundled pair on the CI tasks vs the committed baseline", regression.add_arguments),
        "reproduce": Subcommand("the thesis tables: plain, EAGLE-2, + OPT-Tree, + calibrator on lmms-eval tasks at temperatures 0 and 1", reproduce.add_arguments),
        "bench": Subcommand("time plain vs speculative decoding (each tree, with and without the calibrator) on the same prompts", bench.add_arguments),
        "compare-runs": Subcommand("lmms-eval on 1 vs N data-parallel processes (GPUs): answers per doc_id, score, docs/s, tokens/s, tau", compare_runs.add_arguments),
        "testbed-report": Subcommand("accuracy, tau/alpha and acceptance by token type of a pair on the chart test split", report.add_arguments),
    }


def build_parser() -> argparse.ArgumentParser:
    """The full parser: global options plus one subparser per entry of `_subcommands()`."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Lossless speculative decoding for LLaVA-1.5 with an MSD draft head.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, subcommand in _subcommands().items():
        sub = commands.add_parser(name, help=subcommand.help, description=subcommand.help)
        sub.set_defaults(handler=subcommand.build(sub))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on `argv` (default: `sys.argv[1:]`) and return the exit status.

    `--help`, `--version` and usage errors end in `SystemExit` (status 0, 0 and 2), as argparse does.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command is None:
        parser.error(f"no command given; run '{PROG} --help' to see the commands")
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
