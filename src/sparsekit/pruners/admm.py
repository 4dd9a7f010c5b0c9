"""ADMM on the layer objective for any pattern (ALPS-style, Meng et al. 2024), warm-started from any method.

Problem (DESIGN.md §1, damped): ``min_W ½ tr((W − W₀) H_d (W − W₀)ᵀ)`` s.t. every scope of ``W`` keeps its ``nnz``
blocks. With the split ``W = Z`` (``Z`` in the pattern set 𝒫) and scaled dual ``V`` the ADMM iteration is

    W ← (W₀ H_d + ρ Z − V)(H_d + ρ I)⁻¹                      (a linear solve, one factorisation per ρ)
    Z ← Π_𝒫(W + V/ρ)                                          (keep the nnz blocks of largest ‖·‖² per scope)
    V ← V + ρ (W − Z)

``Π_𝒫`` is :meth:`Layout.project` on the elementwise squares, so every BlockSpec/ScopeSpec works (``rowpair-16``
included). Everything runs in the scale-free coordinates ``H̃ = D⁻¹ H_d D⁻¹`` (unit diagonal), ``W̃ = W D``,
``D = sqrt(diag H_d)``: there ``ρ`` has one meaning for every layer, and the projection ranks blocks by
``Σ w_j² H_jj`` rather than by raw magnitude.

Warm start: the init method's weights ``Z₀`` (its mask) with ``W = Z₀`` and the dual of that point,
``V₀ = −∇f(Z₀) = (W₀ − Z₀) H̃`` (the KKT multiplier: a fixed point of the iteration when the mask is stable).
``ρ`` starts at ``rho`` and grows every ``rho_every`` iterations by a factor that depends on how much of the
mask changed meanwhile (ALPS's rule: ×1.3 / ×1.2 / ×1.1 for ≥ 10% / ≥ 0.5% / ≥ 1 changed kept blocks, ×1.05
otherwise), so ``W`` and ``Z`` are driven together. ALPS grows ``ρ`` every 3 iterations; every 10 (the default
here) explores longer: measured on real MiniLM and SmolLM2 layers at 2:4, warm-started from True OBS, it lowers
the final loss by 0.5-0.7% for about twice the iterations (every 20: a further 0.1-0.2%). Stop when the mask
has not changed for ``patience`` iterations, or after ``iters``. Then the kept weights of the final mask are
refit exactly (:func:`sparsekit.refine.refit`), and the result is compared with the init's through the
undamped ``H``: the better one is returned (``stats["chosen"]``), so ADMM is never worse than its init.

Rows in parts (``gather``, :mod:`sparsekit.coupling`): the rows interact only through the mask-change counts
that drive ``ρ`` and the stop (summed over the parts each iteration: integers, exact), the init-versus-ADMM loss
comparison (:func:`~sparsekit.metrics.relative_error` over the parts) and the refit's CG stop; the W-update,
projection and dual update are row by row. So the parts, concatenated, are the one-part result.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import torch
from torch import Tensor

from sparsekit.coupling import SINGLE, Gather
from sparsekit.hessian import DEFAULT_DAMP, damped_hessian, scaled_hessian
from sparsekit.errors import InputError
from sparsekit.kernels import obs_linalg
from sparsekit.memory import device_budget, plan_rows
from sparsekit.metrics import relative_error
from sparsekit.patterns import Layout
from sparsekit.pruners import METHODS, PrunerOutput, get_pruner
from sparsekit.pruners._common import PASSED_BY_CALLER, unknown_options
from sparsekit.refine import REFIT_SOLVERS, refit

log = logging.getLogger(__name__)

__all__ = ["prune_admm", "admm_iterate", "admm_bytes"]


def admm_bytes(K: int, work: torch.dtype) -> tuple[int, int]:
    """``(per_row, fixed)`` bytes of :func:`admm_iterate` (``s`` bytes of the work dtype). Per row the ``(M, K)``
    matrices it holds: ``W₀ D``, ``W₀ H̃``, ``V``, ``W``, ``Z``, ``U = W + V/ρ``, its square, the mask, the
    previous mask and the reference mask, the right-hand side of the W-update (``8·K·s + 3·K``); fixed ``H_d``,
    ``H̃``, the identity, the factor of ``H̃ + ρI`` and ``(H̃ + ρI)⁻¹`` (``5·K²·s``)."""
    s = work.itemsize
    return 8 * K * s + 3 * K, 5 * K * K * s


def _check_options(
    init: Any, init_options: Any, rho: Any, iters: Any, patience: Any, rho_every: Any, refit_solver: Any, tf32: Any
) -> None:
    if not isinstance(init, str) or init not in METHODS or init == "admm":
        known = ", ".join(m for m in METHODS if m != "admm")
        raise InputError(f"unknown init {init!r} for admm; use one of: {known}.")
    if init_options is not None and not isinstance(init_options, dict):
        raise InputError(f"init_options must be a dict of {init!r}'s options, got {type(init_options).__name__}.")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho > 0:
        raise InputError(f"rho must be a number > 0 (the initial ADMM penalty, e.g. 0.1), got {rho!r}.")
    for name, v, lo in (("iters", iters, 0), ("patience", patience, 1), ("rho_every", rho_every, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise InputError(f"{name} must be an int >= {lo}, got {v!r}.")
    if refit_solver not in REFIT_SOLVERS:
        raise InputError(f"refit_solver must be one of {', '.join(REFIT_SOLVERS)}, got {refit_solver!r}.")
    if tf32 is not None and not isinstance(tf32, bool):
        raise InputError(f"tf32 must be None, True or False, got {tf32!r}.")


def _check_init_options(fn: Callable[..., Any], init: str, options: dict[str, Any]) -> None:
    unknown, accepted = unknown_options(fn, options, PASSED_BY_CALLER)  # damp, ... passed by admm itself
    if unknown:
        raise InputError(
            f"init_options for {init!r} has unknown {', '.join(unknown)}; it takes: {', '.join(accepted) or 'none'}."
        )


def _rho_factor(changed: int, kept_blocks: int) -> float:
    """ALPS's penalty schedule: grow faster while the support still moves."""
    if changed >= 0.1 * kept_blocks:
        return 1.3
    if changed >= 0.005 * kept_blocks:
        return 1.2
    if changed >= 1:
        return 1.1
    return 1.05


