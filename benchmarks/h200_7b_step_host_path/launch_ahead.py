"""Queuing a tree level ahead of the read that decides it (tried in 840fdbb, measured slower in r48/r49, reverted in
88e2958): OPT-Tree's expected length per level on real trees, and what each margin would queue ahead and waste.
840fdbb queued the next level when the last gain read exceeded stop_delta by 0.3 (`LAUNCH_AHEAD_MARGIN`, from this).

Runs on CPU (the bundled pair in float32; the 7B-inflated pair on a GPU has the same outputs up to rounding): the
static engine without graphs decodes the first N long-answer requests with OPT-Tree at stop_delta 0.6 and records,
per tree, the levels grown and the expected length after each. Then, for each margin m, at every read that decides
a further level: the level is queued ahead when the last gain read exceeds stop_delta by more than m; it counts as
hidden (the device did not wait for the read) when the tree then grew it, as wasted when the read stopped the tree.
usage (repository root): python benchmarks/h200_7b_step_host_path/launch_ahead.py [N] > launch_ahead.txt
"""

import sys
from collections import Counter
from pathlib import Path

import torch

import lmms_msd.speculative.decoding as D
from lmms_msd.commands.bench import requests_from_task
from lmms_msd.pipeline import PairSettings, RuntimeSettings, TreeSettings, build_decoder, build_tree, load_pair, resolve_pair
from lmms_msd.speculative.fast.tree_growth import GraphedTreeGrower

torch.set_num_threads(1)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
delta = 0.6
paths = resolve_pair(None, None)
pair = load_pair(PairSettings(paths.pretrained, paths.msd_model_path, "cpu", "float32"))
dec = build_decoder(pair, RuntimeSettings("static", 1024))
spec = build_tree(TreeSettings(kind="opt", stop_delta=delta), dec).builder
reqs, config = requests_from_task("msd_chartqa_synth_long", Path("tasks"), n)
trees = []  # (levels grown, expected length by depth)
build = GraphedTreeGrower.build


def recorded(self, *args, **kwargs):
    out = build(self, *args, **kwargs)
    grown = self.drafter.tree_used // self.spec.top_k + 1
    trees.append((grown, [0.0] + self.expected[1 : grown + 1].tolist()))
    return out


GraphedTreeGrower.build = recorded
for request in reqs:
    D.speculative_generate(dec.runtime, dec.target.prepare(request.context, request.images), config, spec)
print(f"{len(trees)} trees of {spec}")
print("levels grown: trees", sorted(Counter(g for g, _ in trees).items()))
print("gains of the first 5 trees:", [[round(e[d + 1] - e[d], 3) for d in range(1, g)] for g, e in trees[:5]])
print("margin  queued ahead and grown / tree  queued ahead in vain / tree  (of reads deciding a level / tree)")
for margin in (0.0, 0.1, 0.2, 0.3, 0.4):
    hidden = wasted = reads = 0
    for grown, e in trees:
        for d in range(1, min(grown, spec.max_depth - 1)):  # the read after level d decides level d + 1
            reads += 1
            if e[d] - e[d - 1] - delta > margin:  # the last gain read before it
                hidden += d + 1 <= grown - 1
                wasted += d + 1 > grown - 1
    print(f"{margin:6.1f}  {hidden / len(trees):30.2f}  {wasted / len(trees):28.3f}  ({reads / len(trees):.2f})")
