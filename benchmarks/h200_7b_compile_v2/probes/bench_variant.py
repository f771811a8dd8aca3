"""lmms-msd bench with static_target.EAGER_ATTENTION_ROWS set: python bench_variant.py LEAST MOST bench-args..."""
import sys

import lmms_msd.speculative.fast.static_target as st
from lmms_msd.commands.cli import main

st.EAGER_ATTENTION_ROWS = (int(sys.argv[1]), int(sys.argv[2]))
print("EAGER_ATTENTION_ROWS", st.EAGER_ATTENTION_ROWS, flush=True)
sys.exit(main(sys.argv[3:]))
