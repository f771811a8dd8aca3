"""The draft's k best tokens and their log-probabilities over the vocabulary, by two Triton kernels on CUDA.

Each level of a graphed tree (`tree_growth`, `batched_growth`) turns the draft's LM-head logits [n, V] (a level's
k frontier rows, V = 32000 for LLaVA-1.5) into log-probabilities and takes their top k. In the library that is a
float32 copy, a log-softmax and a multi-block top-k: some 17 kernels and 45-50 us of a level's 0.42 ms on the
H200 (`benchmarks/h200_7b_row_product/r42/step_probe.txt`), where the logits are only n * V * 2 bytes.

Here (`logprob_topk`) it is two kernels:

1. `_chunk_kernel`, one program per (row, chunk of BLOCK logits): the chunk's max m_c, its sum
   s_c = sum exp(x - m_c), and its k largest logits (k rounds of max-and-remove) with their token ids.
2. `_merge_kernel`, one program per row: the log-sum-exp lse = M + log(sum_c s_c exp(m_c - M)), M = max_c m_c,
   and the k largest of the chunks' candidates, each returned as x - lse (float32) with its token id.

Order: descending value, and among equal values the smaller token id first (each round takes the leftmost
maximum: within a chunk by position, across chunks by chunk), as a stable sort orders them (`tree`'s rule for
equal scores). Worked example: logits [2, 5, 5, 1] with BLOCK = 2, k = 2: chunk 0 gives (5 @ 1, 2 @ 0), chunk 1
(5 @ 2, 1 @ 3); the merge takes 5 @ 1, then 5 @ 2; lse = log(e^2 + 2 e^5 + e^1) = 5.7266; values -0.7266 twice.

The values differ from `torch.log_softmax(x.float()).topk(k)`'s only in the float32 roundings of the sums (in
another order) and of exp/log, so a tree can differ where two candidates' scores tie to within them; a
generation's tokens cannot (verification decides them). Off CUDA, without Triton, or for shapes the kernels do
not take (k > MAX_K), `logprob_topk` is the library's computation exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lmms_msd.speculative.fast.triton_support import run_kernel, tl, triton

BLOCK = 2048  # logits per chunk program
MAX_K = 32  # the kernels unroll k rounds


class TopK(NamedTuple):
    values: torch.Tensor  # [..., k] float32 log-probabilities, descending
    indices: torch.Tensor  # [..., k] long token ids


def library_logprob_topk(logits: torch.Tensor, k: int) -> TopK:
    """The library's computation: log-softmax in float32 over the last dimension, then its top k."""
    top = torch.log_softmax(logits.float(), dim=-1).topk(k)
    return TopK(top.values, top.indices)


