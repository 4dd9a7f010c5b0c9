"""Refinements applied after any method: exact refit of the kept weights and best-improvement swap search.

Why one file over 500 lines: refit and swap search are one algorithm — the swap search keeps the refit in
its swept matrices (eq. 2 below) and both share the chunking of per-row matrices by memory — and are tested together.

Both work on the **damped** objective ``L_d(W') = tr((W' − W) H_d (W' − W)ᵀ)`` with ``H_d = H + Λ`` (the damping
rule of :func:`sparsekit.hessian.damped_inverse`), which equals the true objective when ``damp = 0`` and ``H``
is full rank, and stays well posed when ``H`` is singular (dead inputs, fewer tokens than columns). The caller
(:func:`sparsekit.prune_weight`) measures the true loss through the undamped ``H`` before and after and keeps
the better result, so a refinement never increases the reported loss.

**Refit** (DESIGN.md §2). For a row with kept set ``R`` and pruned set ``P`` the optimal weights are

    w'_R = w_R + (H_RR)⁻¹ H_RP w_P,     w'_P = 0,                                                          (1)

with loss ``w_P (C_PP)⁻¹ w_Pᵀ`` (``C = H⁻¹``). :func:`refit` solves (1) for every row: by Cholesky of the gathered
``H_RR`` (rows batched by ``|R|``), or by conjugate gradients on the unit-diagonal ``H̃`` batched over rows (one
``(M, K) × (K, K)`` GEMM per iteration; for large K on a GPU).

**Swap search.** Per row we keep the *swept* matrix (Goodnight's sweep operator applied to ``H`` over ``R``)

    A = [[−G, G H_RP], [H_PR G, S]],     G = (H_RR)⁻¹,   S = H_PP − H_PR G H_RP = (C_PP)⁻¹,              (2)

from which everything is read: the refit ``w'_R = w_R + (A_{R,P} w_P)``, the gradient of the pruned entries
``g_P = −A_PP w_P`` and the loss ``L = w_P A_PP w_Pᵀ``. A swap inside a scope un-prunes block ``I`` and prunes
block ``J``. With ``U = A_JI = (G H_RI)_J`` the exact loss change is (rank-``e`` bordering, ``e`` = block size)

    ΔL = − g_I S_II⁻¹ g_Iᵀ + w''_J (G_JJ + U S_II⁻¹ Uᵀ)⁻¹ w''_Jᵀ,    w''_J = w'_J + U S_II⁻¹ g_Iᵀ        (3)

(un-prune ``I``: Newton step on ``δ_I``; then OBS cost of pruning ``J`` from ``R ∪ I``). When ``I`` and ``J``
lie in different rows (``rowpair-16``: the two rows exchange who keeps the block) the two terms are the two
rows' own changes with ``U = 0``. Applying a swap is a sweep of ``A`` on ``I`` and a reverse sweep on ``J``,
fused into one rank-``2e`` update (one pass over ``A``, ``O(K² e)`` per row; no inverse is recomputed), and the
refit deltas ``δ = w' − w`` follow by ``O(K e)`` updates (Newton step on ``I``, OBS update removing ``J``), so the
gradient is one ``(n, K) × (K, K)`` product per sweep. Every sweep of the search evaluates (3) for every in-scope
pair of every row in one batch and applies each row group's best improving swap; it stops when no swap improves
or after ``max_sweeps`` sweeps (a sweep is one swap per row, so ``max_sweeps`` bounds the swaps per row). Work is
in the scale-free coordinates ``H̃ = D⁻¹ H_d D⁻¹``, ``W̃ = W D``, ``D = sqrt(diag H_d)`` (same masks and losses,
better conditioned in float32).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch
from torch import Tensor

from sparsekit.coupling import SINGLE, Gather
from sparsekit.errors import HessianError, InputError
from sparsekit.hessian import damped_hessian, scaled_hessian
from sparsekit.kernels import obs_linalg
from sparsekit.memory import Budget, device_budget, plan_rows, require, run_chunked
from sparsekit.metrics import relative_error
from sparsekit.patterns import Layout

log = logging.getLogger(__name__)

__all__ = [
    "REFINES",
    "REFIT_SOLVERS",
    "damped_hessian",
    "check_refine_options",
    "refit",
    "swap_search",
    "swap_state",
    "refine_result",
]

#: values accepted by ``prune_weight(refine=...)``
REFINES = ("swap",)
#: solvers of :func:`refit`
REFIT_SOLVERS = ("auto", "direct", "cg")


def check_refine_options(refine: str | None, refit: bool, max_sweeps: int) -> None:
    """Validate ``prune_weight``'s refinement options (raise :class:`InputError` naming the fix)."""
    if refine is not None and refine not in REFINES:
        raise InputError(f"unknown refine {refine!r}; use refine=None or one of: {', '.join(REFINES)}.")
    if not isinstance(refit, bool):
        raise InputError(f"refit must be True or False, got {refit!r}.")
    if isinstance(max_sweeps, bool) or not isinstance(max_sweeps, int) or max_sweeps < 0:
        raise InputError(f"max_sweeps must be an int >= 0 (0 = no swap sweeps), got {max_sweeps!r}.")


