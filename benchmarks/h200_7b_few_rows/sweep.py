"""The sweep behind "a few rows by a Triton kernel: not adopted" (r55, README beside this file): the products of a draft
tree level (10 rows) and of a tree's verification (64 rows) on the 7B shapes (q/k/v packed, o, gate/up packed, down, the
LM head, the draft's fuse [4096 x 8192]), 32 weights of each so that nothing is served from L2, from a CUDA graph: cuBLAS
against a Triton kernel (`rows_product`, tensor cores, optional split-K with an ordered float32 sum) at every
(BLOCK_N, BLOCK_K, SPLIT, num_stages) of a grid. Prints the three best blocks per shape and row count and the blocks best
over all six shapes; --csv writes every timing.

usage, from the repository root on a CUDA machine: python benchmarks/h200_7b_few_rows/sweep.py --csv rows.csv
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, "scripts")
from kernel_probes import replayed_us  # noqa: E402


@triton.jit
def rows_product_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K, K_SPLIT,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """out[m, n] = sum_k x[m, k] * w[n, k] over this program's BLOCK_N weight rows and its K_SPLIT-long piece of the
    reduction (program_id(1)), taken as w @ x.T so that the weight's rows fill the tensor cores' long side. SPLIT 1:
    rounded into out [M, N]; else float32 partials into out [SPLIT, M, N]."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    k = tl.program_id(1) * K_SPLIT + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + n[:, None] * K + k[None, :]
    x_ptrs = x_ptr + m[None, :] * K + k[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for _ in range(0, K_SPLIT, BLOCK_K):
        acc = tl.dot(tl.load(w_ptrs), tl.load(x_ptrs, mask=m[None, :] < M, other=0.0), acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    places = m[None, :] * N + n[:, None]
    if SPLIT == 1:
        tl.store(out_ptr + places, acc.to(out_ptr.dtype.element_ty), mask=m[None, :] < M)
    else:
        tl.store(out_ptr + tl.program_id(1) * M * N + places, acc, mask=m[None, :] < M)


@triton.jit
def sum_splits_kernel(part_ptr, out_ptr, SIZE, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = part[0, i] + part[1, i] + ... in that order (float32), rounded once."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.load(part_ptr + i, mask=i < SIZE)
    for s in tl.static_range(1, SPLIT):
        acc += tl.load(part_ptr + s * SIZE + i, mask=i < SIZE)
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=i < SIZE)


def rows_product(x, weight, blocks):
    """x [M, K] @ weight.T with blocks (BLOCK_N, BLOCK_K, SPLIT, num_stages, num_warps) -> [M, N]."""
    block_n, block_k, split, stages, warps = blocks
    (m, k), n = x.shape, weight.shape[0]
    out = x.new_empty(m, n) if split == 1 else x.new_empty(split, m, n, dtype=torch.float32)
    rows_product_kernel[(n // block_n, split)](
        x, weight, out, m, n, k, k // split, BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n,
        BLOCK_K=block_k, SPLIT=split, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if split == 1:
        return out
    summed = x.new_empty(m, n)
    sum_splits_kernel[(triton.cdiv(m * n, 1024),)](out, summed, m * n, SPLIT=split, BLOCK=1024)
    return summed


SHAPES = (("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008),
          ("lm_head", 32000, 4096), ("fuse", 4096, 8192))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", type=Path, default=None)
    csv = parser.parse_args().csv
    device, layers = torch.device("cuda"), 32
    half = dict(device=device, dtype=torch.float16)
    torch.manual_seed(0)
    grid = list(itertools.product((32, 64, 128), (64, 128, 256), (1, 2, 4, 8), (3, 5), (4,)))
    lines = ["shape,rows,kernel,block_n,block_k,split,stages,warps,us,tb_s,max_diff"]
    totals = {}  # (rows, blocks) -> us per shape that the blocks tile
    for name, n, k in SHAPES:
        weights = [torch.randn(n, k, **half) * 0.02 for _ in range(layers)]
        tb = n * k * 2 / 1e6
        for m in (10, 64):
            x = torch.randn(m, k, **half)
            library = torch.stack([x @ w.T for w in weights])
            cublas = replayed_us(lambda x=x, weights=weights: torch.stack([x @ w.T for w in weights]), device, calls=20) / layers
            lines.append(f"{name},{m},cublas,,,,,,{cublas:.2f},{tb / cublas:.2f},0")
            timed = []
            for blocks in grid:
                block_n, block_k, split = blocks[:3]
                if n % block_n or k % (split * block_k):
                    continue
                try:
                    out = torch.stack([rows_product(x, w, blocks) for w in weights])
                    run = lambda x=x, blocks=blocks, weights=weights: torch.stack([rows_product(x, w, blocks) for w in weights])  # noqa: E731
                    us = replayed_us(run, device, calls=20) / layers
                except Exception as error:  # noqa: BLE001 (a block shape that does not fit: skip it)
                    print(f"  {name} rows {m} blocks {blocks} failed: {type(error).__name__}: {str(error)[:120]}", flush=True)
                    continue
                diff = (out.float() - library.float()).abs().max().item()
                timed.append((us, blocks, diff))
                totals.setdefault((m, blocks), []).append(us)
                lines.append(f"{name},{m},triton,{','.join(map(str, blocks))},{us:.2f},{tb / us:.2f},{diff:.1e}")
            timed.sort()
            best = ", ".join(f"{b} {us:.2f} us ({tb / us:.2f} TB/s, diff {d:.0e})" for us, b, d in timed[:3])
            print(f"{name:8s} [{n:5d} x {k:5d}] rows {m:2d}: cuBLAS {cublas:6.2f} us ({tb / cublas:.2f} TB/s); best {best}", flush=True)
        del weights
        torch.cuda.empty_cache()
    for m in (10, 64):
        complete = sorted((sum(us), b) for (rows, b), us in totals.items() if rows == m and len(us) == len(SHAPES))
        print(f"rows {m}: blocks best over all six shapes (sum of us): " + ", ".join(f"{b} {us:.1f}" for us, b in complete[:5]))
    if csv is not None:
        csv.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
