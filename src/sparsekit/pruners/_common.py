"""What several methods share, under public names: one copy each (no method imports another's privates).

- options: :func:`unknown_options` (a method's options are its keyword-only parameters), :func:`check_c_dtype`,
  :data:`ORDERS`, :data:`TF32_DEFAULT`, :data:`MAX_JOINT_SUBSETS`;
- :func:`factor_with_jitter`: the batched ``L⁻¹`` of ``C_PP`` with the jitter retry of 16-bit ``c_dtype``;
- :func:`per_row_sets` (pruned elements -> per-row column sets), :func:`batch_bounds` (column batches that cut
  no scope);
- :data:`MessageFn`: the type of a pruner's ``progress_fn`` (text messages; the pipeline's events are
  :class:`sparsekit.pipeline.Progress`).

The scale-free coordinates (``scaled_inverse``, ``scaled_hessian``) live in :mod:`sparsekit.hessian`, since
:mod:`sparsekit.refine` (not a method) uses them too.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from sparsekit.errors import InputError
from sparsekit.kernels.obs_linalg import chol_inv_factor
from sparsekit.patterns import Layout

__all__ = [
    "MessageFn",
    "PASSED_BY_CALLER",
    "ORDERS",
    "MAX_JOINT_SUBSETS",
    "TF32_DEFAULT",
    "JITTER_STEPS",
    "unknown_options",
    "check_c_dtype",
    "factor_with_jitter",
    "per_row_sets",
    "batch_bounds",
]

#: A pruner's ``progress_fn``: receives short text messages from long-running methods.
MessageFn = Callable[[str], None] | None
#: Keyword arguments every pruner gets from its caller, not options the user sets per method.
PASSED_BY_CALLER = ("damp", "damp_mode", "progress_fn", "max_memory", "gather")
#: Scope orders of True OBS and OBS-ord.
ORDERS = ("left_to_right", "largest_first")
#: Largest subset count the ``joint`` scoring enumerates per scope.
MAX_JOINT_SUBSETS = 4096
#: float32 ``c_dtype`` on CUDA runs the big GEMMs in TF32 (measured within 0.5% of float64: BENCHMARKS.md).
TF32_DEFAULT = True
#: Retries with a growing diagonal jitter when ``C_PP`` is not numerically positive definite (16-bit ``U``).
JITTER_STEPS = 6


def unknown_options(fn: Callable[..., Any], options: Mapping[str, Any], exclude: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """``(names in options that fn does not take, the options fn takes)``: a method's options are its keyword-only
    parameters, less ``exclude`` (what the caller passes itself, e.g. :data:`PASSED_BY_CALLER`)."""
    accepted = [n for n, p in inspect.signature(fn).parameters.items() if p.kind == p.KEYWORD_ONLY and n not in exclude]
    return [k for k in options if k not in accepted], accepted


def check_c_dtype(c_dtype: Any) -> torch.dtype | None:
    """``None`` or a floating ``torch.dtype`` (float16, bfloat16, float32, float64); else :class:`InputError`."""
    if c_dtype is None:
        return None
    if not isinstance(c_dtype, torch.dtype) or not c_dtype.is_floating_point or c_dtype.itemsize < 2:
        raise InputError(
            f"c_dtype must be None or a floating torch dtype (torch.float16, torch.bfloat16, torch.float32, "
            f"torch.float64), got {c_dtype!r}."
        )
    return c_dtype


def factor_with_jitter(A: Tensor, on_retry: Callable[[int, float], None], message: Callable[[int], str]) -> Tensor:
    """``chol_inv_factor`` of ``A (n, q, q)`` (``L⁻¹`` with ``A = L Lᵀ``); the matrices that fail get
    ``jitter · mean diag`` added to their diagonal (1e-6, growing tenfold, at most :data:`JITTER_STEPS` times;
    ``on_retry(failed matrices, jitter)`` is called before each retry). Raises :class:`InputError` with
    ``message(JITTER_STEPS)`` if some stay indefinite. Used where 16-bit rounding makes ``C_PP`` indefinite."""
    X, info = chol_inv_factor(A)
    bad = info > 0
    jitter = 1e-6
    for _ in range(JITTER_STEPS):
        if not bool(bad.any()):
            return X
        on_retry(int(bad.sum()), jitter)
        Ab = A[bad]  # a copy
        Ab.diagonal(dim1=1, dim2=2).add_(jitter * Ab.diagonal(dim1=1, dim2=2).mean(1, keepdim=True))
        Xb, ib = chol_inv_factor(Ab)
        X[bad] = Xb
        idx = bad.nonzero().flatten()
        bad = torch.zeros_like(bad)
        bad[idx[ib > 0]] = True
        jitter *= 10
    if bool(bad.any()):
        raise InputError(message(JITTER_STEPS))
    return X


def per_row_sets(er: Tensor, ec: Tensor, R: int, uniform: bool) -> tuple[Tensor, Tensor | None]:
    """Pruned elements ``(er, ec)`` (rows, columns) -> per-row column sets ``(P (R, q), valid (R, q) or None)``.

    ``uniform``: the elements are grouped by row in row order, the same number per row (row-local patterns):
    ``P`` is a view and ``valid`` None. Otherwise rows get different counts; ``P`` is padded to the largest
    (padding points at column 0, ``valid`` False).
    """
    if uniform:
        return ec.view(R, -1), None
    srt = torch.argsort(er, stable=True)
    er, ec = er[srt], ec[srt]
    counts = torch.bincount(er, minlength=R)
    q = int(counts.max())
    start = counts.cumsum(0) - counts
    at = torch.arange(er.numel(), device=er.device) - start[er]
    P = torch.zeros(R, q, dtype=torch.long, device=er.device)
    valid = torch.zeros(R, q, dtype=torch.bool, device=er.device)
    P[er, at] = ec
    valid[er, at] = True
    return P, valid


def batch_bounds(layout: Layout, blocksize: int) -> list[int]:
    """Column boundaries ``0 = b_0 < b_1 < ... = K`` of lazy batches, none inside any scope's column span."""
    K = layout.num_cols
    span = layout.col_span.cpu()  # (S, 2)
    inside = torch.zeros(K + 2, dtype=torch.long)  # inside[c] = #scopes with first < c <= last
    inside.index_add_(0, span[:, 0] + 1, torch.ones(len(span), dtype=torch.long))
    inside.index_add_(0, span[:, 1] + 1, -torch.ones(len(span), dtype=torch.long))
    free = (inside.cumsum(0)[: K + 1] == 0).nonzero().flatten().tolist()  # allowed boundaries
    bounds, nxt = [0], 0
    for c in free:
        if c >= nxt + blocksize or c == K:
            if c > bounds[-1]:
                bounds.append(c)
            nxt = c
    return bounds
