"""The method table (:data:`METHODS`): name -> pure pruning function, label, row-separability, default options.

Every pruner has the signature::

    fn(weight, hessian, layout, *, damp, damp_mode, progress_fn, max_memory, **options) -> PrunerOutput

``weight (M, K)`` is a private float32/float64 copy the pruner may overwrite, ``hessian (K, K)`` the undamped
``H`` (same dtype and device), read only: it may be the caller's own tensor. ``layout`` is the pattern resolved
for ``(M, K)`` on the same device, ``max_memory`` the memory budget in bytes or ``None``
(:func:`sparsekit.memory.device_budget`; methods that chunk their rows plan the chunks with
:func:`sparsekit.memory.plan_rows`; methods that allocate little may ignore it). Pruners do no input validation of
weight/H/pattern (``sparsekit.prune_weight`` does); they validate their own options.
The methods whose rows are coupled (``row_separable=False``: OBS-ord, ADMM) also take ``gather``, a
:class:`sparsekit.coupling.Gather`: ``weight`` may be one row part of a layer, and what couples the rows is reduced
over the parts through it.
Modules are imported on first use, so importing sparsekit stays cheap and never touches CUDA.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import Tensor

from sparsekit.errors import InputError

__all__ = ["PrunerOutput", "Method", "METHODS", "get_pruner"]


@dataclass
class PrunerOutput:
    weight: Tensor  # (M, K) pruned and compensated; pruned entries may be tiny non-zeros (the caller zeroes them)
    mask: Tensor  # (M, K) bool, True = kept
    damp: float | None = None  # relative damping actually used, if the method inverts H
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """One row of the method table: everything sparsekit knows about a method, in one place."""

    target: str  # "module:function" inside sparsekit.pruners
    label: str  # display name in tables and plots ("True OBS")
    row_separable: bool  # each row pruned on its own given H; False: the method takes `gather` (sparsekit.coupling)
    options: Mapping[str, Any] = field(default_factory=dict)  # default options of `sparsekit prune`

    @property
    def module(self) -> str:
        return self.target.split(":")[0]


#: THE method table: name -> :class:`Method`. ``sparsekit.api`` (which pruners take ``gather``), the pipeline's
#: ``DEFAULT_OPTIONS`` and the bench labels are read from it.
METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude:prune_magnitude", "Magnitude", True),
    "wanda": Method("wanda:prune_wanda", "Wanda", True),
    "sparsegpt": Method("sparsegpt:prune_sparsegpt", "SparseGPT", True),
    "obs-local": Method("obs:prune_obs_local", "OBS local", True),
    "obs-full": Method("obs:prune_obs_full", "OBS full", True),
    "obs-split": Method("obs:prune_obs_split", "OBS split", True),
    "obs-interleaved": Method("obs:prune_obs_interleaved", "OBS interleaved", True),
    "obs-ord": Method("obs_ord:prune_obs_ord", "OBS-ord", False),
    # the default of `sparsekit prune`: True OBS, largest-first, 16 scopes per step
    "true-obs": Method("true_obs:prune_true_obs", "True OBS", True,
                       {"ng": 16, "order": "largest_first", "chunk_size": None}),
    "admm": Method("admm:prune_admm", "ADMM", False),
}


def get_pruner(method: str) -> Callable[..., PrunerOutput]:
    """Look up a pruner by name; raises :class:`InputError` naming the known methods."""
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; use one of: {', '.join(METHODS)}.")
    module, fn = METHODS[method].target.split(":")
    return getattr(importlib.import_module(f"sparsekit.pruners.{module}"), fn)
