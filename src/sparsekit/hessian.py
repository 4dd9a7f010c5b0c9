"""The layer Hessian ``H = XᵀX / N`` and its damped inverse ``C = (H + λ I)⁻¹`` (DESIGN.md §1, §5).

Scaling ``H`` by ``1/N`` changes neither the OBS choices nor the relative output error; it only keeps the
numbers of long calibration runs in range.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import numpy as np

import torch
from torch import Tensor

from sparsekit.errors import HessianError, InputError

log = logging.getLogger(__name__)

#: Bytes of one slice of a batch converted to the accumulator's dtype at once: bounds the transient copy of a
#: long, wide batch (16,384 tokens × 28,672 features in float32 is 1.75 GiB; issue 14). A batch within one slice
#: is added in one product, as always; a larger one slice by slice (the same sum up to float rounding order).
SLICE_BYTES = 256 * 2**20

__all__ = [
    "DEFAULT_DAMP",
    "HessianAccumulator",
    "DampingWarning",
    "check_damp",
    "damping_value",
    "damped_inverse",
    "damped_hessian",
    "DampedInverse",
    "check_hessian",
    "ScaledInverse",
    "scaled_inverse",
    "scaled_hessian",
]

#: The default relative damping of every method, the pipeline and the CLI (``λ = 0.01 · mean(diag H)``,
#: SparseGPT's). :class:`sparsekit.pruners.obs.StructuredOBS` keeps the seed API's own default (1e-4).
DEFAULT_DAMP = 0.01
#: Damping escalation: each Cholesky failure multiplies the relative damping by this factor ...
DAMP_GROWTH = 10.0
#: ... at most this many times ...
MAX_DAMP_STEPS = 6
#: ... and never past this relative damping (or the caller's own, if larger): an H that needs more is not
#: ``XᵀX`` up to rounding, and :class:`HessianError` is raised instead of pruning with a damping-dominated H.
MAX_ESCALATED_DAMP = 0.1


class DampingWarning(UserWarning):
    """The damping had to be escalated past the caller's value for the Cholesky factorisation to succeed."""


#: input dtypes whose values are exact in TF32 (10 stored mantissa bits): their products are exact in float32
_EXACT_IN_TF32 = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def _tf32_matmul() -> Iterator[None]:
    """CUDA float32 GEMMs on TF32 tensor cores (float32 accumulation) for the duration; the setting restored."""
    mm = torch.backends.cuda.matmul
    if hasattr(mm, "fp32_precision"):
        old = mm.fp32_precision
        mm.fp32_precision = "tf32"
        try:
            yield
        finally:
            mm.fp32_precision = old
    else:  # pragma: no cover - torch < 2.9
        old_flag = mm.allow_tf32
        mm.allow_tf32 = True
        try:
            yield
        finally:
            mm.allow_tf32 = old_flag


