"""How far apart two floating-point evaluations of the same function may land, when the kernels that
evaluate them (CPU vector extensions, BLAS blocking, a wider zero-padded matrix) sum in different orders.

The rule (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., eq. 3.5 and Lemma 3.1): a sum
of K products evaluated in floating point, in any order, satisfies

    |fl(a . b) - a . b| <= gamma_K * sum_i |a_i b_i|,   gamma_K = K u / (1 - K u),

with u the unit roundoff (half the dtype's eps: 2**-24 for float32). Two evaluations that are both within
that of the exact value are within twice that of each other. A bias adds one more term (K + 1).

Worked example: float32, K = 255 products plus a bias, sum |a_i b_i| + |bias| = 10:
gamma_256 = 256 * 2**-24 / (1 - 256 * 2**-24) = 1.5259e-5, so two kernels agree to 2 * 1.5259e-5 * 10 = 3.05e-4.

`linear_gap` applies the rule element by element to one linear layer (a rigorous bound). `chain_gap` is
the first-order bound for a network: relative errors of successive reductions add, each at most
gamma_K, under the assumption that the steps between them (normalisations, softmax, residual sums) do not
amplify a relative error by more than a constant; it is stated against the largest magnitude compared.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def unit_roundoff(dtype: torch.dtype) -> float:
    """u: half the distance from 1 to the next representable number (2**-24 for float32)."""
    return torch.finfo(dtype).eps / 2


def gamma(k: int, dtype: torch.dtype) -> float:
    """gamma_K = K u / (1 - K u): the relative error bound of a K-term sum in `dtype`."""
    ku = k * unit_roundoff(dtype)
    assert ku < 1, f"K = {k} terms are too many for the bound in {dtype}"
    return ku / (1 - ku)


def linear_gap(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int | None = None) -> torch.Tensor:
    """Element-wise bound on |a - b| for two evaluations of F.linear(x, weight, bias) in x's dtype.

    x: [..., K]; weight: [N, K]; bias: [N] or None; k: the number of terms summed (default K; pass the
    wider size when one side sums a zero-padded row)
    returns [..., N]: 2 gamma_{k+1} (|x| @ |weight|^T + |bias|)
    """
    assert x.shape[-1] == weight.shape[1], f"x {tuple(x.shape)} and weight {tuple(weight.shape)} disagree on K"
    k = weight.shape[1] if k is None else k
    magnitude = x.abs().double() @ weight.abs().double().T
    if bias is not None:
        magnitude = magnitude + bias.abs().double()
    return (2 * gamma(k + 1, x.dtype) * magnitude).to(x.dtype)


def chain_gap(reductions: Iterable[int], scale: float, dtype: torch.dtype) -> float:
    """First-order bound on |a - b| for a network whose longest path runs through reductions of these
    sizes (one entry per matmul, norm or softmax sum on the path): 2 * sum_K gamma_K * scale.

    scale: the largest magnitude among the values compared (max |reference|)
    """
    return 2 * sum(gamma(k, dtype) for k in reductions) * scale
