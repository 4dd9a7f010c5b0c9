"""Structured OBS (Optimal Brain Surgeon) via BlockSpec/ScopeSpec: the seed's ``StructuredOBS``.

Why one file over 500 lines: it is one algorithm (the seed's structured OBS) with its four compensation modes
sharing the subset search and the inverse, plus the seed API's ``StructuredOBS`` class that wraps them; the
modes differ by a few lines each, so splitting them would scatter one sweep over several files.

Compensation modes: ``local``, ``full``, ``split``, ``interleaved`` (DESIGN.md §4; equations of §2).

Notation. ``W (M, K)``, ``Hd = H + Λ`` the damped Hessian (seed's damping rule, :func:`~sparsekit.hessian.
damped_inverse`), ``C = Hd⁻¹ = UᵀU`` (``U`` upper triangular). For one row ``w`` and a pruned index set ``P``:

    ΔL(P) = w_P (C_PP)⁻¹ w_Pᵀ,       δw = −w_P (C_PP)⁻¹ C_{P,:}                          (OBS, eq. 2.1)

**Column groups.** The columns are cut into *groups* at every boundary no scope straddles
(``_common.batch_bounds``): 4 columns for ``2:4``, 8 for ``2:4-pairs``, 16 for ``coupled-2:4`` and
``rowpair-16``. In every row a group holds whole scopes (``coupled-2:4``: two scopes of one row).

**Phase 1 (subset search).** For every (row, scope), all ``C(B, B − nnz)`` sets ``S`` of blocks to prune are
scored ``w_S (C_SS)⁻¹ w_Sᵀ`` with the frozen ``C`` and the cheapest is chosen (:func:`scoring.best_subset`
on :func:`scoring.shared_scope_inverse`; a ``rowpair-16`` scope's cost is the sum of its two rows' costs, as
the cross-row entries of ``C_scope`` are 0). All rows and scopes of a run of about ``block_size`` columns are
scored at once; ``block_size`` bounds the memory and never changes the result.

**Sequential frozen-C compensation** (used by ``full``, ``split`` and ``interleaved``). Groups are processed
left to right; group ``g`` prunes its set ``P_g`` (per row) with the OBS update of a *frozen* inverse ``Cf``
over a *free* column set ``F``, using the current weights::

    e_g = w_{P_g} (Cf_{P_g P_g})⁻¹,      w_F ← w_F − e_g Cf_{P_g, F}     (all of F except entries pruned before)

so later groups see the updates of earlier ones, and every pruned entry is exactly 0 once its group is done
(entries pruned earlier stay 0: they are no longer free). The recursion is exact (it does not depend on
``block_size``); it runs in lazy batches of ``block_size`` columns, each solved in segments of up to
``SEGMENT`` columns as one unit-triangular system per row (``v (I + D⁻¹ T) = w_P`` with ``D`` the
block-diagonal ``Cf_{P_g P_g}`` and ``T`` the ``Cf_{P_h P_g}``, ``h < g``), as SparseGPT solves its segments.
With a frozen ``Cf`` this is only an approximation of greedy OBS: the update of a later set should use the
``C`` downdated by the earlier ones (Schur complement, eq. 2.2).

The four modes:

- ``local``: phase-1 masks; each scope is compensated only inside itself, by the exact within-scope least
  squares solve: with the rest of the row fixed, ``min_{w'_R} (w' − w) Hd (w' − w)ᵀ`` over the scope's kept
  elements ``R`` with ``w'_P = 0`` gives ``δw_R = Hd_RR⁻¹ Hd_RP w_P`` (``Hd`` restricted to the scope). This
  equals the OBS update with ``(Hd_scope)⁻¹`` — *not* with ``C`` restricted to the scope (``(C_scope)`` is
  the scope block of the global inverse, which assumes the rest of the row moves too). Scopes independent.
- ``full``: phase-1 masks; sequential frozen-C compensation with ``Cf = C`` and ``F`` = all ``K`` columns
  (kept weights of processed groups keep moving).
- ``split``: phase-1 masks; the groups are cut into ``n_splits`` splits of (nearly) equal group counts. Within
  split ``k`` (columns ``[a_k, c_k)``) sequential frozen-C compensation with ``F = [a_k, K)`` and
  ``Cf = C_k = (Hd_{FF})⁻¹`` (processed columns frozen; ``C_k`` is the Schur complement of ``C``, i.e.
  ``U[a_k:, a_k:]ᵀ U[a_k:, a_k:]``; only its rows ``[a_k, c_k)`` are formed). ``n_splits=1`` is ``full``.
- ``interleaved``: like ``split``, but at the start of every split the masks of the split's scopes are
  re-selected (phase 1 on the split) with ``C_k`` and the current weights. One shared ``C`` (``O(K²)``).
  ``n_splits=1`` is ``full``; with one group per split every group is pruned by the exact joint OBS update
  with the downdated ``C_k``, close to SparseGPT (which differs in scoring blocks by ``Σ w²/U_jj²`` and in
  freezing a scope's kept columns before its later pruned columns).

Measured (CPU, MiniLM ``encoder.layer.{1,4}.output.dense`` 384×1536, H from 16k tokens of stdlib docstrings,
2:4 and 2:4-pairs): the seed's order holds, local > full > interleaved=8 > 16 > 64, and interleaved=64 is
within 0.0–1.5% of SparseGPT (one group per split: 0.2–0.6% better). Unlike the seed, ``split`` beats
``full`` there (e.g. 16.33% → 15.94% (2 splits) → 15.65% (8)); on a synthetic low-rank layer it can lose.
``local`` with ``(C_scope)`` instead of ``(Hd_scope)⁻¹`` is worse (24.97% vs 24.57% at 2:4, layer 1).

``StructuredOBS`` wraps the same engine as the registered pure functions ``prune_obs_local``,
``prune_obs_full``, ``prune_obs_split``, ``prune_obs_interleaved`` (methods ``"obs-local"`` ... of
:func:`sparsekit.prune_weight`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from sparsekit.errors import InputError
from sparsekit.hessian import DEFAULT_DAMP, check_damp, check_hessian, damped_inverse
from sparsekit.memory import device_budget, plan_rows
from sparsekit.metrics import pow2_scale, relative_error
from sparsekit.patterns import Layout, Pattern, ScopeSpec, block_col_indices, block_param_rc, check_mask
from sparsekit.pruners import PrunerOutput, get_pruner
from sparsekit.pruners._common import batch_bounds
from sparsekit.pruners.scoring import shared_scope_inverse, subset_costs, subsets

__all__ = [
    "block_col_indices",
    "block_param_rc",
    "StructuredOBS",
    "COMPENSATE",
    "subset_search",
    "prune_obs_local",
    "prune_obs_full",
    "prune_obs_split",
    "prune_obs_interleaved",
]

COMPENSATE = ("local", "full", "split", "interleaved")
#: :class:`StructuredOBS`'s default damping: the seed API's documented default (1e-4), kept for its users;
#: ``prune_weight`` and the ``obs-*`` methods use :data:`sparsekit.hessian.DEFAULT_DAMP`.
SEED_API_DAMP = 1e-4

#: columns of one triangular solve in the sequential compensation (rounded to whole groups)
SEGMENT = 32
#: subsets per scope above which exact enumeration is refused (e.g. the unstructured "50%" pattern)
MAX_SUBSETS = 20_000
#: elements of the gathered (rows, scopes, subsets, q) tensors of one phase-1 step (memory bound)
_PHASE1_ELEMS = 1 << 24

ProgressFn = Callable[[str], None] | None


# ---- structure ---------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """Column groups and the template scopes of each, for one layout."""

    bounds: list[int]  # (G + 1,) group boundaries, 0 ... K
    rows: Tensor  # (S_c, B, e) template scopes sorted by group
    cols: Tensor  # (S_c, B, e)
    order: Tensor  # (S_c,) template index of each sorted scope
    first: list[int]  # (G + 1,) sorted-scope offset of each group

    @property
    def num_groups(self) -> int:
        return len(self.bounds) - 1

    def scopes(self, g0: int, g1: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(rows, cols, template index)`` of the scopes in groups ``[g0, g1)``."""
        s0, s1 = self.first[g0], self.first[g1]
        return self.rows[s0:s1], self.cols[s0:s1], self.order[s0:s1]