def _count(gather: Gather, *counts: Tensor) -> list[int]:
    """Integer counts (0-d tensors) summed over the row parts (float64 holds them exactly)."""
    return [int(c) for c in gather.sum(torch.stack(counts)).tolist()]


def admm_iterate(
    ws0: Tensor,
    hs: Tensor,
    layout: Layout,
    z: Tensor,
    mask: Tensor,
    *,
    rho: float,
    iters: int,
    patience: int,
    rho_every: int,
    progress_fn: Callable[[str], None] | None = None,
    gather: Gather = SINGLE,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """The ADMM loop in scaled coordinates from ``(z, mask)``; returns ``(W, mask, stats)``, W not yet refit.

    ``ws0 (M, K)`` dense scaled weights, ``hs (K, K)`` unit-diagonal damped Hessian, ``z (M, K)`` warm start
    (zero off ``mask``). With ``gather`` the rows are one part of a layer; the counts that steer ``ρ`` and the stop
    are summed over the parts."""
    K = hs.shape[0]
    eye = torch.eye(K, dtype=hs.dtype, device=hs.device)
    lin = ws0 @ hs  # (M, K) W₀ H̃
    v = lin - z @ hs  # (M, K) V₀ = −∇f(Z₀)
    w = z
    kept_blocks = _count(gather, mask.sum())[0] // layout.block_numel
    stable, it, factors = 0, 0, 0
    cur_rho, inv_rho = None, None
    ref_mask = mask
    for it in range(1, iters + 1):
        if cur_rho != rho:
            L = torch.linalg.cholesky(hs + rho * eye)  # (K, K); H̃ + ρI is PD for ρ > 0
            inv_rho = torch.cholesky_inverse(L)  # (K, K) (H̃ + ρI)⁻¹, symmetric
            cur_rho = rho
            factors += 1
        w = (lin + rho * z - v) @ inv_rho  # (M, K) W-update
        u = w + v / rho  # (M, K)
        new_mask = layout.project(u.square())
        z = u * new_mask  # Z-update (projection)
        v = v + rho * (w - z)  # dual update
        # mask entries changed since the last iteration and since the last ρ update, over every part
        n_changed, moved = _count(gather, (new_mask != mask).sum(), (new_mask != ref_mask).sum())
        n_changed //= layout.block_numel
        stable = stable + 1 if n_changed == 0 else 0
        mask = new_mask
        if stable >= patience:
            break
        if it % rho_every == 0:
            changed = moved // layout.block_numel // 2  # blocks that moved
            rho *= _rho_factor(changed, kept_blocks)
            ref_mask = mask
        if progress_fn is not None and it % 10 == 0:
            progress_fn(f"admm: iteration {it}, rho {rho:.3g}, {n_changed} blocks changed")
    stats = {"admm_iters": it, "admm_rho_final": rho, "admm_factorizations": factors,
             "admm_converged": stable >= patience}
    return w, mask, stats


def prune_admm(
    weight: Tensor,
    hessian: Tensor,
    layout: Layout,
    *,
    damp: float = DEFAULT_DAMP,
    damp_mode: str = "mean",
    progress_fn: Callable[[str], None] | None = None,
    init: str = "sparsegpt",
    init_options: dict[str, Any] | None = None,
    rho: float = 0.1,
    iters: int = 500,
    patience: int = 3,
    rho_every: int = 10,
    refit_solver: str = "auto",
    tf32: bool | None = None,
    max_memory: int | str | None = None,
    gather: Gather = SINGLE,
) -> PrunerOutput:
    """ADMM pruning of ``weight (M, K)`` to ``layout``, warm-started from ``init`` (module docstring).

    Args:
        init: any registered method but ``"admm"`` (``"sparsegpt"``, ``"true-obs"``, ``"magnitude"``, ...).
        init_options: keyword options passed to the init method (e.g. ``{"ng": 64}`` for True OBS).
        rho: initial penalty in scaled coordinates (``diag H̃ = 1``); smaller explores more masks.
        iters: maximum ADMM iterations (0: only refit the init's mask).
        patience: stop once the mask has been unchanged for this many consecutive iterations.
        rho_every: iterations between penalty increases.
        refit_solver: ``"auto" | "direct" | "cg"`` for the final exact refit (see :func:`refine.refit`).
        tf32: TF32 for the float32 matmuls of the ADMM iterations and of the final refit's CG iterations on CUDA,
            on (True) or off (False) whatever the global setting (:func:`sparsekit.kernels.obs_linalg.tf32`); the
            refit's convergence test (its true residual) and the loss never use it. ``None`` (default): on for
            float32 work on CUDA (the fast setting; within 0.03% of float64 at the seed shape, BENCHMARKS.md), off
            for float64 and on the CPU, where it has no effect.
        max_memory: the memory budget (:func:`sparsekit.memory.device_budget`) of the init, the iterations
            (which hold every row at once: :func:`admm_bytes`) and the refit (whose row chunks it plans).
        gather: the reductions over the row parts of the layer (:mod:`sparsekit.coupling`), passed on to a
            coupled init (OBS-ord) and to the refit.
    Raises:
        ResourceError: the iterations or a step's smallest chunk do not fit the budget.
    """
    init_options = {} if init_options is None else init_options
    _check_options(init, init_options, rho, iters, patience, rho_every, refit_solver, tf32)
    init_fn = get_pruner(init)
    _check_init_options(init_fn, init, init_options)
    M, K = weight.shape
    if tf32 is None:
        tf32 = weight.is_cuda and weight.dtype == torch.float32
    per_row, fixed = admm_bytes(K, weight.dtype)
    plan_rows(M, per_row, fixed, device_budget(weight.device, max_memory), multiple=M, what="admm iterations")
    w0 = weight.clone()
    coupled = {} if METHODS[init].row_separable else {"gather": gather}
    out0 = init_fn(weight, hessian, layout, damp=damp, damp_mode=damp_mode, progress_fn=progress_fn,
                   max_memory=max_memory, **coupled, **init_options)
    mask0 = out0.mask.bool()
    winit = out0.weight.masked_fill(~mask0, 0.0)
    loss_init = relative_error(w0, winit, hessian, gather)

    hd, rel, steps = damped_hessian(hessian, damp, damp_mode)
    hs, d = scaled_hessian(hd)
    with obs_linalg.tf32(tf32) if weight.is_cuda else contextlib.nullcontext():
        w_s, mask, st = admm_iterate(
            w0 * d, hs, layout, winit * d, mask0,
            rho=float(rho), iters=iters, patience=patience, rho_every=rho_every, progress_fn=progress_fn,
            gather=gather,
        )
    new_w, st_refit = refit(w0, hd, mask, solver=refit_solver, x0=w_s / d, tf32=tf32, max_memory=max_memory,
                            gather=gather)
    loss_admm = relative_error(w0, new_w, hessian, gather)
    changed_vs_init = _count(gather, (mask != mask0).sum())[0] // layout.block_numel // 2
    stats: dict[str, Any] = {"init": init, "init_loss": loss_init, "admm_loss": loss_admm, **st, **st_refit,
                             "mask_changed_vs_init": changed_vs_init, "damp_steps": steps}
    stats.update({f"init_{k}": v for k, v in out0.stats.items()})
    if loss_admm <= loss_init:
        stats["chosen"] = "admm"
        return PrunerOutput(new_w, mask, rel, stats)
    log.info("admm: the init's result (%.5f) beats ADMM's (%.5f); returning the init's.", loss_init, loss_admm)
    stats["chosen"] = "init"
    return PrunerOutput(winit, mask0, out0.damp, stats)
