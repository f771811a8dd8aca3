"""The one-row product kernel (`lmms_msd.speculative.fast.row_product`): its blocks, and its sums against float64.

The kernel runs here through Triton's interpreter (TRITON_INTERPRET=1, set before Triton is imported, hence a
child process); on CUDA the static target calls it for plain decoding's step (`linear`)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lmms_msd.speculative.fast.row_product import linear, row_blocks

triton = pytest.importorskip("triton")


def test_row_blocks_follow_the_docstrings_examples():
    assert row_blocks(4096, 4096) == (4, 1024)  # o: 2^24 elements, four rows a program
    assert row_blocks(4096, 11008) == (2, 256)  # down: 11008 = 43 * 256
    assert row_blocks(12288, 4096) == (2, 1024)  # q/k/v packed
    assert row_blocks(32000, 4096) == (2, 1024)  # the LM head
    assert row_blocks(4097, 4096) is None  # no block of rows divides 4097
    assert row_blocks(64, 96) is None  # 96 = 32 * 3: no power of two >= 64 divides it


CHILD = r"""
import json, sys, torch
from lmms_msd.speculative.fast.row_product import launch_row_product, row_blocks
torch.manual_seed(0)
cases = []
for n, k, blocks in ((64, 256, None), (32, 192, None), (8, 128, (2, 64))):
    blocks = blocks or row_blocks(n, k)
    w = (torch.randn(n, k) * 0.5).half()
    x = torch.randn(k).half()
    out = launch_row_product(x, w, blocks)
    exact = w.double() @ x.double()
    # the products are exact in float32; the sum's roundings and the last one bound the error
    bound = 2**-11 * exact.abs() + k * 2**-24 * (w.double().abs() @ x.double().abs())
    cases.append(dict(n=n, k=k, blocks=list(blocks), dtype=str(out.dtype), shape=list(out.shape),
                      worst=((out.double() - exact).abs() / bound).max().item()))
print(json.dumps(cases))
"""


def test_the_kernel_sums_each_row_within_float32s_bound():
    """Every output within half an ulp of float16 plus K float32 roundings of the exact (float64) sum, for the
    blocks `row_blocks` picks and for smaller ones: a skipped chunk, a wrong row or a float16 accumulator would
    be far outside it (|x_k w_k| ~ 0.5 summed over K terms)."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    cases = json.loads(done.stdout.strip().splitlines()[-1])
    assert [c["blocks"] for c in cases] == [[4, 256], [4, 64], [2, 64]]
    for case in cases:
        assert case["dtype"] == "torch.float16" and case["shape"] == [case["n"]], case
        assert case["worst"] <= 1.0, case


def test_linear_off_cuda_is_the_librarys_product():
    """Off CUDA (and at several rows) `linear` is a @ w.T itself, bit for bit, whatever the shape."""
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    for a in (torch.randn(1, 256), torch.randn(3, 256), torch.randn(2, 5, 256)):
        assert torch.equal(linear(a, w), a @ w.T)
