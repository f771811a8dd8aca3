"""Speculative decoding: the loops (`decoding`: one request; `batching`: many at once, continuous
batching) over a runtime (`runtime`: the interfaces and the eager one; `fast`: the static CUDA-graph
ones), the draft tree (`tree`), the draft's forwards (`drafting`), verification (`verify`), sampling
(`sampling`) and stop criteria (`stopping`).
"""