# ---- refit ---------------------------------------------------------------------------------------------------
def refit_direct_bytes(M: int, K: int, r: int, work: torch.dtype) -> tuple[int, int]:
    """``(per_row, fixed)`` bytes of :func:`_refit_direct` for rows keeping ``r`` columns: per row the gathered
    ``H_RR`` and its factor (``2·r²·s``), the gather's flat int64 index (``8·r²``) and ``r``-vectors; fixed the
    right-hand sides, the output and the scaled ``H`` and ``W`` that :func:`refit` holds (``K²·s + 3·M·K·s``)."""
    s = work.itemsize
    return 2 * r * r * s + 8 * r * r + r * (16 + 4 * s), K * K * s + 3 * M * K * s


def _refit_rows(w0: Tensor, hd: Tensor, mask: Tensor, rhs_all: Tensor, out: Tensor, rc: Tensor, r: int) -> None:
    """Eq. (1) for the rows ``rc`` that all keep ``r`` columns; writes ``out[rc]`` at the end."""
    K = w0.shape[1]
    idx = mask[rc].nonzero()[:, 1].view(len(rc), r)  # (n, r) kept columns, ascending
    HRR = hd.flatten()[idx.unsqueeze(2) * K + idx.unsqueeze(1)]  # (n, r, r) one int64 (n, r, r) index
    L, info = torch.linalg.cholesky_ex(HRR)
    if (info != 0).any():
        raise HessianError("H restricted to a row's kept columns is not positive definite; pass damp > 0 for refit.")
    rhs = rhs_all[rc].gather(1, idx).unsqueeze(2)  # (n, r, 1)
    x = torch.cholesky_solve(rhs, L).squeeze(2)  # (n, r)
    out[rc] = out[rc].scatter(1, idx, w0[rc].gather(1, idx) + x)


def _refit_direct(w0: Tensor, hd: Tensor, mask: Tensor, budget: Budget, stats: dict[str, Any]) -> Tensor:
    """Eq. (1) by Cholesky of ``H_RR`` per row, rows batched by ``|R|`` in chunks sized by the planner."""
    M, K = w0.shape
    out = torch.zeros_like(w0)
    rhs_all = (w0 * ~mask) @ hd  # (M, K); entries on R are (H_RP w_P)ᵀ
    counts = mask.sum(1)
    for r in torch.unique(counts).tolist():
        rows = (counts == r).nonzero().flatten()
        if r == 0:
            continue
        if r == K:
            out[rows] = w0[rows]
            continue
        per_row, fixed = refit_direct_bytes(M, K, r, w0.dtype)
        n = plan_rows(len(rows), per_row, fixed, budget, what="refit (direct)")
        stats["refit_chunk_size"] = min(n, stats.get("refit_chunk_size", n))
        run_chunked(lambda a, b: _refit_rows(w0, hd, mask, rhs_all, out, rows[a:b], r), len(rows), n,
                    stats=stats, what="refit (direct)", budget=budget, counter="refit_oom_retries")
    return out


def refit_cg_bytes(M: int, K: int, work: torch.dtype) -> int:
    """Bytes :func:`_refit_cg` holds at once: the scaled ``H`` and about ten ``(M, K)`` iterates and temporaries
    (mask, right-hand side, ``x``, residual, direction, product, best iterate, the scaled ``W``)."""
    return K * K * work.itemsize + 10 * M * K * work.itemsize


def _refit_cg(
    w0: Tensor,
    hd: Tensor,
    mask: Tensor,
    x0: Tensor | None,
    tol: float,
    max_iter: int,
    tf32: bool,
    gather: Gather = SINGLE,
    check_every: int = 10,
) -> tuple[Tensor, int, float, bool]:
    """Eq. (1) by CG on the unit-diagonal ``hd`` (already Jacobi-scaled), all rows at once: solve
    ``x H_RR = w_P H_PR`` for the update ``x = δ_R`` from ``x0``.

    The right-hand side and the true residual (recomputed every ``check_every`` iterations) use the working
    precision; the products of the iterations use TF32 when ``tf32`` (CUDA; residual replacement resets their
    errors at every check). The best iterate so far is kept, and the loop stops at ``tol``, after ``max_iter``,
    or when three checks in a row bring no improvement (round-off floor). Rows are independent but for that
    stop: with ``gather`` the residual is the largest over every row part (:mod:`sparsekit.coupling`). Call it
    inside ``obs_linalg.tf32(False)``. Returns ``(best update (zero off the mask), iterations, its max relative
    residual, stalled)``."""
    tiny = torch.finfo(w0.dtype).tiny
    m = mask.to(w0.dtype)  # (M, K)
    b = ((w0 * (1 - m)) @ hd) * m  # (M, K)
    x = torch.zeros_like(w0) if x0 is None else x0 * m
    r = b - (x @ hd) * m
    bn = b.norm(dim=1).clamp_min(tiny)  # (M,)
    p = r.clone()
    rr = (r * r).sum(1)  # (M,)
    it, res = 0, float(gather.max((r.norm(dim=1) / bn).max()))
    best_x, best_res, stall = x.clone(), res, 0
    while it < max_iter and res > tol and stall < 3:
        with obs_linalg.tf32(tf32):
            q = (p @ hd) * m
        alpha = rr / (p * q).sum(1).clamp_min(tiny)
        x.addcmul_(alpha.unsqueeze(1), p)
        r.addcmul_(alpha.unsqueeze(1), q, value=-1.0)
        it += 1
        if it % check_every == 0 or it == max_iter:
            r = b - (x @ hd) * m  # true residual against drift
            res = float(gather.max((r.norm(dim=1) / bn).max()))
            if res < 0.7 * best_res:
                best_x, best_res, stall = x.clone(), res, 0
            else:
                stall += 1
                if res < best_res:
                    best_x, best_res = x.clone(), res
        rr_new = (r * r).sum(1)
        p = r + (rr_new / rr.clamp_min(tiny)).unsqueeze(1) * p
        rr = rr_new
    if res < best_res:
        best_x, best_res = x, res
    return best_x, it, best_res, stall >= 3


