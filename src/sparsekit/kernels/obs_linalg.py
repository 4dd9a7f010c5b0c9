"""Batched linear algebra for True OBS and OBS-ord: fast paths next to their torch references.

- :func:`tf32` — a context manager that allows TF32 for float32 CUDA matmuls *inside it only* (the previous
  setting is restored on exit; nothing is changed at import).
- :func:`bmm` — ``a @ b`` batched, each entry's result independent of the batch size on the CPU.
- :func:`baddbmm_` — ``out += alpha · a @ b`` where ``a, b`` may be 16-bit (the per-row C factors stored in
  ``c_dtype``) and ``out`` is float32/float64: products accumulated and returned in ``out``'s dtype.
  Reference: upcast ``a`` and ``b`` (exact products of the rounded operands), in batch slices to bound memory.
  CUDA fast path: cuBLAS 16-bit GEMM with float32 accumulation writing float32 directly
  (``torch.baddbmm(..., out_dtype=torch.float32)``, torch >= 2.8), probed once per device against the
  reference and skipped if unavailable.
- :func:`chol_inv_factor` — for a batch of SPD matrices ``A (n, q, q)`` the lower-triangular ``X = L⁻¹``
  (``A = L Lᵀ``), so ``X A Xᵀ = I`` and ``A⁻¹ = Xᵀ X``. Reference: :func:`chol_inv_factor_reference`
  (``cholesky_ex`` + ``solve_triangular``). Fast path: 2×2 block recursion whose work is batched GEMMs::

      X11 = L11⁻¹,  L21 = A21 X11ᵀ,  S = A22 − L21 L21ᵀ,  X22 = chol_inv(S),  X21 = −X22 L21 X11

  down to ``base × base`` blocks that go to the reference. Strict float32 (never TF32) inside.
"""

from __future__ import annotations

import contextlib
import logging
from functools import lru_cache
from typing import Iterator

import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = [
    "UPCAST_SLICE_BYTES", "tf32", "bmm", "baddbmm_", "chol_inv_factor", "chol_inv_factor_reference", "LOW_PRECISION",
]

#: 16-bit storage dtypes whose GEMMs accumulate in float32.
LOW_PRECISION = (torch.float16, torch.bfloat16)

