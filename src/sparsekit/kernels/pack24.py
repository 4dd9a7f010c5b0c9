"""The compact 2:4 storage format (:mod:`sparsekit.compact`): pack a 2:4 weight into its kept values and 2-bit
positions, and unpack it back — the torch reference every sparse24 kernel is tested against.

``values (M, K/2)`` hold the two kept entries of each group of 4 input columns in column order; ``meta (M, K/8)
uint8`` holds kept value j's position (0..3 within its group) at bits ``2·(j mod 4)`` of byte ``j // 4``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsekit.errors import InputError

__all__ = ["is_24", "pack_24", "positions_24", "unpack_24"]

_SHIFTS = (0, 2, 4, 6)  # bit offset of kept value j within its byte, j mod 4 = 0..3


def is_24(weight: Tensor) -> bool:
    """True when ``weight (M, K)`` is 2-D, ``K % 8 == 0`` and every group of 4 input columns has ≤ 2 nonzeros."""
    if weight.dim() != 2 or weight.shape[1] % 8 or weight.shape[1] == 0:
        return False
    M, K = weight.shape
    nnz = (weight.detach().reshape(M, K // 4, 4) != 0).sum(-1)  # (M, K/4)
    return bool((nnz <= 2).all())


def pack_24(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Pack a 2:4 ``weight (M, K)`` into ``(values (M, K/2) weight.dtype, positions (M, K/8) uint8)``.

    Raises :class:`InputError` (weight untouched) if it is not 2:4 or ``K % 8 != 0``.
    """
    if not is_24(weight):
        raise InputError(
            f"weight of shape {tuple(weight.shape)} is not 2:4 (every group of 4 input columns needs ≥ 2 exact "
            "zeros and K must be a multiple of 8); prune it with pattern '2:4' first."
        )
    M, K = weight.shape
    g = weight.detach().reshape(M, K // 4, 4)  # (M, G, 4)
    zero_first_last = (g == 0).to(torch.int8)  # nonzeros sort first, then the lowest zero positions
    pos = torch.argsort(zero_first_last, dim=-1, stable=True)[..., :2].sort(dim=-1).values  # (M, G, 2)
    values = g.gather(-1, pos).reshape(M, K // 2).contiguous()  # (M, K/2)
    p = pos.reshape(M, K // 8, 4).to(torch.int32)  # (M, K/8, 4): four positions per byte
    byte = p[..., 0] | (p[..., 1] << 2) | (p[..., 2] << 4) | (p[..., 3] << 6)  # (M, K/8)
    return values, byte.to(torch.uint8).contiguous()


def positions_24(meta: Tensor) -> Tensor:
    """``meta (M, K/8) uint8`` -> ``positions (M, K/4, 2) int64`` (0..3 within each group)."""
    M, KB = meta.shape
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=meta.device)
    return ((meta.to(torch.int32)[..., None] >> shifts) & 3).reshape(M, 2 * KB, 2).long()


def unpack_24(values: Tensor, meta: Tensor) -> Tensor:
    """The dense ``W (M, K)`` with zeros from ``values (M, K/2)`` and ``meta (M, K/8)``: the CPU reference."""
    M, KH = values.shape
    pos = positions_24(meta)  # (M, K/4, 2)
    dense = torch.zeros(M, KH // 2, 4, dtype=values.dtype, device=values.device)
    return dense.scatter_(-1, pos, values.reshape(M, KH // 2, 2)).reshape(M, 2 * KH)
