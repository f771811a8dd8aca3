"""lmms-msd bench with the graphed tree grower uncompiled (the previous release's growth): python bench_nogrowcompile.py bench-args..."""
import sys

import lmms_msd.speculative.fast.tree_growth as tg
from lmms_msd.commands.cli import main

init = tg.GraphedTreeGrower.__init__
tg.GraphedTreeGrower.__init__ = lambda self, drafter, spec, cuda_graphs, compile=False: init(self, drafter, spec, cuda_graphs, False)
print("GraphedTreeGrower uncompiled", flush=True)
sys.exit(main(sys.argv[1:]))
