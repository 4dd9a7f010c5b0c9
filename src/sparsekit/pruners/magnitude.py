"""Magnitude pruning: keep the ``nnz`` blocks of largest ``‖w_block‖²`` per scope; no weight update."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from sparsekit.patterns import Layout
from sparsekit.pruners import PrunerOutput


def prune_magnitude(weight: Tensor, hessian: Tensor, layout: Layout, **_: Any) -> PrunerOutput:
    """Score of block ``b``: ``Σ_{j∈b} w_j²``. ``hessian`` is unused (kept for the common signature)."""
    mask = layout.project(weight.square())  # (M, K)
    return PrunerOutput(weight, mask)
