"""The layer Hessian ``H = XᵀX / N`` and its damped inverse ``C = (H + λ I)⁻¹`` (DESIGN.md §1, §5).

Scaling ``H`` by ``1/N`` changes neither the OBS choices nor the relative output error; it only keeps the
numbers of long calibration runs in range.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
from torch import Tensor

from sparsekit.errors import HessianError, InputError

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_DAMP", "HessianAccumulator", "damping_value", "damped_inverse", "damped_hessian", "DampedInverse", "check_hessian",
           "ScaledInverse", "scaled_inverse", "scaled_hessian"]

#: The default relative damping of every method, the pipeline and the CLI (``λ = 0.01 · mean(diag H)``,
#: SparseGPT's). :class:`sparsekit.pruners.obs.StructuredOBS` keeps the seed API's own default (1e-4).
DEFAULT_DAMP = 0.01
#: Damping escalation: each Cholesky failure multiplies the relative damping by this factor ...
DAMP_GROWTH = 10.0
#: ... at most this many times before :class:`HessianError` is raised.
MAX_DAMP_STEPS = 6


class HessianAccumulator:
    """Streaming ``H = XᵀX / N`` over batches of inputs of any leading shape ``(..., K)``.

    ``N`` counts tokens (rows of X) exactly; adding batches one by one equals one pass over all of them.
    """

    def __init__(self, num_features: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if dtype not in (torch.float32, torch.float64):
            raise InputError(f"accumulate in float32 or float64, got {dtype}.")
        self.num_features = num_features
        self._sum = torch.zeros(num_features, num_features, dtype=dtype, device=device)  # (K, K) Σ x xᵀ
        self.num_tokens = 0

    def add(self, x: Tensor) -> None:
        """Add a batch ``x (..., K)``."""
        if x.shape[-1] != self.num_features:
            raise InputError(f"inputs have {x.shape[-1]} features, the accumulator expects {self.num_features}.")
        x = x.reshape(-1, self.num_features).to(device=self._sum.device, dtype=self._sum.dtype)  # (n, K)
        if not torch.isfinite(x).all():
            raise InputError("calibration inputs contain NaN or Inf; check the model's forward pass in this dtype.")
        self._sum.addmm_(x.T, x)
        self.num_tokens += x.shape[0]

    @property
    def hessian(self) -> Tensor:
        """``(K, K)`` ``XᵀX / N``."""
        if self.num_tokens == 0:
            raise InputError("no calibration tokens were added; give at least one batch of inputs.")
        return self._sum / self.num_tokens


def check_hessian(hessian: Tensor, num_cols: int) -> None:
    """Raise a clear error unless ``hessian`` is a finite, symmetric ``(K, K)`` matrix with a non-negative diagonal."""
    if hessian.dim() != 2 or hessian.shape != (num_cols, num_cols):
        raise InputError(
            f"hessian must be ({num_cols}, {num_cols}) for a weight with K={num_cols} columns, got {tuple(hessian.shape)}."
        )
    if not hessian.is_floating_point():
        raise InputError(f"hessian must be a floating tensor, got {hessian.dtype}.")
    if not torch.isfinite(hessian).all():
        raise InputError("hessian contains NaN or Inf; recompute it from finite inputs.")
    h = hessian.double()
    scale = h.abs().max().clamp_min(1e-300)
    if ((h - h.T).abs().max() / scale).item() > 1e-4:
        raise HessianError("hessian is not symmetric; pass (H + H.T) / 2 or recompute it as XᵀX.")
    if (h.diagonal() < -1e-6 * scale).any():
        raise HessianError(
            "hessian has negative diagonal entries, so it is not positive semi-definite; it must be XᵀX of real inputs."
        )


def damping_value(hessian: Tensor, damp: float) -> float:
    """The seed's rule: ``λ = damp · mean(diag H)`` if ``damp < 1``, else ``λ = damp`` (absolute)."""
    if damp < 0:
        raise InputError(f"damp must be >= 0, got {damp}.")
    if damp < 1.0:
        return damp * hessian.diagonal().mean().item()
    return float(damp)


DAMP_MODES = ("mean", "diag")
T = TypeVar("T")


@dataclass
class DampedInverse:
    """``C = (H + Λ)⁻¹`` and how it was obtained."""

    inverse: Tensor  # (K, K) C
    chol: Tensor  # (K, K) lower Cholesky factor of H + Λ
    damp: float  # relative damping actually used (λ / mean(diag H) in mode "mean", the factor in mode "diag")
    steps: int  # number of escalations needed
    upper: Tensor | None = None  # (K, K) upper Cholesky factor U of C (C = UᵀU), if asked for


