"""Speculative decoding: the loops (`decoding`) over a runtime (`runtime`: the interface and the eager
one; `fast`: the static CUDA-graph one), the draft tree (`tree`), the draft's forwards (`drafting`),
verification (`verify`), sampling (`sampling`) and stop criteria (`stopping`).
"""
