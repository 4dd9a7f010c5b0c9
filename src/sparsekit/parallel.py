"""Several devices for one layer: the rows of ``W`` split across them (``prune_weight(..., devices=[...])``).

For the methods in :data:`ROW_SEPARABLE` every row (every row group of the pattern's ``chunk_rows``, e.g. the
16-row chunks of ``rowpair-16``) is pruned independently of the others given the shared ``H``: True OBS keeps one
inverse per row; SparseGPT and the StructuredOBS modes decide and compensate each row with a shared ``H⁻¹``.
Splitting the rows into contiguous parts (whole row chunks, as equal as possible), pruning each part on its own
device with its own copy of ``H``, and concatenating gives the one-device result, up to floating-point
differences between devices and batch sizes. The methods that couple rows are refused: OBS-ord (one column
order for all rows, from their summed costs) and ADMM (its penalty schedule follows the whole mask).

Parts run in one thread per device (CUDA kernels release the GIL; each thread makes its device current), so
``progress_fn`` may be called from several threads; messages are prefixed with the device. TF32 is a process-wide
flag that the pruners set and restore around their GEMMs (:func:`sparsekit.kernels.obs_linalg.tf32`); with
several threads one part may finish a context while another is inside its own, so a part can run some float32
GEMMs strictly instead of in TF32 (slower, not less accurate). The flag is restored to the caller's value when
all parts are done.

Whole models go parallel through :mod:`sparsekit.pipeline.distributed` (``torchrun``: several GPUs or machines,
every method); ``devices=`` stays the one-layer, one-process convenience and shares :func:`row_parts` with it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from sparsekit.errors import InputError
from sparsekit.hessian import as_device
from sparsekit.patterns import Pattern
from sparsekit.pruners import METHODS, PrunerOutput

__all__ = ["ROW_SEPARABLE", "parse_devices", "row_parts", "prune_rows_on_devices"]

#: methods whose result is the same whether rows are pruned together or in parts (``Method.row_separable``)
ROW_SEPARABLE = tuple(name for name, m in METHODS.items() if m.row_separable)


def parse_devices(devices: Any, method: str) -> list[torch.device]:
    """Validate ``devices`` (a sequence of device names or ``torch.device``; each CUDA device at most once) for
    ``method``."""
    if isinstance(devices, (str, torch.device)) or not isinstance(devices, Sequence) or not devices:
        raise InputError(f"devices must be a non-empty list such as ['cuda:0', 'cuda:1'], got {devices!r}.")
    if method not in ROW_SEPARABLE:
        raise InputError(
            f"devices= splits a layer's rows across devices, which gives the one-device result only for methods "
            f"whose rows are independent ({', '.join(ROW_SEPARABLE)}); run {method!r} on one device."
        )
    out = []
    for d in devices:
        out.append(as_device(d, "devices", need_index=True))
    if len(set(out)) != len(out) and any(d.type == "cuda" for d in out):
        raise InputError(f"devices: each CUDA device may appear once, got {[str(d) for d in out]}.")
    return out


def row_parts(num_rows: int, chunk_rows: int, n: int) -> list[tuple[int, int]]:
    """Split ``num_rows`` rows into at most ``n`` contiguous ``(start, stop)`` parts of whole ``chunk_rows``
    chunks, as equal as possible (sizes differ by at most one chunk; no empty part)."""
    chunks = num_rows // chunk_rows
    n = min(n, chunks)
    sizes = [chunks // n + (i < chunks % n) for i in range(n)]
    bounds, start = [], 0
    for s in sizes:
        bounds.append((start * chunk_rows, (start + s) * chunk_rows))
        start += s
    return bounds


def prune_rows_on_devices(
    fn: Callable[..., PrunerOutput],
    weight: Tensor,
    hessian: Tensor,
    pattern: Pattern,
    devices: Sequence[torch.device],
    *,
    progress_fn: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> PrunerOutput:
    """Run the pruner ``fn`` on row parts of ``weight (M, K)``, one part per device; gather on ``weight``'s device.

    ``kwargs`` are the pruner's keyword arguments (``damp``, ``damp_mode``, options). The output's ``stats`` are
    the first part's, plus ``devices``, ``rows_per_device`` and every part's own stats (``per_device``)."""
    M, K = weight.shape
    chunk_rows = pattern.resolve(M, K, device=weight.device).chunk_rows
    parts = row_parts(M, chunk_rows, len(devices))

    def run(dev: torch.device, a: int, b: int) -> PrunerOutput:
        ctx = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
        with ctx:
            layout = pattern.resolve(b - a, K, device=dev)
            prog = None if progress_fn is None else (lambda msg: progress_fn(f"[{dev}] {msg}"))
            out = fn(weight[a:b].to(dev, copy=True), hessian.to(dev), layout, progress_fn=prog, **kwargs)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return out

    flags = torch.backends.cuda.matmul
    tf32_before = flags.allow_tf32
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(parts)) as pool:
            futures = [pool.submit(run, dev, a, b) for dev, (a, b) in zip(devices, parts)]
            outs = [f.result() for f in futures]
    finally:  # interleaved enter/exit of the threads' TF32 contexts must not leak into the caller
        flags.allow_tf32 = tf32_before
    home = weight.device
    stats = dict(outs[0].stats)
    stats.update(devices=[str(d) for d in devices[: len(parts)]], rows_per_device=[b - a for a, b in parts],
                 per_device=[o.stats for o in outs])
    return PrunerOutput(
        torch.cat([o.weight.to(home) for o in outs]),
        torch.cat([o.mask.to(home) for o in outs]),
        outs[0].damp,
        stats,
    )
