"""The memory planner: the one place that decides how many rows a step processes at once (DESIGN.md §8).

A method describes each chunked step by its memory: ``fixed`` bytes (held whatever the chunk) and ``per_row``
bytes (every temporary of one row counted: the gathered data *and* the int64 index tensors of the gathers,
8 B per index). The planner turns a :class:`Budget` into the largest chunk with::

    fixed + rows · per_row  <=  budget.bytes                                                          (8.1)

rounded down to the layout's row chunk (16 for ``rowpair-16``), or raises :class:`~sparsekit.errors.ResourceError`
naming the budget and the smallest ``max_memory`` that would work. :func:`run_chunked` then runs the step chunk by
chunk and, on a CUDA out-of-memory error, empties the allocator's cache and retries at half the chunk (logged and
counted in ``stats["oom_retries"]``) down to the minimum. Steps are row-separable, so results do not depend on
the chunking.

**The budget** (:func:`device_budget`): what the process may still allocate on the device, less a
fragmentation margin (:data:`FRAGMENTATION_MARGIN` of it).

- CUDA: the per-process cap ``torch.cuda.get_per_process_memory_fraction · total`` (the fraction set by
  ``torch.cuda.set_per_process_memory_fraction``), an explicit ``max_memory`` (also a cap on the process's
  allocated bytes on the device), and what the device really has (``mem_get_info``'s free memory plus what the
  caching allocator holds unused), each minus what the process has allocated already. Unused cache inside
  segments that live tensors still pin is not counted: one large tensor cannot use it.
- CPU: ``max_memory`` if given (the bytes the call may allocate), else the available RAM.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from sparsekit.errors import InputError, ResourceError

log = logging.getLogger(__name__)

__all__ = [
    "FRAGMENTATION_MARGIN",
    "Budget",
    "parse_bytes",
    "format_bytes",
    "device_budget",
    "plan_rows",
    "require",
    "run_chunked",
]

#: fraction of the budget kept free for the allocator's fragmentation and small untracked temporaries
FRAGMENTATION_MARGIN = 0.05

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: "int | float | str") -> int:
    """``24 * 2**30``, ``"24GiB"``, ``"500MB"``, ``"1.5 GB"``, ``"4096"`` -> bytes (int > 0).

    Decimal units (``KB``, ``MB``, ``GB``, ``TB``, also ``K``/``M``/``G``/``T``) are powers of 1000, binary
    units (``KiB``, ``MiB``, ``GiB``, ``TiB``) powers of 1024. Raises :class:`InputError` otherwise.
    """
    if isinstance(value, bool):
        raise InputError(f"max_memory must be bytes (an int) or a string like '24GiB', got {value!r}.")
    if isinstance(value, (int, float)):
        n = value
    elif isinstance(value, str):
        m = _BYTES_RE.match(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise InputError(
                f"cannot read {value!r} as a memory size; write e.g. '24GiB', '500MB' or a number of bytes."
            )
        n = float(m.group(1)) * _UNITS[unit]
    else:
        raise InputError(f"max_memory must be bytes (an int) or a string like '24GiB', got {type(value).__name__}.")
    if not math.isfinite(n) or n < 1:
        raise InputError(f"a memory size must be at least 1 byte (e.g. '24GiB'), got {value!r}.")
    return int(n)


def format_bytes(n: float) -> str:
    """``25769803776`` -> ``"24.0 GiB"``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Budget:
    """Bytes a step may allocate: ``bytes`` = ``limit`` less the fragmentation margin."""

    bytes: int
    limit: int
    source: str  # where the limit comes from, for messages

    def __str__(self) -> str:
        return f"{format_bytes(self.bytes)} usable of {format_bytes(self.limit)} ({self.source})"


def _budget(limit: int, source: str) -> Budget:
    limit = max(0, int(limit))
    return Budget(int(limit * (1 - FRAGMENTATION_MARGIN)), limit, source)


def _cpu_available() -> int:
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 * 2**30


