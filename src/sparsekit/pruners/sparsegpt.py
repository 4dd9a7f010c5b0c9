"""SparseGPT (Frantar & Alistarh, 2023), the published algorithm for any pattern.

With ``C = (H + λI)⁻¹ = UᵀU`` (``U`` upper triangular), sweeping columns left to right, row ``i`` of ``U`` is the
OBS update of column ``i`` once columns ``< i`` are frozen (paper, Alg. 1):

    err_i = (w_i − q_i) / U_ii,        w_{i:} ← w_{i:} − err_i · U_{i, i:}

where ``q_i`` is ``w_i`` if kept and 0 if pruned. The mask of a scope is chosen when the sweep reaches the scope's
first column, keeping the ``nnz`` blocks of largest ``Σ_{j∈b} (w_j / U_jj)²`` on the already-updated weights.
Updates are applied lazily in batches of about ``blocksize`` columns (the paper's "lazy batch updates"), with
batch boundaries moved to the next column no scope straddles, so a scope's columns always see all earlier updates.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from sparsekit.errors import InputError
from sparsekit.hessian import damped_inverse
from sparsekit.patterns import Layout
from sparsekit.pruners import PrunerOutput


def _batch_bounds(layout: Layout, blocksize: int) -> list[int]:
    """Column boundaries ``0 = b_0 < b_1 < ... = K`` of lazy batches, none inside any scope's column span."""
    K = layout.num_cols
    span = layout.col_span.cpu()  # (S, 2)
    inside = torch.zeros(K + 2, dtype=torch.long)  # inside[c] = #scopes with first < c <= last
    inside.index_add_(0, span[:, 0] + 1, torch.ones(len(span), dtype=torch.long))
    inside.index_add_(0, span[:, 1] + 1, -torch.ones(len(span), dtype=torch.long))
    free = (inside.cumsum(0)[: K + 1] == 0).nonzero().flatten().tolist()  # allowed boundaries
    bounds, nxt = [0], 0
    for c in free:
        if c >= nxt + blocksize or c == K:
            if c > bounds[-1]:
                bounds.append(c)
            nxt = c
    return bounds


def prune_sparsegpt(
    weight: Tensor,
    hessian: Tensor,
    layout: Layout,
    *,
    damp: float = 0.01,
    damp_mode: str = "mean",
    progress_fn: Callable[[str], None] | None = None,
    blocksize: int = 128,
) -> PrunerOutput:
    """SparseGPT on ``weight (M, K)``; ``blocksize`` is the lazy-batch width in columns."""
    if not isinstance(blocksize, int) or blocksize < 1:
        raise InputError(f"blocksize must be a positive int, got {blocksize!r}.")
    M, K = weight.shape
    inv = damped_inverse(hessian, damp, damp_mode, upper=True)
    U = inv.upper  # (K, K) upper, C = UᵀU
    W = weight
    pruned = torch.zeros(M, K, dtype=torch.bool, device=W.device)  # True = pruned

    # Scopes grouped by first column: start -> (rows, cols) of their elements, (n, B, e) each.
    first = layout.col_span[:, 0]
    order = torch.argsort(first, stable=True)
    starts, counts = torch.unique_consecutive(first[order], return_counts=True)
    groups = {}
    for s, idx in zip(starts.tolist(), torch.split(order, counts.tolist())):
        groups[s] = (layout.rows[idx], layout.cols[idx])

    bounds = _batch_bounds(layout, blocksize)
    for i1, i2 in zip(bounds[:-1], bounds[1:]):
        W1 = W[:, i1:i2].clone()  # (M, n) the batch, updated in place
        U1 = U[i1:i2, i1:i2]  # (n, n)
        d = U1.diagonal()  # (n,)
        Err1 = torch.zeros_like(W1)  # (M, n)
        for i in range(i2 - i1):
            g = groups.get(i1 + i)
            if g is not None:
                rows, cols = g  # (n_s, B, e)
                score = (W1[rows, cols - i1] / d[cols - i1]).square().sum(-1)  # (n_s, B)
                drop = torch.ones_like(score, dtype=torch.bool)
                if layout.nnz:
                    drop.scatter_(1, score.topk(layout.nnz, dim=1).indices, False)
                pruned[rows, cols] = drop.unsqueeze(-1).expand_as(rows)
            w = W1[:, i]  # (M,)
            err = torch.where(pruned[:, i1 + i], w, torch.zeros_like(w)) / d[i]  # (M,)
            W1[:, i:].sub_(err.unsqueeze(1) * U1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:].sub_(Err1 @ U[i1:i2, i2:])
        if progress_fn is not None:
            progress_fn(f"sparsegpt: columns {i2}/{K}")
    mask = ~pruned
    return PrunerOutput(W.masked_fill(pruned, 0.0), mask, inv.damp, {"damp_steps": inv.steps})