def _plan(layout: Layout) -> _Plan:
    bounds = batch_bounds(layout, 1)  # every column boundary that cuts no scope
    t_rows, t_cols = layout.template
    start = layout.col_span[:, 0]
    group = torch.searchsorted(torch.tensor(bounds, device=start.device), start.contiguous(), right=True) - 1  # (S_c,)
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=len(bounds) - 1).cpu()
    first = [0] + counts.cumsum(0).tolist()
    return _Plan(bounds, t_rows[order], t_cols[order], order, first)


def _column_runs(bounds: list[int], g0: int, g1: int, width: int, same_width: bool = False) -> list[tuple[int, int]]:
    """Cut groups ``[g0, g1)`` into consecutive runs of at most ``width`` columns (at least one group each);
    with ``same_width`` a run also never mixes groups of different widths."""
    out, s = [], g0
    while s < g1:
        t = s + 1
        w0 = bounds[s + 1] - bounds[s]
        while t < g1 and bounds[t + 1] - bounds[s] <= width and (not same_width or bounds[t + 1] - bounds[t] == w0):
            t += 1
        out.append((s, t))
        s = t
    return out


def _split_groups(num_groups: int, n_splits: int) -> list[tuple[int, int]]:
    """``n_splits`` runs of groups with (nearly) equal group counts."""
    cut = [round(k * num_groups / n_splits) for k in range(n_splits + 1)]
    return list(zip(cut[:-1], cut[1:]))


# ---- phase 1 -----------------------------------------------------------------------------------------------
def _check_enumerable(layout: Layout) -> None:
    n_sub = math.comb(layout.blocks_per_scope, layout.num_prune)
    if n_sub > MAX_SUBSETS:
        raise InputError(
            f"pattern {layout.pattern.name!r} has C({layout.blocks_per_scope}, {layout.num_prune}) = {n_sub} "
            f"subsets per scope; StructuredOBS enumerates them all (limit {MAX_SUBSETS}). Use method 'sparsegpt' or "
            "'true-obs' (scoring='independent') for large scopes."
        )


