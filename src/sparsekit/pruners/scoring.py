"""OBS costs of pruning sets of blocks, shared by StructuredOBS, OBS-ord and True OBS (DESIGN.md §2).

For one row ``w`` with inverse Hessian ``C``, pruning the index set ``P`` (everything else free) costs

    ΔL(P) = w_P (C_PP)⁻¹ w_Pᵀ                                                    (OBS, Hassibi & Stork 1993)

A scope's elements are laid out as ``(B, e)`` (blocks x elements per block), flattened to ``n = B·e``.
``C_scope (..., n, n)`` is C restricted to those elements; elements of different rows (``rowpair-16``) do not
interact, so the caller zeroes those entries (:func:`shared_scope_inverse` does).
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import torch
from torch import Tensor

from sparsekit.patterns import top_mask

__all__ = [
    "subsets",
    "shared_scope_inverse",
    "subset_costs",
    "best_subset",
    "independent_choice",
    "obs_cost",
]


@lru_cache(maxsize=64)
def _subsets_cpu(num_blocks: int, num_prune: int) -> Tensor:
    combos = list(itertools.combinations(range(num_blocks), num_prune))
    return torch.tensor(combos, dtype=torch.long).view(len(combos), num_prune)  # (1, 0) when num_prune = 0


def subsets(num_blocks: int, num_prune: int, device: torch.device | str = "cpu") -> Tensor:
    """All ``C(B, p)`` subsets of ``p`` blocks out of ``B``, lexicographic: ``(n_sub, p)`` long."""
    return _subsets_cpu(num_blocks, num_prune).to(device)


def shared_scope_inverse(C: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Gather a shared ``C (K, K)`` over each scope's elements: ``rows, cols (S, B, e)`` -> ``(S, n, n)``.

    Entries between elements of different rows are 0 (rows never interact: ``L = Σ_r δw_r H δw_rᵀ``).
    """
    r = rows.flatten(1)  # (S, n)
    c = cols.flatten(1)  # (S, n)
    Cs = C[c.unsqueeze(2), c.unsqueeze(1)]  # (S, n, n)
    same_row = r.unsqueeze(2) == r.unsqueeze(1)
    return Cs * same_row


def obs_cost(w: Tensor, Cpp: Tensor) -> Tensor:
    """``w (..., q)``, ``Cpp (..., q, q)`` -> ``w Cpp⁻¹ wᵀ`` ``(...,)``; closed forms for q <= 2."""
    q = w.shape[-1]
    if q == 1:
        return w[..., 0].square() / Cpp[..., 0, 0]
    if q == 2:
        a, b, d = Cpp[..., 0, 0], Cpp[..., 0, 1], Cpp[..., 1, 1]
        x, y = w[..., 0], w[..., 1]
        return (d * x * x - 2 * b * x * y + a * y * y) / (a * d - b * b)
    L, _ = torch.linalg.cholesky_ex(Cpp)
    z = torch.linalg.solve_triangular(L, w.unsqueeze(-1), upper=False)
    return z.square().sum((-1, -2))


def subset_costs(w: Tensor, C_scope: Tensor, subs: Tensor, block_numel: int) -> Tensor:
    """OBS cost of pruning each subset of blocks, for every scope.

    Args:
        w: ``(..., n)`` the scope's weights, ``n = B·e`` in (block, element) order.
        C_scope: ``(..., n, n)`` inverse Hessian over the scope's elements.
        subs: ``(n_sub, p)`` block subsets (from :func:`subsets`).
        block_numel: ``e``.
    Returns:
        ``(..., n_sub)`` costs ``w_S C_SS⁻¹ w_Sᵀ``.
    """
    e = block_numel
    idx = (subs.unsqueeze(-1) * e + torch.arange(e, device=subs.device)).flatten(1)  # (n_sub, q) element ids
    wS = w[..., idx]  # (..., n_sub, q)
    CSS = C_scope[..., idx.unsqueeze(2), idx.unsqueeze(1)]  # (..., n_sub, q, q)
    return obs_cost(wS, CSS)


def best_subset(w: Tensor, C_scope: Tensor, num_blocks: int, num_prune: int, block_numel: int) -> tuple[Tensor, Tensor]:
    """Cheapest set of ``num_prune`` blocks per scope (joint OBS choice).

    Returns ``(cost (...,), keep (..., B) bool)`` — True for kept blocks.
    """
    keep = torch.ones(*w.shape[:-1], num_blocks, dtype=torch.bool, device=w.device)
    if num_prune == 0:
        return torch.zeros(w.shape[:-1], dtype=w.dtype, device=w.device), keep
    subs = subsets(num_blocks, num_prune, w.device)  # (n_sub, p)
    costs = subset_costs(w, C_scope, subs, block_numel)  # (..., n_sub)
    cost, arg = costs.min(-1)
    keep.scatter_(-1, subs[arg], False)
    return cost, keep


def independent_choice(w: Tensor, c_diag: Tensor, num_prune: int) -> tuple[Tensor, Tensor]:
    """Per-element OBS scores ``w_j² / C_jj`` summed per block; prune the ``num_prune`` smallest blocks.

    Args: ``w, c_diag (..., B, e)``. Returns ``(score (...,) summed over pruned blocks, keep (..., B) bool)``.
    The score is the sum of single-element costs, an approximation of the joint cost that ignores the
    off-diagonal entries of ``C_PP``.
    """
    score = (w.square() / c_diag).sum(-1)  # (..., B)
    keep = top_mask(score, score.shape[-1] - num_prune)  # prune the smallest; ties: the later block
    return score.masked_fill(keep, 0.0).sum(-1), keep
