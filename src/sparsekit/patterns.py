"""Sparsity patterns as a view + block + scope (DESIGN.md §3).

A pattern is described in three steps:

1. A **view** of a chunk of ``chunk_rows`` consecutive rows of the weight ``W (M, K)``: sizes and strides,
   exactly as ``torch.as_strided`` takes them, over the chunk's row-major storage (``chunk_rows * K``
   elements). Sizes and strides may use ``K`` symbolically: ``"K"``, ``"K/16"``, ``"8K"``.
   The default view is ``(chunk_rows, K)`` with strides ``(K, 1)``.
2. A **block shape** (one entry per view dimension): the elements pruned or kept together.
3. A **scope shape**, in units of blocks: the blocks that compete. A pattern keeps ``nnz`` blocks per scope.

Examples (``K = 32``)::

    2:4          view (1, K)                          block (1, 1)        scope (1, 4)     keep 2
    2:4-pairs    view (1, K)                          block (1, 2)        scope (1, 4)     keep 2
    coupled-2:4  view (1, K/16, 8, 2):(K, 16, 1, 8)   block (1, 1, 1, 2)  scope (1, 1, 4, 1) keep 2
    rowpair-16   view (8, 2, K):(K, 8K, 1), 16 rows   block (1, 1, 16)    scope (1, 2, 1)  keep 1

In ``coupled-2:4`` view element ``(0, g, i, j)`` is ``W[r, 16 g + i + 8 j]``; in ``rowpair-16`` view element
``(i, j, k)`` of chunk ``c`` is ``W[16 c + i + 8 j, k]``.

Every algorithm works on a :class:`Layout` — the pattern resolved against a concrete ``(M, K)``: the
``(row, col)`` of every element of every block of every scope, as tensors.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Union

import torch
from torch import Tensor

from sparsekit.errors import PatternError

Dim = Union[int, str]

__all__ = [
    "BlockSpec",
    "ScopeSpec",
    "Pattern",
    "Layout",
    "PRESETS",
    "get_pattern",
    "top_mask",
    "block_col_indices",
    "block_param_rc",
    "check_mask",
]

_DIM_RE = re.compile(r"^\s*(\d*)\s*\*?\s*K\s*(?:/\s*(\d+))?\s*$")


def _resolve_dim(d: Dim, num_cols: int, what: str) -> int:
    """Resolve an int or a ``K`` expression (``"K"``, ``"K/16"``, ``"8K"``, ``"8*K"``) to an int."""
    if isinstance(d, int):
        return d
    m = _DIM_RE.match(str(d))
    if not m:
        raise PatternError(f"{what}: cannot parse {d!r}; use an int or an expression like 'K', 'K/16', '8K'.")
    mul = int(m.group(1)) if m.group(1) else 1
    div = int(m.group(2)) if m.group(2) else 1
    if (mul * num_cols) % div:
        raise PatternError(
            f"{what}: {d!r} needs K divisible by {div}, got K={num_cols}; pad or pick a layer whose "
            f"input size is a multiple of {div}."
        )
    return mul * num_cols // div


@dataclass(frozen=True)
class BlockSpec:
    """A view over ``chunk_rows`` rows of the weight, cut into blocks of ``block_shape`` elements.

    ``view_size``/``view_stride`` default to ``(chunk_rows, "K")``/``("K", 1)``. ``block_shape`` has one entry
    per view dimension and must divide the view's sizes; the block grid is ``view_size / block_shape``.
    """

    block_shape: tuple[int, ...]
    view_size: tuple[Dim, ...] | None = None
    view_stride: tuple[Dim, ...] | None = None
    chunk_rows: int = 1

    def __post_init__(self) -> None:
        if self.chunk_rows < 1:
            raise PatternError(f"chunk_rows must be >= 1, got {self.chunk_rows}.")
        if (self.view_size is None) != (self.view_stride is None):
            raise PatternError("Give both view_size and view_stride, or neither.")
        ndim = 2 if self.view_size is None else len(self.view_size)
        if self.view_stride is not None and len(self.view_stride) != ndim:
            raise PatternError(f"view_size has {ndim} dims but view_stride has {len(self.view_stride)}.")
        if len(self.block_shape) != ndim:
            raise PatternError(f"block_shape {self.block_shape} needs {ndim} entries, one per view dimension.")
        if any(b < 1 for b in self.block_shape):
            raise PatternError(f"block_shape entries must be >= 1, got {self.block_shape}.")

    @property
    def block_numel(self) -> int:
        return math.prod(self.block_shape)

    def view(self, num_cols: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Concrete ``(sizes, strides)`` of the view for ``K = num_cols``."""
        if self.view_size is None:
            return (self.chunk_rows, num_cols), (num_cols, 1)
        size = tuple(_resolve_dim(d, num_cols, "view_size") for d in self.view_size)
        stride = tuple(_resolve_dim(d, num_cols, "view_stride") for d in self.view_stride)  # type: ignore[union-attr]
        return size, stride

    def grid_shape(self, num_cols: int) -> tuple[int, ...]:
        size, _ = self.view(num_cols)
        for s, b in zip(size, self.block_shape):
            if s % b:
                raise PatternError(
                    f"view size {size} is not divisible by block_shape {self.block_shape} at K={num_cols}; "
                    "the layer's input size must be a multiple of the pattern's column period."
                )
        return tuple(s // b for s, b in zip(size, self.block_shape))


@dataclass(frozen=True)
class ScopeSpec:
    """Groups of blocks that compete: ``scope_shape`` is in units of blocks, one entry per view dim."""

    block: BlockSpec
    scope_shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        if len(self.scope_shape) != len(self.block.block_shape):
            raise PatternError(
                f"scope_shape {self.scope_shape} needs {len(self.block.block_shape)} entries, one per view dim."
            )

    def scope_dims(self, num_cols: int) -> tuple[int, ...]:
        dims = tuple(_resolve_dim(d, num_cols, "scope_shape") for d in self.scope_shape)
        if any(d < 1 for d in dims):
            raise PatternError(f"scope_shape entries must be >= 1, got {dims}.")
        return dims

    def blocks_per_scope(self, num_cols: int) -> int:
        return math.prod(self.scope_dims(num_cols))


@dataclass(frozen=True)
class Pattern:
    """A scope structure plus how many blocks each scope keeps.

    ``nnz`` is an int in ``[0, B]`` (blocks kept per scope, ``B`` blocks per scope; 0 and ``B`` are honoured
    exactly) or a fraction in (0, 1) of the blocks per scope, rounded to the nearest int, which must then keep
    at least one block and prune at least one (a fraction that rounds to 0% or 100% sparsity is an error).
    """

    scope: ScopeSpec
    nnz: int | float
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.nnz, bool) or not isinstance(self.nnz, numbers.Real) or not math.isfinite(self.nnz):
            raise PatternError(
                f"nnz must be an int (blocks kept per scope) or a fraction in (0, 1), got {self.nnz!r}."
            )

    def keep(self, num_cols: int) -> int:
        bps = self.scope.blocks_per_scope(num_cols)
        if 0 < self.nnz < 1:
            k = round(self.nnz * bps)
            if not 0 < k < bps:
                raise PatternError(
                    f"nnz={self.nnz!r} of {bps} blocks per scope rounds to {k} kept, i.e. "
                    f"{'100' if k == 0 else '0'}% sparsity; use a fraction that keeps 1 to {bps - 1} of the {bps} "
                    "blocks, or an int nnz."
                )
            return k
        nnz = int(self.nnz)
        if nnz != self.nnz or not 0 <= nnz <= bps:
            raise PatternError(f"nnz must be an int in [0, {bps}] (blocks per scope), got {self.nnz!r}.")
        return nnz

    def resolve(self, num_rows: int, num_cols: int, device: torch.device | str = "cpu") -> "Layout":
        return Layout.build(self, num_rows, num_cols, torch.device(device))

    def __str__(self) -> str:
        return self.name


