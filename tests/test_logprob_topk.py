"""The draft's fused log-softmax and top-k (`lmms_msd.speculative.fast.logprob_topk`): the docstring's worked example,
its order rule and its values against float64.

The kernels run here through Triton's interpreter (TRITON_INTERPRET=1, set before Triton is imported, hence a
child process); on CUDA the graphed tree growers call them for every level (`draft_topk`)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lmms_msd.speculative.fast.logprob_topk import BLOCK, library_logprob_topk, logprob_topk

triton = pytest.importorskip("triton")

CHILD = r"""
import json, torch
from lmms_msd.speculative.fast.logprob_topk import launch_logprob_topk

def case(name, logits, k, block):
    out = launch_logprob_topk(logits, k, block=block)
    exact = torch.log_softmax(logits.double(), dim=-1)
    # the expected order: descending value, the smaller token id first among equal values (a stable sort)
    order = torch.sort(exact, dim=-1, descending=True, stable=True).indices[:, :k]
    chunks = -(-logits.shape[1] // block)
    # float32: x and lse rounded (an ulp each), exp and log (an ulp each), the sums' additions in any order
    # (block + chunks terms a row, each adding at most 2^-24 of the sum, so as much of log(sum))
    x = logits.double().gather(1, out.indices)
    lse = torch.logsumexp(logits.double(), dim=-1, keepdim=True)
    bound = 2**-23 * (x.abs() + lse.abs()) + (block + chunks + 4) * 2**-24
    return dict(name=name, ids=out.indices.tolist(), expected_ids=order.tolist(), dtype=str(out.values.dtype),
                values=out.values.tolist(), worst=((out.values.double() - exact.gather(1, out.indices)).abs() / bound).max().item())

torch.manual_seed(0)
cases = [case("example", torch.tensor([[2.0, 5.0, 5.0, 1.0]]).half(), 2, 2)]
# distinct float16 logits (a permutation of distinct values), three rows, a last chunk of 904 of 2048
distinct = torch.stack([torch.randperm(5000) for _ in range(3)]).float().div(500).sub(5).half()
cases.append(case("random", distinct, 10, 2048))
cases.append(case("one", distinct, 1, 2048))
# the best logits in the last chunk's tail and ties across chunks and within one: id order decides
tied = torch.full((2, 300), -1.0).half()
tied[0, [299, 7, 130, 131]] = 3.0
tied[1, [5, 250, 64]] = torch.tensor([1.5, 2.0, 2.0]).half()
cases.append(case("ties", tied, 5, 64))
print(json.dumps(cases))
"""


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return {c["name"]: c for c in json.loads(done.stdout.strip().splitlines()[-1])}


def test_the_docstrings_worked_example(interpreted):
    example = interpreted["example"]
    assert example["ids"] == [[1, 2]]
    assert example["values"][0] == pytest.approx([-0.7266316, -0.7266316], abs=1e-6)


def test_kernels_order_tokens_as_a_stable_descending_sort(interpreted):
    """Every case's ids are the first k of a stable descending sort of the exact log-probabilities: equal
    logits in one chunk and across chunks come smaller id first, the last (partial) chunk is searched."""
    for name in ("example", "random", "one", "ties"):
        assert interpreted[name]["ids"] == interpreted[name]["expected_ids"], name
    assert interpreted["ties"]["ids"] == [[7, 130, 131, 299, 0], [64, 250, 5, 0, 1]]


def test_kernels_values_are_the_log_softmax_within_float32s_bound(interpreted):
    """A chunk left out of the log-sum-exp (each of the random rows' three chunks holds about a third of the
    mass: log 1.5 off) or a float16 sum would be far outside the bound."""
    for name, case in interpreted.items():
        assert case["dtype"] == "torch.float32", name
        assert case["worst"] <= 1.0, case


def test_off_cuda_it_is_the_librarys_computation():
    logits = torch.randn(2, 3, 100).half()
    out, library = logprob_topk(logits, 4), library_logprob_topk(logits, 4)
    assert out.indices.shape == (2, 3, 4)
    assert torch.equal(out.indices, library.indices) and torch.equal(out.values, library.values)
    assert BLOCK & (BLOCK - 1) == 0  # tl.arange takes powers of two
