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
from sparsekit.hessian import DEFAULT_DAMP, damped_inverse
from sparsekit.kernels.sparsegpt_nm import available, sweep_batch
from sparsekit.memory import device_budget, plan_rows
from sparsekit.patterns import Layout, top_mask
from sparsekit.pruners import PrunerOutput
from sparsekit.pruners._common import batch_bounds


#: columns solved at once between mask decisions (a unit-triangular solve per row of this size)
SEGMENT = 32


def _sweep_segment(W1: Tensor, U1: Tensor, pruned1: Tensor, a: int, b: int) -> Tensor:
    """Process columns ``a:b`` of the batch, whose masks are known, exactly as the column loop would.

    The loop ``err_i = p_i v_i / U_ii``, ``v_j ← v_j − err_i U_ij (j > i)`` over the segment is, per row, the
    unit-triangular system ``v (I + diag(p / d) T⁺) = w`` with ``T⁺`` the strict upper part of ``U1[a:b, a:b]``;
    solving it replaces ``b − a`` rank-1 updates by one batched solve. Updates ``W1`` in place; returns the
    segment's ``err (M, b − a)``.
    """
    T = U1[a:b, a:b]  # (g, g) upper
    d = T.diagonal()  # (g,)
    p = pruned1[:, a:b].to(W1.dtype)  # (M, g) 1 = pruned
    w = W1[:, a:b]  # (M, g)
    A = (p / d).unsqueeze(2) * T.triu(1)  # (M, g, g) strict upper
    A.diagonal(dim1=1, dim2=2).fill_(1.0)
    v = torch.linalg.solve_triangular(A.transpose(1, 2), w.unsqueeze(2), upper=False, unitriangular=True)
    v = v.squeeze(2)  # (M, g) each column's value when the sweep reaches it
    err = p * v / d  # (M, g)
    W1[:, a:b] = v * (1 - p)
    W1[:, b:].sub_(err @ U1[a:b, b:])
    return err


def _fused_config(layout: Layout, blocksize: int, W: Tensor) -> tuple[int, int, int] | None:
    """``(blocks, elems, nnz)`` when the fused CUDA kernel applies: float32 on CUDA, scopes of contiguous
    columns in one row (``N:M``, ``2:4-pairs``), ``blocksize`` a power of two holding whole scopes."""
    if not available(W.device) or W.dtype != torch.float32 or layout.row_cols is None:
        return None
    S_r, B, e = layout.row_cols.shape
    G = B * e
    contiguous = torch.equal(layout.row_cols.flatten(), torch.arange(layout.num_cols, device=layout.device))
    if not contiguous or G > 64 or blocksize % G or blocksize & (blocksize - 1) or blocksize > 256 or B > 8:
        return None
    return B, e, layout.nnz


def sparsegpt_bytes(K: int, blocksize: int, work: torch.dtype) -> tuple[int, int]:
    """``(per_row, fixed)`` bytes of :func:`prune_sparsegpt` (``s`` bytes of the work dtype): per row the pruned
    mask (``K``) and a lazy batch's copy, errors and scores (``4·blocksize·s``); fixed ``H + λI``, its factor and
    the upper factor of the inverse (``3·K²·s``)."""
    s = work.itemsize
    return K + 4 * blocksize * s, 3 * K * K * s


def prune_sparsegpt(
    weight: Tensor,
    hessian: Tensor,
    layout: Layout,
    *,
    damp: float = DEFAULT_DAMP,
    damp_mode: str = "mean",
    progress_fn: Callable[[str], None] | None = None,
    blocksize: int = 128,
    max_memory: int | str | None = None,
) -> PrunerOutput:
    """SparseGPT on ``weight (M, K)``; ``blocksize`` is the lazy-batch width in columns. Every row is swept at
    once: ``max_memory`` (:func:`sparsekit.memory.device_budget`) is checked against :func:`sparsegpt_bytes`."""
    if not isinstance(blocksize, int) or blocksize < 1:
        raise InputError(f"blocksize must be a positive int, got {blocksize!r}.")
    M, K = weight.shape
    per_row, fixed = sparsegpt_bytes(K, blocksize, weight.dtype)
    plan_rows(M, per_row, fixed, device_budget(weight.device, max_memory), multiple=M, what="sparsegpt")
    inv = damped_inverse(hessian, damp, damp_mode, upper=True)
    U = inv.upper  # (K, K) upper, C = UᵀU
    W = weight
    pruned = torch.zeros(M, K, dtype=torch.bool, device=W.device)  # True = pruned

    # Template scopes grouped by first column: start -> (rows, cols) of their elements, (n, B, e) each,
    # rows within a chunk of R rows; every chunk repeats them (``Wc[:, rows, cols]``: all chunks at once).
    R = layout.chunk_rows
    t_rows, t_cols = layout.template
    first = layout.col_span[:, 0]
    order = torch.argsort(first, stable=True)
    starts, counts = torch.unique_consecutive(first[order], return_counts=True)
    groups = {}
    for s, idx in zip(starts.tolist(), torch.split(order, counts.tolist())):
        groups[s] = (t_rows[idx], t_cols[idx])
    pruned_c = pruned.view(M // R, R, K)  # (chunks, R, K)

    fused = _fused_config(layout, blocksize, W)
    bounds = batch_bounds(layout, blocksize)
    for i1, i2 in zip(bounds[:-1], bounds[1:]):
        W1 = W[:, i1:i2].clone()  # (M, n) the batch, updated in place
        U1 = U[i1:i2, i1:i2]  # (n, n)
        if fused is not None and i2 - i1 == blocksize:
            Err1, pruned[:, i1:i2] = sweep_batch(W1, U1.contiguous(), *fused)
        else:
            Err1 = torch.empty_like(W1)  # (M, n)
            W1c = W1.view(M // R, R, -1)  # (chunks, R, n)
            d = U1.diagonal()  # (n,)
            # mask decisions happen at scope starts; between two of them, segments of <= SEGMENT columns
            cuts = sorted({c - i1 for c in groups if i1 <= c < i2} | set(range(0, i2 - i1, SEGMENT)) | {i2 - i1})
            for a, b in zip(cuts[:-1], cuts[1:]):
                g = groups.get(i1 + a)
                if g is not None:
                    rows, cols = g  # (n_s, B, e)
                    score = (W1c[:, rows, cols - i1] / d[cols - i1]).square().sum(-1)  # (chunks, n_s, B)
                    drop = ~top_mask(score, layout.nnz)
                    pruned_c[:, rows, cols] = drop.unsqueeze(-1).expand(-1, -1, -1, rows.shape[-1])
                Err1[:, a:b] = _sweep_segment(W1, U1, pruned[:, i1:i2], a, b)
        W[:, i1:i2] = W1
        W[:, i2:].sub_(Err1 @ U[i1:i2, i2:])
        if progress_fn is not None:
            progress_fn(f"sparsegpt: columns {i2}/{K}")
    return PrunerOutput(W.masked_fill(pruned, 0.0), ~pruned, inv.damp, {"damp_steps": inv.steps})