def refit(
    weight0: Tensor,
    hessian_d: Tensor,
    mask: Tensor,
    *,
    solver: str = "auto",
    x0: Tensor | None = None,
    tol: float | None = None,
    max_iter: int = 1000,
    tf32: bool = False,
    max_memory: int | str | None = None,
    gather: Gather = SINGLE,
) -> tuple[Tensor, dict[str, Any]]:
    """Exact least-squares refit (eq. 1): the optimal weights for ``mask`` under ``hessian_d``.

    Args:
        weight0: ``(M, K)`` dense weights.
        hessian_d: ``(K, K)`` positive definite (damped) Hessian, same dtype/device.
        mask: ``(M, K)`` bool, True = kept.
        solver: ``"direct"`` (per-row Cholesky, exact), ``"cg"`` (batched CG to ``tol``), ``"auto"`` (direct on
            the CPU, CG on CUDA: on an H200 at 14336×4096 CG takes 1.8 s and 5 GiB against the direct solver's
            5.9 s and 100 GiB, same loss to 1e-9 relative; BENCHMARKS.md).
        x0: CG warm start for the weights (``(M, K)``), e.g. the previous iterate.
        tf32: TF32 for the products of the CG iterations on CUDA; the residual that decides convergence stays
            float32 (see :func:`_refit_cg`), and if the TF32 iterations stall above ``tol`` the solve finishes
            from their best iterate with float32 products, so the accuracy reached is float32's.
        max_memory: the memory budget (:func:`sparsekit.memory.device_budget`): the direct solver's row chunks
            are planned from it (:func:`refit_direct_bytes`); CG must fit whole (:func:`refit_cg_bytes`).
        gather: the rows are one part of a layer (:mod:`sparsekit.coupling`): ``"auto"`` chooses for all parts
            (direct if any part is on the CPU), and CG stops on the largest residual over the parts.
    Returns:
        ``(weights (M, K) with exact zeros off the mask, stats)``.
    """
    if solver not in REFIT_SOLVERS:
        raise InputError(f"refit solver must be one of {', '.join(REFIT_SOLVERS)}, got {solver!r}.")
    M, K = weight0.shape
    if solver == "auto":
        on_cpu = bool(gather.max(torch.tensor(float(weight0.device.type == "cpu"))))  # every part decides alike
        solver = "direct" if on_cpu else "cg"
    budget = device_budget(weight0.device, max_memory)
    if solver == "cg":
        require(refit_cg_bytes(M, K, weight0.dtype), budget, "refit (cg)")
    hs, d = scaled_hessian(hessian_d)
    ws = weight0 * d
    if solver == "direct":
        stats: dict[str, Any] = {"refit_solver": "direct"}
        out = _refit_direct(ws, hs, mask, budget, stats)
        return out / d, stats
    if tol is None:
        tol = 1e-10 if weight0.dtype == torch.float64 else 1e-5
    xs = None if x0 is None else x0 * d - ws
    with obs_linalg.tf32(False):  # (the flag only affects CUDA matmuls; CPU runs take the same code path)
        x, it, res, stalled = _refit_cg(ws, hs, mask, xs, tol, max_iter, tf32, gather)
        # TF32 stalled (on some part: every part takes the same branch): finish with float32 products
        if res > tol and it < max_iter and bool(gather.max(torch.tensor(float(tf32 and ws.is_cuda)))):
            x, it2, res, stalled = _refit_cg(ws, hs, mask, x, tol, max_iter - it, False, gather)
            it += it2
    out = (ws + x) * mask
    if res > tol:  # at the float round-off floor (stalled) that is expected: H_RR's conditioning sets it
        log.log(logging.INFO if stalled else logging.WARNING,
                "refit CG stopped after %d iterations at relative residual %.2e (tol %.1e)%s.", it, res, tol,
                ", its round-off floor" if stalled else "")
    return out / d, {"refit_solver": "cg", "refit_cg_iters": it, "refit_cg_residual": res}


