"""Fused SparseGPT lazy batch for contiguous patterns (``N:M``, ``2:4-pairs``): Triton kernel + torch reference.

Within one lazy batch of ``BS`` columns, rows are independent. One program owns ``BLOCK_M`` rows and walks the
batch segment by segment (a segment = one scope = ``G = B·e`` contiguous columns): it scores the blocks
``Σ (w_j / U_jj)²`` on the updated weights, keeps the ``nnz`` best, runs the column loop of SparseGPT over the
segment in registers, writes ``q`` (kept values, zeros) and ``err``, and applies the segment's update to the rest
of the batch with one ``tl.dot``. This replaces ~25 kernel launches per segment by one launch per batch.

The reference is :func:`sweep_batch_reference`, the same computation in plain torch (a column loop), which the
GPU tests compare the kernel against; CPU runs use the general path in ``pruners/sparsegpt.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # Triton is optional: absent on CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU CI
    triton = None

__all__ = ["available", "sweep_batch", "sweep_batch_reference"]


def available(device: torch.device) -> bool:
    """True when the fused kernel can run on ``device``."""
    return triton is not None and device.type == "cuda"


def sweep_batch_reference(W1: Tensor, U1: Tensor, blocks: int, elems: int, nnz: int) -> tuple[Tensor, Tensor]:
    """Torch reference: the SparseGPT column loop over one batch ``W1 (M, BS)`` with ``U1 (BS, BS)``.

    Scopes are consecutive groups of ``blocks`` blocks of ``elems`` contiguous columns. Returns
    ``(err (M, BS), pruned (M, BS) bool)`` and overwrites ``W1`` with ``q`` (kept values, pruned = 0).
    """
    M, BS = W1.shape
    G = blocks * elems
    d = U1.diagonal()
    err = torch.zeros_like(W1)
    pruned = torch.zeros_like(W1, dtype=torch.bool)
    for i in range(BS):
        if i % G == 0:
            score = (W1[:, i : i + G] / d[i : i + G]).square().view(M, blocks, elems).sum(-1)  # (M, B)
            keep = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(nnz, dim=1).indices, True)
            pruned[:, i : i + G] = ~keep.repeat_interleave(elems, dim=1)
        e = torch.where(pruned[:, i], W1[:, i], torch.zeros_like(W1[:, i])) / d[i]
        W1[:, i:] -= e[:, None] * U1[i, i:][None]
        err[:, i] = e
    W1.masked_fill_(pruned, 0.0)
    return err, pruned


if triton is not None:

    @triton.jit
    def _sweep_kernel(
        W_ptr, U_ptr, E_ptr, P_ptr, M, stride_w, stride_u,
        BS: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, B: tl.constexpr, EL: tl.constexpr,
        NNZ: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        rmask = rows < M
        gcol = tl.arange(0, GP)  # (GP,) segment columns, padded to >= 16 for tl.dot
        gvalid = gcol < G
        bcol = tl.arange(0, BS)  # (BS,)
        for s in range(BS // G):
            a = s * G
            wp = W_ptr + rows[:, None] * stride_w + (a + gcol)[None, :]
            m2 = rmask[:, None] & gvalid[None, :]
            w = tl.load(wp, mask=m2, other=0.0)  # (BLOCK_M, GP)
            d = tl.load(U_ptr + (a + gcol) * stride_u + (a + gcol), mask=gvalid, other=1.0)  # (GP,)
            # block scores and top-NNZ by rank (ties -> lower block index wins)
            sc = (w / d[None, :]) * (w / d[None, :])
            blk = gcol // EL  # (GP,) block id of each column
            keep = tl.zeros((BLOCK_M, GP), dtype=tl.int32)
            for b in tl.static_range(B):
                sb = tl.sum(tl.where((blk == b)[None, :], sc, 0.0), axis=1)  # (BLOCK_M,)
                rank = tl.zeros((BLOCK_M,), dtype=tl.int32)
                for c in tl.static_range(B):
                    sc_c = tl.sum(tl.where((blk == c)[None, :], sc, 0.0), axis=1)
                    better = (sc_c > sb) | ((sc_c == sb) & (c < b))
                    rank += better.to(tl.int32)
                kb = (rank < NNZ).to(tl.int32)  # (BLOCK_M,)
                keep += tl.where((blk == b)[None, :], kb[:, None], 0)
            pr = (keep == 0) & gvalid[None, :]  # (BLOCK_M, GP) pruned
            # SparseGPT column loop over the segment, in registers
            err = tl.zeros((BLOCK_M, GP), dtype=tl.float32)
            for j in tl.static_range(G):
                sel = (gcol == j)[None, :]
                wj = tl.sum(tl.where(sel, w, 0.0), axis=1)  # (BLOCK_M,)
                pj = tl.sum(tl.where(sel, pr.to(tl.float32), 0.0), axis=1)
                dj = tl.load(U_ptr + (a + j) * stride_u + (a + j))
                ej = pj * wj / dj
                urow = tl.load(U_ptr + (a + j) * stride_u + (a + gcol), mask=gvalid & (gcol > j), other=0.0)
                w = w - ej[:, None] * urow[None, :]
                err = tl.where(sel, ej[:, None], err)
            q = tl.where(pr, 0.0, w)
            tl.store(wp, q, mask=m2)
            tl.store(E_ptr + rows[:, None] * stride_w + (a + gcol)[None, :], err, mask=m2)
            tl.store(P_ptr + rows[:, None] * stride_w + (a + gcol)[None, :], pr.to(tl.int8), mask=m2)
            tl.debug_barrier()  # the tile below is read by other threads than the ones that stored q
            # rest of the batch: W[:, a+G:] -= err @ U[a:a+G, a+G:]
            rest = bcol >= a + G
            ublk = tl.load(
                U_ptr + (a + gcol)[:, None] * stride_u + bcol[None, :],
                mask=gvalid[:, None] & rest[None, :], other=0.0,
            )  # (GP, BS)
            tp = W_ptr + rows[:, None] * stride_w + bcol[None, :]
            tm = rmask[:, None] & rest[None, :]
            tile = tl.load(tp, mask=tm, other=0.0)
            tile = tile - tl.dot(err, ublk, input_precision="ieee")
            tl.store(tp, tile, mask=tm)
            tl.debug_barrier()  # next segment's loads must see this program's stores


def sweep_batch(W1: Tensor, U1: Tensor, blocks: int, elems: int, nnz: int, block_m: int = 16) -> tuple[Tensor, Tensor]:
    """Fused kernel version of :func:`sweep_batch_reference` (float32, CUDA). Same contract."""
    M, BS = W1.shape
    G = blocks * elems
    assert W1.dtype == torch.float32 and W1.is_contiguous() and U1.is_contiguous() and BS % G == 0
    assert BS & (BS - 1) == 0, "batch width must be a power of two"
    GP = max(16, triton.next_power_of_2(G))
    err = torch.empty_like(W1)
    pr = torch.empty(M, BS, dtype=torch.int8, device=W1.device)
    grid = (triton.cdiv(M, block_m),)
    _sweep_kernel[grid](
        W1, U1, err, pr, M, W1.stride(0), U1.stride(0),
        BS=BS, G=G, GP=GP, B=blocks, EL=elems, NNZ=nnz, BLOCK_M=block_m,
    )
    return err, pr.bool()