#: Batch entries upcast at once by the reference path of :func:`baddbmm_` (bounds its temporary memory).
UPCAST_SLICE_BYTES = 256 * 2**20


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Allow (or forbid) TF32 for float32 CUDA matmuls inside the block; restore the previous setting after."""
    flags = torch.backends.cuda.matmul
    prev = flags.allow_tf32
    flags.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        flags.allow_tf32 = prev


def _baddbmm_reference_(out: Tensor, a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """``out += alpha · a @ b`` upcasting ``a``, ``b`` to ``out.dtype`` slice by slice (exact rounded operands)."""
    n = out.shape[0]
    per = max(1, (a[0].numel() + b[0].numel()) * out.element_size())
    step = max(1, UPCAST_SLICE_BYTES // per)
    for i in range(0, n, step):
        j = min(n, i + step)
        out[i:j].baddbmm_(a[i:j].to(out.dtype), b[i:j].to(out.dtype), alpha=alpha)
    return out


@lru_cache(maxsize=8)
def _fast_mode(device: str, in_dtype: torch.dtype) -> str:
    """Which CUDA 16-bit → float32 GEMM form works here: ``"inplace"``, ``"product"`` or ``"reference"``.

    Probed once per (device, dtype) on random inputs against :func:`_baddbmm_reference_`.
    """
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(3, 40, 72, generator=g).to(device, in_dtype)
    b = torch.randn(3, 72, 24, generator=g).to(device, in_dtype)
    base = torch.randn(3, 40, 24, generator=g).to(device)
    ref = _baddbmm_reference_(base.clone(), a, b, -1.0)
    tol = 1e-4 * ref.abs().max().item()
    try:
        out = base.clone()
        torch.baddbmm(out, a, b, alpha=-1.0, out_dtype=torch.float32, out=out)
        if (out - ref).abs().max().item() <= tol:
            return "inplace"
    except (TypeError, RuntimeError) as exc:  # older torch: no out_dtype, or no aliasing
        log.debug("baddbmm with out_dtype in place unavailable: %s", exc)
    try:
        out = base.clone()
        out.add_(torch.bmm(a, b, out_dtype=torch.float32), alpha=-1.0)
        if (out - ref).abs().max().item() <= tol:
            return "product"
    except (TypeError, RuntimeError) as exc:
        log.debug("bmm with out_dtype unavailable: %s", exc)
    log.warning("no 16-bit GEMM with float32 output on %s; upcasting the C factors (slower).", device)
    return "reference"


def bmm(a: Tensor, b: Tensor) -> Tensor:
    """``a (n, m, t) @ b (n, t, k)`` -> ``(n, m, k)``. On CUDA ``torch.bmm``; on the CPU one GEMM per entry:
    torch's CPU ``bmm`` picks its kernel by the batch count, so an entry's rounding would depend on how many rows
    are processed together (and the memory planner's chunking must not change results)."""
    if a.is_cuda:
        return torch.bmm(a, b)
    out = torch.empty(a.shape[0], a.shape[1], b.shape[2], dtype=torch.promote_types(a.dtype, b.dtype))
    for i in range(a.shape[0]):
        torch.mm(a[i], b[i], out=out[i])
    return out


def baddbmm_(out: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """``out (n, m, k) += alpha · a (n, m, t) @ b (n, t, k)`` in place, accumulated in ``out.dtype``.

    ``a``/``b`` may be strided views (e.g. a column slice of a wider buffer, a transpose). On CUDA, when they
    already have ``out``'s dtype this is ``out.baddbmm_``; for 16-bit operands the float32 result comes straight
    from the tensor-core GEMM, else from the upcasting reference. On the CPU one GEMM per entry, like :func:`bmm`.
    """
    if not out.is_cuda:  # one GEMM per entry (see :func:`bmm`)
        for i in range(out.shape[0]):
            out[i].addmm_(a[i].to(out.dtype), b[i].to(out.dtype), alpha=alpha)
        return out
    if a.dtype == out.dtype and b.dtype == out.dtype:
        return out.baddbmm_(a, b, alpha=alpha)
    if out.dtype == torch.float32 and a.dtype in LOW_PRECISION and a.dtype == b.dtype:
        mode = _fast_mode(str(out.device), a.dtype)
        if mode == "inplace":
            return torch.baddbmm(out, a, b, alpha=alpha, out_dtype=torch.float32, out=out)
        if mode == "product":
            return out.add_(torch.bmm(a, b, out_dtype=torch.float32), alpha=alpha)
    return _baddbmm_reference_(out, a, b, alpha)


def chol_inv_factor_reference(A: Tensor) -> tuple[Tensor, Tensor]:
    """``A (n, q, q)`` SPD -> ``(X, info)``: ``X = L⁻¹`` lower triangular, ``info (n,)`` > 0 where Cholesky failed."""
    L, info = torch.linalg.cholesky_ex(A)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)
    X = torch.linalg.solve_triangular(L, eye, upper=False)
    return X, info


def _chol_inv_blocked(A: Tensor, base: int) -> tuple[Tensor, Tensor]:
    q = A.shape[-1]
    if q <= base:
        return chol_inv_factor_reference(A)
    h = (q // 2 + 15) // 16 * 16 if q > 32 else q // 2  # split on a multiple of 16 (GEMM-friendly)
    X11, info1 = _chol_inv_blocked(A[:, :h, :h], base)  # (n, h, h)
    L21 = A[:, h:, :h] @ X11.mT  # (n, q-h, h)
    S = torch.baddbmm(A[:, h:, h:], L21, L21.mT, alpha=-1.0)  # (n, q-h, q-h) Schur complement
    X22, info2 = _chol_inv_blocked(S, base)
    X = torch.zeros_like(A)
    X[:, :h, :h] = X11
    X[:, h:, h:] = X22
    X[:, h:, :h] = -(X22 @ (L21 @ X11))
    info = torch.where(info1 > 0, info1, torch.where(info2 > 0, info2 + h, info2))
    return X, info


def chol_inv_factor(A: Tensor, base: int = 64) -> tuple[Tensor, Tensor]:
    """Inverse Cholesky factor of a batch of SPD matrices: ``A (n, q, q)`` -> ``(X (n, q, q), info (n,))``.

    ``X A Xᵀ = I``, ``X`` lower triangular. On CUDA, matrices larger than ``base`` use the blocked recursion
    (batched GEMMs instead of cuSOLVER's batched factorisation and cuBLAS's batched triangular solve, which are
    slow for q in the hundreds); elsewhere the reference. Always strict (non-TF32) float32/float64.
    """
    if A.is_cuda and A.shape[-1] > base:
        with tf32(False):
            return _chol_inv_blocked(A, base)
    return chol_inv_factor_reference(A)