# ---- swap search ---------------------------------------------------------------------------------------------
def _row_groups(layout: Layout) -> Tensor:
    """``(M,)`` label of each row's connected group (rows coupled by some scope), labels ordered by first row."""
    M = layout.num_rows
    label = torch.arange(M, device=layout.device)
    if layout.row_local:
        return label
    srows = layout.rows.flatten(1)  # (S, B·e)
    while True:
        smin = label[srows].min(1).values  # (S,)
        new = label.scatter_reduce(0, srows.flatten(), smin.repeat_interleave(srows.shape[1]), "amin")
        if torch.equal(new, label):
            break
        label = new
    return torch.unique(label, return_inverse=True)[1]


def swap_state(ws: Tensor, hs: Tensor, mask: Tensor, build_rows: int | None = None) -> Tensor:
    """The swept matrices ``A (n, K, K)`` of eq. (2) for rows ``ws (n, K)`` with masks ``mask (n, K)``.

    Rows are batched by ``|R|``, at most ``build_rows`` at a time (their temporaries: :func:`swap_bytes`;
    ``None``: all): ``G = H_RR⁻¹`` by Cholesky, ``U = G H_RP``, ``S = H_PP − H_PR U``, then
    scattered into ``K × K`` in column order.
    """
    n, K = ws.shape
    A = torch.empty(n, K, K, dtype=ws.dtype, device=ws.device)
    counts = mask.sum(1)
    for r in torch.unique(counts).tolist():
        rows_r = (counts == r).nonzero().flatten()
        step = build_rows or len(rows_r)
        for a in range(0, len(rows_r), step):
            rows = rows_r[a : a + step]
            A[rows] = _swept(hs, mask[rows], r)
    return A


def _swept(hs: Tensor, mask: Tensor, r: int) -> Tensor:
    """Eq. (2) for ``k`` rows that all keep ``r`` columns: ``mask (k, K)`` -> ``A (k, K, K)`` in column order."""
    k, K = mask.shape
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # (k, K): R first, then P
    Hperm = hs[order.unsqueeze(2), order.unsqueeze(1)]  # (k, K, K) in (R, P) order
    HRR, HRP, HPP = Hperm[:, :r, :r], Hperm[:, :r, r:], Hperm[:, r:, r:]
    B = torch.empty_like(Hperm)
    if r:
        L, info = torch.linalg.cholesky_ex(HRR)
        if (info != 0).any():
            raise HessianError("H restricted to a row's kept columns is not positive definite; pass damp > 0.")
        G = torch.cholesky_inverse(L)  # (k, r, r)
        U = G @ HRP  # (k, r, p)
        B[:, :r, :r] = -G
        B[:, :r, r:] = U
        B[:, r:, :r] = U.transpose(1, 2)
        B[:, r:, r:] = HPP - HRP.transpose(1, 2) @ U
    else:
        B.copy_(Hperm)
    inv = torch.argsort(order, dim=1)  # (k, K) position of each column in (R, P) order
    return B[torch.arange(k, device=mask.device).view(k, 1, 1), inv.unsqueeze(2), inv.unsqueeze(1)]


def _cols(A: Tensor, idx: Tensor) -> Tensor:
    """``A[b, :, idx[b]]``: ``A (k, K, K)``, ``idx (k, e)`` -> ``(k, K, e)``."""
    return A.gather(2, idx.unsqueeze(1).expand(-1, A.shape[1], -1))


def _at(x: Tensor, idx: Tensor) -> Tensor:
    """``x[b, idx[b], :]``: ``x (k, K, c)``, ``idx (k, e)`` -> ``(k, e, c)``."""
    return x.gather(1, idx.unsqueeze(2).expand(-1, -1, x.shape[2]))


def _set_cols(A: Tensor, idx: Tensor, cols: Tensor) -> None:
    """Write ``cols (k, K, e)`` into columns ``idx (k, e)`` of the symmetric ``A (k, K, K)``, and its transpose into
    the rows."""
    k, e = idx.shape
    K = A.shape[-1]
    A.scatter_(2, idx.unsqueeze(1).expand(k, K, e), cols)
    A.scatter_(1, idx.unsqueeze(2).expand(k, e, K), cols.transpose(1, 2))


def _inv_small(a: Tensor) -> Tensor:
    """Inverse of SPD (or negative definite) ``a (k, e, e)``; a division when ``e = 1``."""
    return 1.0 / a if a.shape[-1] == 1 else torch.linalg.inv(a)


