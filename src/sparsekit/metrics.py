"""The layer objective and the seed's reported metric (DESIGN.md §1).

``L(W') = ‖X (W' − W)ᵀ‖²_F = tr((W' − W) H (W' − W)ᵀ)``; the seed's "Norm. Loss" is the relative output error
``sqrt(L / tr(W H Wᵀ))``. Both are computed in float64, on ``W`` and ``H`` brought to unit scale by exact powers
of two (:func:`pow2_scale`), so no scale the input's float format can hold overflows or underflows them.

With ``gather`` (:mod:`sparsekit.coupling`) the weight is one row part of a layer: the scale and the traces are
reduced over the parts, so every part gets the whole layer's value.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sparsekit.coupling import SINGLE, Gather

__all__ = ["SLICE_BYTES", "pow2_scale", "quadratic_loss", "relative_error", "relative_error_x"]

#: Bytes of one float64 operand slice in :func:`relative_error` (rows of ``W``, columns of ``H``).
SLICE_BYTES = 256 * 2**20


def pow2_scale(x: Tensor, dtype: torch.dtype = torch.float64, gather: Gather = SINGLE) -> float:
    """The power of two ``2^-e`` that brings ``max|x|`` into ``[0.5, 1)`` (1.0 for an all-zero ``x``), clamped to
    the normal powers of two of ``dtype`` (the dtype it will multiply), so that it and its inverse are finite there.

    Multiplying by it is exact (barring underflow of entries ``2^-e`` times below the largest), so scores computed
    from ``x · pow2_scale(x)`` are the same for ``x`` and ``c · x`` whenever ``c`` is a power of two, and equal up
    to the rounding of ``c · x`` itself for any other ``c``. With ``gather``: ``max|x|`` over every row part.
    """
    lo, hi = torch.aminmax(x.detach())  # no |x| temporary (a K × K one for a Hessian)
    amax = gather.max(torch.maximum(hi, -lo))  # max|x| = max(max x, −min x)
    if amax == 0:
        return 1.0
    _, e = torch.frexp(amax)
    fi = torch.finfo(dtype)
    return math.ldexp(1.0, min(max(-int(e), math.frexp(fi.tiny)[1] - 1), math.frexp(fi.max)[1] - 1))


def quadratic_loss(delta: Tensor, hessian: Tensor) -> Tensor:
    """Per-row ``δw_r H δw_rᵀ`` for ``delta (M, K)``: ``(M,)`` float64 (no rescaling; see :func:`relative_error`)."""
    d = delta.double()
    return ((d @ hessian.double()) * d).sum(1)


def _traces(weight: Tensor, pruned: Tensor, hessian: Tensor, sw: float, sh: float) -> Tensor:
    """``(tr(δ H δᵀ), tr(W H Wᵀ))`` (2,) float64 of the rescaled ``W``, ``W'``, ``H``. Within :data:`SLICE_BYTES` of
    float64 per operand it is one product; beyond (a 28672 × 8192 layer is 1.75 GiB in float64, its ``K = 28672``
    Hessian 6.1 GiB) the sums run over row slices of ``W`` and column blocks of ``H`` (``Σ_j (δ H_{:,j}) ∘ δ_{:,j}``),
    so the float64 temporaries stay within a few slices (issue 14: this metric ran out of memory on a 70B block
    under 24 GiB) — the same sums up to float64 rounding order."""
    M, K = weight.shape
    step = max(1, SLICE_BYTES // (8 * K))  # rows of W or columns of H per slice
    if step >= M and step >= K:
        w = weight.double() * sw  # (M, K)
        h = hessian.double() * sh  # (K, K)
        return torch.stack([quadratic_loss(pruned.double() * sw - w, h).sum(), quadratic_loss(w, h).sum()])
    traces = torch.zeros(2, dtype=torch.float64, device=weight.device)
    for j in range(0, K, step):
        hj = hessian[:, j : j + step].double() * sh  # (K, kb)
        for r in range(0, M, step):
            w = weight[r : r + step].double() * sw  # (rb, K)
            d = pruned[r : r + step].double() * sw - w
            traces[0] += ((d @ hj) * d[:, j : j + step]).sum()
            traces[1] += ((w @ hj) * w[:, j : j + step]).sum()
    return traces


def relative_error(weight: Tensor, pruned: Tensor, hessian: Tensor, gather: Gather = SINGLE) -> float:
    """``sqrt(tr(δ H δᵀ) / tr(W H Wᵀ))`` with ``δ = pruned − weight``: the relative output error through H.

    ``W``, ``W'`` and ``H`` are rescaled by exact powers of two first; a numerator that rounding makes slightly
    negative (low-rank ``H``) is clamped at 0 before the root, so the result is never NaN. ``tr(W H Wᵀ) = 0``
    (a zero output to preserve) gives 0 if ``δ H δᵀ`` is 0 too and ``inf`` otherwise. With ``gather`` the rows
    are one part of a layer and the result is the whole layer's (both traces summed over the parts).
    """
    sw, sh = pow2_scale(weight, gather=gather), pow2_scale(hessian)
    num, den = gather.sum(_traces(weight, pruned, hessian, sw, sh)).tolist()
    num = max(num, 0.0)
    if den <= 0:
        return 0.0 if num == 0 else math.inf
    return math.sqrt(num / den)


def relative_error_x(weight: Tensor, pruned: Tensor, inputs: Tensor) -> float:
    """``‖X (W' − W)ᵀ‖_F / ‖X Wᵀ‖_F`` computed from the inputs ``X (N, K)`` directly (for tests)."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    return float(torch.linalg.norm(x @ (pruned.double() - weight.double()).T) / torch.linalg.norm(x @ weight.double().T))