def _nm(n: int, m: int) -> Pattern:
    return Pattern(ScopeSpec(BlockSpec((1, 1)), (1, m)), n, f"{n}:{m}")


def _preset(name: str) -> Pattern:
    if name == "2:4-pairs":
        return Pattern(ScopeSpec(BlockSpec((1, 2)), (1, 4)), 2, name)
    if name == "coupled-2:4":
        blk = BlockSpec((1, 1, 1, 2), view_size=(1, "K/16", 8, 2), view_stride=("K", 16, 1, 8))
        return Pattern(ScopeSpec(blk, (1, 1, 4, 1)), 2, name)
    if name == "rowpair-16":
        blk = BlockSpec((1, 1, 16), view_size=(8, 2, "K"), view_stride=("K", "8K", 1), chunk_rows=16)
        return Pattern(ScopeSpec(blk, (1, 2, 1)), 1, name)
    raise KeyError(name)


#: rows of at most this many entries are ranked by comparison counts in :func:`top_mask`
RANK_MAX_BLOCKS = 16


def top_mask(score: Tensor, k: int) -> Tensor:
    """``(..., B)`` -> bool ``(..., B)``: True at the ``k`` highest entries along the last dim, ties to the lower
    index (deterministic, unlike ``topk``).

    Up to :data:`RANK_MAX_BLOCKS` entries: ``B`` elementwise passes count, for every entry, the entries that beat
    it (kept iff fewer than ``k``); torch's ``topk`` on millions of 4-entry rows is far slower on a GPU (2:4
    projection of a 2560×9728 weight: 8.7 ms on an H200). Longer rows: a stable sort.
    """
    B = score.shape[-1]
    if B <= RANK_MAX_BLOCKS:
        beaten = torch.zeros(score.shape, dtype=torch.uint8, device=score.device)  # (..., B)
        for j in range(B):
            sj = score[..., j : j + 1]  # (..., 1)
            beats = sj > score  # (..., B): entry j beats entry i
            beats[..., j + 1 :] |= sj == score[..., j + 1 :]  # ties: the earlier entry wins
            beaten += beats
        return beaten < k
    order = score.argsort(dim=-1, descending=True, stable=True)
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, order[..., :k], True)


