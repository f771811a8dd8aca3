"""Fast generation on a GPU: static KV caches written by slot, CUDA graphs, one host read per step.

`StaticEngine` is a runtime for the loops of `lmms_msd.speculative.decoding` (the same outputs as
`EagerRuntime`): pass it as their `runtime` on CUDA for speed. On CPU it runs the same code without
graphs (tests). `BatchedStaticEngine` is its batched form (a `BatchedRuntime`: a cache row per
sequence, one forward for every row in flight), for `lmms_msd.speculative.batching.generate_batched`.
"""

from lmms_msd.speculative.fast.batched_engine import BatchedStaticEngine
from lmms_msd.speculative.fast.engine import StaticEngine

__all__ = ["BatchedStaticEngine", "StaticEngine"]
