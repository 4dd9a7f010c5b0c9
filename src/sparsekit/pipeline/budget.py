"""The pipeline's memory budget (issue 14, DESIGN.md §8): what :func:`~sparsekit.pipeline.prune_model_` holds on
the device, with the least each ``prune_weight`` call needs besides, whether that fits, and the budget each
``prune_weight`` call gets.

While a layer is pruned the pipeline holds, on ``config.device``: the block's weights, the calibration hidden
states (one set, ``n_tokens × d``: each block's outputs replace its inputs batch by batch; with
``sequential="layer"`` one more for the finished children's outputs, :mod:`sparsekit.pipeline.reuse`), the Hessians of
the current stage (``K²`` float32 each) and, during the forwards, one batch's temporaries; between the forwards,
a ``prune_weight`` call, which on the widest linear ``(M, K)`` holds at least ``(4 K² + 2 M K) · s + 16 M K``
bytes (``s = 4``, 8 for a float64 model): its scaled copy of ``H``, the three ``(K, K)`` of
:func:`~sparsekit.hessian.damped_inverse` (``H + Λ`` then the inverse, its Cholesky factor, the working copy of
the factor on CUDA), its working copy of the weight and the result, and the pattern's layout (the int64 row and
column of every entry); a method's chunks come on top, planned in what is left. Before the first block
:func:`plan_memory` estimates these bytes (:class:`PipelineMemory`; the peak counts the larger of the batch's
temporaries and the ``prune_weight`` call, which are never held together) and :func:`decide_offload` compares
them with the budget (:func:`sparsekit.memory.device_budget` of ``config.max_memory``):

- they fit: the run goes ahead as configured;
- on CUDA, they fit only with the activations on the CPU: the activations are offloaded (logged at WARNING,
  ``report.extra["memory"]["offload_activations"]``); offloading moves them, it does not change them, so the
  result is the same bit for bit;
- otherwise :class:`~sparsekit.errors.ResourceError` names what is needed and the fixes (a larger
  ``max_memory``, a smaller ``batch_size``, fewer calibration tokens, a larger device).

Each ``prune_weight`` call then gets :func:`layer_max_memory`: on CUDA ``config.max_memory`` itself, since the
method's :func:`~sparsekit.memory.device_budget` subtracts the process's allocated bytes, which include
everything the pipeline holds there (and with ``max_memory=None`` the device's free memory already excludes
it); on the CPU, where ``max_memory`` is read as the bytes a step may allocate, ``max_memory`` less the bytes
the pipeline holds at that moment.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from sparsekit.errors import ResourceError
from sparsekit.hessian import SLICE_BYTES
from sparsekit.memory import Budget, device_budget, format_bytes

log = logging.getLogger(__name__)

__all__ = [
    "H_ENTRY_BYTES", "PipelineMemory", "module_bytes", "tensor_bytes", "plan_memory", "decide_offload",
    "layer_max_memory", "pipeline_resource_error",
]

#: bytes per Hessian entry: the pipeline accumulates ``H`` in float32
H_ENTRY_BYTES = 4


def module_bytes(mod: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*mod.parameters(), *mod.buffers()])


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the tensors (each counted once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@dataclass(frozen=True)
class PipelineMemory:
    """Estimated bytes on the device at once: the pipeline's, and the least ``prune_weight`` holds besides."""

    block: int  # the largest block's weights and buffers (0 if the blocks already live on the device)
    activations: int  # calibration hidden states, n_tokens × d: one set, two with "layer" (:mod:`.reuse`'s store)
    hessians: int  # the H accumulators alive together (largest stage)
    working: int  # one batch: its hidden states in and out, the widest linear's activations, the fp32 copy of H's input
    pruning: int  # the least prune_weight holds on the widest linear, besides the pipeline's H (module docstring)

    def total(self, offload: bool) -> int:
        """Peak bytes: the batch's temporaries (forwards) and ``prune_weight``'s (after them) are not held at once."""
        return self.block + self.hessians + max(self.working, self.pruning) + (0 if offload else self.activations)


def _estimate(
    blocks: nn.ModuleList, linears: Sequence[nn.Linear], num_tokens: int, batch_tokens: int, d: int,
    act_dtype: torch.dtype, sequential: str, on_device: bool,
) -> PipelineMemory:
    elem = torch.empty((), dtype=act_dtype).element_size()
    block = 0 if on_device else max(module_bytes(b) for b in blocks)
    h = [m.in_features ** 2 * H_ENTRY_BYTES for m in linears]
    # "layer": one stage at a time, mostly one distinct input per stage; "block": at most every linear's H
    hessians = (max(h) if sequential == "layer" else sum(h)) if h else 0
    widest = max((max(m.in_features, m.out_features) for m in linears), default=d)
    # the H hooks convert their input to float32 in slices of at most SLICE_BYTES (hessian.HessianAccumulator.add)
    working = batch_tokens * (2 * d * elem + 3 * widest * elem) + min(batch_tokens * widest * H_ENTRY_BYTES,
                                                                      SLICE_BYTES)
    sets = 2 if sequential == "layer" else 1
    # prune_weight works in float64 for a float64 model (the pipeline's H is float32), else in float32; its
    # layout holds two int64 indices per weight entry
    s = 8 if act_dtype == torch.float64 else 4
    pruning = max(((4 * m.in_features ** 2 + 2 * m.out_features * m.in_features) * s
                   + 16 * m.out_features * m.in_features for m in linears), default=0)
    return PipelineMemory(block, sets * num_tokens * d * elem, hessians, working, pruning)