PRESETS = ("2:4", "4:8", "2:4-pairs", "coupled-2:4", "rowpair-16", "50%")
"""Named presets; any ``"N:M"`` and any ``"P%"`` (per-row unstructured, P% of each row pruned) also parse."""


def get_pattern(pattern: "str | Pattern") -> Pattern:
    """Parse a preset name (``"2:4"``, ``"N:M"``, ``"2:4-pairs"``, ``"coupled-2:4"``, ``"rowpair-16"``, ``"50%"``)."""
    if isinstance(pattern, Pattern):
        return pattern
    if isinstance(pattern, ScopeSpec):
        raise PatternError("A ScopeSpec has no keep count: pass Pattern(scope, nnz) instead.")
    if not isinstance(pattern, str):
        raise PatternError(f"pattern must be a preset name or a Pattern, got {type(pattern).__name__}.")
    name = pattern.strip()
    m = re.fullmatch(r"(\d+):(\d+)", name)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise PatternError(f"N:M needs 0 < N < M, got {name!r}.")
        return _nm(n, mm)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", name)
    if m:
        frac = float(m.group(1)) / 100
        if not 0 < frac < 1:
            raise PatternError(f"sparsity must be strictly between 0% and 100%, got {name!r}.")
        return Pattern(ScopeSpec(BlockSpec((1, 1)), (1, "K")), 1.0 - frac, name)
    try:
        return _preset(name)
    except KeyError:
        raise PatternError(
            f"unknown pattern {pattern!r}; use one of {', '.join(PRESETS)}, any 'N:M', any 'P%', "
            "or a Pattern object."
        ) from None


def _chunk_flat_index(block: BlockSpec, num_cols: int) -> Tensor:
    """Flat index into one chunk (``chunk_rows * K`` elements) of every view element: the view's shape."""
    size, stride = block.view(num_cols)
    numel = block.chunk_rows * num_cols
    if math.prod(size) != numel:
        raise PatternError(
            f"the view {size} has {math.prod(size)} elements but a chunk of {block.chunk_rows} rows x K={num_cols} "
            f"has {numel}; the view must cover every weight element exactly once."
        )
    idx = torch.arange(numel).as_strided(size, stride) if numel else torch.zeros(size, dtype=torch.long)
    if not torch.equal(idx.flatten().sort().values, torch.arange(numel)):
        raise PatternError(f"the view {size}:{stride} does not cover each of the chunk's elements exactly once.")
    return idx


