"""The static target's matrix products, with one row's (plain decoding's step) by a Triton kernel on CUDA.

At one row a product is a matrix-vector product: it reads the weight once and does two flops a byte, so its
time is the weight's bytes over the bandwidth it reaches. cuBLAS reaches less than the device allows on the
7B shapes, most of all on the small ones (split-K kernels plus their reduce kernels for o and down). Measured
on the H200 over 32 layers of distinct weights, from CUDA graphs (`scripts/kernel_probes.py decode`, r42 in
`benchmarks/h200_7b_row_product/`): per layer, o [4096 x 4096] 13.65 us by cuBLAS and 10.91 by this kernel,
down [4096 x 11008] 28.19 and 24.95, q/k/v [12288 x 4096] 27.80 and 25.11, gate/up [22016 x 4096] 44.87 and
42.37, and the LM head [32000 x 4096] 65.87 and 59.96: the plain step's graph took 4.07 ms against 4.44.

The kernel (`_row_product_kernel`): each program owns BLOCK_N output rows and walks the reduction in BLOCK_K
chunks, multiplying in float32 into a [BLOCK_N, BLOCK_K] accumulator that it sums at the end, then rounds
once to the output's dtype. No atomics, so the same inputs give the same bits on every call. Products of two
float16 or bfloat16 values are exact in float32, so the result differs from the exact sum by the float32
additions (at most K * 2^-24 of the sum of |x_k w_k|) and the final rounding (half an ulp of the dtype).

`linear` is what the static target calls; everything else (several rows, CPU, shapes the blocks do not
divide) keeps the library's product, written as `(a[None] @ w.T)[0]`: that view keeps inductor from folding
a residual add that follows into an addmm, which cuBLAS runs at one row as a copy kernel and a split-K
product with a beta term (`benchmarks/h200_7b_batched_host/probes/gaps_plain.txt`); unfolded, the add joins
the next RMSNorm's kernel.
"""

from __future__ import annotations

import torch

from lmms_msd.speculative.fast.triton_support import run_kernel, tl, triton

MAX_BLOCK_K = 1024


def row_blocks(n: int, k: int) -> tuple[int, int] | None:
    """(BLOCK_N, BLOCK_K) for a [n, k] weight, or None where the kernel does not apply: BLOCK_K the largest
    power of two up to MAX_BLOCK_K that divides k (at least 64), BLOCK_N 4 for weights of at most 2^24
    elements and 2 above (the H200 sweep's best, `benchmarks/h200_7b_row_product/`), dividing n.
    Example: o [4096, 4096] -> (4, 1024); down [4096, 11008] -> (2, 256); n = 4097 -> None."""
    block_k = MAX_BLOCK_K
    while block_k >= 64 and k % block_k:
        block_k //= 2
    block_n = 4 if n * k <= 1 << 24 else 2
    if block_k < 64 or n % block_n:
        return None
    return block_n, block_k


if triton is not None:

    @triton.jit
    def _row_product_kernel(x_ptr, w_ptr, out_ptr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[i] = sum_k x[k] * w[i, k] for this program's BLOCK_N rows i; w row-major [N, K], K % BLOCK_K == 0."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + rows[:, None] * K + cols[None, :])
            x = tl.load(x_ptr + cols)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty))


def launch_row_product(x: torch.Tensor, weight: torch.Tensor, blocks: tuple[int, int]) -> torch.Tensor:
    """The kernel over x [K] and a contiguous weight [N, K] with `row_blocks`' blocks -> [N] in x's dtype.
    Runs wherever Triton runs, its interpreter on CPU included (TRITON_INTERPRET=1, the tests)."""
    assert triton is not None, "Triton is not installed"
    assert x.dim() == 1 and weight.dim() == 2 and weight.shape[1] == x.shape[0], f"x {tuple(x.shape)}, weight {tuple(weight.shape)}"
    assert weight.is_contiguous() and x.is_contiguous(), "the kernel reads row-major, contiguous operands"
    block_n, block_k = blocks
    out = x.new_empty(weight.shape[0])
    _row_product_kernel[(weight.shape[0] // block_n,)](
        x, weight, out, K=weight.shape[1], BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=3
    )
    return out


@torch.library.custom_op("lmms_msd::row_product", mutates_args=(), device_types="cuda")
def row_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [K] @ weight.T -> [N] by `_row_product_kernel` (an operator of its own, so that torch.compile calls
    it as it is and CUDA graphs capture its launch). Where Triton cannot run, the library's product
    (`triton_support.run_kernel`)."""
    return run_kernel(
        "one-row products", x.device, lambda: launch_row_product(x, weight, row_blocks(*weight.shape)),
        lambda: x @ weight.T, "cuBLAS",
    )  # fmt: skip


@row_product.register_fake
def _(x, weight):
    return x.new_empty(weight.shape[0])


def linear(a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """a @ weight.T. a: [..., K]; weight: [N, K] -> [..., N]. One row on CUDA with Triton and a contiguous
    weight whose shape `row_blocks` takes: `row_product`; otherwise the library's product through a view of
    `a` (see the module's docstring)."""
    if (
        triton is not None and a.is_cuda and a.numel() == a.shape[-1] and weight.is_contiguous()
        and row_blocks(*weight.shape) is not None
    ):  # fmt: skip
        return row_product(a.reshape(-1).contiguous(), weight).view(*a.shape[:-1], weight.shape[0])
    return (a[None] @ weight.T)[0]