def plan_memory(
    model: nn.Module, blocks: nn.ModuleList, linears: Sequence[nn.Linear], calibration: Tensor, config: Any,
    device: torch.device, offload: bool,
) -> tuple[bool, dict[str, Any]]:
    """``(offload activations?, record for report.extra["memory"])`` for a run of ``config`` on ``device``.

    Raises :class:`ResourceError` when the pipeline does not fit the budget even with the activations on the
    CPU (module docstring). ``linears`` are the linears to be pruned (their ``K²`` Hessians are held).
    """
    emb = getattr(model, "get_input_embeddings", lambda: None)()
    ref = emb.weight if isinstance(emb, nn.Embedding) else next(iter(blocks.parameters()))
    d = emb.embedding_dim if isinstance(emb, nn.Embedding) else (linears[0].in_features if linears else 1)
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    on_device = ref.device.type == device.type and (device.type != "cuda" or ref.device.index == index)
    seq_len = calibration.shape[1]
    mem = _estimate(blocks, linears, calibration.numel(), min(config.batch_size, calibration.shape[0]) * seq_len, d,
                    ref.dtype, config.sequential, on_device)
    budget = device_budget(device, config.max_memory)
    record: dict[str, Any] = {"budget": str(budget), "budget_bytes": budget.bytes, "max_memory": config.max_memory,
                              "estimate": asdict(mem)}
    record["offload_activations"] = decide_offload(mem, budget, device, offload)
    return record["offload_activations"], record


def decide_offload(mem: PipelineMemory, budget: Budget, device: torch.device, offload: bool) -> bool:
    """Whether the activations stay on the CPU between blocks, given the estimate ``mem``, the ``budget`` and the
    configured ``offload`` (module docstring): ``offload`` if everything fits as configured, ``True`` on CUDA if it
    fits only so. Raises :class:`ResourceError` when it does not fit even with the activations on the CPU."""
    cuda = device.type == "cuda"
    if mem.total(offload=offload and cuda) <= budget.bytes:
        return offload
    if cuda and mem.total(offload=True) <= budget.bytes:
        log.warning(
            "the calibration activations (%s) do not fit on %s next to the block, its Hessians and the forwards or "
            "the pruning of its widest layer (budget %s); keeping them on the CPU between blocks (same result, "
            "slower).",
            format_bytes(mem.activations), device, budget,
        )
        return True
    need = mem.total(offload=cuda)
    raise ResourceError(
        f"the pipeline needs about {format_bytes(need)} on {device} (block {format_bytes(mem.block)}, Hessians "
        f"{format_bytes(mem.hessians)}, one batch {format_bytes(mem.working)}, pruning the widest layer "
        f"{format_bytes(mem.pruning)}"
        + ("" if cuda else f", activations {format_bytes(mem.activations)}")
        + f") but the budget is {budget}. Pass a larger max_memory (--max-memory), a smaller batch_size "
        "(--batch-size), fewer calibration tokens, or use a device with more memory.",
        needed=need, budget=budget.limit,
    )


def layer_max_memory(max_memory: int | None, device: torch.device, held: int) -> int | None:
    """The ``max_memory`` of a ``prune_weight`` call while the pipeline holds ``held`` bytes (module docstring).

    Raises :class:`ResourceError` on the CPU when ``held`` already exhausts ``max_memory``.
    """
    if max_memory is None or device.type == "cuda":
        return max_memory
    left = max_memory - held
    if left < 1:
        raise ResourceError(
            f"max_memory={format_bytes(max_memory)} leaves nothing to prune with: the pipeline holds "
            f"{format_bytes(held)} (the block, its activations, the Hessians). Pass a larger max_memory.",
            needed=held + 1, budget=max_memory,
        )
    return left



def pipeline_resource_error(err: ResourceError, layer: str, max_memory: int | None, device: torch.device,
                            held: int) -> ResourceError:
    """``err`` (a layer's :class:`ResourceError`) restated for ``prune_model_``'s ``max_memory``: the layer's
    ``needed`` plus what the pipeline held (on CUDA: the process's allocated bytes, which the method's budget
    subtracted)."""
    if err.needed is None:
        return ResourceError(f"{layer}: {err}", needed=None, budget=max_memory)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else held
    needed = err.needed + base
    return ResourceError(
        f"{layer}: {err} The pipeline holds {format_bytes(base)} besides (the block, its activations, the "
        f"Hessians): pass max_memory >= {format_bytes(needed)} ({needed} bytes) to prune_model_ (--max-memory), "
        "or a smaller batch_size / fewer calibration tokens.",
        needed=needed, budget=max_memory,
    )
