"""Modality-aware speculative decoding (MSD) for LLaVA-1.5, lossless and fast.

The library loads a LLaVA-1.5 target and an MSD draft head and generates with them speculatively,
producing exactly what plain decoding produces. It does not import lmms-eval; the lmms-eval plugin is
a thin adapter over it.
"""

__version__ = "0.1.0"
