"""``prune_model_`` across the ranks of a ``torch.distributed`` process group (``torchrun ... sparsekit prune``).

When a process group is initialised (by the caller, or by :func:`init_from_env` under ``torchrun``), every rank
runs :func:`sparsekit.pipeline.run.prune_model_` on the same model, config and calibration tokens, and:

- **Calibration batches** are split into contiguous ranges, one per rank (:func:`batch_ranges`); each rank captures,
  runs and keeps only its own batches' activations.
- **Hessians** are reduced in a fixed order, so that ``H`` is bit-identical for every world size, including a
  run without a process group: rank ``r`` keeps the inputs of its linears for its batches, receives the running
  float32 ``Σ xxᵀ`` and token count from rank ``r − 1``, adds its inputs batch by batch with the very operation
  a single process uses (:meth:`HessianAccumulator.add`), and passes the sum on; the last rank broadcasts it.
  An all-reduce of per-rank partial sums would change the summation order with the world size (float addition
  is not associative) and so the masks; the chain costs ``W − 1`` sequential ``K × K`` transfers per group and
  the ``XᵀX`` products run one rank after the other (they are a small part of a block's time: the forward
  passes, which dominate calibration, still run in parallel).
- **Pruning** of a stage is spread over the ranks, a linear's rows in parts (:func:`sparsekit.parallel.row_parts`),
  each part a :func:`sparsekit.prune_weight` call (:mod:`sparsekit.parallel`: one mechanism for threads and ranks):

  - a linear whose rows are pruned independently (``METHODS[m].row_separable``, no held-out choice) is cut
    into :attr:`PruneConfig.row_parts` parts — a number fixed by the config, not by the world size, so every
    world size of two or more cuts it alike — and its parts go to ranks largest first, each to the least-loaded
    rank (cost ``rows · K²``); a group of one rank prunes it whole, as a run without a process group does;
  - a linear whose rows are coupled (ADMM, OBS-ord; or any linear when the regularisation is chosen on the
    held-out loss of the whole layer) is cut into one part per rank (fewer when it has fewer row units: ranks
    ``0 … n−1`` then, through a process subgroup), and the parts run together, reducing what couples them
    through a :class:`~sparsekit.coupling.DistGather` (float64 all-gathers of a few numbers per step;
    :mod:`sparsekit.coupling`). These linears come first, in plan order, on every rank.

  Every part's weights and mask are then broadcast from their owner, so every rank continues with the same
  block. Each part gets the memory budget the linear would get in one process (``max_memory``:
  :func:`~sparsekit.pipeline.budget.layer_max_memory`), so its chunks are planned alike. On the CPU the result
  is bit-identical to one process (tested with 2 and 3 gloo ranks); on GPUs the parts' GEMMs have other shapes
  than the whole linear's (cuBLAS chooses its kernels, and so its rounding, by shape), so with two or more ranks
  the result may differ from one process (and between world sizes) by float32 rounding. A group of one rank
  issues the very operations of one process (one part per linear, the same chunks; tested on the CPU by
  comparing the two runs' operations and their shapes), so its result is one process's on GPUs too — where the
  budget leaves the methods' row chunks whole, or plans them alike: a budget that binds is read from the device
  (its free memory, which NCCL's own buffers lower; with ``max_memory``, less the bytes allocated, which include
  the masks of the group's linears pruned before), so large layers may be chunked differently.
- **Held-out regularisation** (``PruneConfig.reg_grid``): the held-out sequences are split over the ranks like the
  calibration batches and their Hessians reduced by the same ordered chain
  (:mod:`sparsekit.pipeline.heldout`); every linear is then a coupled one (above), and each choice reaches every
  rank with the pruned weights (``reg_scope="model"`` reuses it in later blocks on every rank).
- **Checkpoints**: every rank reads them (on several machines ``checkpoint_dir`` must be on a file system all
  of them see); rank 0 alone writes (the activations gathered from every rank) and the others wait at a barrier. Rank 0 alone reports progress; :mod:`sparsekit.cli.prune` lets only rank 0 save.
- **Reports**: every rank builds the same :class:`ModelReport`; a split linear's ``time_s`` is the sum of its
  parts' pruning times (compute, not wall time) and its ``stats`` gain ``ranks`` and ``rows_per_part``.
- **Failures**: a part that raises (a :class:`~sparsekit.errors.SparsekitError`: bad input, a Hessian that
  cannot be factored, a memory budget; or another error, sent as a ``RuntimeError`` naming it) stops the other
  parts of its linear at their next reduction (:class:`~sparsekit.errors.CoupledPartError`), and every rank
  raises the original error after the exchange. A rank that dies (killed, or an error outside pruning) is seen
  by the backend: gloo at once, NCCL after the timeout. A collective that fails (a rank died, or none answered within ``SPARSEKIT_DIST_TIMEOUT`` seconds, default
  1800) raises :class:`~sparsekit.errors.DistributedError`; finished blocks stay checkpointed and ``--resume``
  continues with any world size.

Under NCCL every rank must work on its own GPU (``config.device = "cuda:LOCAL_RANK"``, which :func:`init_from_env`
returns). :func:`init_from_env` sets ``NCCL_NVLS_ENABLE=0`` unless the environment sets it.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Collection, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from sparsekit.api import PruneResult, prune_weight
from sparsekit.coupling import DistGather
from sparsekit.errors import DistributedError, InputError, SparsekitError
from sparsekit.hessian import HessianAccumulator
from sparsekit.metrics import relative_error
from sparsekit.parallel import root_error, row_parts
from sparsekit.patterns import get_pattern
from sparsekit.pipeline.blocks import LayerPlan
from sparsekit.pipeline.config import PruneConfig
from sparsekit.pruners import METHODS

if TYPE_CHECKING:
    from sparsekit.pipeline.heldout import HeldOut

log = logging.getLogger(__name__)

__all__ = ["TIMEOUT_ENV", "init_from_env", "is_lead", "leave", "batch_ranges", "assign", "Group", "join"]

#: Seconds a collective may wait for the other ranks before the job ends with :class:`DistributedError`.
TIMEOUT_ENV = "SPARSEKIT_DIST_TIMEOUT"


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))


def init_from_env(device: str | None = None) -> str | None:
    """Start the process group from ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``) unless one is running; returns the device this rank works on
    (``cuda:LOCAL_RANK`` with NCCL, ``cpu`` with gloo), or ``None`` outside ``torchrun``.

    ``device``: the user's ``--device``; ``"cpu"`` forces gloo even where CUDA is available."""
    if dist.is_initialized():
        return _rank_device(device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if cuda:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=_timeout())
    log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return _rank_device(device)