def _select(
    Wc: Tensor, Cblk: Tensor, col0: int, rows: Tensor, cols: Tensor, layout: Layout
) -> tuple[Tensor, Tensor, Tensor]:
    """Cheapest subset per (row chunk, scope): ``Wc (n_chunks, R, K)``, ``Cblk`` the inverse over columns
    ``col0 ...`` (shared by all rows), scopes ``rows, cols (S_sel, B, e)``.

    Returns ``(keep (n_chunks, S_sel, B) bool, arg (n_chunks, S_sel) subset index, subs (n_sub, p))``.
    """
    B, e, p = layout.blocks_per_scope, layout.block_numel, layout.num_prune
    subs = subsets(B, p, Wc.device)  # (n_sub, p)
    Cs = shared_scope_inverse(Cblk, rows, cols - col0)  # (S_sel, n, n)
    n_chunks = Wc.shape[0]
    step = max(1, _PHASE1_ELEMS // max(1, rows.shape[0] * subs.shape[0] * max(1, p * e) ** 2))
    args = []
    for r0 in range(0, n_chunks, step):  # row chunks bound memory only
        w = Wc[r0 : r0 + step, rows, cols].flatten(-2)  # (n, S_sel, B·e)
        args.append(subset_costs(w, Cs, subs, e).argmin(-1))  # (n, S_sel)
    arg = torch.cat(args)
    keep = torch.ones(*arg.shape, B, dtype=torch.bool, device=Wc.device)
    keep.scatter_(-1, subs[arg], False)
    return keep, arg, subs


def _phase1(
    W: Tensor, C: Tensor, layout: Layout, plan: _Plan, block_size: int, pruned: Tensor, local_hd: Any = None
) -> None:
    """Choose every scope's mask with the frozen ``C`` (writes ``pruned``); with ``local_hd`` (a function
    ``(c0, c1) -> Hd[c0:c1, c0:c1]``) also apply the within-scope least-squares compensation."""
    M, K = W.shape
    R = layout.chunk_rows
    Wc = W.view(M // R, R, K)
    pruned_c = pruned.view(M // R, R, K)
    e = layout.block_numel
    for g0, g1 in _column_runs(plan.bounds, 0, plan.num_groups, block_size):
        rows, cols, _ = plan.scopes(g0, g1)
        if rows.shape[0] == 0:
            continue
        keep, arg, subs = _select(Wc, C, 0, rows, cols, layout)
        pruned_c[:, rows, cols] = ~keep.unsqueeze(-1).expand(-1, -1, -1, e)
        if local_hd is not None:
            c0, c1 = plan.bounds[g0], plan.bounds[g1]
            _local_update(Wc, local_hd(c0, c1), c0, rows, cols, keep, arg, subs, e)


def _local_update(
    Wc: Tensor, Hblk: Tensor, c0: int, rows: Tensor, cols: Tensor, keep: Tensor, arg: Tensor, subs: Tensor, e: int
) -> None:
    """``δw_R = Hd_RR⁻¹ Hd_RP w_P`` inside every scope (exact within-scope least squares); ``w_P = 0``.

    The ``(R, P)`` solve depends only on (scope, subset), so it is done once per template scope and subset and
    gathered for every row chunk.
    """
    n_sub, p = subs.shape
    B = rows.shape[1]
    ar = torch.arange(B, device=subs.device)
    kept_b = (ar.view(1, 1, B) != subs.unsqueeze(-1)).all(1)  # (n_sub, B)
    kept_blocks = ar.expand(n_sub, B)[kept_b].view(n_sub, B - p)
    el = torch.arange(e, device=subs.device)
    P = (subs.unsqueeze(-1) * e + el).flatten(1)  # (n_sub, p·e) element ids
    Rk = (kept_blocks.unsqueeze(-1) * e + el).flatten(1)  # (n_sub, (B−p)·e)
    w = Wc[:, rows, cols].flatten(-2)  # (n_chunks, S_sel, n)
    new = torch.zeros_like(w)
    if Rk.shape[1]:
        Hs = shared_scope_inverse(Hblk, rows, cols - c0).to(torch.float64)  # (S_sel, n, n) Hd over each scope
        HRR = Hs[:, Rk.unsqueeze(2), Rk.unsqueeze(1)]  # (S_sel, n_sub, r, r)
        HRP = Hs[:, Rk.unsqueeze(2), P.unsqueeze(1)]  # (S_sel, n_sub, r, q)
        G = torch.linalg.solve(HRR, HRP).to(w.dtype)  # (S_sel, n_sub, r, q)
        s_idx = torch.arange(rows.shape[0], device=w.device).expand_as(arg)
        Ga = G[s_idx, arg]  # (n_chunks, S_sel, r, q)
        wP = torch.gather(w, -1, P[arg])  # (n_chunks, S_sel, q)
        wR = torch.gather(w, -1, Rk[arg])  # (n_chunks, S_sel, r)
        new.scatter_(-1, Rk[arg], wR + (Ga @ wP.unsqueeze(-1)).squeeze(-1))
    Wc[:, rows, cols] = new.view(*new.shape[:-1], B, e)


def subset_search(weight: Tensor, inv_h: Tensor, layout: Layout, block_size: int = 2048) -> Tensor:
    """Phase 1 alone: the cheapest ``w_S (C_SS)⁻¹ w_Sᵀ`` subset of every scope with ``C = inv_h``.

    Returns ``keep (S, B)`` bool in the layout's scope order (True = block kept).
    """
    _check_enumerable(layout)
    plan = _plan(layout)
    pruned = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    _phase1(weight, inv_h, layout, plan, block_size, pruned)
    return layout.keep_of_mask(~pruned)


# ---- sequential frozen-C compensation ------------------------------------------------------------------------
def _masked_inverse(Cd: Tensor, pb: Tensor) -> Tensor:
    """``(Cd_PP)⁻¹`` embedded in ``g × g`` (0 on kept entries): ``Cd (..., g, g)``, ``pb (..., g)`` 1 = pruned."""
    pp = pb.unsqueeze(-1) * pb.unsqueeze(-2)
    L, info = torch.linalg.cholesky_ex(Cd * pp + torch.diag_embed(1.0 - pb))  # identity on kept entries
    if info.any():
        raise InputError("a block of the inverse Hessian is not positive definite; raise damp.")
    return torch.cholesky_inverse(L) * pp


def _block_inverses(Cs: Tensor, pb: Tensor) -> Tensor:
    """Per row, the inverse of each group's pruned block: ``Cs (s, s)``, ``pb (M, nb, g)`` -> ``(M, nb, g, g)``.

    Rows share few distinct (group, pruned pattern) pairs (e.g. 6 per group at 2:4), so each distinct pair is
    inverted once and gathered.
    """
    M, nb, g = pb.shape
    idx = torch.arange(nb, device=pb.device)
    Cd = Cs.reshape(nb, g, nb, g)[idx, :, idx, :]  # (nb, g, g) diagonal blocks
    if g > 30:  # pattern codes would not fit in an int64 key
        return _masked_inverse(Cd, pb)
    bits = 2 ** torch.arange(g, device=pb.device)  # (g,)
    key = (pb.long() * bits).sum(-1) * nb + idx  # (M, nb) pruned pattern and group
    uniq, where = torch.unique(key, return_inverse=True)
    ub = ((uniq // nb).unsqueeze(-1) // bits % 2).to(pb.dtype)  # (U, g)
    return _masked_inverse(Cd[uniq % nb], ub)[where]


def _sweep(W: Tensor, pruned: Tensor, Crow: Tensor, a0: int, a: int, c: int, bounds: list[int], g0: int, g1: int,
           block_size: int) -> None:
    """Prune groups ``[g0, g1)`` (columns ``[a, c)``) left to right with the frozen inverse ``Cf`` over the free
    columns ``F = [a0, K)``, given ``Crow = Cf[a:c, a0:]`` ``(c − a, K − a0)``. Updates ``W`` in place."""
    M, K = W.shape
    for b0, b1 in _column_runs(bounds, g0, g1, block_size):  # lazy batches
        i1, i2 = bounds[b0], bounds[b1]
        Eb = torch.zeros(M, i2 - i1, dtype=W.dtype, device=W.device)  # (M, nb) OBS errors e of the batch
        Cb = Crow[i1 - a : i2 - a]  # (nb, K − a0)
        for s0, s1 in _column_runs(bounds, b0, b1, SEGMENT, same_width=True):
            j1, j2 = bounds[s0], bounds[s1]
            s, g = j2 - j1, bounds[s0 + 1] - bounds[s0]
            nb = s // g
            Cs = Cb[j1 - i1 : j2 - i1, j1 - a0 : j2 - a0]  # (s, s)
            p = pruned[:, j1:j2].to(W.dtype)  # (M, s) 1 = pruned
            if not p.any():
                continue
            w = W[:, j1:j2] * p  # (M, s) current values of the pruned entries
            pb = p.view(M, nb, g)
            Dinv = _block_inverses(Cs, pb)  # (M, nb, g, g) (Cf_{P_g P_g})⁻¹, 0 on kept entries
            if nb > 1:
                blk = torch.arange(s, device=W.device) // g
                T = Cs * (blk.view(-1, 1) < blk.view(1, -1))  # (s, s) strictly block-upper part
                N = (Dinv @ (T.view(nb, g, s) * p.view(M, 1, 1, s))).view(M, s, s)  # D⁻¹ T, strictly upper
                N.diagonal(dim1=1, dim2=2).add_(1.0)
                w = torch.linalg.solve_triangular(N, w.unsqueeze(1), upper=True, left=False, unitriangular=True)
                w = w.squeeze(1)  # (M, s) value of each pruned entry when its group is reached
            err = (w.view(M, nb, 1, g) @ Dinv).view(M, s)  # (M, s) e_g = v_g (Cf_PgPg)⁻¹
            Eb[:, j1 - i1 : j2 - i1] = err
            W[:, i1:i2].sub_(err @ Cb[j1 - i1 : j2 - i1, i1 - a0 : i2 - a0])
            W[:, i1:j2].masked_fill_(pruned[:, i1:j2], 0.0)
        if i1 > a0:  # processed free columns left of the batch (kept ones move; pruned ones stay 0)
            W[:, a0:i1].sub_(Eb @ Cb[:, : i1 - a0])
            W[:, a0:i1].masked_fill_(pruned[:, a0:i1], 0.0)
        if i2 < K:
            W[:, i2:].sub_(Eb @ Cb[:, i2 - a0 :])


# ---- the engine --------------------------------------------------------------------------------------------
@dataclass
class _Inverse:
    """``C`` plus, computed on demand, its upper Cholesky factor ``U`` and the damped Hessian ``Hd``."""

    C: Tensor  # (K, K)
    U: Tensor | None = None  # (K, K) upper, C = UᵀU
    chol: Tensor | None = None  # (K, K) lower, Hd = L Lᵀ

    def upper(self) -> Tensor:
        if self.U is None:
            U, info = torch.linalg.cholesky_ex(self.C, upper=True)
            if info.item():
                raise InputError("inv_h is not positive definite; pass a damped inverse (compute_inverse).")
            self.U = U
        return self.U

    def hd_block(self, c0: int, c1: int) -> Tensor:
        """``Hd[c0:c1, c0:c1]``."""
        if self.chol is None:
            L, info = torch.linalg.cholesky_ex(self.C)
            if info.item():
                raise InputError("inv_h is not positive definite; pass a damped inverse (compute_inverse).")
            self.chol = torch.linalg.cholesky(torch.cholesky_inverse(L))
        Lr = self.chol[c0:c1, :c1]  # (c1 − c0, c1): L is lower, columns >= c1 are 0
        return Lr @ Lr.T


def _check_options(compensate: str, block_size: Any, n_splits: Any, layout: Layout) -> int:
    if compensate not in COMPENSATE:
        raise InputError(f"compensate must be one of {COMPENSATE}, got {compensate!r}.")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise InputError(f"block_size must be a positive int (columns per lazy batch, e.g. 2048), got {block_size!r}.")
    if isinstance(n_splits, bool) or not isinstance(n_splits, int) or n_splits < 1:
        raise InputError(f"n_splits must be a positive int, got {n_splits!r}.")
    if compensate in ("local", "full") and n_splits != 1:
        raise InputError(f"n_splits applies to compensate='split' or 'interleaved' only; got n_splits={n_splits} "
                         f"with compensate={compensate!r}.")
    _check_enumerable(layout)
    G = len(batch_bounds(layout, 1)) - 1
    if n_splits > G:
        raise InputError(
            f"n_splits={n_splits} exceeds the {G} column groups of pattern {layout.pattern.name!r} at "
            f"K={layout.num_cols} (splits never cut a scope); use n_splits <= {G}."
        )
    return G


def _run(
    W: Tensor,
    layout: Layout,
    inv: _Inverse,
    compensate: str,
    block_size: int,
    n_splits: int,
    progress_fn: ProgressFn = None,
) -> Tensor:
    """Prune ``W (M, K)`` in place (pruned entries exactly 0); returns ``pruned (M, K)`` bool (True = pruned)."""
    M, K = W.shape
    plan = _plan(layout)
    pruned = torch.zeros(M, K, dtype=torch.bool, device=W.device)
    tag = f"obs-{compensate}"
    if compensate == "local":
        _phase1(W, inv.C, layout, plan, block_size, pruned, local_hd=inv.hd_block)
    elif compensate != "interleaved":
        _phase1(W, inv.C, layout, plan, block_size, pruned)
    if progress_fn is not None and compensate != "interleaved":
        progress_fn(f"{tag}: phase 1 done ({plan.num_groups} column groups)")
    if compensate == "local" or layout.num_prune == 0:
        return pruned

    R, e = layout.chunk_rows, layout.block_numel
    Wc, pruned_c = W.view(M // R, R, K), pruned.view(M // R, R, K)
    bounds = plan.bounds
    for g0, g1 in _split_groups(plan.num_groups, n_splits):
        a, c = bounds[g0], bounds[g1]
        if compensate == "full":
            a0, Crow = 0, inv.C[a:c]  # frozen C over all K columns
        elif a == 0:
            a0, Crow = 0, inv.C[:c]
        else:  # C_k = (Hd over [a, K))⁻¹ = U[a:, a:]ᵀ U[a:, a:]; its rows [a, c) need U[a:c] only (U upper)
            U = inv.upper()
            a0, Crow = a, U[a:c, a:c].T @ U[a:c, a:]  # (c − a, K − a)
        if compensate == "interleaved":  # re-select the split's masks with C_k and the current weights
            for h0, h1 in _column_runs(bounds, g0, g1, block_size):
                rows, cols, _ = plan.scopes(h0, h1)
                keep, _, _ = _select(Wc, Crow[:, a - a0 : c - a0], a, rows, cols, layout)
                pruned_c[:, rows, cols] = ~keep.unsqueeze(-1).expand(-1, -1, -1, e)
        _sweep(W, pruned, Crow, a0, a, c, bounds, g0, g1, block_size)
        if progress_fn is not None:
            progress_fn(f"{tag}: columns {c}/{K}")
    W.masked_fill_(pruned, 0.0)
    return pruned


# ---- the seed's class --------------------------------------------------------------------------------------
class StructuredOBS:
    """Structured OBS pruner operating through ScopeSpec (the seed's class; semantics in the module docstring).

    The seed's constructor has no weight argument and ``prune(...)`` returns None. Our reading: the object is
    bound to one weight ``W (M, K)`` — pass ``weight=W`` or set ``obs.weight = W`` before ``prune`` — and
    ``prune`` modifies that tensor **in place** (its dtype and device kept; computation in float32, or float64
    if W or H is float64). Afterwards ``obs.mask`` (``(M, K)`` bool, True = kept), ``obs.loss`` (relative output
    error ``sqrt(tr(δ H δᵀ) / tr(W H Wᵀ))`` through the *undamped* ``hessian``, δ from the weight as it was
    before this call) and ``obs.stats`` hold the result. Another ``prune`` call prunes the bound weight again.

    Args:
        scope: the block and scope structure (:class:`~sparsekit.patterns.ScopeSpec`); ``nnz`` comes with
            ``prune``.
        hessian: ``(K, K)`` undamped ``H = XᵀX / N``.
        damp: damping, the seed's rule: ``λ = damp · mean(diag H)`` if ``damp < 1``, else ``λ = damp``.
        inv_h: precomputed ``(K, K)`` damped inverse ``(H + λI)⁻¹``; skips the inversion (then ``damp`` only
            matters for :meth:`prune_true_obs`, which needs ``H``).
        weight: the ``(M, K)`` weight to prune in place (keyword; may be set later as ``.weight``).
        damp_mode: ``"mean"`` (``λ I``, the seed's) or ``"diag"`` (``damp · diag H``), as in ``prune_weight``.
    """

    def __init__(
        self,
        scope: ScopeSpec,
        hessian: Tensor,
        damp: float = SEED_API_DAMP,
        inv_h: Tensor | None = None,
        *,
        weight: Tensor | None = None,
        damp_mode: str = "mean",
    ) -> None:
        if not isinstance(scope, ScopeSpec):
            raise InputError(f"scope must be a ScopeSpec, got {type(scope).__name__}; see sparsekit.patterns.")
        if not isinstance(hessian, Tensor) or hessian.dim() != 2:
            raise InputError("hessian must be a (K, K) tensor.")
        check_hessian(hessian, hessian.shape[0])
        check_damp(damp, damp_mode)
        if inv_h is not None and inv_h.shape != hessian.shape:
            raise InputError(f"inv_h must have the hessian's shape {tuple(hessian.shape)}, got {tuple(inv_h.shape)}.")
        self.scope = scope
        self.hessian = hessian
        self.damp = damp
        self.damp_mode = damp_mode
        self.inv_h = inv_h
        self.weight = weight
        self.mask: Tensor | None = None
        self.loss: float | None = None
        self.stats: dict[str, Any] = {}
        self._inv: _Inverse | None = None
        self._dtype: torch.dtype | None = None

    @staticmethod
    def compute_inverse(hessian: Tensor, damp: float = SEED_API_DAMP, damp_mode: str = "mean") -> Tensor:
        """``(H + Λ)⁻¹`` with ``Λ = λ I``, ``λ = damp · mean(diag H)`` if ``damp < 1`` else ``λ = damp``
        (``damp_mode="mean"``, the seed's), or ``Λ = damp · diag H`` (``"diag"``); Cholesky-based, with the damping
        escalated step by step (logged) if the factorisation fails (:func:`damped_inverse`)."""
        return damped_inverse(hessian, damp, damp_mode).inverse

    # -- helpers
    def _h_scale(self, dtype: torch.dtype) -> float:
        """The power of two ``H`` is multiplied by in ``dtype`` (scale invariance, as in ``prune_weight``); 1 with
        absolute damping, which is in ``H``'s units."""
        return pow2_scale(self.hessian, dtype) if self.damp_mode == "diag" or self.damp < 1 else 1.0

    def _bound(self) -> tuple[Tensor, Tensor, torch.dtype]:
        """``(W · 2^a, H · 2^b, dtype)``: the bound weight and H rescaled by :func:`pow2_scale` (exact)."""
        W = self.weight
        if not isinstance(W, Tensor) or W.dim() != 2 or not W.is_floating_point():
            raise InputError("bind a floating (M, K) weight first: StructuredOBS(..., weight=W) or obs.weight = W.")
        if W.shape[1] != self.hessian.shape[0]:
            raise InputError(f"weight has K={W.shape[1]} columns but the hessian is {tuple(self.hessian.shape)}.")
        if W.device != self.hessian.device:
            raise InputError(f"weight is on {W.device} but hessian on {self.hessian.device}; move both to one device.")
        if not torch.isfinite(W).all():
            raise InputError("weight contains NaN or Inf.")
        dtype = torch.float64 if torch.float64 in (W.dtype, self.hessian.dtype) else torch.float32
        w = W.detach().to(dtype) * pow2_scale(W, dtype)  # (M, K)
        return w, self.hessian.detach().to(dtype) * self._h_scale(dtype), dtype

    def _inverse(self, h: Tensor, dtype: torch.dtype) -> _Inverse:
        if self._inv is None or self._dtype != dtype:
            if self.inv_h is not None:
                self._inv = _Inverse(self.inv_h.detach().to(h.device, dtype) / self._h_scale(dtype))
                self.stats["damp"] = None
            else:
                d = damped_inverse(h, self.damp, self.damp_mode)
                self._inv = _Inverse(d.inverse, chol=d.chol)
                self.stats.update(damp=d.damp, damp_steps=d.steps)
            self._dtype = dtype
        return self._inv

    def _write_back(self, new: Tensor, mask: Tensor, layout: Layout) -> None:
        """Write ``new`` (rescaled by :meth:`_bound`'s power of two) into the bound weight; loss against it."""
        check_mask(mask, layout)
        new = new.masked_fill(~mask, 0.0)
        new = (new / pow2_scale(self.weight, new.dtype)).to(self.weight.dtype)
        if not torch.isfinite(new).all():
            raise InputError(f"pruning produced NaN/Inf; raise damp (now {self.damp}) or use float64.")
        self.loss = relative_error(self.weight, new, self.hessian)
        self.mask = mask
        with torch.no_grad():
            self.weight.copy_(new)

    # -- the seed's methods
    def prune(self, nnz: int, block_size: int = 2048, compensate: str = "local", n_splits: int = 1) -> None:
        """Prune the bound weight to ``nnz`` blocks per scope (semantics of each mode: module docstring).

        Phase 1 enumerates all ``C(B, B − nnz)`` subsets per (row, scope) and picks the cheapest
        ``w_S (C_SS)⁻¹ w_Sᵀ`` with ``C = H⁻¹`` (damped); phase 2 compensates: ``local`` (within-scope least
        squares), ``full`` (sequential frozen-C updates to all K columns), ``split`` (like full, C recomputed
        for the unprocessed columns at each of ``n_splits`` splits), ``interleaved`` (like split, masks
        re-selected at each split).

        Args:
            nnz: blocks kept per scope.
            block_size: columns handled per lazy batch (memory bound; does not change the result).
            compensate: ``"local"``, ``"full"``, ``"split"`` or ``"interleaved"``.
            n_splits: column splits for ``split``/``interleaved`` (1 for the others); at most the number of
                column groups.
        Raises:
            PatternError: ``nnz`` out of range or a pattern that does not tile the weight.
            InputError: bad options (unknown ``compensate``, ``block_size < 1``, ``n_splits`` out of range).
        """
        W0, h, dtype = self._bound()
        layout = Pattern(self.scope, nnz).resolve(*W0.shape, device=W0.device)
        _check_options(compensate, block_size, n_splits, layout)
        inv = self._inverse(h, dtype)
        W = W0.clone()
        pruned = _run(W, layout, inv, compensate, block_size, n_splits)
        self.stats.update(compensate=compensate, n_splits=n_splits, block_size=block_size)
        self._write_back(W, ~pruned, layout)

    def prune_true_obs(
        self,
        nnz: int,
        ng: int = 64,
        chunk_size: int = 16,
        order: str = "left_to_right",
        scoring: str = "independent",
        c_dtype: torch.dtype | None = None,
        progress_fn: ProgressFn = None,
    ) -> None:
        """Per-row True OBS with Schur complement updates (DESIGN.md §4), on the bound weight, in place.

        Delegates to the registered ``"true-obs"`` pruner (``sparsekit.pruners.true_obs.prune_true_obs``) with
        the layout of ``(scope, nnz)``, ``self.hessian``, ``self.damp`` and ``self.damp_mode`` (``inv_h`` is
        not used: each row's C is built from H). Options as documented there: ``ng`` scopes per step,
        ``chunk_size`` rows at a time, ``order`` ``"left_to_right"``/``"largest_first"``, ``scoring``
        ``"independent"``/``"joint"``, ``c_dtype`` for the per-row C, ``progress_fn`` for progress messages.
        """
        W0, h, _ = self._bound()
        layout = Pattern(self.scope, nnz).resolve(*W0.shape, device=W0.device)
        fn = get_pruner("true-obs")
        out = fn(W0.clone(), h, layout, damp=self.damp, damp_mode=self.damp_mode, progress_fn=progress_fn, ng=ng,
                 chunk_size=chunk_size, order=order, scoring=scoring, c_dtype=c_dtype)
        self.stats = dict(out.stats, damp=out.damp, method="true-obs")
        self._write_back(out.weight, out.mask.bool(), layout)


# ---- registered pure functions -----------------------------------------------------------------------------
def obs_bytes(layout: Layout, block_size: int, work: torch.dtype) -> tuple[int, int]:
    """``(per_row, fixed)`` bytes of the StructuredOBS pruners (every row at once; ``s`` bytes of the work dtype):
    per row the pruned mask (``K``) and, for the ``block_size`` columns handled at once, each scope's weights
    and every subset's ``w_S`` with their temporaries (8 B per entry); fixed ``H + Λ``, its factor, ``C`` and
    ``C``'s rows of a split (``4·K²·s``)."""
    K, B, e, p = layout.num_cols, layout.blocks_per_scope, layout.block_numel, layout.num_prune
    scopes = -(-min(block_size, K) // (B * e)) * layout.chunk_rows
    return K + scopes * 8 * (B * e + 3 * math.comb(B, p) * p * e), 4 * K * K * work.itemsize


def _prune(
    weight: Tensor, hessian: Tensor, layout: Layout, damp: float, damp_mode: str, progress_fn: ProgressFn,
    compensate: str, block_size: int, n_splits: int, max_memory: int | str | None = None,
) -> PrunerOutput:
    _check_options(compensate, block_size, n_splits, layout)
    per_row, fixed = obs_bytes(layout, block_size, weight.dtype)
    plan_rows(layout.num_rows, per_row, fixed, device_budget(weight.device, max_memory), multiple=layout.num_rows,
              what=f"obs-{compensate}")
    d = damped_inverse(hessian, damp, damp_mode, upper=compensate in ("split", "interleaved") and n_splits > 1)
    inv = _Inverse(d.inverse, U=d.upper, chol=d.chol)
    pruned = _run(weight, layout, inv, compensate, block_size, n_splits, progress_fn)
    stats = {"damp_steps": d.steps, "compensate": compensate, "n_splits": n_splits}
    return PrunerOutput(weight, ~pruned, d.damp, stats)


def prune_obs_local(
    weight: Tensor,
    hessian: Tensor,
    layout: Layout,
    *,
    damp: float = DEFAULT_DAMP,
    damp_mode: str = "mean",
    progress_fn: ProgressFn = None,
    block_size: int = 2048,
    max_memory: int | str | None = None,
) -> PrunerOutput:
    """StructuredOBS ``compensate="local"``: phase-1 masks, exact within-scope least-squares compensation.

    ``block_size``: columns per run of the phase-1 search and per lazy batch of the compensation; it bounds
    memory and does not change the result.
    """
    return _prune(weight, hessian, layout, damp, damp_mode, progress_fn, "local", block_size, 1, max_memory)


def prune_obs_full(
    weight: Tensor,
    hessian: Tensor,
    layout: Layout,
    *,
    damp: float = DEFAULT_DAMP,
    damp_mode: str = "mean",
    progress_fn: ProgressFn = None,
    block_size: int = 2048,
    max_memory: int | str | None = None,
) -> PrunerOutput:
    """StructuredOBS ``compensate="full"``: phase-1 masks, sequential frozen-C compensation of all K columns.

    ``block_size``: columns per run of the phase-1 search and per lazy batch of the compensation; it bounds
    memory and does not change the result.
    """
    return _prune(weight, hessian, layout, damp, damp_mode, progress_fn, "full", block_size, 1, max_memory)


def prune_obs_split(
    weight: Tensor,
    hessian: Tensor,
    layout: Layout,
    *,
    damp: float = DEFAULT_DAMP,
    damp_mode: str = "mean",
    progress_fn: ProgressFn = None,
    block_size: int = 2048,
    n_splits: int = 1,
    max_memory: int | str | None = None,
) -> PrunerOutput:
    """StructuredOBS ``compensate="split"``: phase-1 masks, C recomputed for the unprocessed columns at each of
    ``n_splits`` splits (processed columns frozen).

    ``block_size``: columns per run of the phase-1 search and per lazy batch of the compensation; it bounds
    memory and does not change the result.
    ``n_splits``: splits of (nearly) equal numbers of column groups, ``1 <= n_splits <= groups``; 1 is ``full``.
    """
    return _prune(weight, hessian, layout, damp, damp_mode, progress_fn, "split", block_size, n_splits, max_memory)


def prune_obs_interleaved(
    weight: Tensor,
    hessian: Tensor,
    layout: Layout,
    *,
    damp: float = DEFAULT_DAMP,
    damp_mode: str = "mean",
    progress_fn: ProgressFn = None,
    block_size: int = 2048,
    n_splits: int = 1,
    max_memory: int | str | None = None,
) -> PrunerOutput:
    """StructuredOBS ``compensate="interleaved"``: like ``split``, with each split's masks re-selected with
    the current C and weights.

    ``block_size``: columns per run of the phase-1 search and per lazy batch of the compensation; it bounds
    memory and does not change the result.
    ``n_splits``: splits of (nearly) equal numbers of column groups, ``1 <= n_splits <= groups``; 1 is ``full``.
    """
    return _prune(weight, hessian, layout, damp, damp_mode, progress_fn, "interleaved", block_size, n_splits,
                  max_memory)