if triton is not None:

    @triton.jit
    def _chunk_kernel(logits_ptr, values_ptr, ids_ptr, max_ptr, sum_ptr, V, CHUNKS, K: tl.constexpr, BLOCK: tl.constexpr):
        """Row `program_id(0)`, chunk `program_id(1)`: its max, sum of exp(x - max) and k best (value, id)."""
        row, chunk = tl.program_id(0), tl.program_id(1)
        place = tl.arange(0, BLOCK)
        cols = chunk * BLOCK + place
        x = tl.load(logits_ptr + row * V + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        top = tl.max(x, axis=0)
        tl.store(max_ptr + row * CHUNKS + chunk, top)
        tl.store(sum_ptr + row * CHUNKS + chunk, tl.sum(tl.exp(x - top), axis=0))
        out = (row * CHUNKS + chunk) * K
        for i in tl.static_range(K):
            value, at = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
            tl.store(values_ptr + out + i, value)
            tl.store(ids_ptr + out + i, chunk * BLOCK + at)
            x = tl.where(place == at, float("-inf"), x)

    @triton.jit
    def _merge_kernel(
        values_ptr, ids_ptr, max_ptr, sum_ptr, out_values_ptr, out_ids_ptr, CHUNKS,
        K: tl.constexpr, CHUNKS_P2: tl.constexpr, CANDIDATES_P2: tl.constexpr,
    ):  # fmt: skip
        """Row `program_id(0)`: its log-sum-exp from the chunks' (max, sum), and the k best of their candidates."""
        row = tl.program_id(0)
        chunk = tl.arange(0, CHUNKS_P2)
        maxes = tl.load(max_ptr + row * CHUNKS + chunk, mask=chunk < CHUNKS, other=float("-inf"))
        sums = tl.load(sum_ptr + row * CHUNKS + chunk, mask=chunk < CHUNKS, other=0.0)
        top = tl.max(maxes, axis=0)
        lse = top + tl.log(tl.sum(sums * tl.exp(maxes - top), axis=0))
        place = tl.arange(0, CANDIDATES_P2)
        first = row * CHUNKS * K
        x = tl.load(values_ptr + first + place, mask=place < CHUNKS * K, other=float("-inf"))
        for i in tl.static_range(K):
            value, at = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
            tl.store(out_values_ptr + row * K + i, value - lse)
            tl.store(out_ids_ptr + row * K + i, tl.load(ids_ptr + first + at))
            x = tl.where(place == at, float("-inf"), x)


def launch_logprob_topk(logits: torch.Tensor, k: int, block: int = BLOCK) -> TopK:
    """The two kernels over logits [n, V] (contiguous, V >= k, k <= MAX_K) -> TopK [n, k]. Runs wherever
    Triton runs, its interpreter on CPU included (TRITON_INTERPRET=1, the tests)."""
    assert triton is not None, "Triton is not installed"
    n, vocab = logits.shape
    assert logits.is_contiguous() and 1 <= k <= min(MAX_K, vocab), f"logits {tuple(logits.shape)}, k = {k}"
    chunks = triton.cdiv(vocab, block)
    f32 = dict(dtype=torch.float32, device=logits.device)
    values = torch.empty(n, chunks, k, **f32)
    ids = torch.empty(n, chunks, k, dtype=torch.int32, device=logits.device)
    maxes, sums = torch.empty(n, chunks, **f32), torch.empty(n, chunks, **f32)
    out = TopK(torch.empty(n, k, **f32), torch.empty(n, k, dtype=torch.long, device=logits.device))
    if n:
        _chunk_kernel[(n, chunks)](logits, values, ids, maxes, sums, vocab, chunks, K=k, BLOCK=block, num_warps=4)
        _merge_kernel[(n,)](
            values, ids, maxes, sums, out.values, out.indices, chunks, K=k,
            CHUNKS_P2=triton.next_power_of_2(chunks), CANDIDATES_P2=triton.next_power_of_2(chunks * k), num_warps=4,
        )  # fmt: skip
    return out


@torch.library.custom_op("lmms_msd::logprob_topk", mutates_args=(), device_types="cuda")
def _logprob_topk_op(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`launch_logprob_topk` as an operator of its own (torch.compile calls it as it is, CUDA graphs capture
    its launches); where Triton cannot run, the library's computation (`triton_support.run_kernel`)."""
    return tuple(
        run_kernel(
            "the draft's vocabulary top-k", logits.device, lambda: launch_logprob_topk(logits, k),
            lambda: library_logprob_topk(logits, k), "log_softmax and topk",
        )
    )  # fmt: skip


@_logprob_topk_op.register_fake
def _(logits, k):
    return logits.new_empty(logits.shape[0], k, dtype=torch.float32), logits.new_empty(logits.shape[0], k, dtype=torch.long)


def logprob_topk(logits: torch.Tensor, k: int) -> TopK:
    """The k best tokens of each row of logits [..., V] and their log-probabilities (float32) -> TopK [..., k]:
    `torch.log_softmax(logits.float(), -1).topk(k)` up to the float32 roundings (the module's docstring). The
    kernels on CUDA with Triton and k <= MAX_K; the library's computation otherwise."""
    vocab = logits.shape[-1]
    if triton is None or not logits.is_cuda or not 1 <= k <= min(MAX_K, vocab):
        return library_logprob_topk(logits, k)
    values, indices = _logprob_topk_op(logits.reshape(-1, vocab).contiguous(), k)
    shape = (*logits.shape[:-1], k)
    return TopK(values.view(shape), indices.view(shape))


def draft_topk(lm_head: torch.nn.Linear, hidden: torch.Tensor, k: int) -> TopK:
    """hidden: [..., H] draft outputs -> their k best tokens through the target's lm_head (`logprob_topk`):
    `drafting.draft_logprobs(lm_head, hidden).topk(k)` with the log-softmax and the top-k fused."""
    return logprob_topk(lm_head(hidden.to(lm_head.weight.dtype)), k)
