"""The method registry: name -> pure pruning function.

Every pruner has the signature::

    fn(weight, hessian, layout, *, damp, damp_mode, progress_fn, max_memory, **options) -> PrunerOutput

``weight (M, K)`` is a private float32/float64 copy the pruner may overwrite, ``hessian (K, K)`` the undamped
``H`` (same dtype and device), ``layout`` the pattern resolved for ``(M, K)`` on the same device, ``max_memory``
the memory budget in bytes or ``None`` (:func:`sparsekit.memory.device_budget`; methods that chunk their rows
plan the chunks with :func:`sparsekit.memory.plan_rows`; methods that allocate little may ignore it). Pruners do no
input validation of weight/H/pattern (``sparsekit.prune_weight`` does); they validate their own options.
Modules are imported on first use, so importing sparsekit stays cheap and never touches CUDA.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor

from sparsekit.errors import InputError

__all__ = ["PrunerOutput", "METHODS", "get_pruner"]


@dataclass
class PrunerOutput:
    weight: Tensor  # (M, K) pruned and compensated; pruned entries may be tiny non-zeros (the caller zeroes them)
    mask: Tensor  # (M, K) bool, True = kept
    damp: float | None = None  # relative damping actually used, if the method inverts H
    stats: dict[str, Any] = field(default_factory=dict)


#: method name -> "module:function" (all modules live in sparsekit.pruners)
METHODS: dict[str, str] = {
    "magnitude": "magnitude:prune_magnitude",
    "wanda": "wanda:prune_wanda",
    "sparsegpt": "sparsegpt:prune_sparsegpt",
    "obs-local": "obs:prune_obs_local",
    "obs-full": "obs:prune_obs_full",
    "obs-split": "obs:prune_obs_split",
    "obs-interleaved": "obs:prune_obs_interleaved",
    "obs-ord": "obs_ord:prune_obs_ord",
    "true-obs": "true_obs:prune_true_obs",
    "admm": "admm:prune_admm",
}


def get_pruner(method: str) -> Callable[..., PrunerOutput]:
    """Look up a pruner by name; raises :class:`InputError` naming the known methods."""
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; use one of: {', '.join(METHODS)}.")
    module, fn = METHODS[method].split(":")
    return getattr(importlib.import_module(f"sparsekit.pruners.{module}"), fn)