def _sweep(A: Tensor, d: Tensor, m: Tensor, wsr: Tensor, t: Tensor, idx: Tensor, unprune: bool) -> None:
    """One side of a swap, in place on every row of ``A (k, K, K)``, ``d (k, K)``, ``m (k, K)``.

    ``unprune``: sweep on ``I = idx (k, e)`` (move it from P to R) and take the Newton step on ``δ_I``,
    ``δ_I += S_II⁻¹ t_I``, ``δ_R −= A_RI S_II⁻¹ t_I``. Else reverse-sweep on ``J = idx`` (move it from R to P) with
    the OBS update ``δ_R −= A_RJ A_JJ⁻¹ w'_J`` (``w' = w + δ``, so ``w'_J`` becomes 0). The sweep:
    ``Ã_II = −A_II⁻¹``, ``Ã_·I = ±A_·I A_II⁻¹`` (+ for a sweep, − for a reverse sweep), ``Ã = A − A_·I A_II⁻¹ A_I·``
    elsewhere.
    """
    c = _cols(A, idx)  # (k, K, e)
    a = _at(c, idx)  # (k, e, e)
    ainv = _inv_small(a)
    rhs = (t if unprune else wsr + d).gather(1, idx)  # (k, e)
    step = (ainv @ rhs.unsqueeze(2))  # (k, e, 1)
    d.sub_((c @ step).squeeze(2) * m)
    if unprune:
        d.scatter_add_(1, idx, step.squeeze(2))
    m.scatter_(1, idx, unprune)
    ca = c @ ainv  # (k, K, e)
    A.baddbmm_(ca, c.transpose(1, 2), alpha=-1.0)
    new = ca if unprune else -ca
    new.scatter_(1, idx.unsqueeze(2).expand_as(a), -ainv)
    _set_cols(A, idx, new)


def _swap(A: Tensor, d: Tensor, m: Tensor, wsr: Tensor, t: Tensor, I: Tensor, J: Tensor) -> None:
    """``_sweep(I, unprune)`` then ``_sweep(J, prune)`` in the same rows, fused into one rank-2e pass over ``A``.

    With ``c = A_·I``, ``a = A_II``: after the sweep on I, ``A¹_·J = A_·J − c a⁻¹ A_IJ`` (rows ∉ I) and
    ``A¹_IJ = a⁻¹ A_IJ``; ``b = A¹_JJ``. Outside rows/columns I, J the result is
    ``A − c a⁻¹ cᵀ − A¹_·J b⁻¹ A¹_·Jᵀ``; columns J become ``−A¹_·J b⁻¹`` (``−b⁻¹`` on J) and columns I
    ``A¹_·I − A¹_·J b⁻¹ A¹_JI``.
    """
    c = _cols(A, I)  # (k, K, e)
    cJ = _cols(A, J)
    a = _at(c, I)
    ainv = _inv_small(a)
    ca = c @ ainv  # (k, K, e)
    AIJ = _at(cJ, I)  # (k, e, e)
    c1J = cJ - ca @ AIJ  # (k, K, e) A¹_·J on rows ∉ I
    c1J.scatter_(1, I.unsqueeze(2).expand_as(a), ainv @ AIJ)
    c1I = ca.clone()  # A¹_·I
    c1I.scatter_(1, I.unsqueeze(2).expand_as(a), -ainv)
    b = _at(c1J, J)
    binv = _inv_small(b)
    cb = c1J @ binv  # (k, K, e)
    # refit deltas: Newton step on I, then OBS update removing J
    step = ainv @ t.gather(1, I).unsqueeze(2)  # (k, e, 1)
    d.sub_((c @ step).squeeze(2) * m)
    d.scatter_add_(1, I, step.squeeze(2))
    m.scatter_(1, I, True)
    wJ = (wsr + d).gather(1, J).unsqueeze(2)  # (k, e, 1)
    d.sub_((cb @ wJ).squeeze(2) * m)
    m.scatter_(1, J, False)
    # A: one rank-2e update, then the new columns/rows I and J
    A.baddbmm_(torch.cat([ca, cb], 2), torch.cat([c, c1J], 2).transpose(1, 2), alpha=-1.0)
    newJ = -cb
    newJ.scatter_(1, J.unsqueeze(2).expand_as(b), -binv)
    newI = c1I - cb @ _at(c1I, J)
    newI.scatter_(1, J.unsqueeze(2).expand_as(a), _at(newJ, I).transpose(1, 2))
    _set_cols(A, I, newI)
    _set_cols(A, J, newJ)


def _solve_small(a: Tensor, b: Tensor) -> Tensor:
    """``a⁻¹ b`` for SPD ``a (..., e, e)``, ``b (..., e, c)``; scalar division when ``e = 1``."""
    if a.shape[-1] == 1:
        return b / a
    return torch.linalg.solve(a, b)


def _quad(a: Tensor, v: Tensor) -> Tensor:
    """``v a⁻¹ vᵀ`` for ``a (..., e, e)``, ``v (..., e)``: ``(...)``."""
    return (v.unsqueeze(-1) * _solve_small(a, v.unsqueeze(-1))).sum((-1, -2))


