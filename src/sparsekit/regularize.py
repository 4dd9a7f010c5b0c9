"""Regularisation chosen on data: the damping of a layer picked by its loss on held-out tokens (issue 16).

An exact solver fits the calibration Hessian ``H_calib = X_cᵀX_c/N_c`` closely, noise included; what the user
sees is the output error on *other* tokens. So hold out a slice of the calibration tokens, accumulate their
Hessian ``H_heldout = X_hᵀX_h/N_h`` (same layer, same inputs path), prune with every candidate regularisation on
``H_calib``, and keep the candidate with the lowest held-out layer loss (DESIGN.md §1 with ``H_heldout``)::

    heldout_loss(W') = sqrt(tr((W' − W) H_heldout (W' − W)ᵀ) / tr(W H_heldout Wᵀ)) = ‖X_h (W' − W)ᵀ‖ / ‖X_h Wᵀ‖

Candidates are a grid of ``(damp, damp_mode)`` pairs (the damping of :func:`sparsekit.prune_weight`: ``λ I`` or
``damp · diag H`` added to ``H_calib``), each optionally combined with a *shrink* ``α`` of the compensating
update on the method's own mask ``S`` (kept entries):

    W'(α) = W ⊙ S + (1 − α) (W' − W ⊙ S),    0 ≤ α ≤ 1

``α = 0`` is the method's result, ``α = 1`` keeps the surviving weights unchanged (magnitude-style, no
compensation). Every ``W'(α)`` has the same zeros as ``W'``, so the pattern holds — unlike a blend with another
method's result (e.g. ``(1 − α) W'_method + α W'_sparsegpt``), which is only valid where the two masks agree
and otherwise leaves non-zeros in pruned positions. The shrink is a ridge on the update: it trades the
calibration fit for robustness, at no extra pruning cost (each ``α`` is evaluated, not re-pruned).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from sparsekit.api import PruneResult, prune_weight
from sparsekit.coupling import SINGLE, Gather
from sparsekit.errors import InputError
from sparsekit.hessian import DAMP_MODES, check_hessian
from sparsekit.metrics import relative_error
from sparsekit.patterns import Pattern

__all__ = ["DEFAULT_GRID", "RegularisationChoice", "heldout_loss", "shrink_update", "shrink_result",
           "choose_regularisation"]

#: The default candidates: SparseGPT's 1% of mean(diag H) and a decade either side, and three diagonal dampings.
DEFAULT_GRID: tuple[tuple[float, str], ...] = (
    (0.001, "mean"), (0.01, "mean"), (0.1, "mean"), (0.01, "diag"), (0.1, "diag"), (0.3, "diag"),
)


@dataclass
class RegularisationChoice:
    """What :func:`choose_regularisation` returns.

    ``result`` is the pruned layer at the chosen point (its ``weight`` already shrunk by ``shrink``; its
    ``loss`` the calibration loss of that weight); ``table`` has one row per candidate:
    ``{"damp", "damp_mode", "shrink", "heldout_loss", "calib_loss"}``, in grid order.
    """

    damp: float
    damp_mode: str
    shrink: float
    heldout_loss: float
    result: PruneResult
    table: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (no tensors)."""
        return {"damp": self.damp, "damp_mode": self.damp_mode, "shrink": self.shrink,
                "heldout_loss": self.heldout_loss, "calib_loss": self.result.loss, "table": self.table}


def heldout_loss(weight: Tensor, pruned: Tensor, h_heldout: Tensor, gather: Gather = SINGLE) -> float:
    """The relative output error of ``pruned (M, K)`` on the held-out tokens, through their ``H (K, K)`` (the
    whole layer's when the rows are one part of it, ``gather``: :mod:`sparsekit.coupling`)."""
    return relative_error(weight, pruned, h_heldout, gather)


def shrink_update(weight: Tensor, pruned: Tensor, mask: Tensor, alpha: float) -> Tensor:
    """``W ⊙ S + (1 − α)(W' − W ⊙ S)`` in ``pruned``'s dtype: the update shrunk by ``α``, zeros of ``pruned`` kept."""
    kept = torch.where(mask, weight.to(pruned.dtype), torch.zeros((), dtype=pruned.dtype, device=pruned.device))
    return torch.lerp(pruned, kept, alpha)  # (M, K); exact at α = 0 and α = 1


def shrink_result(weight: Tensor, res: PruneResult, h_calib: Tensor, alpha: float,
                  gather: Gather = SINGLE) -> PruneResult:
    """``res`` with its update shrunk by ``α`` (:func:`shrink_update`), its loss through ``h_calib``; ``α = 0``: ``res``."""
    if alpha == 0:
        return res
    w = shrink_update(weight, res.weight, res.mask, alpha)  # (M, K)
    return PruneResult(weight=w, mask=res.mask, loss=relative_error(weight, w, h_calib, gather), method=res.method,
                       pattern=res.pattern, time_s=res.time_s, damp=res.damp, stats={**res.stats, "shrink": alpha})