def _to_blocks(t: Tensor, block_shape: tuple[int, ...]) -> Tensor:
    """``(*view)`` -> ``(*grid, block_numel)``: split each dim into (grid, block) and move blocks last."""
    nd = len(block_shape)
    split: list[int] = []
    for s, b in zip(t.shape, block_shape):
        split += [s // b, b]
    t = t.reshape(split).permute(*range(0, 2 * nd, 2), *range(1, 2 * nd, 2))
    return t.reshape(*t.shape[:nd], -1)


def block_param_rc(block: BlockSpec, num_cols: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Map each block of one row chunk to ``(param_row, param_col)``.

    Returns ``(row_idx, col_idx)``, each a ``(*grid_shape, block_numel)`` long tensor; rows are relative to the
    chunk (``0 <= row < chunk_rows``). Example, ``2:4-pairs`` at ``K = 8``: grid ``(1, 4)``, ``col_idx[0, 1] =
    [2, 3]``.
    """
    block.grid_shape(num_cols)  # divisibility check with a clear error
    flat = _to_blocks(_chunk_flat_index(block, num_cols), block.block_shape)
    return (flat // num_cols).to(device), (flat % num_cols).to(device)


def block_col_indices(block: BlockSpec, num_cols: int, device: torch.device | str = "cpu") -> Tensor:
    """Map each block to its original column indices: ``(*grid_shape[1:], block_numel)`` long tensor.

    The first grid dimension is dropped (it runs over rows); this is the column map of index 0 along it,
    which is the column map of every index when, as in all presets, the columns do not depend on it.
    """
    _, col = block_param_rc(block, num_cols, device)
    return col[0]


@dataclass(frozen=True, eq=False)
class Layout:
    """A pattern resolved against a weight of shape ``(M, K)``.

    Attributes:
        rows, cols: ``(S, B, e)`` long — the ``(row, col)`` of element ``e`` of block ``b`` of scope ``s``;
            scopes are ordered chunk by chunk, and within a chunk in the scope grid's row-major order.
        nnz: blocks kept per scope; ``B - nnz`` are pruned.
    """

    pattern: Pattern
    num_rows: int
    num_cols: int
    rows: Tensor
    cols: Tensor
    nnz: int

    @staticmethod
    def build(pattern: Pattern, num_rows: int, num_cols: int, device: torch.device) -> "Layout":
        blk = pattern.scope.block
        if num_rows % blk.chunk_rows:
            raise PatternError(
                f"pattern {pattern.name!r} works on chunks of {blk.chunk_rows} rows but the weight has {num_rows} rows."
            )
        r, c = block_param_rc(blk, num_cols)
        grid = r.shape[:-1]
        sdims = pattern.scope.scope_dims(num_cols)
        if any(g % s for g, s in zip(grid, sdims)):
            raise PatternError(
                f"pattern {pattern.name!r} does not tile a weight with K={num_cols} columns: block grid {tuple(grid)} "
                f"is not divisible by scope shape {sdims}. Use a layer whose K is a multiple of the pattern's "
                "period, or skip this layer."
            )
        e = blk.block_numel
        # (*grid, e) -> (*scope_grid, e, B): the element dim is a view dim of block size 1.
        r = _to_blocks(r, (*sdims, 1)).reshape(-1, e, math.prod(sdims)).transpose(1, 2)  # (S_chunk, B, e)
        c = _to_blocks(c, (*sdims, 1)).reshape(-1, e, math.prod(sdims)).transpose(1, 2)
        n_chunks = num_rows // blk.chunk_rows
        r, c = r.to(device), c.to(device)  # expand on the device: only the chunk template travels
        offs = (torch.arange(n_chunks, device=device) * blk.chunk_rows).view(-1, 1, 1, 1)
        rows = (r.unsqueeze(0) + offs).reshape(-1, *r.shape[1:])
        cols = c.unsqueeze(0).expand(n_chunks, *c.shape).reshape(-1, *c.shape[1:])
        nnz = pattern.keep(num_cols)
        return Layout(pattern, num_rows, num_cols, rows.contiguous(), cols.contiguous(), nnz)

    # ---- sizes -------------------------------------------------------------------------------------------
    @property
    def num_scopes(self) -> int:
        return self.rows.shape[0]

    @property
    def blocks_per_scope(self) -> int:
        return self.rows.shape[1]

    @property
    def block_numel(self) -> int:
        return self.rows.shape[2]

    @property
    def num_prune(self) -> int:
        return self.blocks_per_scope - self.nnz

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def to(self, device: torch.device | str) -> "Layout":
        return Layout(self.pattern, self.num_rows, self.num_cols, self.rows.to(device), self.cols.to(device), self.nnz)

    # ---- per-chunk and per-row structure -----------------------------------------------------------------
    @property
    def chunk_rows(self) -> int:
        return self.pattern.scope.block.chunk_rows

    @property
    def scopes_per_chunk(self) -> int:
        return self.num_scopes // (self.num_rows // self.chunk_rows)

    @property
    def template(self) -> tuple[Tensor, Tensor]:
        """``(rows, cols)``, each ``(S_c, B, e)``: the first chunk's scopes. Chunk ``k`` repeats them with rows
        shifted by ``k * chunk_rows``; so ``W.view(-1, chunk_rows, K)[:, rows, cols]`` gathers every scope as
        ``(M / chunk_rows, S_c, B, e)``."""
        n = self.scopes_per_chunk
        return self.rows[:n], self.cols[:n]

    @cached_property
    def row_local(self) -> bool:
        """True when every scope lies in one row (all presets but ``rowpair-16``)."""
        return bool((self.rows == self.rows[:, :1, :1]).all())

    @cached_property
    def row_cols(self) -> Tensor | None:
        """``(S_r, B, e)`` column indices of one row's scopes, identical for every row; None if not row-uniform.

        Defined when the pattern's chunks are single rows (``chunk_rows == 1``); scope ``s`` of row ``r`` is
        global scope ``r * S_r + s``.
        """
        if self.pattern.scope.block.chunk_rows != 1:
            return None
        return self.cols[: self.scopes_per_chunk]

    @cached_property
    def col_span(self) -> Tensor:
        """``(S_c, 2)`` first and last column of each scope of the chunk template (all chunks share them)."""
        flat = self.template[1].flatten(1)
        return torch.stack([flat.min(1).values, flat.max(1).values], 1)

    # ---- gathers and projections -------------------------------------------------------------------------
    def gather(self, x: Tensor) -> Tensor:
        """``x (M, K)`` -> ``(S, B, e)`` values at every pattern element."""
        return x[self.rows, self.cols]

    def block_scores(self, elem: Tensor) -> Tensor:
        """Sum an elementwise score ``(M, K)`` over each block: ``(S, B)``."""
        return self.gather(elem).sum(-1)

    def keep_top(self, block_score: Tensor) -> Tensor:
        """Keep the ``nnz`` highest-scoring blocks of every scope: ``(S, B)`` bool (True = kept), ties to the lower
        block index (:func:`top_mask`)."""
        return top_mask(block_score, self.nnz)

    def mask_from_keep(self, keep: Tensor) -> Tensor:
        """``(S, B)`` block decisions -> ``(M, K)`` element mask (True = kept)."""
        mask = torch.zeros(self.num_rows, self.num_cols, dtype=torch.bool, device=self.device)
        mask[self.rows, self.cols] = keep.unsqueeze(-1).expand_as(self.rows)
        return mask

    def project(self, elem_score: Tensor) -> Tensor:
        """Mask keeping, per scope, the ``nnz`` blocks of highest summed elementwise score ``(M, K)``."""
        return self.mask_from_keep(self.keep_top(self.block_scores(elem_score)))

    def keep_of_mask(self, mask: Tensor) -> Tensor:
        """``(M, K)`` mask -> ``(S, B)`` block decisions (a block counts as kept if all its elements are)."""
        return self.gather(mask).all(-1)


def check_mask(mask: Tensor, pattern: "str | Pattern | Layout") -> None:
    """Raise :class:`PatternError` unless ``mask (M, K)`` (True = kept) satisfies ``pattern`` exactly.

    Exactly: every block is all kept or all pruned, and every scope keeps exactly ``nnz`` blocks.
    """
    if mask.dim() != 2:
        raise PatternError(f"mask must be 2-D (M, K), got shape {tuple(mask.shape)}.")
    if isinstance(pattern, Layout):
        layout = pattern
    else:
        layout = get_pattern(pattern).resolve(*mask.shape, device=mask.device)
    g = layout.gather(mask.bool())  # (S, B, e)
    mixed = (g.any(-1) != g.all(-1)).sum().item()
    if mixed:
        raise PatternError(f"{mixed} blocks are partly kept and partly pruned under pattern {layout.pattern.name!r}.")
    kept = g.all(-1).sum(-1)
    bad = (kept != layout.nnz).nonzero()
    if len(bad):
        s = bad[0, 0].item()
        raise PatternError(
            f"{len(bad)} scopes of pattern {layout.pattern.name!r} do not keep exactly {layout.nnz} blocks "
            f"(scope {s} keeps {kept[s].item()})."
        )
