"""OBS-ord: one shared inverse Hessian, scopes in batches of ``ng`` in an order shared by all rows (DESIGN.md §4).

The seed's "shared C, Schur, ng=256" method. ``F`` is the set of *free* columns (initially all ``K``) and
``C = inv((H + Λ)_FF)`` the shared inverse over them (damping as :func:`~sparsekit.hessian.damped_inverse`).
A *scope column* is the set of scopes that cover the same columns in every row chunk (one scope per row for
row-local patterns; the 8 row-pair scopes of a 16-column block of a 16-row chunk for ``rowpair-16``).
Until every scope column is decided, one batch:

1. **order**: ``left_to_right`` takes the next ``ng`` scope columns by first column; ``largest_first`` the ``ng``
   undecided scope columns of largest *total* cost — the sum over all rows of each row's cheapest choice,
   evaluated with the current ``C`` and weights (re-evaluated at every batch), summed in float64. This sum is
   the only coupling of the rows: with ``gather`` (:mod:`sparsekit.coupling`) the rows are one part of a layer
   and the per-part sums are added over the parts; ``C`` depends on ``H`` alone and is the same in every part.
2. **masks**: every row chooses, in each scope of the batch, the cheapest set ``S`` of ``B − nnz`` blocks,
   ``w_S (C_SS)⁻¹ w_Sᵀ`` (:func:`~sparsekit.pruners.scoring.best_subset`'s enumeration, with the shared ``C``).
   Rows prune different elements of the same columns; ``P_r`` is row ``r``'s union over the batch.
3. **compensation** (exact OBS over the free set, per row, one shared ``C``)::

       δw_F = −w_{P_r} (C_{P_r P_r})⁻¹ C_{P_r, F}                                        (2.1)

   ``w_{P_r}`` becomes exactly 0. Our reading, precisely: every free column moves — the unprocessed columns and
   the batch's *kept* columns, which are still free when the batch is decided (``C`` treats them as free), and
   are frozen only after this update. This is the OBS optimum for row ``r`` given ``P_r`` and the current free
   set, so its loss is never above the variant that freezes the kept batch columns first (which would need a
   per-row ``C`` for ``F \\ K_r``); with one scope per batch it is SparseGPT's treatment of a scope made exact
   within the scope.
4. **freeze and downdate**: all columns ``Q`` of the batch's scopes (pruned and kept, in every row) leave ``F``,
   and ``C`` becomes ``inv((H + Λ)_{F'F'})``, ``F' = F \\ Q``, by the Schur complement (compacted: ``C`` shrinks)::

       C ← C_{F'F'} − C_{F'Q} (C_QQ)⁻¹ C_{QF'}                                            (2.2)

Work runs in the scaled coordinates of :func:`~sparsekit.hessian.scaled_inverse` (DESIGN.md §5).
``C`` itself is always kept in the working dtype (float32, or float64 for float64 inputs) and every solve is
float32 or wider. ``c_dtype`` (``None``: the working dtype) is the operand dtype of the Schur downdate (2.2),
the ``O(|Q| · |F|²)`` bulk of the arithmetic: ``Y = L_QQ⁻¹ C_{Q,F'}`` is rounded to ``c_dtype`` and
``C_{F'F'} − Yᵀ Y`` accumulates in the working dtype (:func:`~sparsekit.kernels.obs_linalg.baddbmm_`: 16-bit
tensor-core GEMM with float32 output on CUDA, upcast on the CPU). Storing ``C`` itself in 16 bits (the first
implementation) re-rounds it after every batch and the error compounds: on MiniLM FFN-output layers at 2:4,
ng=64, that moved the loss by up to +4.5% (float16) from float32 and made ``C_PP`` indefinite (bfloat16);
rounding only ``Y`` stayed within 0.3% (DESIGN.md §5's 0.5% rule; ``tests/test_obs_ord.py``). A ``C_PP`` or
``C_QQ`` that rounding leaves indefinite gets a small diagonal jitter (:func:`_factor`, ``stats["jitter_steps"]``;
seen once, bfloat16 on a 32-row slice, loss unchanged to 0.02%).
Memory: ``K²`` for ``C`` plus ``rows · q²`` for the per-row ``C_{P_r P_r}`` (computed in slices of rows sized by
the memory planner, :mod:`sparsekit.memory`, from :func:`obs_ord_bytes` and ``max_memory``). The
per-row solves are batched inverse Cholesky factors (:func:`~sparsekit.kernels.obs_linalg.chol_inv_factor`);
the compensation of all rows is one GEMM.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

import torch
from torch import Tensor

from sparsekit.coupling import SINGLE, Gather
from sparsekit.errors import InputError
from sparsekit.hessian import DEFAULT_DAMP, scaled_inverse
from sparsekit.kernels.obs_linalg import LOW_PRECISION, baddbmm_, tf32
from sparsekit.memory import device_budget, plan_rows, run_chunked
from sparsekit.patterns import Layout
from sparsekit.pruners import PrunerOutput
from sparsekit.pruners.scoring import obs_cost, shared_scope_inverse, subsets
from sparsekit.pruners._common import (
    MAX_JOINT_SUBSETS,
    ORDERS,
    TF32_DEFAULT,
    MessageFn,
    check_c_dtype,
    factor_with_jitter,
    per_row_sets,
)

log = logging.getLogger(__name__)

__all__ = ["prune_obs_ord", "obs_ord_bytes"]


def _factor(A: Tensor, what: str, stats: dict[str, Any]) -> Tensor:
    """:func:`~sparsekit.pruners._common.factor_with_jitter` of ``A (n, q, q)``, jitter steps counted in
    ``stats["jitter_steps"]`` and logged."""

    def retry(n_bad: int, jitter: float) -> None:
        stats["jitter_steps"] += 1
        log.warning("obs-ord: %s not positive definite in %d of %d matrices (c_dtype=%s rounding); adding %.0e·mean "
                    "diag.", what, n_bad, len(A), stats["c_dtype"], jitter)

    return factor_with_jitter(A, retry, lambda steps: (
        f"obs-ord: {what} stayed indefinite after {steps} jitter steps; use c_dtype=None "
        "(float32), float64 inputs or a larger damp."))


def _column_groups(layout: Layout) -> tuple[Tensor, Tensor]:
    """Template scopes grouped by the columns they cover: ``(members (Gc, m), first (Gc,))``."""
    _, t_cols = layout.template
    key = t_cols.flatten(1).sort(1).values  # (St, n)
    uniq, inv = torch.unique(key, dim=0, return_inverse=True)
    order = torch.argsort(inv, stable=True)
    counts = torch.bincount(inv)
    if not bool((counts == counts[0]).all()):
        raise InputError(f"pattern {layout.pattern.name!r}: scope columns hold different numbers of scopes.")
    return order.view(len(uniq), int(counts[0])), uniq[:, 0]


def _best(w: Tensor, Cs: Tensor, num_blocks: int, num_prune: int, elems: int) -> tuple[Tensor, Tensor]:
    """Cheapest subset per (row chunk, scope) with a *shared* scope inverse.

    ``w (N, S, n)``, ``Cs (S, n, n)`` -> ``(cost (N, S), keep (N, S, B))``. Each ``C_SS`` is factored once for all
    rows (:func:`scoring.best_subset` would factor it per row).
    """
    subs = subsets(num_blocks, num_prune, w.device)  # (n_sub, p)
    idx = (subs.unsqueeze(-1) * elems + torch.arange(elems, device=w.device)).flatten(1)  # (n_sub, q)
    wS = w[..., idx]  # (N, S, n_sub, q)
    CSS = Cs[:, idx.unsqueeze(2), idx.unsqueeze(1)]  # (S, n_sub, q, q)
    if idx.shape[1] <= 2:
        costs = obs_cost(wS, CSS)
    else:
        L, _ = torch.linalg.cholesky_ex(CSS)
        inv = torch.cholesky_inverse(L)  # (S, n_sub, q, q)
        costs = torch.einsum("nsai,saij,nsaj->nsa", wS, inv, wS)
    cost, arg = costs.min(-1)
    keep = torch.ones(*w.shape[:-1], num_blocks, dtype=torch.bool, device=w.device)
    keep.scatter_(-1, subs[arg], False)
    return cost, keep


def obs_ord_bytes(M: int, K: int, layout: Layout, num_scopes: int, q: int, work: torch.dtype) -> tuple[int, int, int]:
    """``(per_chunk_scoring, per_row_solve, fixed)`` bytes of one batch (``s`` bytes of the work dtype).

    Scoring, per row chunk: for each of the ``num_scopes`` candidate scopes its weights and every subset's
    ``w_S`` with the einsum temporaries (8 B per entry, as float64). Solving, per row: ``C_PP``, its factor, ``X``
    and the identity (``4·q²·s``), the gather's int64 indices (``2·8·q²``) and ``q``-vectors. Fixed: ``C`` and
    the downdate's copies (``4·K²·s``), ``E`` and the pruned mask (``M·K·(s + 1)``), the scores
    (``num_scopes`` per chunk).
    """
    B, e, p = layout.blocks_per_scope, layout.block_numel, layout.num_prune
    s = work.itemsize
    n_el = B * e
    per_chunk = num_scopes * 8 * (n_el + 3 * math.comb(B, p) * p * e)
    per_row = 4 * q * q * s + 16 * q * q + 32 * q
    fixed = 4 * K * K * s + M * K * (s + 1) + (M // layout.chunk_rows) * num_scopes * (s + B)
    return per_chunk, per_row, fixed


def prune_obs_ord(
    weight: Tensor,
    hessian: Tensor,
    layout: Layout,
    *,
    damp: float = DEFAULT_DAMP,
    damp_mode: str = "mean",
    progress_fn: MessageFn = None,
    ng: int = 256,
    order: str = "largest_first",
    c_dtype: torch.dtype | None = None,
    max_memory: int | str | None = None,
    gather: Gather = SINGLE,
) -> PrunerOutput:
    """OBS-ord (module docstring) on ``weight (M, K)`` with the undamped ``hessian (K, K)``.

    Args:
        ng: scope columns per batch (shared by all rows).
        order: ``"largest_first"`` (largest total cost, re-evaluated each batch) or ``"left_to_right"``.
        c_dtype: operand dtype of the Schur downdate GEMM (``None``: the working dtype); ``C`` stays in the
            working dtype (module docstring).
        max_memory: the memory budget (:func:`sparsekit.memory.device_budget`) of the row slices.
        gather: the reduction of the ``largest_first`` costs over the row parts of the layer
            (:mod:`sparsekit.coupling`).
    """
    if not isinstance(ng, int) or isinstance(ng, bool) or ng < 1:
        raise InputError(f"ng (scope columns per batch) must be an int >= 1, got {ng!r}.")
    if order not in ORDERS:
        raise InputError(f"order must be one of {ORDERS}, got {order!r}.")
    check_c_dtype(c_dtype)
    M, K = weight.shape
    dev = weight.device
    work = weight.dtype
    c = c_dtype or work
    budget = device_budget(dev, max_memory)
    B, e, p = layout.blocks_per_scope, layout.block_numel, layout.num_prune
    cr = layout.chunk_rows
    nch = M // cr
    inv = scaled_inverse(hessian, damp, damp_mode)
    pruned = torch.zeros(M, K, dtype=torch.bool, device=dev)
    stats: dict[str, Any] = {"damp_steps": inv.steps, "ng": ng, "order": order,
                             "c_dtype": str(c).replace("torch.", ""), "batches": 0, "jitter_steps": 0,
                             "oom_retries": 0}
    if p == 0:  # nothing to prune: the weight as it is (no round trip through the scaling)
        return PrunerOutput(weight, ~pruned, inv.damp, stats)
    W = weight.mul_(inv.d)  # (M, K) scaled weights
    if math.comb(B, p) > MAX_JOINT_SUBSETS:
        raise InputError(f"obs-ord enumerates C({B}, {p}) = {math.comb(B, p)} subsets per scope: too many.")
    t_rows, t_cols = layout.template  # (St, B, e) rows within a chunk of cr rows
    members, first = _column_groups(layout)
    l2r = torch.argsort(first, stable=True)  # scope columns, left to right
    undecided = torch.ones(len(first), dtype=torch.bool, device=dev)
    C = inv.C.to(work)  # (nF, nF) shared inverse over the free columns, always in the working dtype
    free = torch.arange(K, device=dev)  # (nF,) free columns
    pos = torch.arange(K, device=dev)  # column -> index in C (-1 when frozen)
    Wc = W.view(nch, cr, K)
    row_local = cr == 1
    use_tf32 = weight.is_cuda and ((c == torch.float32 and TF32_DEFAULT) or c in LOW_PRECISION)
    t0 = time.perf_counter()
    with tf32(use_tf32) if weight.is_cuda else contextlib.nullcontext():
        while bool(undecided.any()):
            left = undecided.nonzero().flatten()
            if order == "left_to_right":
                rem = l2r[undecided[l2r]]
                cand = rem[:ng]
            else:
                cand = left
            sids = members[cand].flatten()  # (ns,) template scopes of the candidate scope columns
            r_s, c_s = t_rows[sids], t_cols[sids]  # (ns, B, e)
            Cs = shared_scope_inverse(C, r_s, pos[c_s])  # (ns, n, n)
            per_chunk, _, fixed = obs_ord_bytes(M, K, layout, len(sids), 0, work)
            step = plan_rows(nch, per_chunk, fixed, budget, what="obs-ord scoring")
            cost = torch.empty(nch, len(sids), dtype=work, device=dev)
            keep = torch.empty(nch, len(sids), B, dtype=torch.bool, device=dev)

            def score(a: int, b: int) -> None:
                wv = Wc[a:b][:, r_s, c_s].flatten(-2)  # (b-a, ns, n)
                cost[a:b], keep[a:b] = _best(wv, Cs, B, p, e)

            run_chunked(score, nch, step, stats=stats, what="obs-ord scoring", budget=budget)
            if order == "largest_first":
                per_scope = gather.sum(cost.sum(0, dtype=torch.float64))  # (ns,) over every row of every part
                total = per_scope.view(len(cand), -1).sum(1)  # (nc,) total cost per scope column
                top = total.topk(min(ng, len(cand))).indices
                cand = cand[top]
                m = members.shape[1]
                sel = (top.unsqueeze(1) * m + torch.arange(m, device=dev)).flatten()
                sids, keep = sids[sel], keep[:, sel]
                r_s, c_s = t_rows[sids], t_cols[sids]
            # pruned elements of every row: (chunk, scope, block, elem) -> (row, col)
            drop = (~keep).unsqueeze(-1).expand(-1, -1, -1, e)  # (nch, ns, B, e)
            rows_full = r_s.unsqueeze(0) + (torch.arange(nch, device=dev) * cr).view(nch, 1, 1, 1)
            er = rows_full[drop]
            ec = c_s.unsqueeze(0).expand_as(rows_full)[drop]
            P, valid = per_row_sets(er, ec, M, row_local)  # (M, q)
            Q = c_s.flatten().unique()  # (|Q|,) sorted columns of the batch
            Qpos = pos[Q]
            # per-row OBS solves e_r = w_P (C_PP)⁻¹, in row slices
            q = P.shape[1]
            E = torch.zeros(M, len(Q), dtype=work, device=dev)
            jq = torch.searchsorted(Q, P)  # (M, q) index of each pruned column in Q
            _, per_row, fixed = obs_ord_bytes(M, K, layout, len(sids), q, work)
            rs = plan_rows(M, per_row, fixed, budget, what="obs-ord solves")

            def solve(a: int, b: int) -> None:
                pP = pos[P[a:b]]  # (n, q)
                Cpp = C[pP.unsqueeze(2), pP.unsqueeze(1)]  # (n, q, q)
                wP = W[a:b].gather(1, P[a:b])
                if valid is not None:
                    v = valid[a:b]
                    Cpp = Cpp * (v.unsqueeze(1) & v.unsqueeze(2))
                    Cpp.diagonal(dim1=1, dim2=2).add_((~v).to(work))
                    wP = wP * v
                X = _factor((Cpp + Cpp.mT) / 2, "C_PP", stats)
                # (n, q) (C_PP)⁻¹ w_Pᵀ = Xᵀ X w_Pᵀ as products and sums (a batched mat-vec rounds differently
                # for a batch of one, and results must not depend on the slicing)
                ev = (X * (X * wP.unsqueeze(1)).sum(2).unsqueeze(2)).sum(1)
                E[a:b] = torch.zeros_like(E[a:b]).scatter_add_(1, jq[a:b].clamp_max(len(Q) - 1), ev)

            run_chunked(solve, M, rs, stats=stats, what="obs-ord solves", budget=budget)
            # (2.1) one GEMM for every row: δw_F = −E C_{Q,F}
            W[:, free] -= E @ C[Qpos]
            pruned[er, ec] = True
            W.masked_fill_(pruned, 0.0)
            # (2.2) freeze Q, downdate C to the remaining free columns
            is_q = torch.zeros(K, dtype=torch.bool, device=dev)
            is_q[Q] = True
            stay = ~is_q[free]
            Upos = stay.nonzero().flatten()
            CQQ = C[Qpos][:, Qpos]
            Xq = _factor(((CQQ + CQQ.T) / 2).unsqueeze(0), "C_QQ", stats)
            Y = (Xq[0] @ C[Qpos][:, Upos]).to(c)  # (|Q|, nU), rounded to c_dtype
            Cn = C[Upos][:, Upos].unsqueeze(0)  # (1, nU, nU) a copy (advanced indexing)
            baddbmm_(Cn, Y.T.unsqueeze(0), Y.unsqueeze(0), alpha=-1.0)  # C_UU − Yᵀ Y in the working dtype
            C = (Cn[0] + Cn[0].T) / 2
            free = free[Upos]
            pos = torch.full((K,), -1, dtype=torch.long, device=dev)
            pos[free] = torch.arange(len(free), device=dev)
            undecided[cand] = False
            stats["batches"] += 1
            if progress_fn is not None:
                done = int((~undecided).sum())
                el = time.perf_counter() - t0
                progress_fn(f"obs-ord: scope columns {done}/{len(first)}, {el:.1f}s elapsed, "
                            f"ETA {el / done * (len(first) - done):.1f}s")
    W.div_(inv.d).masked_fill_(pruned, 0.0)
    return PrunerOutput(W, ~pruned, inv.damp, stats)