class HessianAccumulator:
    """Streaming ``H = XᵀX / N`` over batches of inputs of any leading shape ``(..., K)``.

    ``N`` counts tokens (rows of X) exactly; adding batches one by one equals one pass over all of them.
    On CUDA, bfloat16/float16 inputs into a float32 sum take the TF32 tensor-core GEMM: their values are exact in
    TF32, so every product ``x_i x_j`` is exact and summed in float32: the IEEE float32 path's H up to float32
    rounding of the sums (DESIGN.md §8; ≈ 8× the float32 SIMT rate for the pipeline's Hessians).
    Inputs are detached (no autograd graph is kept, so a model's activations can be added as they come), and
    may be floating tensors on any device or floating numpy arrays (converted with ``torch.from_numpy``).
    """

    def __init__(self, num_features: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) or num_features < 1:
            raise InputError(
                f"num_features must be a positive int (the layer's input size K), got {num_features!r}."
            )
        if dtype not in (torch.float32, torch.float64):
            raise InputError(f"accumulate in float32 or float64, got {dtype}.")
        self.num_features = int(num_features)
        dev = as_device(device, "HessianAccumulator(device=...)")
        self._sum = torch.zeros(self.num_features, self.num_features, dtype=dtype, device=dev)  # (K, K) Σ x xᵀ
        self.num_tokens = 0

    def add(self, x: "Tensor | np.ndarray") -> None:
        """Add a batch ``x (..., K)``: a floating tensor or numpy array with at least one dimension."""
        if isinstance(x, np.ndarray):
            if not np.issubdtype(x.dtype, np.floating):
                raise InputError(f"calibration inputs must be floating, got a numpy array of {x.dtype}.")
            x = torch.from_numpy(x)
        if not isinstance(x, Tensor):
            raise InputError(
                f"calibration inputs must be a tensor (..., {self.num_features}), got {type(x).__name__}; "
                "convert it with torch.as_tensor(x, dtype=torch.float32)."
            )
        if x.dim() == 0 or x.shape[-1] != self.num_features:
            got = "a 0-D tensor" if x.dim() == 0 else f"{x.shape[-1]} features"
            raise InputError(f"inputs have {got}, the accumulator expects (..., {self.num_features}).")
        if not x.is_floating_point():
            raise InputError(f"calibration inputs must be floating activations, got {x.dtype}.")
        if x.device.type == "meta":
            raise InputError("calibration inputs are on the meta device (no data); load the model's weights first.")
        tf32 = x.dtype in _EXACT_IN_TF32 and self._sum.dtype == torch.float32 and self._sum.device.type == "cuda"
        x = x.detach().reshape(-1, self.num_features)  # (n, K)
        rows = max(1, SLICE_BYTES // (self.num_features * self._sum.element_size()))
        if x.shape[0] <= rows:  # the usual case: one converted copy, checked, added
            slices = [x.to(device=self._sum.device, dtype=self._sum.dtype)]
        else:  # slices converted one at a time, after checking them all: a bad batch leaves the sum untouched
            slices = [x[i : i + rows] for i in range(0, x.shape[0], rows)]
        limit = torch.finfo(self._sum.dtype).max  # a wider input must also fit the accumulator's range
        for xs in slices:
            if not torch.isfinite(xs).all() or (xs.element_size() > self._sum.element_size()
                                                and xs.abs().amax() > limit):
                raise InputError("calibration inputs contain NaN or Inf; check the model's forward pass in this dtype.")
        with _tf32_matmul() if tf32 else contextlib.nullcontext():
            for xs in slices:
                xs = xs.to(device=self._sum.device, dtype=self._sum.dtype)  # (r, K); no copy if converted already
                self._sum.addmm_(xs.T, xs)
        self.num_tokens += x.shape[0]

    def merge(self, other: "HessianAccumulator") -> None:
        """Add ``other``'s tokens: ``Σ x xᵀ`` and ``N`` summed, so that :attr:`hessian` becomes the token-weighted
        ``(N_a H_a + N_b H_b) / (N_a + N_b) = (X_aᵀX_a + X_bᵀX_b) / (N_a + N_b)``, the Hessian of both sets of
        tokens accumulated together (up to the float summation order)."""
        if not isinstance(other, HessianAccumulator) or other.num_features != self.num_features:
            raise InputError(f"merge needs a HessianAccumulator with {self.num_features} features, got {other!r}.")
        if other._sum.dtype != self._sum.dtype or other._sum.device != self._sum.device:
            raise InputError(f"merge needs the same dtype and device ({self._sum.dtype} on {self._sum.device}), got "
                             f"{other._sum.dtype} on {other._sum.device}.")
        self._sum += other._sum
        self.num_tokens += other.num_tokens

    @property
    def partial_sum(self) -> Tensor:
        """``(K, K)`` the running ``Σ x xᵀ`` itself (not a copy): :mod:`sparsekit.pipeline.distributed` sends and
        receives it in place, with ``num_tokens``."""
        return self._sum

    @property
    def hessian(self) -> Tensor:
        """``(K, K)`` ``XᵀX / N``."""
        if self.num_tokens == 0:
            raise InputError("no calibration tokens were added; give at least one batch of inputs.")
        return self._sum / self.num_tokens


def check_hessian(hessian: Tensor, num_cols: int) -> None:
    """Raise a clear error unless ``hessian`` is a finite, symmetric ``(K, K)`` matrix with a non-negative diagonal.

    Symmetric: ``max|H − Hᵀ| / max|H| <= 1e-4``; non-negative: ``H_jj >= −1e-6 · max|H|``, and some ``H_jj > 0``.
    Read in row slices (``hessian[a:b]`` against ``hessian[:, a:b]ᵀ``), one float64 slice of at most
    :data:`SLICE_BYTES` at a time: no full-size temporary, and the same maxima as over the whole matrix (a maximum
    does not depend on the order it is taken in).
    """
    if hessian.dim() != 2 or hessian.shape != (num_cols, num_cols):
        raise InputError(
            f"hessian must be ({num_cols}, {num_cols}) for a weight with K={num_cols} columns, got {tuple(hessian.shape)}."
        )
    if not hessian.is_floating_point():
        raise InputError(f"hessian must be a floating tensor, got {hessian.dtype}.")
    if hessian.device.type == "meta":
        raise InputError("hessian is on the meta device (no data); compute it from real inputs.")
    K = num_cols
    rows = max(1, SLICE_BYTES // (8 * max(K, 1)))  # float64 rows per slice
    finite = torch.ones((), dtype=torch.bool, device=hessian.device)
    scale = torch.zeros((), dtype=torch.float64, device=hessian.device)  # max|H|
    asym = torch.zeros((), dtype=torch.float64, device=hessian.device)  # max|H − Hᵀ|
    for a in range(0, K, rows):  # one pass, no host sync inside
        s = hessian[a : a + rows].to(torch.float64, copy=True)  # (rows, K)
        finite &= torch.isfinite(s).all()
        lo, hi = torch.aminmax(s)
        scale = torch.maximum(scale, torch.maximum(hi, -lo))  # max|x| = max(max x, −min x)
        asym = torch.maximum(asym, s.sub_(hessian[:, a : a + rows].T).abs_().max())  # H − Hᵀ on these rows
    if not finite:
        raise InputError("hessian contains NaN or Inf; recompute it from finite inputs.")
    scale = scale.clamp_min(1e-300)
    if (asym / scale).item() > 1e-4:
        raise HessianError("hessian is not symmetric; pass (H + H.T) / 2 or recompute it as XᵀX.")
    diag = hessian.diagonal().double()  # (K,)
    if (diag < -1e-6 * scale).any():
        raise HessianError(
            "hessian has negative diagonal entries, so it is not positive semi-definite; it must be XᵀX of real inputs."
        )
    if not (diag > 0).any():
        raise HessianError(
            "hessian is all zero (the layer saw only zero inputs), so the loss is 0/0; check the calibration data "
            "(e.g. an all-zero attention mask) or skip this layer."
        )


def as_device(device: Any, what: str, need_index: bool = False) -> torch.device:
    """``torch.device(device)`` for a device that exists here (a CUDA one with its index if ``need_index``);
    :class:`InputError` naming ``what`` otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"{what}: {device!r} is not a device name ({e}); use e.g. 'cpu' or 'cuda:0'.") from None
    if dev.type == "cuda" and need_index and dev.index is None:
        raise InputError(f"{what}: give CUDA devices with their index ('cuda:0', 'cuda:1'), got {device!r}.")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise InputError(
            f"{what}: {device!r} does not exist here ({torch.cuda.device_count()} CUDA devices); use 'cpu' or one "
            "of them."
        )
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"{what}: sparsekit runs on 'cpu' or 'cuda', got {device!r}.")
    return dev


def check_damp(damp: Any, damp_mode: Any = "mean") -> None:
    """Raise :class:`InputError` unless ``damp`` is a finite real ``>= 0`` (``< 1`` in mode ``"diag"``) and
    ``damp_mode`` one of :data:`DAMP_MODES`."""
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not math.isfinite(damp) or damp < 0:
        raise InputError(
            f"damp must be a finite number >= 0 (relative to mean(diag H) if < 1, absolute otherwise), got "
            f"{damp!r}; the usual value is 0.01."
        )
    if not isinstance(damp_mode, str) or damp_mode not in DAMP_MODES:
        raise InputError(f"damp_mode must be one of {DAMP_MODES}, got {damp_mode!r}.")
    if damp_mode == "diag" and not damp < 1:
        raise InputError(f"damp_mode='diag' needs 0 <= damp < 1 (a fraction of each diag H_jj), got {damp}.")


def damping_value(hessian: Tensor, damp: float) -> float:
    """The seed's rule: ``λ = damp · mean(diag H)`` if ``damp < 1``, else ``λ = damp`` (absolute)."""
    check_damp(damp)
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
    by ``DAMP_GROWTH`` (logged) up to ``max_steps`` times and up to a relative damping of
    ``max(MAX_ESCALATED_DAMP, the caller's)``, past which :class:`HessianError` is raised. A result that needed
    escalations also emits a :class:`DampingWarning`. Dead inputs (``H_jj = 0``) get ``H_jj = 1`` first.
    One ``(K, K)`` copy of ``hessian`` is held (``H + Λ``, rebuilt from ``hessian`` for each try, so ``factor`` may
    write over it), besides what ``factor`` allocates; it is released before returning unless ``factor``'s result
    holds it.
    """
    check_damp(damp, damp_mode)
    hd = hessian.clone()  # (K, K) H with dead inputs at 1, then H + Λ
    dead = hd.diagonal() == 0
    hd.diagonal()[dead] = 1.0
    mean_diag = hd.diagonal().mean().item()
    lam = damping_value(hd, damp) if damp_mode == "mean" else damp
    bound = max(MAX_ESCALATED_DAMP, lam / mean_diag if damp_mode == "mean" else lam)
    for step in range(max_steps + 1):
        if step:
            hd.copy_(hessian)
            hd.diagonal()[dead] = 1.0
        if damp_mode == "mean":
            hd.diagonal().add_(lam)
        else:
            hd.diagonal().mul_(1.0 + lam)
        rel = lam / mean_diag if damp_mode == "mean" else lam
        out = factor(hd)
        if out is not None:
            del hd
            if step:
                msg = (f"the Hessian needed relative damping {rel:.3g} (asked: {damp}) after {step} escalations: it "
                       "is not XᵀX up to rounding, or badly conditioned; check it, or pass a larger damp.")
                log.warning("%s", msg)
                warnings.warn(msg, DampingWarning, stacklevel=3)
            return out, rel, step
        new = lam * DAMP_GROWTH if lam > 0 else 1e-8 * (mean_diag if damp_mode == "mean" else 1.0)
        if (new / mean_diag if damp_mode == "mean" else new) > bound * (1 + 1e-9):
            break
        log.warning("Cholesky of the damped H failed at relative damping %.3g; raising it to %.3g.",
                    rel, new / mean_diag if damp_mode == "mean" else new)
        lam = new
    del hd  # not pinned by the traceback's frame
    raise HessianError(
        f"the damped Hessian is not positive definite even at relative damping {rel:.3g} after {step} "
        f"escalations (bound: {bound:.3g}): H is not PSD (not XᵀX of real inputs) or is badly conditioned; check "
        "it, compute it in float64, or pass a larger damp."
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

    Memory: ``C`` is written over ``H + Λ`` once factored, so the peak is three ``(K, K)`` matrices (``H + Λ``
    then ``C``, the factor, and the working copy of the factor ``cholesky_inverse`` makes on CUDA), four with
    ``upper``.
    """

    def factor(hd: Tensor) -> tuple[Tensor, Tensor, Tensor | None] | None:
        chol, info = torch.linalg.cholesky_ex(hd)
        if info.item() != 0:
            return None
        # C into hd's memory (hd.mT: the column-major result cholesky_inverse makes anyway, the same bits);
        # symmetric, so .mT is C row-major
        inv = torch.cholesky_inverse(chol, out=hd.mT).mT
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
    """Damped inverse in scale-free coordinates; ``w̃ = w · d`` are the matching weights.

    ``C̃ = (D C D + (D C D)ᵀ) / 2`` is formed in place of ``C``: the Cholesky factor is released first, and the
    symmetrisation runs over square blocks of at most :data:`SLICE_BYTES`, so the peak is that of
    :func:`damped_inverse` (three ``(K, K)`` matrices), and ``C̃`` owns its memory.
    """
    inv = damped_inverse(hessian, damp, damp_mode)
    d = inv.chol.square().sum(1).sqrt()  # (K,) sqrt(diag(L Lᵀ)) = sqrt(diag(H + Λ))
    C, rel, steps = inv.inverse, inv.damp, inv.steps  # (K, K)
    del inv  # frees the factor
    C.mul_(d[:, None]).mul_(d[None, :])
    K = C.shape[0]
    step = max(1, math.isqrt(SLICE_BYTES // C.element_size()))  # block side: one block's temporary <= SLICE_BYTES
    for i in range(0, K, step):
        for j in range(i, K, step):
            t = C[i : i + step, j : j + step] + C[j : j + step, i : i + step].T  # (bi, bj) C + Cᵀ on the block
            t.div_(2)
            C[i : i + step, j : j + step] = t
            if j != i:
                C[j : j + step, i : i + step] = t.T
    return ScaledInverse(C, d, rel, steps)