def device_budget(device: "torch.device | str", max_memory: "int | str | None" = None) -> Budget:
    """What the process may still allocate on ``device`` (module docstring), as a :class:`Budget`."""
    device = torch.device(device)
    cap = None if max_memory is None else parse_bytes(max_memory)
    if device.type != "cuda":
        if cap is not None:
            return _budget(cap, f"max_memory={format_bytes(cap)}")
        return _budget(_cpu_available(), "available RAM")
    idx = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(idx).total_memory
    allocated = torch.cuda.memory_allocated(idx)
    # the allocator's unused blocks, less those inside segments that live tensors pin (inactive splits): a chunk
    # sized to fill the device is one large tensor, and such a fragment cannot hold it
    pinned = torch.cuda.memory_stats(idx).get("inactive_split_bytes.all.current", 0)
    cached = torch.cuda.memory_reserved(idx) - allocated - pinned
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    frac = float(getter(idx)) if getter is not None else 1.0
    limits = {"device free + allocator cache": torch.cuda.mem_get_info(idx)[0] + cached}
    if frac < 1.0:
        limits[f"memory fraction {frac:.3g} of {format_bytes(total)}"] = int(frac * total) - allocated
    if cap is not None:
        limits[f"max_memory={format_bytes(cap)}"] = cap - allocated
    source = min(limits, key=lambda k: limits[k])
    return _budget(limits[source], f"{source}, {format_bytes(allocated)} already allocated")


def _needed_limit(need: int) -> int:
    """The smallest ``limit`` whose usable part covers ``need`` bytes."""
    return math.ceil(need / (1 - FRAGMENTATION_MARGIN)) + 1


def plan_rows(
    rows: int, per_row_bytes: int, fixed_bytes: int, budget: Budget, *, multiple: int = 1, what: str = "step"
) -> int:
    """The largest chunk of rows ``<= rows``, a multiple of ``multiple`` (or ``rows`` itself), satisfying (8.1).

    Raises :class:`ResourceError` when even ``min(multiple, rows)`` rows do not fit; its message names the
    budget and the smallest ``max_memory`` that would work (also in ``.needed``).
    """
    if rows < 1:
        return max(rows, 0)
    smallest = min(multiple, rows)
    need = fixed_bytes + smallest * per_row_bytes
    if need > budget.bytes:
        needed = _needed_limit(need)
        raise ResourceError(
            f"{what}: {smallest} row(s) need {format_bytes(need)} ({format_bytes(fixed_bytes)} fixed + "
            f"{format_bytes(per_row_bytes)} per row) but the budget is {budget}. Free memory or pass "
            f"max_memory >= {format_bytes(needed)} ({needed} bytes) on a device that has it.",
            needed=needed, budget=budget.limit,
        )
    n = (budget.bytes - fixed_bytes) // max(1, per_row_bytes)
    if n >= rows:
        return rows
    return max(smallest, n // multiple * multiple)


def require(nbytes: int, budget: Budget, what: str) -> None:
    """Raise :class:`ResourceError` unless a step that needs ``nbytes`` at once fits ``budget``."""
    plan_rows(1, nbytes, 0, budget, what=what)


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_chunked(
    step: Callable[[int, int], Any],
    n: int,
    chunk: int,
    *,
    multiple: int = 1,
    stats: dict[str, Any] | None = None,
    what: str = "step",
    budget: Budget | None = None,
    counter: str = "oom_retries",
) -> int:
    """Call ``step(a, b)`` on consecutive ranges ``[a, b)`` of ``n`` items, ``chunk`` at a time.

    A step must leave no trace when it fails (write its results only at its end). On
    ``torch.OutOfMemoryError`` the allocator's cache is emptied and the same range is retried with half the
    chunk (rounded down to ``multiple``), logged at WARNING and counted in ``stats["oom_retries"]``; at the
    minimum chunk a :class:`ResourceError` is raised. Returns the chunk size finally used.

    When every chunk is done the allocator's cache is emptied, so that the chunks' large blocks go back to the
    device instead of taking the small tensors made next, which would pin them: such a block counts as free cache
    but cannot hold the next layer's chunk (one OOM retry per large layer at the Llama-3-8B shape, measured).
    """
    a = 0
    while a < n:
        b = min(n, a + chunk)
        try:
            step(a, b)
        except torch.OutOfMemoryError as exc:
            err = str(exc).splitlines()[0] if str(exc) else "out of memory"
        else:
            a = b
            continue
        _empty_cache()  # (outside the except clause: the traceback no longer pins the failed step's tensors)
        smallest = min(multiple, n)
        if chunk <= smallest:
            where = "" if budget is None else f" (budget {budget})"
            raise ResourceError(
                f"{what}: out of memory at the smallest chunk ({chunk} rows){where}: {err}. Free memory on the "
                "device or use a larger one.", budget=None if budget is None else budget.limit,
            )
        new = max(smallest, chunk // 2 // multiple * multiple)
        log.warning("%s: out of memory with %d rows per chunk; retrying with %d.", what, chunk, new)
        if stats is not None:
            stats[counter] = stats.get(counter, 0) + 1
        chunk = new
    _empty_cache()
    return chunk
