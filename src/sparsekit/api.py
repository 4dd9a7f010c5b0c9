"""The functional entry point: ``prune_weight(weight, hessian, pattern, method, **options) -> PruneResult``."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from sparsekit.coupling import SINGLE, Gather
from sparsekit.errors import InputError
from sparsekit.hessian import DEFAULT_DAMP, check_damp, check_hessian
from sparsekit.memory import parse_bytes
from sparsekit.metrics import pow2_scale, relative_error
from sparsekit.parallel import parse_devices, prune_on_devices
from sparsekit.patterns import Layout, Pattern, check_mask, get_pattern
from sparsekit.pruners import METHODS, get_pruner
from sparsekit.pruners._common import unknown_options
from sparsekit.refine import check_refine_options, refine_result

log = logging.getLogger(__name__)

__all__ = ["PruneResult", "prune_weight"]


@dataclass
class PruneResult:
    """What :func:`prune_weight` returns.

    ``weight`` has the input's dtype and device, pruned entries exactly 0; ``mask`` is True where kept;
    ``loss`` is the relative output error ``sqrt(tr(δ H δᵀ) / tr(W H Wᵀ))`` through the undamped H, of the
    returned ``weight`` (in its dtype) against the input (:func:`~sparsekit.metrics.relative_error`; 0 for an
    all-zero input weight).
    """

    weight: Tensor  # (M, K)
    mask: Tensor  # (M, K) bool
    loss: float
    method: str
    pattern: str
    time_s: float
    damp: float | None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.mask.float().mean().item()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (no tensors)."""
        return {
            "method": self.method,
            "pattern": self.pattern,
            "loss": self.loss,
            "sparsity": self.sparsity,
            "time_s": self.time_s,
            "damp": self.damp,
            "stats": self.stats,
        }


def _check_weight(weight: Tensor) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise InputError(f"weight must be a 2-D tensor (M, K), got {getattr(weight, 'shape', type(weight))}.")
    if not weight.is_floating_point():
        raise InputError(f"weight must be a floating tensor, got {weight.dtype}; cast it with .float().")
    if weight.numel() == 0:
        raise InputError("weight is empty.")
    if weight.device.type == "meta":
        raise InputError("weight is on the meta device (no data); load the checkpoint's weights before pruning.")
    if not torch.isfinite(weight).all():
        raise InputError("weight contains NaN or Inf; fix the checkpoint before pruning.")