def is_lead() -> bool:
    """True outside a process group and on rank 0: the process that prints, saves and evaluates."""
    return not dist.is_initialized() or dist.get_rank() == 0


def leave() -> bool:
    """End the process group once every rank has finished pruning (what follows, saving and the verdict, runs on
    rank 0 alone, in one process); returns :func:`is_lead`. A no-op outside a process group."""
    if not dist.is_initialized():
        return True
    lead = dist.get_rank() == 0
    try:
        dist.barrier()
    except RuntimeError as e:
        raise DistributedError(f"rank {dist.get_rank()}: the final barrier failed ({e}); another rank died.") from e
    dist.destroy_process_group()
    return lead


def _rank_device(device: str | None) -> str:
    if dist.get_backend() == "nccl":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', torch.cuda.current_device()))}"
    return device or "cpu"


def batch_ranges(num_batches: int, world: int) -> list[tuple[int, int]]:
    """Contiguous ``(first, stop)`` batch ranges, one per rank, sizes differing by at most one."""
    sizes = [num_batches // world + (r < num_batches % world) for r in range(world)]
    bounds, start = [], 0
    for s in sizes:
        bounds.append((start, start + s))
        start += s
    return bounds


@dataclass
class _Item:
    """Rows ``[start, stop)`` of one linear, pruned by rank ``owner``; a coupled item is part ``owner`` of
    ``parts`` that run together on ranks ``0 … parts−1``."""

    plan: LayerPlan
    start: int
    stop: int
    owner: int = 0
    coupled: bool = False
    parts: int = 1

    @property
    def cost(self) -> int:
        return (self.stop - self.start) * self.plan.module.in_features ** 2


def coupled_rows(plan: LayerPlan, heldout: bool) -> bool:
    """Whether the row parts of ``plan``'s linear must run together, reducing through a
    :class:`~sparsekit.coupling.Gather`: its method couples rows, or (``heldout``) the regularisation is chosen on
    the whole layer's held-out loss."""
    return heldout or not METHODS[plan.method].row_separable


def assign(plans: Sequence[LayerPlan], parts: int, world: int, coupled: Collection[str] = ()) -> list[_Item]:
    """The work items of a group of linears and their owners. The linears named in ``coupled`` come first, in plan
    order, each in ``world`` row parts (fewer if it has fewer row units), part ``r`` on rank ``r``; the others
    follow in ``parts`` row parts each, largest first to the least-loaded rank (lowest rank on ties). Parts are
    whole units of :func:`sparsekit.parallel.row_parts`. With one rank every linear is one part: the work of a run
    without a process group, whose GEMM shapes (and so, on GPUs, rounding) it then shares. Depends only on its
    arguments, so every rank computes the same assignment."""
    parts = parts if world > 1 else 1
    load = [0] * world
    together, spread = [], []
    for p in plans:
        M, cr = p.module.out_features, get_pattern(p.pattern).scope.block.chunk_rows
        if p.name in coupled:
            bounds = row_parts(M, cr, world)
            for r, (a, b) in enumerate(bounds):
                together.append(_Item(p, a, b, r, True, len(bounds)))
                load[r] += together[-1].cost
        else:
            spread.extend(_Item(p, a, b) for a, b in row_parts(M, cr, parts))
    for it in sorted(spread, key=lambda it: -it.cost):  # stable: ties keep the plan order
        it.owner = min(range(world), key=lambda r: (load[r], r))
        load[it.owner] += it.cost
    return together + spread


class _Deferred:
    """Stands in for a :class:`HessianAccumulator` in :class:`~sparsekit.pipeline.blocks.HessianHooks`: keeps this
    rank's inputs (in batch order) until the ordered reduction adds them."""

    def __init__(self) -> None:
        self.inputs: list[Tensor] = []

    def add(self, x: Tensor) -> None:
        self.inputs.append(x)


class Group:
    """This rank's view of the process group for one ``prune_model_`` call."""

    def __init__(self, num_batches: int, device: torch.device):
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        if num_batches < self.world:
            raise InputError(
                f"{num_batches} calibration batches cannot be split across {self.world} ranks; give at least "
                f"{self.world} batches (more sequences, or a smaller batch_size)."
            )
        if dist.get_backend() == "nccl" and device.type != "cuda":
            raise InputError(f"the NCCL process group needs each rank on its GPU, not {device}; set device='cuda:LOCAL_RANK'.")
        self.ranges = batch_ranges(num_batches, self.world)
        self.device = device
        self.is_writer = self.rank == 0
        self._subgroups: dict[int, Any] = {}  # n -> the process group of ranks 0 … n−1

    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as e:  # gloo/NCCL report a dead peer or a timeout as RuntimeError (DistBackendError)
            raise DistributedError(
                f"rank {self.rank}: {what} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "another rank died or timed out. The finished blocks are checkpointed: rerun with --resume "
                "(resume=True)."
            ) from e

    def barrier(self) -> None:
        with self._collective("barrier"):
            dist.barrier()

    def local(self, per_batch: list[Any]) -> list[Any]:
        """This rank's entries of a list with one entry per calibration batch."""
        a, b = self.ranges[self.rank]
        return per_batch[a:b]

    def local_calibration(self, ids: Tensor, mask: Tensor | None, batch_size: int) -> tuple[Tensor, Tensor | None]:
        """The sequences of this rank's batches (whole batches, so the batches are those of one process; none when
        there are fewer batches than ranks, as in a small held-out slice)."""
        a, b = batch_ranges(-(-ids.shape[0] // batch_size), self.world)[self.rank]
        rows = slice(a * batch_size, b * batch_size)
        return ids[rows], None if mask is None else mask[rows]

    def gather(self, per_batch: list[Tensor]) -> list[Tensor] | None:
        """Every rank's per-batch tensors, in batch order, on rank 0 (on the CPU); ``None`` elsewhere."""
        out: list[Any] | None = [None] * self.world if self.is_writer else None
        with self._collective("gathering the activations"):
            dist.gather_object([t.cpu() for t in per_batch], out, dst=0)
        return None if out is None else [t for part in out for t in part]

    def deferred(self) -> _Deferred:
        return _Deferred()

    def reduce_hessians(self, accs: Sequence[HessianAccumulator], inputs: Sequence[_Deferred]) -> None:
        """Fill every accumulator with the sum over all ranks' inputs, added in batch order (bit-identical to one
        process adding every batch): a chain rank 0 → 1 → … → W−1, then a broadcast from the last rank."""
        last = self.world - 1
        with self._collective("the Hessian reduction"):
            for acc, rec in zip(accs, inputs):
                s = acc.partial_sum  # (K, K) Σ x xᵀ, sent and received in place
                n = torch.zeros(1, dtype=torch.long, device=s.device)
                if self.rank > 0:
                    dist.recv(s, src=self.rank - 1)
                    dist.recv(n, src=self.rank - 1)
                    acc.num_tokens = int(n)
                for x in rec.inputs:
                    acc.add(x)
                rec.inputs.clear()
                n.fill_(acc.num_tokens)
                if self.rank < last:
                    dist.send(s, dst=self.rank + 1)
                    dist.send(n, dst=self.rank + 1)
                dist.broadcast(s, src=last)
                dist.broadcast(n, src=last)
                acc.num_tokens = int(n)

    def _groups(self, sizes: Collection[int]) -> dict[int, Any]:
        """The process group of ranks ``0 … n−1`` for each ``n`` in ``sizes`` (``None``: the whole world). Every
        rank calls this with the same sizes: making a subgroup is a collective of all ranks."""
        out = {}
        for n in sorted(sizes):
            if n < self.world and n not in self._subgroups:
                with self._collective("making a process subgroup"):
                    self._subgroups[n] = dist.new_group(list(range(n)), timeout=_timeout())
            out[n] = self._subgroups[n] if n < self.world else None
        return out

    def prune(self, plans: Sequence[LayerPlan], H: Tensor, config: PruneConfig, held: "HeldOut | None" = None,
              H_held: Tensor | None = None, max_memory: int | None = None,
              all_tokens: bool = False) -> dict[str, PruneResult]:
        """Prune a group of linears sharing ``H (K, K)`` across the ranks (``held``: at the regularisation chosen on
        the held-out Hessian ``H_held``; ``all_tokens``: ``H`` is the merge over calibration and held-out tokens,
        :meth:`HeldOut.calibrates`), each part with the budget ``max_memory`` (that of a ``prune_weight``
        call, :func:`~sparsekit.pipeline.budget.layer_max_memory`); every rank ends with every pruned weight in
        place and gets each linear's :class:`PruneResult` (loss over the whole linear, times summed over its
        parts, the first part's damping and stats plus ``ranks`` and ``rows_per_part``)."""
        coupled = {p.name for p in plans if coupled_rows(p, held is not None)}
        items = assign(plans, config.row_parts, self.world, coupled)
        groups = self._groups({it.parts for it in items if it.coupled and it.parts > 1})
        split = {it.plan.name for it in items
                 if not it.coupled and (it.start, it.stop) != (0, it.plan.module.out_features)}
        dense = {p.name: p.module.weight.detach().clone() for p in plans if p.name in split}  # (M, K) for the loss
        meta: dict[int, dict[str, Any]] = {}
        masks: list[Tensor] = []
        for k, it in enumerate(items):
            p = it.plan
            w = p.module.weight.data[it.start : it.stop]  # (rows, K) a view: pruned in place
            if it.owner != self.rank:
                masks.append(torch.empty(w.shape, dtype=torch.uint8, device=w.device))
                continue
            gather = DistGather(self.device, groups[it.parts]) if it.coupled and it.parts > 1 else None
            try:
                if held is not None:
                    res = held.prune(p, H, H_held, max_memory=max_memory, rows=slice(it.start, it.stop),
                                     gather=gather, all_tokens=all_tokens)
                else:
                    res = prune_weight(w, H, p.pattern, p.method, damp=config.damp, damp_mode=config.damp_mode,
                                       inplace=True, max_memory=max_memory, gather=gather, **p.options)
            except Exception as e:  # every rank raises it after the exchange, none waits for this one
                if not isinstance(e, SparsekitError):  # (e.g. a CUDA error) sent as text: it may not pickle
                    log.error("rank %d: pruning %s failed", self.rank, p.name, exc_info=True)
                    e = RuntimeError(f"rank {self.rank}, {p.name}: {type(e).__name__}: {e}")
                meta[k] = {"error": e}
                masks.append(torch.zeros(w.shape, dtype=torch.uint8, device=w.device))
                continue
            meta[k] = {"loss": res.loss, "time_s": res.time_s, "damp": res.damp, "stats": res.stats}
            masks.append(res.mask.to(torch.uint8))
        everyone: list[Any] = [None] * self.world
        with self._collective("sharing the pruned weights"):
            for it, mask in zip(items, masks):
                dist.broadcast(it.plan.module.weight.data[it.start : it.stop], src=it.owner)
                dist.broadcast(mask, src=it.owner)
            dist.all_gather_object(everyone, meta)
        for part in everyone:
            meta.update(part)
        errors = [meta[k]["error"] for k in range(len(items)) if "error" in meta[k]]
        if errors:
            raise root_error(errors)
        out = {}
        for p in plans:
            ks = [k for k, it in enumerate(items) if it.plan is p]
            first = meta[ks[0]]
            weight = p.module.weight.data
            loss = relative_error(dense.pop(p.name), weight, H) if p.name in split else first["loss"]
            stats = dict(first["stats"], ranks=[items[k].owner for k in ks],
                         rows_per_part=[items[k].stop - items[k].start for k in ks])
            if held is not None:  # ranks that held no part of this linear learn its choice too
                held.learn(p.name, stats)
            mask = torch.cat([masks[k] for k in ks]).bool()  # (M, K)
            out[p.name] = PruneResult(weight, mask, loss, p.method, get_pattern(p.pattern).name,
                                      sum(meta[k]["time_s"] for k in ks), first["damp"], stats)
        return out


def join(config: PruneConfig, device: torch.device, num_sequences: int) -> Group | None:
    """This rank's :class:`Group` when a process group is initialised, else ``None`` (one process, as before)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if config.prune_devices is not None:
        raise InputError("prune_devices splits layers over devices inside one process; under torch.distributed "
                         "each rank has its device: drop prune_devices (--prune-devices).")
    return Group(-(-num_sequences // config.batch_size), device)