def _escalate(
    hessian: Tensor, damp: float, damp_mode: str, max_steps: int, factor: Callable[[Tensor], T | None]
) -> tuple[T, float, int]:
    """The damping rule with step-by-step escalation: ``(factor(H + Λ), relative damping, escalations)``.

    ``factor`` returns ``None`` when ``H + Λ`` fails it (a Cholesky factorisation, say); the damping then grows
    by ``DAMP_GROWTH`` (logged) up to ``max_steps`` times, past which :class:`HessianError` is raised.
    Dead inputs (``H_jj = 0``) get ``H_jj = 1`` first.
    """
    if damp_mode not in DAMP_MODES:
        raise InputError(f"damp_mode must be one of {DAMP_MODES}, got {damp_mode!r}.")
    if damp_mode == "diag" and not 0 <= damp < 1:
        raise InputError(f"damp_mode='diag' needs 0 <= damp < 1, got {damp}.")
    h = hessian.clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    mean_diag = h.diagonal().mean().item()
    lam = damping_value(h, damp) if damp_mode == "mean" else damp
    for step in range(max_steps + 1):
        hd = h.clone()
        if damp_mode == "mean":
            hd.diagonal().add_(lam)
        else:
            hd.diagonal().mul_(1.0 + lam)
        rel = lam / mean_diag if damp_mode == "mean" else lam
        out = factor(hd)
        if out is not None:
            if step:
                log.warning("Cholesky succeeded with relative damping %.3g after %d escalations.", rel, step)
            return out, rel, step
        new = lam * DAMP_GROWTH if lam > 0 else 1e-8 * (mean_diag if damp_mode == "mean" else 1.0)
        log.warning("Cholesky of the damped H failed at relative damping %.3g; raising it to %.3g.",
                    rel, new / mean_diag if damp_mode == "mean" else new)
        lam = new
    raise HessianError(
        f"the damped Hessian is not positive definite even at relative damping {rel:.3g} after {max_steps} "
        "escalations: H is not PSD (not XᵀX of real inputs) or is badly conditioned; check it or pass a larger damp."
    )


def damped_hessian(
    hessian: Tensor, damp: float = DEFAULT_DAMP, damp_mode: str = "mean", max_steps: int = MAX_DAMP_STEPS
) -> tuple[Tensor, float, int]:
    """``(H + Λ (K, K), relative damping used, escalations)``: the rule of :func:`damped_inverse`, no inverse."""
    return _escalate(hessian, damp, damp_mode, max_steps,
                     lambda hd: hd if torch.linalg.cholesky_ex(hd).info.item() == 0 else None)


def damped_inverse(
    hessian: Tensor,
    damp: float = DEFAULT_DAMP,
    damp_mode: str = "mean",
    max_steps: int = MAX_DAMP_STEPS,
    upper: bool = False,
) -> DampedInverse:
    """Cholesky-based damped inverse with step-by-step escalation on failure.

    ``damp_mode="mean"`` (the seed's rule): ``Λ = λ I`` with ``λ`` from :func:`damping_value`.
    ``damp_mode="diag"``: ``Λ = damp · diag(H)`` (``damp < 1``), which is ``λ I`` in the scale-free coordinates
    ``D⁻¹ H D⁻¹`` with ``D = sqrt(diag H)`` (DESIGN.md §5).

    Dead inputs (``H_jj = 0``) get ``H_jj = 1`` first, as in SparseGPT: their weights carry no signal, and this
    keeps ``mean(diag H)`` and the factorisation well-defined. If the Cholesky factorisation fails, the damping
    is multiplied by ``DAMP_GROWTH`` (a warning is logged) up to ``max_steps`` times; past that a
    :class:`HessianError` names the damping tried. With ``upper=True`` the upper Cholesky factor of ``C``
    (SparseGPT's ``Hinv``) is computed too, and its failure escalates the damping the same way.
    """

    def factor(hd: Tensor) -> tuple[Tensor, Tensor, Tensor | None] | None:
        chol, info = torch.linalg.cholesky_ex(hd)
        if info.item() != 0:
            return None
        inv = torch.cholesky_inverse(chol).mT  # symmetric; .mT of the column-major result is row-major
        if not upper:
            return inv, chol, None
        up, info = torch.linalg.cholesky_ex(inv, upper=True)
        return (inv, chol, up) if info.item() == 0 else None

    (inv, chol, up), rel, steps = _escalate(hessian, damp, damp_mode, max_steps, factor)
    return DampedInverse(inv, chol, rel, steps, up)


# ---- scale-free coordinates (DESIGN.md §5): one place for both forms ------------------------------------------
def scaled_hessian(hd: Tensor) -> tuple[Tensor, Tensor]:
    """``(H̃ = D⁻¹ H_d D⁻¹ (K, K) with unit diagonal, d = sqrt(diag H_d) (K,))``."""
    d = hd.diagonal().sqrt()
    return hd / d.unsqueeze(1) / d.unsqueeze(0), d


@dataclass
class ScaledInverse:
    """``C̃ = D C D`` with ``C = (H + Λ)⁻¹`` and ``D = sqrt(diag(H + Λ))`` (DESIGN.md §5)."""

    C: Tensor  # (K, K) scaled damped inverse, symmetric
    d: Tensor  # (K,) D
    damp: float
    steps: int


def scaled_inverse(hessian: Tensor, damp: float, damp_mode: str) -> ScaledInverse:
    """Damped inverse in scale-free coordinates; ``w̃ = w · d`` are the matching weights."""
    inv = damped_inverse(hessian, damp, damp_mode)
    d = inv.chol.square().sum(1).sqrt()  # (K,) sqrt(diag(L Lᵀ)) = sqrt(diag(H + Λ))
    C = inv.inverse * d[:, None] * d[None, :]
    C = (C + C.T) / 2
    return ScaledInverse(C, d, inv.damp, inv.steps)
