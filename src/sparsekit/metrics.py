"""The layer objective and the seed's reported metric (DESIGN.md §1).

``L(W') = ‖X (W' − W)ᵀ‖²_F = tr((W' − W) H (W' − W)ᵀ)``; the seed's "Norm. Loss" is the relative output error
``sqrt(L / tr(W H Wᵀ))``. Both are computed in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["quadratic_loss", "relative_error", "relative_error_x"]


def quadratic_loss(delta: Tensor, hessian: Tensor) -> Tensor:
    """Per-row ``δw_r H δw_rᵀ`` for ``delta (M, K)``: ``(M,)`` float64."""
    d = delta.double()
    return ((d @ hessian.double()) * d).sum(1)


def relative_error(weight: Tensor, pruned: Tensor, hessian: Tensor) -> float:
    """``sqrt(tr(δ H δᵀ) / tr(W H Wᵀ))`` with ``δ = pruned − weight``: the relative output error through H."""
    num = quadratic_loss(pruned.double() - weight.double(), hessian).sum()
    den = quadratic_loss(weight, hessian).sum()
    return float((num / den.clamp_min(1e-300)).sqrt())


def relative_error_x(weight: Tensor, pruned: Tensor, inputs: Tensor) -> float:
    """``‖X (W' − W)ᵀ‖_F / ‖X Wᵀ‖_F`` computed from the inputs ``X (N, K)`` directly (for tests)."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    return float(torch.linalg.norm(x @ (pruned.double() - weight.double()).T) / torch.linalg.norm(x @ weight.double().T))
