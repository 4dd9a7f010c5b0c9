"""Reusing the outputs of a block's finished parts across the passes of layer-sequential calibration (issue 14).

With ``sequential="layer"`` each stage's Hessians come from a new pass over the block, and the block's outputs
from one more. A direct child of the block (Llama's ``self_attn``) whose linears are all pruned, and which runs
after no linear still to be pruned, computes the same output in every later pass: its input and its weights
no longer change (the block runs in eval mode, deterministically). :class:`ChildOutputCache` keeps that output
per calibration batch the first time a pass computes it and returns a copy in the later passes, so Llama's
attention runs in two passes of the block instead of four. The values are the ones the pass would compute, so
the result is bit-for-bit that of running every pass in full.

Only outputs the size of the block's hidden states are kept (one more set of activations at most per child).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from torch import Tensor, nn

from sparsekit.pipeline.blocks import LayerPlan, _map_tensors

__all__ = ["ChildOutputCache", "unwrap"]


class ChildOutputCache:
    """Forward wrappers on the block's children serving finished children's outputs from a per-batch store.

    ``order`` is the linears' execution order (the probe's). Call :meth:`finished` after each stage is pruned,
    set :attr:`batch` before each batch's forward. :meth:`install` puts the wrappers on the children; the
    caller removes them with :func:`unwrap` (in a ``finally``), which also frees the stored outputs.
    """

    def __init__(
        self, block: nn.Module, plans: Sequence[LayerPlan], order: Sequence[str], calls: Mapping[str, int], width: int
    ):
        pos = {name: k for k, name in enumerate(order)}
        self._order = list(order)
        self._width = width
        self._children: list[tuple[nn.Module, int]] = []  # (child, position of its last linear in ``order``)
        for child in block.children():
            inside = {id(m) for m in child.modules()}
            names = [p.name for p in plans if id(p.module) in inside and p.name in pos]
            # a child called more than once per forward (its linears too) has no single output per batch
            if names and all(calls.get(n) == 1 for n in names):
                self._children.append((child, max(pos[n] for n in names)))
        self._store: list[dict[int, Any]] = [{} for _ in self._children]
        self._done: set[str] = set()
        self._final_upto = 0  # the first ``_final_upto`` linears of ``order`` are pruned
        self.batch = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the stored outputs."""
        total = 0
        for store in self._store:
            for out in store.values():
                first = out[0] if isinstance(out, (tuple, list)) else out
                total += first.numel() * first.element_size()
        return total

    def finished(self, names: Sequence[str]) -> None:
        """Linears ``names`` are pruned (final) from now on."""
        self._done.update(names)
        while self._final_upto < len(self._order) and self._order[self._final_upto] in self._done:
            self._final_upto += 1

    def _wrap(self, k: int, child: nn.Module, last: int) -> Callable[..., Any]:
        inner = type(child).forward.__get__(child)
        store = self._store[k]

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.batch in store:
                return _map_tensors(store[self.batch], Tensor.clone)  # a copy: callers may write into it
            out = inner(*args, **kwargs)
            first = out[0] if isinstance(out, (tuple, list)) and out else out
            if last < self._final_upto and isinstance(first, Tensor) and first.shape[-1] == self._width:
                store[self.batch] = _map_tensors(out, Tensor.detach)
            return out

        forward._sparsekit_reuse = True  # type: ignore[attr-defined]  # what :func:`unwrap` removes
        return forward

    def install(self) -> "ChildOutputCache":
        for k, (child, last) in enumerate(self._children):
            if "forward" not in child.__dict__:  # a child whose forward someone else replaced is left alone
                child.forward = self._wrap(k, child, last)  # instance attribute: nn.Module.__call__ uses it
        return self


def unwrap(block: nn.Module) -> None:
    """Remove the wrappers :meth:`ChildOutputCache.install` put on ``block``'s children (and their stores)."""
    for child in block.children():
        if getattr(child.__dict__.get("forward"), "_sparsekit_reuse", False):
            del child.forward