def _reject_unknown_options(fn: Callable[..., Any], method: str, options: dict[str, Any]) -> None:
    unknown, accepted = unknown_options(fn, options)
    if unknown:
        raise InputError(f"method {method!r} does not take {', '.join(unknown)}; it takes: {', '.join(accepted)}.")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prune_weight(
    weight: Tensor,
    hessian: Tensor,
    pattern: "str | Pattern",
    method: str = "sparsegpt",
    *,
    damp: float = DEFAULT_DAMP,
    damp_mode: str = "mean",
    inplace: bool = False,
    progress_fn: Callable[[str], None] | None = None,
    refine: str | None = None,
    refit: bool = False,
    max_sweeps: int = 256,
    devices: "Sequence[str | torch.device] | None" = None,
    max_memory: "int | str | None" = None,
    gather: Gather | None = None,
    **options: Any,
) -> PruneResult:
    """Prune ``weight (M, K)`` to ``pattern`` minimising ``‖X (W' − W)ᵀ‖²`` given ``hessian = XᵀX/N (K, K)``.

    Args:
        weight: the layer's weight, any float dtype, CPU or CUDA. Not modified unless ``inplace=True``.
        hessian: ``(K, K)`` float32/float64 on the weight's device (see :class:`~sparsekit.HessianAccumulator`).
        pattern: a preset name (``"2:4"``, ``"2:4-pairs"``, ``"coupled-2:4"``, ``"rowpair-16"``, ``"50%"``, any
            ``"N:M"``) or a :class:`~sparsekit.Pattern`.
        method: one of ``sparsekit.pruners.METHODS``.
        damp: damping, a finite number >= 0, the seed's rule: relative to ``mean(diag H)`` if < 1, absolute
            otherwise. Checked for every method, including those that ignore it (magnitude, wanda).
        damp_mode: ``"mean"`` (``λ I``) or ``"diag"`` (``damp · diag H``, needs ``damp < 1``).
        inplace: ``True`` writes the result into ``weight``; must be a bool.
        progress_fn: called with short progress messages by long-running methods.
        refine: ``"swap"``: after the method, best-improvement in-scope swap search with exact loss changes
            (:func:`sparsekit.refine.swap_search`), then an exact refit; ``None``: off.
        refit: after the method (and ``refine``), refit the kept weights exactly for the final mask.
            Both optimise the damped objective (``H`` + the ``damp`` rule) and are kept only if the loss through
            the undamped ``H`` does not increase; their effect is recorded in ``stats``.
        max_sweeps: budget of swap sweeps, an int ``>= 0``; a sweep applies at most one swap per row (or row
            pair), so this bounds the swaps per row. Measured on real 2:4 layers the search ends by itself within
            ~140 sweeps from True OBS's mask and ~100 from ADMM's.
        devices: prune the rows in parts, one per device and thread (e.g. ``["cuda:0", "cuda:1"]``), every method
            (:func:`sparsekit.parallel.prune_on_devices`): each part is a call of this function with ``gather``;
            the result, gathered on ``weight``'s device, is that of one device (:mod:`sparsekit.coupling` says
            how exactly). ``None``: all on ``weight``'s device.
        max_memory: memory budget, bytes or a string like ``"24GiB"`` (:func:`sparsekit.memory.parse_bytes`). On
            CUDA a cap on the process's allocated bytes on the device; on the CPU the bytes a step may allocate.
            ``None``: what the device can give (:func:`sparsekit.memory.device_budget`: the per-process memory
            fraction, the allocator's cache, a fragmentation margin). Every method's row chunks are planned
            from it; a step whose smallest chunk does not fit raises :class:`~sparsekit.errors.ResourceError`.
        gather: ``weight`` is one row part of a layer (whole units of :func:`sparsekit.parallel.row_parts`)
            whose other parts are pruned at the same time by calls with the same other arguments, each with its
            own :class:`~sparsekit.coupling.Gather` (threads: :class:`~sparsekit.coupling.ThreadGather`;
            ``torch.distributed`` ranks: :class:`~sparsekit.coupling.DistGather`). The parts reduce through it
            what couples their rows, so that the concatenated parts are the whole layer's result, and the
            returned ``loss`` is the whole layer's; ``weight``/``mask`` are this part's. The call ends with
            ``gather.finish()`` (``inplace`` writes only after it: never when another part failed), or
            ``gather.abort()`` if it raises. Not with ``devices``. ``None``: one part.
        **options: method options (e.g. ``blocksize`` for SparseGPT); unknown ones raise :class:`InputError`.

    Scale: the method sees ``W`` and ``H`` multiplied by exact powers of two that bring their largest entries
    into ``[0.5, 1)`` (:func:`~sparsekit.metrics.pow2_scale`), so masks of ``c·W`` equal those of ``W`` (and of
    ``c·H`` those of ``H``) for any ``c`` the float format holds: bit for bit when ``c`` is a power of two, up to
    the rounding of ``c·W`` otherwise. ``H`` is rescaled only with relative damping (``damp < 1`` or
    ``damp_mode="diag"``): an absolute ``damp`` is in ``H``'s units.
    """
    g = SINGLE if gather is None else gather
    with g.unit():  # finish() at the end, abort() if it raises: no part waits for a failed one
        _check_weight(weight)
        M, K = weight.shape
        if not isinstance(hessian, Tensor):
            raise InputError(f"hessian must be a tensor, got {type(hessian).__name__}.")
        if hessian.device != weight.device:
            raise InputError(
                f"weight is on {weight.device} but hessian on {hessian.device}; move both to the same device."
            )
        if hessian.dtype not in (torch.float32, torch.float64):
            raise InputError(f"hessian must be float32 or float64 (got {hessian.dtype}); accumulate it in float32.")
        check_hessian(hessian, K)
        check_damp(damp, damp_mode)
        if not isinstance(inplace, bool):
            raise InputError(f"inplace must be True or False, got {inplace!r}.")
        pat = get_pattern(pattern)
        layout: Layout = pat.resolve(M, K, device=weight.device)
        fn = get_pruner(method)
        _reject_unknown_options(fn, method, options)
        check_refine_options(refine, refit, max_sweeps)
        mem = None if max_memory is None else parse_bytes(max_memory)
        if devices is not None:
            if gather is not None:
                raise InputError("pass devices= (this call splits the rows) or gather= (this call is one part), "
                                 "not both.")
            return prune_on_devices(prune_weight, weight, hessian, pat, method, parse_devices(devices), damp=damp,
                                    damp_mode=damp_mode, inplace=inplace, progress_fn=progress_fn, refine=refine,
                                    refit=refit, max_sweeps=max_sweeps, max_memory=mem, **options)
        coupled = {} if METHODS[method].row_separable else {"gather": g}

        dtype = torch.float64 if torch.float64 in (weight.dtype, hessian.dtype) else torch.float32
        sw = pow2_scale(weight, dtype, g)
        sh = pow2_scale(hessian, dtype) if damp_mode == "diag" or damp < 1 else 1.0
        w0 = weight.detach().to(dtype) * sw  # (M, K) a private copy, scaled exactly (a power of two)
        if sh == 1.0 and hessian.dtype == dtype and hessian.is_contiguous():
            h = hessian.detach()  # (K, K) the caller's own H, not copied: no pruner writes into its hessian
        else:
            h = hessian.detach().to(dtype) * sh  # (K, K)
        _sync(weight.device)
        t0 = time.perf_counter()
        work = w0 if refine is None and not refit else w0.clone()  # refine/refit need the original w0
        out = fn(work, h, layout, damp=damp, damp_mode=damp_mode, progress_fn=progress_fn, max_memory=mem, **coupled,
                 **options)
        mask = out.mask.bool()
        check_mask(mask, layout)
        new = out.weight.masked_fill(~mask, 0.0)
        if not torch.isfinite(new).all():
            raise InputError(f"method {method!r} produced NaN/Inf; raise damp (now {damp}) or use float64 inputs.")
        stats = dict(out.stats)
        if refine is not None or refit:
            _sync(weight.device)
            t1 = time.perf_counter()
            new, mask, st = refine_result(w0, h, layout, new, mask, refine=refine, refit_weights=refit,
                                          max_sweeps=max_sweeps, damp=damp, damp_mode=damp_mode,
                                          progress_fn=progress_fn, max_memory=mem, gather=g)
            _sync(weight.device)
            stats.update(st, refine_time_s=time.perf_counter() - t1)
            check_mask(mask, layout)
            new = new.masked_fill(~mask, 0.0)
        _sync(weight.device)
        elapsed = time.perf_counter() - t0
        new = (new / sw).to(weight.dtype)
        if not torch.isfinite(new).all():
            raise InputError(f"the pruned weights overflow {weight.dtype}; prune a float32 copy of the weight.")
        loss = relative_error(weight, new, hessian, g)
        if not math.isfinite(loss):
            raise InputError(
                "the layer's output X Wᵀ is zero on the calibration data (W lies in the null space of H) but the "
                "pruned one is not; there is nothing to preserve: skip this layer or calibrate on inputs that reach it."
            )
        log.debug("%s %s (%d, %d): loss %.4f in %.3fs", method, pat.name, M, K, loss, elapsed)
    if inplace:  # after the unit: only once every part has succeeded
        with torch.no_grad():
            weight.copy_(new)
        new = weight
    return PruneResult(new, mask, loss, method, pat.name, elapsed, out.damp, stats)
