"""The weight-bandwidth floor of one plain decoding step on this GPU: the bytes of weights a step reads
(every language-model layer's packed matrices and norms, the final norm and the LM head, as the static
target holds them) over the device's measured copy bandwidth (a 2 GiB device-to-device copy, timed with
CUDA events over 20 copies; it reads and writes, so bandwidth = 2 x bytes / time).

    python scripts/bandwidth_floor.py            # the bundled pair inflated to 7B's shape
    python scripts/bandwidth_floor.py --inflate ""   # the bundled pair as it is

On one H200 (benchmarks/h200_7b_compile, README "torch.compile"): 13.21 GB a step, 4267 GB/s, floor 3.10 ms.
"""

from __future__ import annotations

import argparse

import torch

from lmms_msd.commands.machine import copy_bandwidth
from lmms_msd.pipeline import RuntimeSettings, default_dtype, inflation_shape, load_decoder, resolve_pair


def step_weight_bytes(static_target) -> int:
    """Bytes of weights one plain step reads: every layer's norms and packed matrices, the final norm and the LM head."""
    per_layer = sum(
        t.numel() * t.element_size() for w in static_target.layers for t in (w.input_norm, w.qkv, w.o, w.post_norm, w.gate_up, w.down)
    )
    head = static_target.lm_head.numel() * static_target.lm_head.element_size()
    return per_layer + head + static_target.final_norm.numel() * static_target.final_norm.element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inflate", default="7b", help='the pair inflated to this shape ("7b", HIDDENxLAYERS, or "" for none) [7b]')
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bandwidth_floor: needs a CUDA device (it times device copies)")
    decoder = load_decoder(
        resolve_pair(None, None), RuntimeSettings("static", 1024), "cuda", default_dtype("cuda"), inflation_shape(args.inflate or None)
    )
    weights = step_weight_bytes(decoder.runtime.static_target)
    bandwidth = copy_bandwidth(decoder.target.device)
    print(f"weights read per plain step: {weights / 1e9:.2f} GB")
    print(f"device copy: {bandwidth / 1e9:.0f} GB/s -> weight floor {weights / bandwidth * 1e3:.3f} ms a step")


if __name__ == "__main__":
    main()
