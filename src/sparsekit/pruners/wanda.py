"""Wanda (Sun et al. 2023): score ``|w_j| · ‖x_j‖``, i.e. ``w_j² H_jj`` summed over the block; no update."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from sparsekit.patterns import Layout
from sparsekit.pruners import PrunerOutput


def prune_wanda(weight: Tensor, hessian: Tensor, layout: Layout, **_: Any) -> PrunerOutput:
    """Block score ``Σ_{j∈b} w_j² H_jj`` (the square of Wanda's ``|w|·‖x‖``), top ``nnz`` per scope."""
    mask = layout.project(weight.square() * hessian.diagonal())  # (M, K)
    return PrunerOutput(weight, mask)
