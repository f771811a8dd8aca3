"""Fast generation on a GPU: static KV caches written by slot, CUDA graphs, one host read per step.

`StaticEngine` runs the same algorithms as `lmms_msd.speculative.decoding` (and gives the same outputs); use it
on CUDA for speed. On CPU it runs the same code without graphs (tests).
"""

from lmms_msd.speculative.fast.engine import StaticEngine

__all__ = ["StaticEngine"]
