"""The synthetic task families beside the charts, one module each, in the real benchmarks' schemas:

    mathvista  figures (rectangle, triangle, table, clock) and arithmetic on what they show
    ai2d       labelled diagrams (parts, food chains, cycles), multiple choice by option letter
    mathverse  one geometry problem in versions that move its information between text and image
    textvqa    scenes with rendered words and numbers, questions about the text

`common` holds what they share (the question record, the data folder writer, drawing helpers);
`lmms-msd make-data` (lmms_msd.testbed.make_data) writes them, the charts included.
"""

from __future__ import annotations

from lmms_msd.testbed.families.common import Family

FAMILY_NAMES = ("mathvista", "ai2d", "mathverse", "textvqa")


def get_family(name: str) -> Family:
    """The family called `name` (one of FAMILY_NAMES)."""
    import importlib

    if name not in FAMILY_NAMES:
        raise ValueError(f"unknown family {name!r}; the families are {list(FAMILY_NAMES)}")
    return importlib.import_module(f"lmms_msd.testbed.families.{name}").FAMILY
