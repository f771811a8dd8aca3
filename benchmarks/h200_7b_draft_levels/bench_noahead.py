"""lmms-msd bench with the graphed grower not running ahead (the previous release): python bench_noahead.py bench-args..."""
import sys
from functools import partial

import lmms_msd.speculative.fast.engine as engine_module
from lmms_msd.commands.cli import main
from lmms_msd.speculative.fast.tree_growth import GraphedTreeGrower

engine_module.GraphedTreeGrower = partial(GraphedTreeGrower, run_ahead=False)
print("GraphedTreeGrower run_ahead=False", flush=True)
sys.exit(main(sys.argv[1:]))
