"""The few numbers that couple the row parts of one layer: :class:`Gather`.

A layer's rows can be pruned in contiguous parts (:func:`sparsekit.parallel.row_parts`), each part a call of
:func:`sparsekit.prune_weight` on its own rows with ``gather=`` this part's :class:`Gather`: on several devices of
one process (:class:`ThreadGather`, one thread per part: ``prune_weight(devices=[...])``) or on the ranks of a
``torch.distributed`` group (:class:`DistGather`: ``torchrun ... sparsekit prune``). The rows interact only
through these reductions over the parts, each a few numbers per step:

- the scale: ``max |w|`` of the whole weight (:func:`sparsekit.metrics.pow2_scale`);
- the loss ``sqrt(tr(δ H δᵀ) / tr(W H Wᵀ))`` (DESIGN.md §1): both traces are sums over rows
  (:func:`sparsekit.metrics.relative_error`); it decides ADMM's init-versus-ADMM choice, whether a refit or swap
  search is kept, and the held-out regularisation choice;
- ADMM: the number of mask entries that changed, per iteration (its penalty schedule and its stop);
- OBS-ord: each scope column's cost summed over all rows (the order of the batches);
- the refit's conjugate gradients: the largest relative residual over the rows (its stop).

Every decision is taken on reduced values, so every part takes the same ones and calls the same sequence of
reductions (they are collectives). Maxima and sums of integers are exact, so ADMM's schedule and CG's stop are
those of one process bit for bit. A float sum adds float64 partial sums in part order, where one process adds
all rows at once: the result differs in the last bits (~1e-16 relative), which changes a decision only where
two compared values lie that close. On the CPU, where a row's arithmetic does not depend on how many rows run
with it, tests find the masks and weights of one process bit for bit (``tests/test_parallel.py``,
``tests/test_distributed.py``); on GPUs the row parts' GEMMs have other shapes, so cuBLAS may round differently.

Failures: a part that raises calls :meth:`Gather.abort`; the other parts' next reduction (or their
:meth:`Gather.finish`, which ``prune_weight`` calls at its end) then raises :class:`CoupledPartError` instead of
waiting. In a ``torch.distributed`` group this costs a one-number all-reduce before each reduction. A rank that
dies without a word (killed, or an error sparsekit does not catch) is seen by the backend: the waiting ranks get
:class:`~sparsekit.errors.DistributedError` when the connection drops, or after ``SPARSEKIT_DIST_TIMEOUT``.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from sparsekit.errors import CoupledPartError, DistributedError

__all__ = ["Gather", "SINGLE", "ThreadGather", "DistGather"]


class Gather:
    """One part's view of the reductions over the row parts of a layer. This base class is the single part:
    every reduction returns its argument (in float64)."""

    parts = 1
    index = 0

    def sum(self, x: Tensor) -> Tensor:
        """``Σ_parts x`` (``x`` of the same shape on every part), float64 on ``x``'s device, added in part order."""
        xs = self._exchange(x.detach().to(torch.float64))
        out = xs[0].clone()
        for t in xs[1:]:
            out += t
        return out

    def max(self, x: Tensor) -> Tensor:
        """``max_parts x`` elementwise, float64 on ``x``'s device (exact)."""
        xs = self._exchange(x.detach().to(torch.float64))
        out = xs[0].clone()
        for t in xs[1:]:
            torch.maximum(out, t, out=out)
        return out

    @contextlib.contextmanager
    def unit(self) -> Iterator[None]:
        """A unit of work (a ``prune_weight`` call): :meth:`finish` at its end, :meth:`abort` if it raises."""
        try:
            yield
        except BaseException:
            self.abort()
            raise
        self.finish()

    def finish(self) -> None:
        """End of a unit of work (a ``prune_weight`` call): raises :class:`CoupledPartError` if another part
        aborted, so no part waits for one that will not come."""

    def abort(self) -> None:
        """This part failed: the other parts' next reduction raises :class:`CoupledPartError`."""

    def _exchange(self, x: Tensor) -> list[Tensor]:
        """Every part's ``x``, in part order (each on ``x``'s device)."""
        return [x]


#: The single part: reductions are the identity.
SINGLE = Gather()


def _failed(index: int, parts: int) -> CoupledPartError:
    return CoupledPartError(f"row part {index} of {parts}: another part of this layer failed (its own error says "
                            "why); this part stopped with it.")


class _Hub:
    """What the threads of one layer share: a barrier and one slot per part."""

    def __init__(self, parts: int):
        self.barrier = threading.Barrier(parts)
        self.slots: list[Tensor | None] = [None] * parts


class ThreadGather(Gather):
    """Part ``index`` of ``parts`` threads of one process (:func:`sparsekit.parallel.prune_on_devices`); values
    meet on the CPU. Make the handles with :meth:`group`."""

    def __init__(self, hub: _Hub, index: int):
        self.hub = hub
        self.parts = len(hub.slots)
        self.index = index

    @classmethod
    def group(cls, parts: int) -> list["ThreadGather"]:
        """The ``parts`` handles of one layer, one per thread."""
        hub = _Hub(parts)
        return [cls(hub, i) for i in range(parts)]

    def _wait(self) -> None:
        try:
            self.hub.barrier.wait()
        except threading.BrokenBarrierError:
            raise _failed(self.index, self.parts) from None

    def _exchange(self, x: Tensor) -> list[Tensor]:
        self.hub.slots[self.index] = x.cpu()
        self._wait()  # every slot written
        xs = [t.to(x.device) for t in self.hub.slots]  # type: ignore[union-attr]
        self._wait()  # every slot read: the next exchange may overwrite them
        return xs

    def finish(self) -> None:
        self._wait()

    def abort(self) -> None:
        self.hub.barrier.abort()


class DistGather(Gather):
    """This rank's part in a ``torch.distributed`` group (``None``: the default group): the rank in the group is
    the part index. Tensors travel on ``device`` (the rank's GPU under NCCL, the CPU under gloo), in float64.

    Each reduction is two collectives: a one-number all-reduce (MAX) of the failure flag, then an all-gather of
    the values (summed here in part order, so every rank gets the same bits whatever the backend's algorithm)."""

    def __init__(self, device: torch.device, group: dist.ProcessGroup | None = None):
        self.group = group
        self.device = torch.device(device)
        self.parts = dist.get_world_size(group)
        self.index = dist.get_rank(group)
        self._dead = False  # this part has failed or seen a failure: no further collective

    def _status(self, failed: bool) -> None:
        flag = torch.tensor([float(failed)], dtype=torch.float64, device=self.device)
        self._collective(lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group))
        if float(flag) > 0 and not failed:
            self._dead = True
            raise _failed(self.index, self.parts)

    def _collective(self, fn) -> None:  # type: ignore[no-untyped-def]
        try:
            fn()
        except RuntimeError as e:  # gloo/NCCL report a dead peer or a timeout as RuntimeError
            self._dead = True
            raise DistributedError(f"row part {self.index} of {self.parts}: a reduction over the ranks failed "
                                   f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); another "
                                   "rank died or timed out.") from e

    def _exchange(self, x: Tensor) -> list[Tensor]:
        self._status(False)
        y = x.to(self.device).contiguous()
        ys = [torch.empty_like(y) for _ in range(self.parts)]
        self._collective(lambda: dist.all_gather(ys, y, group=self.group))
        return [t.to(x.device) for t in ys]

    def finish(self) -> None:
        self._status(False)

    def abort(self) -> None:
        if not self._dead:
            self._dead = True
            try:
                self._status(True)
            except DistributedError:  # the group is broken: the others' collectives fail by themselves
                pass
