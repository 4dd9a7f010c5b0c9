"""True OBS: every row keeps its own inverse Hessian, downdated by Schur complements (DESIGN.md §2, §4, §5).

**The method.** Each row ``w`` of ``W (M, K)`` starts from ``C = (H + Λ)⁻¹`` (damping as
:func:`~sparsekit.hessian.damped_inverse`) and repeats, until every scope is decided:

1. pick ``ng`` of its undecided scopes: ``left_to_right`` (column order) or ``largest_first`` (the scopes whose
   cheapest choice costs most, with the current ``C`` and ``w``);
2. choose their masks with the current ``C`` and ``w``: ``independent`` (per element ``w_j² / C_jj``, summed per
   block, the ``B − nnz`` smallest blocks of each scope) or ``joint`` (every subset ``S`` of ``B − nnz`` blocks,
   cost ``w_S (C_SS)⁻¹ w_Sᵀ``, :func:`~sparsekit.pruners.scoring.best_subset`). All of a step's decisions use the
   same ``C`` (for ``ng > 1`` the interaction between the step's scopes is ignored in the *choice*);
3. prune the union ``P`` of the step's pruned elements with the exact OBS update and downdate (DESIGN.md §2)::

       δw = −w_P (C_PP)⁻¹ C_{P,:}                     (2.1)  all remaining columns move; w_P becomes 0
       C  ← C − C_{:,P} (C_PP)⁻¹ C_{P,:}               (2.2)  Schur complement: C = inv((H + Λ)_RR) on the rest

With ``ng = 1`` and ``joint`` scoring this is exact greedy OBS (``tests/oracles.py::exact_greedy``).
``rowpair-16``: a scope is one 16-column block in rows ``i`` and ``i + 8`` of a 16-row chunk; both rows are in
the same chunk, the choice compares the two rows' costs (each with its own ``C``), so rows prune different
numbers of elements per step: the per-row sets are padded to the chunk's largest with identity rows/columns in
``C_PP`` and zero weights (the padding changes nothing).

**Factored form (what is stored).** With ``C_PP = L Lᵀ`` and ``Z = C_{:,P} L⁻ᵀ (K, q)``, (2.2) is
``C ← C − Z Zᵀ`` and (2.1) is ``δw = −Z a`` with ``a = L⁻¹ w_Pᵀ``. After ``s`` steps ``C = C0 − U Uᵀ`` with
``U = [Z_1 … Z_s] (K, t)``, ``t`` = columns pruned so far. Each row stores ``U``, not ``C``; ``C0`` is shared.
A step needs only ``C_{P,:} = C0_{P,:} − U_P Uᵀ``: one batched GEMM ``(q × t)·(t × K)`` per row on tensor cores,
about half the arithmetic of downdating a full ``C`` (compacted or not) at 50% sparsity (BENCHMARKS.md, "True
OBS on GPU").

**Compaction.** Only the remaining columns' entries of ``C_{P,:}`` are ever used: a pruned column's row of ``C``
is zero after its step (the Schur complement removes it), so what is computed there never reaches a remaining
column. Each row therefore keeps ``w``, the diagonal and ``U``'s rows in its own column order with its remaining
columns first (``perm``/``pos``), and a step runs over the first ``n ≈ K − t`` positions only: the GEMM is
``(q × t)·(t × n)``. Over a 2:4 row that is ``Σ 2q·t·(K − t) ≈ K³/6`` FLOPs and bytes of ``U`` instead of ``K³/4``,
and every other per-step pass shrinks by ``n/K`` (¾ on average). The prefix is compacted once the pruned columns
still in it reach ``K /`` :data:`COMPACT_EVERY` (so ``n`` is at most 3% above ``K − t``), moving as many rows of
``U`` per row as there are such columns, never all of ``U`` (:meth:`TrueOBSChunk._compact`).

Memory per row: ``K · t_max`` entries of ``c_dtype`` (``t_max`` = the row's pruned columns: ``K/2`` at 2:4, at
most ``K`` for rowpair-16) plus ``2–5 · K · min(q, 256)`` float32 work entries (:func:`chunk_bytes`): O(chunk_size · K²).
A step's ``q`` columns are pruned at most :data:`~sparsekit.kernels.obs_update.FUSED_MAX_Q` = 256 at a time
(:meth:`TrueOBSChunk.update`: the same result in exact arithmetic). Per update, ``δw = −Z a`` (2.1), ``U``'s next columns and
the diagonal downdate of ``C`` all read ``Z``: for row-local patterns with ``independent`` scoring on CUDA they are
one Triton kernel that never stores ``Z`` (:func:`~sparsekit.kernels.obs_update.z_update_`; 1.26–2.6× the
reference per update, timed; no faster at ``q = 512``, hence the split). Elsewhere (the CPU, rowpair-16,
``joint``) its torch reference runs.

**Scaling (DESIGN.md §5).** The work runs in the scale-free coordinates ``w̃ = w D``, ``H̃ = D⁻¹ (H + Λ) D⁻¹``
with ``D = sqrt(diag(H + Λ))`` (so ``C̃ = D C D``, unit-diagonal ``H̃``). OBS costs and updates are
unchanged by it (``w̃_P (C̃_PP)⁻¹ w̃_Pᵀ = w_P (C_PP)⁻¹ w_Pᵀ``); it only puts every entry of ``C̃`` on one
scale, which is what makes 16-bit ``c_dtype`` usable. ``C0`` stays float32 (or float64); only ``U`` is stored in
``c_dtype``, and the GEMM accumulates in float32.

**c_dtype.** ``None`` (the seed's default): ``torch.float16`` on CUDA for float32 work, "fp16 for tensor-core
Schur updates"; the weight's working dtype on the CPU (where 16-bit GEMMs are slow) and for float64 inputs.
``torch.float16``/``torch.bfloat16`` store ``U`` in 16 bits (half the memory and bytes, full tensor-core rate).
``torch.float32`` on CUDA runs the big GEMMs in TF32 inside an explicit
:func:`~sparsekit.kernels.obs_linalg.tf32` context. The small factorisations are always strict. Every CUDA
choice is measured within 0.5% of the same algorithm in float64 (BENCHMARKS.md).

**chunk_size.** Rows processed together (rounded up to a multiple of the pattern's row chunk, 16 for
rowpair-16). The memory planner (:mod:`sparsekit.memory`) sizes the chunks from :func:`chunk_bytes` and the
budget (``max_memory``, else what the device can give): ``None`` takes the largest chunk that fits, an int at
most that many rows. On a CUDA out-of-memory error a chunk is retried at half the rows.

**Host syncs.** A row-local step reads nothing back from the device, so on CUDA the host queues the next steps'
small kernels while the GPU runs a step's GEMM: the selection, the pruned sets and the compaction use
static-size sorts instead of boolean masks, and the factorisations of ``C_PP`` are not checked step by step. A
chunk runs unchecked and one flag is read at its end; if some ``C_PP`` was not positive definite there (16-bit
rounding of ``U``), the chunk runs again checked (:func:`_run_chunk`), as do the layer's later chunks: a failed
``C_PP`` gets a growing diagonal jitter, counted in ``stats["jitter_steps"]`` and logged, and an error past the
bound. The result is always the checked algorithm's.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sparsekit.errors import InputError, PatternError
from sparsekit.hessian import DEFAULT_DAMP, scaled_inverse
from sparsekit.kernels.obs_linalg import LOW_PRECISION, UPCAST_SLICE_BYTES, baddbmm_, bmm, chol_inv_factor, tf32
from sparsekit.kernels import obs_update
from sparsekit.kernels.obs_update import (FUSED_MAX_Q, gather_c0, gather_rows, move_rows_, z_update_,
                                          z_update_reference_)
from sparsekit.memory import Budget, device_budget, plan_rows, require, run_chunked
from sparsekit.patterns import Layout
from sparsekit.pruners import PrunerOutput
from sparsekit.pruners._common import (
    MAX_JOINT_SUBSETS,
    ORDERS,
    TF32_DEFAULT,
    MessageFn,
    check_c_dtype,
    factor_with_jitter,
    per_row_sets,
)
from sparsekit.pruners.scoring import best_subset, independent_choice, shared_scope_inverse, subsets

log = logging.getLogger(__name__)

__all__ = ["prune_true_obs", "chunk_bytes", "TrueOBSChunk", "SCORINGS"]

SCORINGS = ("independent", "joint")
#: The prefix of positions a step runs over is compacted once it holds ``K / COMPACT_EVERY`` pruned columns: each
#: compaction is ~30 small kernels, so it is not done every step when steps are small (``q < K / 32``).
COMPACT_EVERY = 32


# ---- options ------------------------------------------------------------------------------------------------
def _check_options(ng: Any, chunk_size: Any, order: Any, scoring: Any, c_dtype: Any) -> None:
    if not isinstance(ng, int) or isinstance(ng, bool) or ng < 1:
        raise InputError(f"ng (scopes per step) must be an int >= 1, got {ng!r}.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise InputError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}.")
    if order not in ORDERS:
        raise InputError(f"order must be one of {ORDERS}, got {order!r}.")
    if scoring not in SCORINGS:
        raise InputError(f"scoring must be one of {SCORINGS}, got {scoring!r}.")
    check_c_dtype(c_dtype)


# ---- the scopes of one chunk of rows ------------------------------------------------------------------------
@dataclass
class _Geometry:
    rows: Tensor  # (Sc, B, e) row (within the chunk) of every element of every scope
    cols: Tensor  # (Sc, B, e) column
    groups: Tensor  # (G, Sg) scope ids of each row group (a row, or a row pair), in column order
    group_rows: Tensor  # (G, Sg, B, e) rows[groups]: the elements of each group's scopes, in that order
    group_cols: Tensor  # (G, Sg, B, e) cols[groups]
    row_local: bool  # every scope in one row (groups are rows, in row order)
    num_prune: int  # blocks pruned per scope

    @property
    def blocks(self) -> int:
        return self.rows.shape[1]

    @property
    def elems(self) -> int:
        return self.rows.shape[2]


def _geometry(layout: Layout, R: int, device: torch.device) -> _Geometry:
    """Scopes of a chunk of ``R`` rows (``R`` a multiple of the pattern's chunk), grouped by the rows they span."""
    t_rows, t_cols = layout.template  # (St, B, e)
    cr = layout.chunk_rows
    m = R // cr
    offs = (torch.arange(m, device=device) * cr).view(m, 1, 1, 1)
    rows = (t_rows.to(device).unsqueeze(0) + offs).reshape(-1, *t_rows.shape[1:])
    cols = t_cols.to(device).unsqueeze(0).expand(m, *t_cols.shape).reshape(-1, *t_cols.shape[1:])
    if not bool((rows == rows[..., :1]).all()):
        raise PatternError(f"true-obs needs every block of pattern {layout.pattern.name!r} inside one row.")
    flat_r, flat_c = rows.flatten(1), cols.flatten(1)
    owner = flat_r.min(1).values  # (Sc,) first row of each scope
    first = flat_c.min(1).values  # (Sc,) first column
    order = torch.argsort(owner * (layout.num_cols + 1) + first, stable=True)
    counts = torch.bincount(owner[order])
    counts = counts[counts > 0]
    if not bool((counts == counts[0]).all()):
        raise PatternError(f"pattern {layout.pattern.name!r}: row groups hold different numbers of scopes.")
    groups = order.view(len(counts), int(counts[0]))
    row_local = bool((flat_r == flat_r[:, :1]).all()) and len(counts) == R
    return _Geometry(rows, cols, groups, rows[groups], cols[groups], row_local, layout.num_prune)


# ---- one chunk ----------------------------------------------------------------------------------------------
class TrueOBSChunk:
    """True OBS state of a chunk of ``R`` rows: weights, ``U`` (so that each row's ``C = C0 − U Uᵀ``), decisions.

    All quantities are in the scaled coordinates (module docstring). :meth:`step` runs one step (pick ``ng``
    scopes per row group, choose masks, update and downdate); :meth:`inverse` materialises each row's ``C``
    (for tests).

    ``checked``: every ``C_PP`` factorisation is checked at once and retried with a growing jitter
    (:func:`~sparsekit.pruners._common.factor_with_jitter`), a host sync per step. Unchecked, a row-local step never
    waits for the device; a failed factorisation only sets :attr:`indefinite` (a device flag), and the caller
    must then discard the chunk and run it again checked (:func:`_run_chunk`).
    """

    def __init__(
        self,
        w: Tensor,
        C0: Tensor,
        geom: _Geometry,
        scoring: str = "independent",
        c_dtype: torch.dtype | None = None,
        checked: bool = True,
    ) -> None:
        R, K = w.shape
        self.w = w  # (R, K) scaled weights, float32/float64, in position order (below)
        self.C0 = C0  # (K, K) scaled damped inverse, same dtype as w
        self.geom = geom
        self.scoring = scoring
        self.c_dtype = c_dtype or w.dtype
        G, Sg = geom.groups.shape
        self.t_max = Sg * geom.num_prune * geom.elems  # most columns one row can prune
        # Row-local patterns: every row prunes q columns per step and U is filled in lockstep. Otherwise each row
        # appends only its own columns at its own offset t_row (padding is never stored, so the GEMMs run over the
        # largest row's count, not the sum of padded steps); U's columns past a row's offset must then be zero, and
        # one extra column (index t_max, never read) takes the padded entries' (zero) writes. The allocated width
        # is a multiple of 16 so that U's rows stay aligned for the tensor-core GEMMs (an odd leading dimension
        # sends cuBLAS to slow fallback kernels: 3× on rowpair-16, measured).
        extra = 0 if geom.row_local else 1
        width = -(-(self.t_max + extra) // 16) * 16
        alloc = torch.empty if geom.row_local else torch.zeros
        self.U = alloc(R, K, width, dtype=self.c_dtype, device=w.device)  # (R, K, width >= t_max [+ 1])
        self.t = 0  # columns of U in use (the largest row's count)
        self.t_row = torch.zeros(R, dtype=torch.long, device=w.device)  # (R,) columns used by each row
        # Compaction: w, diag and U's rows are kept in each row's own column order, the row's remaining columns
        # first (positions [0, K − t_row)). perm (a permutation per row) gives the column at each position, pos
        # the position of each column (read for remaining columns only).
        self.perm = torch.arange(K, device=w.device).expand(R, K).clone()  # (R, K)
        self.pos = self.perm.clone()  # (R, K)
        self.n = K  # positions a step runs over: each row's remaining columns, and pruned ones until compacted
        self.stale: list[tuple[Tensor, Tensor | None]] = []  # (positions, valid) pruned since the last compaction
        self.t_done: int | Tensor = 0  # U's columns (per row unless row-local) at the last compaction
        self.pruned = torch.zeros(R, K, dtype=torch.bool, device=w.device)
        self.remaining = torch.ones(G, Sg, dtype=torch.bool, device=w.device)
        self.left = Sg  # undecided scopes per group (equal in every group)
        self.steps = 0
        self.jitter_steps = 0
        self.checked = checked
        self.indefinite = torch.zeros((), dtype=torch.bool, device=w.device)  # unchecked: some C_PP failed
        if scoring == "independent":
            self.diag = C0.diagonal().expand(R, K).clone()  # (R, K) diag of each row's C, in position order
        else:
            B, p = geom.blocks, geom.num_prune
            if math.comb(B, p) > MAX_JOINT_SUBSETS:
                raise InputError(
                    f"scoring='joint' would enumerate C({B}, {p}) = {math.comb(B, p)} subsets per scope; "
                    "use scoring='independent' for this pattern."
                )
            self.subs = subsets(B, p, w.device)
            self.blocks = shared_scope_inverse(C0, geom.rows, geom.cols)  # (Sc, n, n) each scope's C, per row
            fr = geom.rows.flatten(1)
            self.same_row = fr.unsqueeze(2) == fr.unsqueeze(1)  # (Sc, n, n)

    # -- scoring --------------------------------------------------------------------------------------------
    def choose(self, at: slice) -> tuple[Tensor, Tensor]:
        """Cheapest choice of the scopes at positions ``at`` of every group: ``(cost (G, n), keep (G, n, B) bool)``.
        Decided scopes may be among them (their cost is meaningless: the caller masks it)."""
        g = self.geom
        r, c = g.group_rows[:, at], g.group_cols[:, at]  # (G, n, B, e)
        p = self.pos[r, c]  # every element of an undecided scope is a remaining column
        wv = self.w[r, p]
        if self.scoring == "independent":
            return independent_choice(wv, self.diag[r, p], g.num_prune)
        return best_subset(wv.flatten(-2), self.blocks[g.groups[:, at]], g.blocks, g.num_prune, g.elems)

    def select(self, ng: int, order: str) -> tuple[Tensor, Tensor]:
        """The step's scopes and masks: ``(pos (G, k) positions in groups, keep (G, k, B))``."""
        G, Sg = self.geom.groups.shape
        k = min(ng, self.left)
        if order == "left_to_right":
            done = Sg - self.left
            _, keep = self.choose(slice(done, done + k))
            return torch.arange(done, done + k, device=self.w.device).expand(G, k), keep
        # every scope is scored and the decided ones masked: contiguous reads, no gather of the undecided ones
        cost, keep = self.choose(slice(None))  # (G, Sg), (G, Sg, B)
        top = cost.masked_fill_(~self.remaining, -math.inf).topk(k, dim=1).indices  # (G, k) most expensive first
        return top, keep.gather(1, top.unsqueeze(-1).expand(-1, -1, keep.shape[-1]))

    # -- the OBS update -------------------------------------------------------------------------------------
    def _pruned_sets(self, pos: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Elements pruned by the step: ``(el_rows, el_cols, P (R, q), valid (R, q) or None)``."""
        g = self.geom
        G, k, B = keep.shape
        # the num_prune dropped blocks of each scope in block order (a stable sort, not a boolean mask: no host sync)
        drop = torch.argsort(keep.to(torch.uint8), dim=2, stable=True)[..., : g.num_prune]  # (G, k, p)
        drop = drop.unsqueeze(-1).expand(G, k, g.num_prune, g.elems)
        at = pos.view(G, k, 1, 1).expand(G, k, B, g.elems)
        er = g.group_rows.gather(1, at).gather(2, drop).flatten()  # (N,) rows; row-local: grouped by row, in order
        ec = g.group_cols.gather(1, at).gather(2, drop).flatten()
        return (er, ec, *per_row_sets(er, ec, self.w.shape[0], g.row_local))

    def update(self, P: Tensor, valid: Tensor | None) -> None:
        """Prune ``P (R, q)`` (column indices per row; ``valid`` marks real entries) by (2.1) and (2.2), at most
        :data:`~sparsekit.kernels.obs_update.FUSED_MAX_Q` columns at a time (each row's real columns come first).

        Pruning ``P₁`` and then ``P₂`` with the updated ``w`` and ``C`` is pruning ``P₁ ∪ P₂`` at once: the loss's
        minimiser under ``w_j = 0`` constraints does not depend on the order they are imposed, and a Schur
        complement of a Schur complement is the Schur complement (the quotient property). The split costs
        ``2·q₁·q₂·n`` more GEMM FLOPs per row and keeps every update within the fused kernel's sizes."""
        for i in range(0, P.shape[1], FUSED_MAX_Q):
            j = slice(i, i + FUSED_MAX_Q)
            self._update(P[:, j], None if valid is None else valid[:, j])

    def _update(self, P: Tensor, valid: Tensor | None) -> None:
        """:meth:`update` of at most ``FUSED_MAX_Q`` columns.

        Everything runs over the first ``n`` positions (module docstring, "Compaction"): every remaining column
        of every row is there; so are the columns pruned since the last compaction and, for rows that prune
        fewer columns than others, pruned ones past the row's own count."""
        R, K = self.w.shape
        q = P.shape[1]
        n = self.n
        Pp = self.pos.gather(1, P)  # (R, q) positions of P, each below its row's count
        if valid is not None:
            Pp.masked_fill_(~valid, 0)  # padding: any position in range (its rows are zeroed below)
        Gt = gather_c0(self.C0, P, self.perm[:, :n])  # (R, q, n) C0_{P,:} in position order
        if self.t:
            t = self.t
            U_P = gather_rows(self.U, Pp, t)  # (R, q, t)
            baddbmm_(Gt, U_P, self.U[:, :n, :t].mT, alpha=-1.0)  # C_{P,:} = C0_{P,:} − U_P Uᵀ
        if valid is not None:
            Gt.mul_(valid.unsqueeze(2))
        Cpp = Gt.gather(2, Pp.unsqueeze(1).expand(R, q, q))  # (R, q, q) C_PP
        Cpp = (Cpp + Cpp.mT) / 2
        if valid is not None:
            Cpp.mul_(valid.unsqueeze(1) & valid.unsqueeze(2))
            Cpp.diagonal(dim1=1, dim2=2).add_((~valid).to(Cpp.dtype))  # identity padding
        X = self._factor(Cpp)  # (R, q, q) L⁻¹
        wP = self.w.gather(1, Pp)  # (R, q)
        if valid is not None:
            wP = wP * valid
        a = bmm(X, wP.unsqueeze(2)).squeeze(2)  # (R, q) L⁻¹ w_Pᵀ
        independent = self.scoring == "independent"
        w, U, diag = self.w[:, :n], self.U[:, :n], self.diag[:, :n] if independent else None
        if valid is None and independent:  # (2.1), (2.2) into U, diag; Z never stored
            z_update_(Gt, X, a, U, self.t, w, diag)
            self.t += q
        else:  # Z (R, n, q) = C_{:,P} L⁻ᵀ; (2.1); (2.2) C ← C − Z Zᵀ into U (row-local) and the diagonal
            Z = z_update_reference_(Gt, X, a, w, U if valid is None else None, self.t, diag)
            if valid is None:
                self.t += q
            else:  # a row's real columns come first in P; Z's padded columns are exactly zero and go to column t_max
                dest = (self.t_row.unsqueeze(1) + torch.arange(q, device=P.device)).masked_fill_(~valid, self.t_max)
                U.scatter_(2, dest.unsqueeze(1).expand(R, n, q), Z.to(self.c_dtype))
                self.t_row += valid.sum(1)
                self.t = int(self.t_row.max())
            if not independent:
                live = self.geom.groups[self.remaining]  # undecided scopes
                g = self.geom
                lr = g.rows[live].flatten(1)
                Zs = Z[lr, self.pos[lr, g.cols[live].flatten(1)]]  # (S_live, n, q)
                self.blocks[live] -= (Zs @ Zs.mT) * self.same_row[live]
        self.stale.append((Pp, valid))
        if sum(p.shape[1] for p, _ in self.stale) * COMPACT_EVERY >= K:
            self._compact()

    def _compact(self) -> None:
        """Move each row's remaining columns back to its first positions after pruning the positions in
        :attr:`stale`: the remaining columns among the last ``q`` positions of the row's count (``q`` = the columns
        pruned since the last compaction) move into the holes the pruned ones leave below them (swap-remove)."""
        R, K = self.w.shape
        Pp = torch.cat([p for p, _ in self.stale], 1)  # (R, q) all below the row's count n_old
        valid = None if self.stale[0][1] is None else torch.cat([v for _, v in self.stale], 1)
        self.stale = []
        n_old = K - self.t_done  # int or (R, 1)
        self.t_done = self.t if valid is None else self.t_row.unsqueeze(1).clone()
        self.n = K - (self.t if valid is None else int(self.t_row.min()))
        q = Pp.shape[1]
        j = torch.arange(q, device=Pp.device)
        cnt = q if valid is None else valid.sum(1, keepdim=True)  # (R, 1) real pruned columns per row
        n_new = n_old - cnt
        pruned = Pp if valid is None else Pp.masked_fill(~valid, K)  # padding past every position
        mark = torch.zeros(R, K + q + 1, dtype=torch.bool, device=Pp.device)
        mark.scatter_(1, pruned, True)
        tail = (n_new + j).expand(R, q)  # the positions from the new count on
        leaves = mark.gather(1, tail) | (j >= cnt)  # pruned there, or past the old count
        src = tail.gather(1, torch.sort(leaves.to(torch.uint8), dim=1, stable=True).indices)  # movers first
        dst = pruned.sort(dim=1).values  # holes (below the new count) first
        r = torch.arange(R, device=Pp.device).unsqueeze(1).expand(R, q)
        if valid is None:  # past the movers, src and dst both list the pruned positions past the new count: the
            r, d, s = r.flatten(), dst.flatten(), src.flatten()  # moves onto themselves change nothing (no sync)
        else:
            moving = j < q - leaves.sum(1, keepdim=True)  # as many movers as holes
            r, d, s = r[moving], dst[moving], src[moving]
        move_rows_(self.U, r, d, s, self.t)
        self.w[r, d] = self.w[r, s]
        if self.scoring == "independent":
            self.diag[r, d] = self.diag[r, s]
        cd, cs = self.perm[r, d], self.perm[r, s]
        self.perm[r, d], self.perm[r, s] = cs, cd
        self.pos[r, cs], self.pos[r, cd] = d, s

    def _factor(self, Cpp: Tensor) -> Tensor:
        """``L⁻¹`` of ``Cpp (R, q, q) = L Lᵀ``."""
        if not self.checked:
            X, info = chol_inv_factor(Cpp)
            self.indefinite |= (info > 0).any()
            return X

        def retry(n_bad: int, jitter: float) -> None:
            self.jitter_steps += 1
            log.warning("C_PP not positive definite in %d rows (rounding of c_dtype=%s); adding %.0e·mean diag.",
                        n_bad, self.c_dtype, jitter)

        return factor_with_jitter(Cpp, retry, lambda steps: (
            f"C_PP stayed indefinite after {steps} jitter steps: c_dtype={self.c_dtype} is too coarse for "
            "this layer; use c_dtype=torch.float32 or a larger damp."))

    def step(self, ng: int, order: str) -> None:
        """One True OBS step: pick ``ng`` scopes per row group, choose their masks, prune their union."""
        pos, keep = self.select(ng, order)
        er, ec, P, valid = self._pruned_sets(pos, keep)
        self.remaining.scatter_(1, pos, False)
        self.left -= pos.shape[1]
        self.update(P, valid)
        self.pruned[er, ec] = True
        self.steps += 1

    def weights(self) -> Tensor:
        """``(R, K)`` the scaled weights in column order, the pruned ones exactly 0."""
        return torch.empty_like(self.w).scatter_(1, self.perm, self.w).masked_fill_(self.pruned, 0.0)

    def inverse(self) -> Tensor:
        """``(R, K, K)`` each row's current ``C`` in the original (unscaled) coordinates is ``D⁻¹ C̃ D⁻¹``; this
        returns the scaled ``C̃ = C0 − U Uᵀ`` (column order) with the pruned rows and columns set to 0."""
        U = self.U[:, :, : self.t].to(self.C0.dtype)  # (R, K, t) position order
        U = torch.empty_like(U).scatter_(1, self.perm.unsqueeze(2).expand_as(U), U)  # column order
        C = self.C0.unsqueeze(0) - U @ U.mT
        keep = (~self.pruned).to(C.dtype)
        return C * keep.unsqueeze(2) * keep.unsqueeze(1)


# ---- driver -------------------------------------------------------------------------------------------------
def chunk_bytes(layout: Layout, ng: int, c_dtype: torch.dtype, work: torch.dtype,
                scoring: str = "independent") -> tuple[int, int]:
    """``(per_row, fixed)`` bytes of a chunk of :class:`TrueOBSChunk` rows (for :func:`sparsekit.memory.plan_rows`).

    Per row (``q`` = columns per update, at most ``FUSED_MAX_Q``; ``t`` = ``U``'s width, ``c``/``s`` bytes of
    ``c_dtype``/work): ``U`` ``K·t·c``; the gather ``U_P`` ``q·t·c``; ``C_{P,:}``, the rows of ``C0`` it is gathered
    from (CPU), ``Z``, its ``c_dtype`` copy and the product ``5·K·q·s`` (``2·K·q·s`` where the fused update runs:
    ``C_{P,:}`` only, ``Z`` is never stored); ``C_PP``, its factor and work ``4·q²·s``; weights, diagonal, copies
    ``4·K·s``; the int64 row/column indices of the chunk's geometry and of the scoring gathers, the per-row
    ``perm`` and ``pos`` (``8·K·8``) and the masks. Fixed: ``C0`` (``K²·s``), the pruned mask (``M·K``) and, when
    ``U`` is stored in another dtype, the upcast operands of the reference GEMM
    (:func:`~sparsekit.kernels.obs_linalg.baddbmm_`: one row on the CPU, a slice on CUDA without a fast path).
    """
    M, K = layout.num_rows, layout.num_cols
    geom = _geometry(layout, layout.chunk_rows, layout.device)
    Sg = geom.groups.shape[1]  # scopes per row group
    e, p = layout.block_numel, layout.num_prune
    t_max = min(K, Sg * p * e)
    width = -(-(t_max + 1) // 16) * 16
    q = min(K, ng * p * e, FUSED_MAX_Q)  # columns per update (TrueOBSChunk.update)
    c, s = c_dtype.itemsize, work.itemsize
    fused = (scoring == "independent" and geom.row_local
             and obs_update.available(torch.empty(0, dtype=work, device=layout.device)))
    work_q = (2 if fused else 5) * K * q * s
    per_row = K * width * c + q * width * c + work_q + 4 * q * q * s + 4 * K * s + 8 * K * 8 + 4 * K
    upcast = max(UPCAST_SLICE_BYTES, (q + K) * width * s) if c_dtype != work else 0
    fixed = K * K * s + M * K + upcast
    return per_row, fixed


def _inverse_bytes(K: int, work: torch.dtype) -> int:
    """Peak of :func:`scaled_inverse`: ``H + Λ`` (then the inverse, in its memory), its Cholesky factor and the
    working copy of the factor ``cholesky_inverse`` makes on CUDA."""
    return 3 * K * K * work.itemsize


def _chunk_rows(layout: Layout, chunk_size: int | None, ng: int, c_dtype: torch.dtype, work: torch.dtype,
                scoring: str, budget: Budget) -> int:
    """Rows per chunk: the planner's, at most ``chunk_size`` rounded up to the pattern's row chunk."""
    M, cr = layout.num_rows, layout.chunk_rows
    cap = M if chunk_size is None else min(M, -(-chunk_size // cr) * cr)
    per_row, fixed = chunk_bytes(layout, ng, c_dtype, work, scoring)
    return plan_rows(cap, per_row, fixed, budget, multiple=cr, what="true-obs chunk")


def _run_chunk(W: Tensor, pruned: Tensor, r0: int, r1: int, C0: Tensor, geom: _Geometry, ng: int, order: str,
               scoring: str, c_dtype: torch.dtype, checked: bool) -> tuple[int, int, bool]:
    """True OBS on rows ``[r0, r1)`` of ``W``; writes ``W`` and ``pruned`` there only once the chunk is done.

    Unless ``checked``, the chunk first runs unchecked (no host sync per step, so on CUDA the host queues the
    small kernels of the next steps while the GPU runs a step's GEMM); if a ``C_PP`` was not positive definite
    there, that run is discarded and the chunk runs again checked, with the jitter retries. The result is the
    checked run's either way. Returns ``(steps, jitter_steps, checked)``, ``checked`` True if the chunk needed it.
    """
    while True:
        chunk = TrueOBSChunk(W[r0:r1].clone(), C0, geom, scoring, c_dtype, checked)
        while chunk.left:
            chunk.step(ng, order)
        if checked or not bool(chunk.indefinite):
            break
        log.info("true-obs rows [%d, %d): C_PP not positive definite in an unchecked step; re-running checked.",
                 r0, r1)
        del chunk
        checked = True
    W[r0:r1] = chunk.weights()
    pruned[r0:r1] = chunk.pruned
    return chunk.steps, chunk.jitter_steps, checked


def prune_true_obs(
    weight: Tensor,
    hessian: Tensor,
    layout: Layout,
    *,
    damp: float = DEFAULT_DAMP,
    damp_mode: str = "mean",
    progress_fn: MessageFn = None,
    ng: int = 64,
    chunk_size: int | None = None,
    order: str = "left_to_right",
    scoring: str = "independent",
    c_dtype: torch.dtype | None = None,
    max_memory: int | str | None = None,
) -> PrunerOutput:
    """True OBS (module docstring) on ``weight (M, K)`` with the undamped ``hessian (K, K)``.

    Args:
        ng: scopes per row group pruned per step (``ng = 1`` with ``joint``: exact greedy OBS).
        chunk_size: at most this many rows processed together (memory O(chunk_size · K²)); ``None``: the most
            that fit the budget (:func:`chunk_bytes`).
        order: ``"left_to_right"`` or ``"largest_first"``.
        scoring: ``"independent"`` (``w²/C_jj`` per element) or ``"joint"`` (enumerate subsets).
        c_dtype: storage dtype of the per-row factors ``U`` (``None``: float16 on CUDA, else the working dtype;
            ``torch.float32`` on CUDA: TF32 GEMMs).
        max_memory: the memory budget (:func:`sparsekit.memory.device_budget`); ``None``: what the device gives.
    Raises:
        InputError: bad options; a pattern with too many subsets for ``joint``.
        ResourceError: not even one row chunk fits the budget.
    """
    _check_options(ng, chunk_size, order, scoring, c_dtype)
    M, K = weight.shape
    work = weight.dtype
    c = c_dtype or (torch.float16 if weight.is_cuda and work == torch.float32 else work)
    budget = device_budget(weight.device, max_memory)
    require(_inverse_bytes(K, work), budget, "true-obs inverse")
    R = _chunk_rows(layout, chunk_size, ng, c, work, scoring, budget) if layout.num_prune else M
    inv = scaled_inverse(hessian, damp, damp_mode)
    pruned = torch.zeros(M, K, dtype=torch.bool, device=weight.device)
    stats: dict[str, Any] = {"damp_steps": inv.steps, "ng": ng, "order": order, "scoring": scoring,
                             "c_dtype": str(c).replace("torch.", ""), "steps": 0, "jitter_steps": 0,
                             "checked_chunks": 0}
    if layout.num_prune == 0:  # nothing to prune: the weight as it is (no round trip through the scaling)
        return PrunerOutput(weight, ~pruned, inv.damp, stats)
    W = weight.mul_(inv.d)  # (M, K) scaled weights, in place on the private copy
    use_tf32 = weight.is_cuda and ((c == torch.float32 and TF32_DEFAULT) or c in LOW_PRECISION)
    stats.update(chunk_size=R, tf32=bool(use_tf32), oom_retries=0)
    geoms: dict[int, _Geometry] = {}
    t0 = time.perf_counter()

    def step(r0: int, r1: int) -> None:
        if r1 - r0 not in geoms:
            geoms[r1 - r0] = _geometry(layout, r1 - r0, weight.device)
        steps, jitter, checked = _run_chunk(W, pruned, r0, r1, inv.C, geoms[r1 - r0], ng, order, scoring, c,
                                            stats["checked_chunks"] > 0)
        stats["steps"] += steps
        stats["jitter_steps"] += jitter
        stats["checked_chunks"] += checked
        if progress_fn is not None:
            el = time.perf_counter() - t0
            progress_fn(f"true-obs: rows {r1}/{M}, {el:.1f}s elapsed, ETA {el / r1 * (M - r1):.1f}s")

    with tf32(use_tf32) if weight.is_cuda else contextlib.nullcontext():
        stats["chunk_size"] = run_chunked(step, M, R, multiple=layout.chunk_rows, stats=stats,
                                          what="true-obs chunk", budget=budget)
    W.div_(inv.d).masked_fill_(pruned, 0.0)
    return PrunerOutput(W, ~pruned, inv.damp, stats)