def _candidates(
    A: Tensor, ws: Tensor, t: Tensor, keep: Tensor, srow: Tensor, scol: Tensor, nnz: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact ΔL (eq. 3) of every in-scope swap.

    Args: ``A (n, K, K)``, ``ws (n, K)`` dense weights, ``t (n, K)`` (the refit deltas ``δ_R`` on R, ``S w_P`` on
    P), ``keep (S, B)``, ``srow, scol (S, B, e)`` local row and column of every element of the chunk's scopes.
    Returns ``(delta (S, q, nnz), pruned block ids (S, q), kept block ids (S, nnz))``.
    """
    e = srow.shape[2]
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # kept first
    kb, pb = order[:, :nnz], order[:, nnz:]  # (S, nnz), (S, q)
    exp = lambda ids: ids.unsqueeze(-1).expand(-1, -1, e)  # noqa: E731
    rI, cI = srow.gather(1, exp(pb)), scol.gather(1, exp(pb))  # (S, q, e)
    rJ, cJ = srow.gather(1, exp(kb)), scol.gather(1, exp(kb))  # (S, nnz, e)
    gI = -t[rI, cI]  # (S, q, e) gradient of the pruned block
    SII = A[rI.unsqueeze(-1), cI.unsqueeze(-1), cI.unsqueeze(-2)]  # (S, q, e, e)
    wJ = ws[rJ, cJ] + t[rJ, cJ]  # (S, nnz, e) refit weights of the kept block
    GJJ = -A[rJ.unsqueeze(-1), cJ.unsqueeze(-1), cJ.unsqueeze(-2)]  # (S, nnz, e, e)
    gain = _quad(SII, gI)  # (S, q)
    # same-row coupling U = A[row, J, I] (S, q, nnz, e, e); zero where I and J lie in different rows
    same = (rI[:, :, None, 0] == rJ[:, None, :, 0])  # (S, q, nnz)
    U = A[rI[:, :, None, None, None, 0], cJ[:, None, :, :, None], cI[:, :, None, None, :]]  # (S, q, nnz, e, e)
    U = U * same[..., None, None]
    SinvU = _solve_small(SII.unsqueeze(2), U.transpose(-1, -2))  # (S, q, nnz, e, e) = S⁻¹ Uᵀ
    Sinvg = _solve_small(SII, gI.unsqueeze(-1)).squeeze(-1)  # (S, q, e)
    w2 = wJ.unsqueeze(1) + (U @ Sinvg.unsqueeze(2).unsqueeze(-1)).squeeze(-1)  # (S, q, nnz, e)
    G2 = GJJ.unsqueeze(1) + U @ SinvU  # (S, q, nnz, e, e)
    cost = _quad(G2, w2)  # (S, q, nnz)
    return cost - gain.unsqueeze(-1), pb, kb


#: sweeps between exact recomputations of the refit deltas from ``A`` (bounds round-off drift of the updates)
RESYNC_SWEEPS = 16


def swap_bytes(M: int, K: int, work: torch.dtype) -> tuple[int, int, int]:
    """``(per_row, build_per_row, fixed)`` bytes of :func:`swap_search` (``s`` bytes of the work dtype).

    Per row of a chunk: its swept ``A`` (``K²·s``) and ``(n, K)`` state and candidate temporaries (``24·K·s``).
    Per row built at once by :func:`swap_state`: the permuted ``H`` and its flat int64 index, ``B``, the factor
    blocks and the scattered result with its index (``4·K²·s + 2·8·K²``). Fixed: the scaled ``H`` and ``W`` and
    the masks (``K²·s + 2·M·K·s + 2·M·K``).
    """
    s = work.itemsize
    return K * K * s + 24 * K * s, 4 * K * K * s + 16 * K * K, K * K * s + 2 * M * K * s + 2 * M * K


def _swap_chunk(
    ws: Tensor, hs: Tensor, layout: Layout, mask: Tensor, rows: Tensor, sc: Tensor, srow: Tensor, sgrp: Tensor,
    lrow_group: Tensor, ng: int, build_rows: int, max_sweeps: int, rtol: float,
    progress_fn: Callable[[str], None] | None,
) -> tuple[Tensor, float, float, int, int]:
    """The swap search on one chunk of ``ng`` row groups: global ``rows (n,)``, their scopes ``sc``, with local
    rows ``srow`` and groups ``sgrp``, ``lrow_group (n,)``. Reads ``mask`` and writes nothing outside.

    Returns ``(final mask of rows (n, K), damped loss before, after, swaps, sweeps)``."""
    dt = ws.dtype
    w = ws[rows]  # (n, K)
    m = mask[rows]  # (n, K)
    m_out = m.clone()
    local = torch.arange(len(rows), device=w.device)  # (n,) position of each active row in the chunk
    scol = layout.cols[sc]
    A = swap_state(w, hs, m, build_rows)
    keep = m[srow, scol].all(-1)  # (S_c, B)
    total_swaps = sweeps = 0
    loss_before = loss_after = 0.0
    while True:
        if sweeps % RESYNC_SWEEPS == 0:  # exact refit deltas: δ_R = A_RP w_P, δ_P = −w_P
            wP = w * ~m
            d = torch.where(m, torch.bmm(A, wP.unsqueeze(2)).squeeze(2), -w)  # (n, K)
        r = d @ hs  # (n, K); zero on R up to round-off, −S w_P on P
        t = torch.where(m, d, -r)
        row_loss = (d * r).sum(1)  # (n,) δ H̃ δᵀ
        grp_loss = torch.zeros(ng, dtype=dt, device=w.device).index_add_(0, lrow_group, row_loss)
        if sweeps == 0:
            loss_before += float(grp_loss.sum())
        if sweeps >= max_sweeps:
            loss_after += float(grp_loss.sum())
            break
        delta, pb, kb = _candidates(A, w, t, keep, srow, scol, layout.nnz)
        S_c, _, nz = delta.shape
        best, arg = delta.flatten(1).min(1)  # (S_c,)
        gbest = torch.full((ng,), math.inf, dtype=dt, device=w.device).scatter_reduce(0, sgrp, best, "amin")
        thresh = -rtol * grp_loss.abs().clamp_min(torch.finfo(dt).tiny)
        hit = (best == gbest[sgrp]) & (best < thresh[sgrp])
        sidx = torch.arange(S_c, device=w.device)
        big = torch.full((ng,), S_c, dtype=torch.long, device=w.device)
        chosen = big.scatter_reduce(0, sgrp[hit], sidx[hit], "amin")  # (ng,) scope of each group's swap
        active = chosen < S_c  # (ng,) groups that improve; the others are final (their state is unchanged)
        if not bool(active.all()):
            loss_after += float(grp_loss[~active].sum())
            m_out[local] = m
            if not bool(active.any()):
                break
            # compact the chunk to the active groups
            gmap = torch.cumsum(active, 0) - 1  # old group -> new group
            rkeep = active[lrow_group]  # (n,)
            rmap = torch.cumsum(rkeep, 0) - 1  # old local row -> new local row
            skeep = active[sgrp]
            smap = torch.cumsum(skeep, 0) - 1
            local, w, m, A, d, t = local[rkeep], w[rkeep], m[rkeep], A[rkeep], d[rkeep], t[rkeep]
            lrow_group = gmap[lrow_group[rkeep]]
            srow, scol, keep, sgrp = rmap[srow[skeep]], scol[skeep], keep[skeep], gmap[sgrp[skeep]]
            pb, kb, arg = pb[skeep], kb[skeep], arg[skeep]
            chosen = smap[chosen[active]]
            ng = int(active.sum())
        a = arg[chosen]
        bi = pb[chosen, a // nz]  # pruned block to un-prune
        bj = kb[chosen, a % nz]  # kept block to prune
        rI, cI = srow[chosen, bi], scol[chosen, bi]  # (k, e)
        rJ, cJ = srow[chosen, bj], scol[chosen, bj]
        if layout.row_local:  # every group is one row, in order: I and J of row g
            _swap(A, d, m, w, t, cI, cJ)
        else:  # I and J in different rows of a group (rowpair-16): one side each
            for rr, cc, unprune in ((rI[:, 0], cI, True), (rJ[:, 0], cJ, False)):
                Ak, dk, mk = A[rr], d[rr], m[rr]
                _sweep(Ak, dk, mk, w[rr], t[rr], cc, unprune)
                A[rr], d[rr], m[rr] = Ak, dk, mk
        keep[chosen, bi] = True
        keep[chosen, bj] = False
        sweeps += 1
        total_swaps += len(chosen)
        if progress_fn is not None:
            progress_fn(f"swap: sweep {sweeps}, {len(chosen)} swaps")
    m_out[local] = m
    return m_out, loss_before, loss_after, total_swaps, sweeps


def swap_search(
    weight0: Tensor,
    hessian_d: Tensor,
    layout: Layout,
    mask: Tensor,
    *,
    max_sweeps: int = 64,
    rtol: float | None = None,
    progress_fn: Callable[[str], None] | None = None,
    max_memory: int | str | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Best-improvement in-scope swap search from ``mask`` (see the module docstring, eqs. 2-3).

    Each sweep applies, in every group of coupled rows (one row, or the two rows of a ``rowpair-16`` pair), the
    single swap with the most negative exact ΔL, if it improves by more than ``rtol`` times the group's loss
    (default ``1e-10`` in float64, ``1e-5`` in float32). Rows are processed in chunks of whole groups sized by the
    memory planner from ``max_memory`` (:func:`swap_bytes`) so that the per-row ``A (K, K)`` fit. The refit
    deltas ``δ = w' − w`` are updated with each swap (``O(K e)``) and recomputed from ``A`` every
    :data:`RESYNC_SWEEPS` sweeps; the gradient needs one ``(n, K) × (K, K)`` product.

    Returns ``(mask (M, K), stats)``; the mask is valid for ``layout``, and in exact arithmetic the damped loss of
    its refit is lower than that of ``mask`` by the sum of the applied ΔL (``stats``: damped relative errors before
    and after, as seen by the search).
    """
    M, K = weight0.shape
    dt = weight0.dtype
    if not bool((layout.rows == layout.rows[:, :, :1]).all()):
        raise InputError("refine='swap' needs every block inside one row; this pattern has blocks spanning rows.")
    if rtol is None:
        rtol = 1e-10 if dt == torch.float64 else 1e-5
    if layout.nnz in (0, layout.blocks_per_scope):  # every block kept or every block pruned: no swap exists
        max_sweeps = 0
    budget = device_budget(weight0.device, max_memory)
    per_row, build_row, fixed = swap_bytes(M, K, dt)
    group = _row_groups(layout)  # (M,)
    row_perm = torch.argsort(group, stable=True)
    inv_row = torch.argsort(row_perm)
    n_groups = int(group.max()) + 1
    gsize = torch.bincount(group, minlength=n_groups)
    gmax = int(gsize.max())
    # groups per chunk: their A and state, a 1/16 share of build rows, and room for at least one build row
    per_group = gmax * (per_row + build_row // 16)
    chunk_groups = plan_rows(n_groups, per_group, fixed + build_row, budget, what="swap search chunk")
    n_rows = min(M, chunk_groups * gmax)
    build_rows = plan_rows(n_rows, build_row, fixed + n_rows * per_row, budget, what="swap search build")
    scope_group = group[layout.rows[:, 0, 0]]  # (S,)
    scope_perm = torch.argsort(scope_group, stable=True)
    scope_bounds = torch.searchsorted(scope_group[scope_perm], torch.arange(n_groups + 1, device=group.device))
    gstart = torch.cat([torch.zeros(1, dtype=torch.long, device=group.device), gsize.cumsum(0)]).tolist()
    acc = {"swaps": 0, "sweeps": 0, "before": 0.0, "after": 0.0}
    stats: dict[str, Any] = {}
    out = mask.clone()

    def step(g0: int, g1: int) -> None:
        r0, r1 = gstart[g0], gstart[g1]
        rows = row_perm[r0:r1]  # (n,) global rows of the chunk
        sc = scope_perm[int(scope_bounds[g0]) : int(scope_bounds[g1])]
        srow = inv_row[layout.rows[sc]] - r0  # (S_c, B, e) local rows
        m, before, after, swaps, sweeps = _swap_chunk(
            ws, hs, layout, mask, rows, sc, srow, scope_group[sc] - g0, group[rows] - g0, g1 - g0,
            min(build_rows, r1 - r0), max_sweeps, rtol, progress_fn,
        )
        out[rows] = m
        acc["swaps"] += swaps
        acc["sweeps"] = max(acc["sweeps"], sweeps)
        acc["before"] += before
        acc["after"] += after

    hs, dsc = scaled_hessian(hessian_d)
    ws = weight0 * dsc  # (M, K)
    chunk = run_chunked(step, n_groups, chunk_groups, stats=stats, what="swap search chunk", budget=budget,
                        counter="swap_oom_retries")
    den = float(((ws @ hs) * ws).sum().clamp_min(torch.finfo(dt).tiny))
    stats.update({
        "swap_sweeps": acc["sweeps"],
        "swaps": acc["swaps"],
        "swap_damped_loss_before": (acc["before"] / den) ** 0.5,
        "swap_damped_loss_after": (max(acc["after"], 0.0) / den) ** 0.5,
        "swap_chunk_rows": min(M, chunk * gmax),
    })
    return out, stats


# ---- composition used by prune_weight -------------------------------------------------------------------------
def refine_result(
    weight0: Tensor,
    hessian: Tensor,
    layout: Layout,
    weight: Tensor,
    mask: Tensor,
    *,
    refine: str | None,
    refit_weights: bool,
    max_sweeps: int,
    damp: float,
    damp_mode: str,
    progress_fn: Callable[[str], None] | None = None,
    max_memory: int | str | None = None,
    gather: Gather = SINGLE,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Apply ``refine`` then ``refit`` to a method's ``(weight, mask)`` within the memory budget ``max_memory``;
    keep each step only if the true loss (through the undamped ``hessian``) does not increase. Returns
    ``(weight, mask, stats)``. With ``gather`` the rows are one part of a layer (:mod:`sparsekit.coupling`): the
    losses that decide are the whole layer's, the swap search's own statistics this part's.

    ``refine="swap"`` ends with the refit of its mask; a ``refit`` after a kept swap would recompute the same
    weights and is skipped (``stats["refit_by"] = "swap"``)."""
    stats: dict[str, Any] = {}
    if refine is None and not refit_weights:
        return weight, mask, stats
    hd, rel, _ = damped_hessian(hessian, damp, damp_mode)
    stats["refine_damp"] = rel
    loss = relative_error(weight0, weight, hessian, gather)
    refit_done = False
    if refine == "swap":
        new_mask, st = swap_search(weight0, hd, layout, mask, max_sweeps=max_sweeps, progress_fn=progress_fn,
                                   max_memory=max_memory)
        new_w, st_fit = refit(weight0, hd, new_mask, x0=weight, max_memory=max_memory, gather=gather)
        new_loss = relative_error(weight0, new_w, hessian, gather)
        stats.update(st, **st_fit, swap_loss_before=loss, swap_loss_after=new_loss, swap_kept=new_loss <= loss)
        if new_loss <= loss:
            weight, mask, loss, refit_done = new_w, new_mask, new_loss, True
    if refit_weights and refit_done:
        stats["refit_by"] = "swap"
    elif refit_weights:
        new_w, st_fit = refit(weight0, hd, mask, x0=weight, max_memory=max_memory, gather=gather)
        new_loss = relative_error(weight0, new_w, hessian, gather)
        stats.update(st_fit, refit_loss_before=loss, refit_loss_after=new_loss, refit_kept=new_loss <= loss)
        if new_loss <= loss:
            weight, loss = new_w, new_loss
    return weight, mask, stats