def _check_grid(grid: Sequence[Any], shrinks: Sequence[Any]) -> list[tuple[float, str]]:
    points = list(grid)
    if not points:
        raise InputError("the regularisation grid is empty; give (damp, damp_mode) pairs, e.g. DEFAULT_GRID.")
    out = []
    for p in points:
        if not (isinstance(p, (tuple, list)) and len(p) == 2):
            raise InputError(f"grid point {p!r} must be a (damp, damp_mode) pair, e.g. (0.01, 'mean').")
        damp, mode = p
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
            raise InputError(f"grid point {p!r}: damp must be a finite number >= 0.")
        if mode not in DAMP_MODES:
            raise InputError(f"grid point {p!r}: damp_mode must be one of {DAMP_MODES}.")
        if mode == "diag" and not damp < 1:
            raise InputError(f"grid point {p!r}: damp_mode='diag' needs 0 <= damp < 1.")
        out.append((float(damp), mode))
    if len(set(out)) != len(out):
        raise InputError(f"the grid {points!r} repeats a point; list each (damp, damp_mode) once.")
    al = list(shrinks)
    if not al or len(set(al)) != len(al) or any(
        isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1 for a in al
    ):
        raise InputError(f"shrinks must be distinct numbers in [0, 1] (0: the method's update), got {shrinks!r}.")
    return out


def choose_regularisation(
    weight: Tensor,
    h_calib: Tensor,
    h_heldout: Tensor,
    pattern: "str | Pattern",
    method: str = "sparsegpt",
    grid: Sequence[tuple[float, str]] = DEFAULT_GRID,
    *,
    shrinks: Sequence[float] = (0.0,),
    gather: Gather | None = None,
    **options: Any,
) -> RegularisationChoice:
    """Prune ``weight (M, K)`` on ``h_calib`` once per grid point; keep the lowest held-out layer loss.

    Args:
        weight: the layer (not modified).
        h_calib: ``(K, K)`` Hessian of the calibration tokens, the one the method minimises.
        h_heldout: ``(K, K)`` Hessian of held-out tokens of the same layer (same device), the judge.
        pattern, method, options: as for :func:`sparsekit.prune_weight` (``damp``/``damp_mode`` come from the grid).
        grid: ``(damp, damp_mode)`` candidates, distinct.
        shrinks: update shrinks ``α`` tried on each pruned result (see the module docstring); ``(0.0,)``: off.
        gather: ``weight`` is one row part of a layer (as for :func:`sparsekit.prune_weight`): the losses are the
            whole layer's, so every part makes the same choice.

    Returns:
        a :class:`RegularisationChoice`; ties go to the earlier grid point, then the smaller shrink.

    Raises:
        InputError: a bad grid or shrink list, ``damp``/``damp_mode``/``inplace`` among ``options``, or a
            held-out Hessian of the wrong shape, dtype or device. The weight is never modified.
    """
    points = _check_grid(grid, shrinks)
    for key in ("damp", "damp_mode", "inplace"):
        if key in options:
            raise InputError(f"{key!r} is set by the grid (or not allowed) in choose_regularisation; remove it.")
    K = weight.shape[-1] if isinstance(weight, Tensor) else None
    if not isinstance(h_heldout, Tensor) or h_heldout.dtype not in (torch.float32, torch.float64):
        raise InputError("h_heldout must be a float32/float64 (K, K) tensor: the Hessian of held-out tokens.")
    if isinstance(weight, Tensor) and h_heldout.device != weight.device:
        raise InputError(f"weight is on {weight.device} but h_heldout on {h_heldout.device}; move both together.")
    if K is not None:
        check_hessian(h_heldout, K)
    best: tuple[float, int, float] | None = None  # (held-out loss, grid index, shrink)
    best_result: PruneResult | None = None
    table = []
    part = SINGLE if gather is None else gather
    for g, (damp, mode) in enumerate(points):
        res = prune_weight(weight, h_calib, pattern, method, damp=damp, damp_mode=mode, gather=gather, **options)
        for alpha in sorted(float(a) for a in shrinks):
            shrunk = shrink_result(weight, res, h_calib, alpha, part)
            loss = heldout_loss(weight, shrunk.weight, h_heldout, part)
            table.append({"damp": damp, "damp_mode": mode, "shrink": alpha, "heldout_loss": loss,
                          "calib_loss": shrunk.loss})
            if best is None or loss < best[0]:
                best = (loss, g, alpha)
                best_result = shrunk
    assert best is not None and best_result is not None
    loss, g, alpha = best
    return RegularisationChoice(points[g][0], points[g][1], alpha, loss, best_result, table)
