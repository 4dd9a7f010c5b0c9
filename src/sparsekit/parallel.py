"""One way to go parallel: a layer's rows in contiguous parts, each pruned by ``prune_weight(..., gather=...)``.

:func:`row_parts` cuts the ``M`` rows into parts of whole units of ``lcm(chunk_rows, 16)`` rows (the pattern's row
chunks, e.g. the 16-row chunks of ``rowpair-16``, stay whole; parts start on 16-row boundaries). Each part is a
call of :func:`sparsekit.prune_weight` on its rows with a :class:`~sparsekit.coupling.Gather`, through which the
parts reduce the few numbers that couple their rows (:mod:`sparsekit.coupling`: the scale, the loss, ADMM's mask
changes, OBS-ord's column costs, the refit's residual). Every method splits this way; for the row-separable ones
(``METHODS[m].row_separable``: True OBS, SparseGPT, the StructuredOBS modes, ...) only the scale and the loss are
reduced. Two drivers run the parts:

- :func:`prune_on_devices` (``prune_weight(devices=[...])``, ``PruneConfig.prune_devices``): one process, one
  thread per device, :class:`~sparsekit.coupling.ThreadGather`; the parts are concatenated on the weight's device.
- :mod:`sparsekit.pipeline.distributed` (``torchrun ... sparsekit prune``): the parts of a coupled linear run one
  per rank, together, through :class:`~sparsekit.coupling.DistGather`; a row-separable linear's parts (a fixed
  number, so that the result does not depend on the world size) are spread over the ranks and need no
  reductions but the loss, recomputed on the whole. Every part is then broadcast to every rank.

Threads: CUDA kernels release the GIL and each thread makes its device current, so ``progress_fn`` may be called
from several threads; messages are prefixed with the device. TF32 is a process-wide flag that the pruners set and
restore around their GEMMs (:func:`sparsekit.kernels.obs_linalg.tf32`); with several threads one part may finish
a context while another is inside its own, so a part can run some float32 GEMMs strictly instead of in TF32
(slower, not less accurate). The flag is restored to the caller's value when all parts are done.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import time
from typing import Any, Callable, Sequence, TypeVar

import torch
from torch import Tensor

from sparsekit.coupling import ThreadGather
from sparsekit.errors import CoupledPartError, InputError
from sparsekit.hessian import as_device
from sparsekit.patterns import Pattern, get_pattern

__all__ = ["ROW_ALIGN", "parse_devices", "row_parts", "root_error", "prune_on_devices"]

#: Parts start on multiples of this many rows (and of the pattern's ``chunk_rows``): GEMM tiles of 16 rows.
ROW_ALIGN = 16


def parse_devices(devices: Any) -> list[torch.device]:
    """Validate ``devices`` (a sequence of device names or ``torch.device``; each CUDA device at most once)."""
    if isinstance(devices, (str, torch.device)) or not isinstance(devices, Sequence) or not devices:
        raise InputError(f"devices must be a non-empty list such as ['cuda:0', 'cuda:1'], got {devices!r}.")
    out = [as_device(d, "devices", need_index=True) for d in devices]
    if len(set(out)) != len(out) and any(d.type == "cuda" for d in out):
        raise InputError(f"devices: each CUDA device may appear once, got {[str(d) for d in out]}.")
    return out


def row_parts(num_rows: int, chunk_rows: int, n: int) -> list[tuple[int, int]]:
    """Split ``num_rows`` rows into at most ``n`` contiguous ``(start, stop)`` parts, as equal as possible in units
    of ``lcm(chunk_rows, ROW_ALIGN)`` rows (sizes differ by at most one unit; no empty part). Rows past the last
    whole unit (fewer than a unit, whole chunks) go to the last part; fewer rows than a unit make one part."""
    unit = math.lcm(chunk_rows, ROW_ALIGN)
    units = num_rows // unit
    n = max(1, min(n, units))
    sizes = [units // n + (i < units % n) for i in range(n)]
    bounds, start = [], 0
    for s in sizes:
        bounds.append((start * unit, (start + s) * unit))
        start += s
    bounds[-1] = (bounds[-1][0], num_rows)
    return bounds


def root_error(errors: Sequence[BaseException]) -> BaseException:
    """The error to raise when row parts failed: the first that is not another part's echo
    (:class:`~sparsekit.errors.CoupledPartError`), else the first."""
    return next((e for e in errors if not isinstance(e, CoupledPartError)), errors[0])


R = TypeVar("R")


def prune_on_devices(
    prune: Callable[..., R],
    weight: Tensor,
    hessian: Tensor,
    pattern: "str | Pattern",
    method: str,
    devices: Sequence[torch.device],
    *,
    inplace: bool = False,
    progress_fn: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> R:
    """``prune`` (:func:`sparsekit.prune_weight`, which calls this for ``devices=``) of ``weight (M, K)`` with its
    rows in parts (:func:`row_parts`), one per device, in one thread each, coupled by
    :class:`~sparsekit.coupling.ThreadGather`; weights and masks concatenated on ``weight``'s device (written into
    it with ``inplace``).

    ``kwargs`` are ``prune_weight``'s other arguments (``damp``, ``refit``, ``max_memory`` per device, method
    options). The result (a :class:`~sparsekit.PruneResult`) has the whole layer's ``loss`` and ``damp``, the
    wall time as ``time_s``, and as ``stats`` the first part's plus ``devices``, ``rows_per_device`` and every
    part's own stats (``per_device``). If a part fails, the others stop at their next reduction and its error is
    raised (:func:`root_error`)."""
    M, K = weight.shape
    parts = row_parts(M, get_pattern(pattern).scope.block.chunk_rows, len(devices))
    gathers = ThreadGather.group(len(parts))

    def run(i: int, dev: torch.device, a: int, b: int) -> Any:
        ctx = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
        with ctx:
            prog = None if progress_fn is None else (lambda msg: progress_fn(f"[{dev}] {msg}"))
            res = prune(weight[a:b].to(dev), hessian.to(dev), pattern, method, gather=gathers[i], progress_fn=prog,
                        **kwargs)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return res

    flags = torch.backends.cuda.matmul
    tf32_before = flags.allow_tf32
    t0 = time.perf_counter()
    outs, errors = [], []
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(parts)) as pool:
            futures = [pool.submit(run, i, dev, a, b) for i, (dev, (a, b)) in enumerate(zip(devices, parts))]
            for f in futures:
                try:
                    outs.append(f.result())
                except BaseException as e:  # noqa: B036 (re-raised below, the root one first)
                    errors.append(e)
    finally:  # interleaved enter/exit of the threads' TF32 contexts must not leak into the caller
        flags.allow_tf32 = tf32_before
    if errors:
        raise root_error(errors)
    elapsed = time.perf_counter() - t0
    home = weight.device
    new = torch.cat([o.weight.to(home) for o in outs])  # (M, K)
    mask = torch.cat([o.mask.to(home) for o in outs])  # (M, K)
    if inplace:
        with torch.no_grad():
            weight.copy_(new)
        new = weight
    stats = dict(outs[0].stats)
    stats.update(devices=[str(d) for d in devices[: len(parts)]], rows_per_device=[b - a for a, b in parts],
                 per_device=[o.stats for o in outs])
    return dataclasses.replace(outs[0], weight=new, mask=mask, time_s=elapsed, stats=stats)
