"""scripts/predicted_accepted.py with another rule for a row of siblings' calibrated predictions (the experiments
of README "Sibling predictions normalised"; `CalibratedScorer` itself scores each child on its own).

    VARIANT=scale  each row scaled down to sum 1 when it sums to more (the scorer before the depth buckets)
    VARIANT=others the row's most likely child kept, the others scaled into what it leaves (1 - top)

    VARIANT=scale OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/cpu_predicted_accepted/depth_buckets/variant.py \\
        --limit 6 --trees weight_cost,weight_delta --output_dir build/variant_scale \\
        --calibrator benchmarks/cpu_predicted_accepted/depth_buckets/calibrator_depth.json
"""

import os
import sys

import torch

from lmms_msd.calibration import scorer as scorer_module

sys.path.insert(0, "scripts")
import predicted_accepted

VARIANT = os.environ["VARIANT"]
assert VARIANT in ("scale", "others"), f"VARIANT must be scale or others, got {VARIANT!r}"


def call(self, logprobs, tokens, depth, visual):
    row_visual = None if visual is None else visual[:, None].expand_as(logprobs)
    predicted = self.predictor(logprobs.exp(), self.token_types[tokens], row_visual, depth).clamp(min=self.floor, max=1.0)
    if VARIANT == "scale":
        out = predicted / predicted.sum(dim=1, keepdim=True).clamp(min=1.0)
    else:
        top = torch.zeros_like(predicted, dtype=torch.bool).scatter_(1, predicted.argmax(dim=1, keepdim=True), True)
        top_value = (predicted * top).sum(dim=1, keepdim=True)
        rest = (predicted * ~top).sum(dim=1, keepdim=True)
        scale = ((1 - top_value).clamp(min=0) / rest.clamp(min=1e-12)).clamp(max=1.0)
        out = torch.where(top, predicted, (predicted * scale).clamp(min=self.floor))
    return out.log().to(logprobs.dtype)


scorer_module.CalibratedScorer.__call__ = call
sys.exit(predicted_accepted.main(sys.argv[1:]))
