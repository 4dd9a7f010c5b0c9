"""True OBS's per-step update of a chunk of rows in one pass: Triton kernel + wrapper + torch reference.

One step of :class:`~sparsekit.pruners.true_obs.TrueOBSChunk` prunes ``q`` columns ``P`` of every row ``r``
(DESIGN.md §2; the factored form of ``pruners/true_obs.py``). Given ``Gt = C_{P,:} (R, q, K)``, the inverse
Cholesky factor ``X = L⁻¹ (R, q, q)`` of ``C_PP = L Lᵀ`` and ``a = X w_Pᵀ (R, q)``, it does::

    Z    = C_{:,P} L⁻ᵀ = Gtᵀ Xᵀ        (K, q) per row
    w   -= Z a                          (2.1)  δw = −w_P (C_PP)⁻¹ C_{P,:}
    U[:, t:t+q] = Z                     (2.2)  C ← C − Z Zᵀ, stored as the next q columns of U
    diag -= Σ_j Z_{:,j}²                (2.2)  on the diagonal (what ``independent`` scoring reads)

The reference, :func:`z_update_reference_`, is these four lines in torch: it materialises ``Z`` in float32
and reads it three more times (``w``, the copy into ``U``, the norms). The kernel, :func:`z_update_`, computes
each ``(BLOCK_K × BLOCK_N)`` tile of ``Z`` of a row in registers (``tl.dot``, float32 accumulation; TF32 inputs
when ``torch.backends.cuda.matmul.allow_tf32`` is set, as cuBLAS does in the reference, else IEEE float32), and
in its epilogue stores the tile into ``U`` in ``U``'s dtype and accumulates ``Z a`` and ``Σ Z²`` over the
``N``-tiles of the row, so ``Z`` never goes to memory: one program per (row, ``K``-tile) reads its slice of
``Gt`` (once per ``N``-tile, from L2), writes ``U`` once and ``w``/``diag`` once. ``X`` is lower triangular, so
the reduction of column ``j`` of ``Z`` stops at ``j`` (the skipped products are exact zeros): half the FLOPs of
the reference's full ``bmm``.

Before that, the step reads ``C0_{P,:}`` at each row's remaining columns (True OBS keeps them in a per-row order,
``perm``): :func:`gather_c0` copies ``C0[P[r, i], cols[r, j]]`` in one pass (a Triton kernel; on the CPU two torch
gathers, a full row of ``C0`` per pruned column first). Indexing ``C0`` with both index tensors at once would
materialise two int64 indices per element (4× the data: measured as an out-of-memory error at ``q = 512``).
:func:`gather_rows` (``U_P``) and :func:`move_rows_` (the compaction's moves) copy rows of ``U`` with wide loads;
torch's advanced indexing of the same rows ran at ≈ 0.25 TB/s (13% of a layer's time at the seed shape).

Tiles are picked from ``q`` by :func:`tiles` (no autotuning; one compilation per tile set and ``U`` dtype);
any ``q``, ``K`` and ``R`` (masked tails). The CPU, float64 inputs and installs without Triton run the
reference (the interpreter runs the kernel on the CPU under ``TRITON_INTERPRET=1``: ``tests/test_obs_update.py``).
Importing this module imports Triton when it is installed but never initialises CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from sparsekit.kernels.obs_linalg import bmm

try:  # Triton is optional: absent on CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU CI
    triton = None

__all__ = ["Tiles", "tiles", "available", "gather_c0", "gather_rows", "move_rows_", "z_update_", "z_update_reference_",
           "FUSED_MAX_Q"]

#: True OBS uses the kernel up to this many columns per step. Timed on an H200 (torch 2.11, Triton 3.6,
#: 2026-12-04, ``benchmarks/obs_update_tiles.py``; BENCHMARKS.md) against the torch reference at the mean step of
#: 4096×14336: q = 32 0.55 vs 1.42 ms, q = 256 3.19 vs 4.00 ms (1.26×) with the 128×128 4-warp tiles; q = 512
#: 9.0–9.7 vs 8.9 ms (no tile set faster: the triangular ``Z`` GEMM in Triton costs what the passes over ``Z``
#: save; cuBLAS runs it as fast).
FUSED_MAX_Q = 256


@dataclass(frozen=True)
class Tiles:
    """Launch shape: ``block_k`` rows of ``Z`` (columns of the layer) × ``block_n`` of its ``q`` columns per
    accumulator, reduced ``block_i`` at a time; ``num_warps``, ``num_stages`` as in Triton."""

    block_k: int
    block_n: int
    block_i: int
    num_warps: int = 4
    num_stages: int = 3


def tiles(q: int) -> Tiles:
    """Tiles for ``q`` columns per step: the whole of ``q`` in one accumulator up to 128 (``Gt`` read once), else
    128-wide ``N``-tiles (``Gt``'s slice re-read from L2 once per tile). Timed on an H200 with TF32 at the mean
    step of the two layers that matter (``benchmarks/obs_update_tiles.py``, BENCHMARKS.md, issue 14): q = 128 (the
    seed layer at ``prune_weight``'s defaults) 128×128 tiles, 4 warps: 0.80 ms against 1.21 ms for the first
    choice (64×128, 8 warps); q = 32 (ng=16 on 4096×14336) 64-row tiles: 0.56 ms against 0.76 ms (128 rows).
    The other sizes keep the first choice, read from the sm_90 compiler report (no spills), not timed."""
    n = max(16, min(128, 1 << max(0, q - 1).bit_length()))  # next power of two, 16 .. 128
    if n <= 32:
        return Tiles(block_k=64 if n == 32 else 128, block_n=n, block_i=n)
    if n == 64:
        return Tiles(block_k=128, block_n=64, block_i=32, num_warps=8)
    return Tiles(block_k=128, block_n=128, block_i=32, num_warps=4, num_stages=2)


def available(t: Tensor, any_dtype: bool = False) -> bool:
    """True when the kernels run for ``Gt = t``: float32 (any dtype with ``any_dtype``: the copies) on CUDA with
    Triton installed, or on the CPU under the Triton interpreter (``TRITON_INTERPRET=1``, the CPU tests)."""
    if triton is None or not (any_dtype or t.dtype == torch.float32):
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _copy_rows(src: Tensor, dst: Tensor, src_off: Tensor, dst_off: Tensor, t: int, block: int = 512) -> None:
    """``dst[dst_off[k] : + t] = src[src_off[k] : + t]`` (flat element offsets) for every ``k``: one program per
    (run, ``block`` elements), wide loads when every offset is a multiple of 16 elements."""
    aligned = all(x % 16 == 0 for x in (*src.stride()[:-1], *dst.stride()[:-1], src.storage_offset(),
                                          dst.storage_offset()))
    _copy_rows_kernel[(src_off.numel(), triton.cdiv(t, block))](src, dst, src_off, dst_off, t, BLOCK=block,
                                                                  ALIGNED=aligned)


def gather_rows(U: Tensor, rows: Tensor, t: int) -> Tensor:
    """``U[r, rows[r, i], :t]`` for ``U (R, K, width)`` (last stride 1), ``rows (R, q)`` -> ``(R, q, t)`` (a view of
    a buffer whose rows are padded to 16 elements). The kernel copies each row's ``t`` contiguous elements with
    wide loads, where torch's advanced indexing copies element by element (≈ 0.25 TB/s measured on an H200)."""
    R, q = rows.shape
    if not available(U, any_dtype=True):
        return U[torch.arange(R, device=U.device).unsqueeze(1), rows, :t]
    t16 = -(-t // 16) * 16
    out = torch.empty(R, q, t16, dtype=U.dtype, device=U.device)
    r = torch.arange(R, device=U.device).unsqueeze(1)
    dst = torch.arange(R * q, device=U.device) * t16
    _copy_rows(U, out, (r * U.stride(0) + rows * U.stride(1)).flatten(), dst, t)
    return out[:, :, :t]


def move_rows_(U: Tensor, r: Tensor, d: Tensor, s: Tensor, t: int) -> None:
    """In place ``U[r_k, d_k, :t] = U[r_k, s_k, :t]`` for every ``k`` (1-D ``r, d, s``); no ``(r_k, d_k)`` may be
    another move's source."""
    if not available(U, any_dtype=True):
        U[r, d, :t] = U[r, s, :t]
        return
    _copy_rows(U, U, r * U.stride(0) + s * U.stride(1), r * U.stride(0) + d * U.stride(1), t)


def gather_c0(C0: Tensor, P: Tensor, cols: Tensor, block: int = 1024) -> Tensor:
    """``Gt[r, i, j] = C0[P[r, i], cols[r, j]]``: rows ``P (R, q)`` of ``C0 (K, K)`` at columns ``cols (R, n)``
    (any strides) -> ``(R, q, n)`` contiguous, in ``C0``'s dtype. The kernel when :func:`available`, else the
    torch reference (two gathers through an ``(R, q, K)`` copy of the rows)."""
    R, q = P.shape
    n = cols.shape[1]
    if not available(C0):
        rows = C0[P.flatten()].view(R, q, C0.shape[1])  # (R, q, K)
        return rows.gather(2, cols.unsqueeze(1).expand(R, q, n))
    out = torch.empty(R, q, n, dtype=C0.dtype, device=C0.device)
    _gather_kernel[(R * q, triton.cdiv(n, block))](
        C0, P, cols, out, q, n, C0.stride(0), P.stride(0), P.stride(1), cols.stride(0), cols.stride(1), BLOCK=block)
    return out


def z_update_reference_(Gt: Tensor, X: Tensor, a: Tensor, w: Tensor, U: Tensor | None = None, t: int = 0,
                        diag: Tensor | None = None) -> Tensor:
    """Torch reference of :func:`z_update_` (same shapes): ``Z = Gtᵀ Xᵀ``, (2.1) on ``w``, and when given, ``Z`` into
    ``U[:, :, t:t+q]`` and ``diag -= ‖Z‖²`` per row of ``Z`` (2.2). Returns ``Z (R, K, q)`` in ``Gt``'s dtype (True
    OBS's other cases, rowpair-16 padding and ``joint`` scoring, store and use it themselves)."""
    Z = bmm(Gt.mT, X.mT)  # (R, K, q) C_{:,P} L⁻ᵀ
    w.sub_(bmm(Z, a.unsqueeze(2)).squeeze(2))  # (2.1)
    if U is not None:
        U[:, :, t : t + Z.shape[2]] = Z
    if diag is not None:
        diag.sub_(torch.linalg.vector_norm(Z, dim=2).square())
    return Z


def z_update_(Gt: Tensor, X: Tensor, a: Tensor, U: Tensor, t: int, w: Tensor, diag: Tensor,
              config: Tiles | None = None) -> None:
    """In place: (2.1) ``w -= Z a``, (2.2) ``U[:, :, t:t+q] = Z`` and ``diag -= ‖Z‖²`` per row of ``Z``, for
    ``Z = Gtᵀ Xᵀ``, without storing ``Z`` (the fused kernel when :func:`available`, else the reference).

    Shapes: ``Gt (R, q, K)`` = ``C_{P,:}`` float32/float64; ``X (R, q, q)`` = ``L⁻¹``, lower triangular (the kernel
    relies on it); ``a (R, q)``; ``U (R, K, width ≥ t + q)`` in any float dtype; ``w, diag (R, K)``. ``config``:
    the kernel's tiles (default :func:`tiles` of ``q``).
    """
    R, q, K = Gt.shape
    if not available(Gt):
        z_update_reference_(Gt, X, a, w, U, t, diag)
        return
    assert X.dtype == a.dtype == w.dtype == diag.dtype == torch.float32 and Gt.stride(2) == 1
    assert w.stride(1) == 1 and diag.stride(1) == 1 and U.shape[2] >= t + q
    cfg = config or tiles(q)
    kt = triton.cdiv(K, cfg.block_k)
    precision = "tf32" if Gt.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    _z_update_kernel[(R * kt,)](
        Gt, X, a, U, w, diag, K, q, t, kt,
        Gt.stride(0), Gt.stride(1), X.stride(0), X.stride(1), X.stride(2), a.stride(0), a.stride(1),
        U.stride(0), U.stride(1), U.stride(2), w.stride(0), diag.stride(0),
        BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, BLOCK_I=cfg.block_i, PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


if triton is not None:

    @triton.jit
    def _gather_kernel(C, P, COLS, OUT, q, n, s_ck, s_pr, s_pi, s_cr, s_cj, BLOCK: tl.constexpr):
        ri = tl.program_id(0).to(tl.int64)  # r·q + i
        r = ri // q
        row = tl.load(P + r * s_pr + (ri % q) * s_pi)  # the column of C0 pruned: a row of the symmetric C0
        js = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = js < n
        c = tl.load(COLS + r * s_cr + js * s_cj, mask=m, other=0)
        tl.store(OUT + ri * n + js, tl.load(C + row * s_ck + c, mask=m), mask=m)

    @triton.jit
    def _copy_rows_kernel(S, D, SOFF, DOFF, t, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
        so = tl.load(SOFF + tl.program_id(0))
        do = tl.load(DOFF + tl.program_id(0))
        if ALIGNED:
            so = tl.multiple_of(so, 16)
            do = tl.multiple_of(do, 16)
        js = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = js < t
        tl.store(D + do + js, tl.load(S + so + js, mask=m), mask=m)

    @triton.jit
    def _z_update_kernel(
        G, X, A, U, W, D, K, q, t, KT,
        s_gr, s_gi, s_xr, s_xj, s_xi, s_ar, s_aj, s_ur, s_uk, s_un, s_wr, s_dr,
        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        r = (pid // KT).to(tl.int64)  # the row; consecutive programs share it (its X and a stay in L2)
        ks = (pid % KT) * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,) columns of the layer = rows of Z
        kmask = ks < K
        G += r * s_gr
        X += r * s_xr
        A += r * s_ar
        U += r * s_ur
        dw = tl.zeros((BLOCK_K,), dtype=tl.float32)  # Σ_j Z_kj a_j
        dd = tl.zeros((BLOCK_K,), dtype=tl.float32)  # Σ_j Z_kj²
        for n0 in range(0, q, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) columns of Z
            nmask = ns < q
            acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)  # Z[ks, ns]
            for i0 in range(0, tl.minimum(n0 + BLOCK_N, q), BLOCK_I):  # X[j, i] = 0 for i > j
                i = i0 + tl.arange(0, BLOCK_I)  # (BLOCK_I,)
                imask = i < q
                g = tl.load(G + i[None, :] * s_gi + ks[:, None], mask=kmask[:, None] & imask[None, :], other=0.0)
                x = tl.load(X + ns[None, :] * s_xj + i[:, None] * s_xi, mask=imask[:, None] & nmask[None, :],
                            other=0.0)  # (BLOCK_I, BLOCK_N) Xᵀ
                acc = tl.dot(g, x, acc, input_precision=PRECISION)  # (BLOCK_K, BLOCK_I) Gtᵀ tile times Xᵀ tile
            tl.store(U + ks[:, None] * s_uk + (t + ns)[None, :] * s_un, acc.to(U.dtype.element_ty),
                     mask=kmask[:, None] & nmask[None, :])
            av = tl.load(A + ns * s_aj, mask=nmask, other=0.0)  # (BLOCK_N,)
            dw += tl.sum(acc * av[None, :], axis=1)
            dd += tl.sum(acc * acc, axis=1)
        wp = W + r * s_wr + ks
        tl.store(wp, tl.load(wp, mask=kmask) - dw, mask=kmask)
        dp = D + r * s_dr + ks
        tl.store(dp, tl.load(dp, mask=kmask) - dd, mask=kmask)
