"""``y = x Wᵀ (+ b)`` with a compact 2:4 ``W``: Triton kernel + wrapper + torch reference.

The compact weight (:mod:`sparsekit.compact`): ``values (M, K/2)`` 16-bit, read here as ``(M, K/4)`` 32-bit
words (one word = the two kept values of one group of 4 columns, low half first), and ``meta (M, K/8) uint8``
(one byte = the positions of two groups, a nibble ``i0 | i1 << 2`` per group, ``i0 < i1``).

One program owns ``BLOCK_M`` output rows, ``BLOCK_N`` tokens and a ``1/SPLIT_K`` slice of ``K``. Per tile of
``BLOCK_K`` columns it loads ``BLOCK_M × BLOCK_K/4`` words and ``BLOCK_M × BLOCK_K/8`` bytes once (contiguous
vector loads: 56.25 % of the dense bytes), splits each byte into its two nibbles with one ``tl.join``, and then

- ``USE_DOT`` (2–16 tokens, prefill): rebuilds the dense 16-bit tile in registers by selecting, for each column
  ``c`` of a group, the low value (``i0 == c``), the high value (``i1 == c``) or 0 — done on the raw 16-bit
  patterns, so it is exact for fp16 and bf16 alike — interleaves the four columns with ``tl.join`` and feeds
  it with the ``x`` tile (staged in shared memory by Triton) to ``tl.dot`` (tensor cores, float32 accumulator);
- otherwise (one token per program): splits the ``x`` tile into its four group columns ``x0..x3`` and picks,
  per kept value, ``x[4g + i]`` with two selects, then one fused multiply-add in float32 — a gather from
  registers, no tensor cores, no padding of the token dimension to 16.

A third variant, ``pairs`` (:func:`_sparse24_pairs_kernel`, 1–16 tokens on CUDA cores), reads the values as
int64 words aligned with the position bytes (one word and one byte = eight columns) and ``x`` likewise, all in
one register layout, and prefetches the next tile. With ``SPLIT_K > 1`` the programs add float32 partial sums atomically (the bias once, by slice 0) and the wrapper
casts; this fills the 132 SMs of an H200 when ``M / BLOCK_M`` is small. :func:`tune` times a list of
:class:`Config` on the device and keeps the fastest per ``(M, K, token bucket, dtype)``; :func:`choose_prefill`
decides between the kernel and cuBLAS on the rebuilt dense weight for prefill-sized inputs.

The reference is :func:`sparse24_reference` (unpack to dense, ``F.linear``), used on CPU and by the tests.
Importing :mod:`sparsekit` or :mod:`sparsekit.compact` does not import this module (``Sparse24Linear`` imports it
in its CUDA forward), so neither imports Triton or initialises CUDA.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsekit.kernels.pack24 import unpack_24
from sparsekit.errors import InputError

try:  # Triton is optional (absent on CPU-only installs); this module is imported only by a CUDA forward
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU CI
    triton = None

__all__ = [
    "MAX_DECODE_TOKENS",
    "Config",
    "DECODE_CONFIGS",
    "PREFILL_CONFIGS",
    "sparse24_reference",
    "sparse24_linear",
    "launch",
    "unpack",
    "tune",
    "choose_prefill",
]

log = logging.getLogger(__name__)

MAX_DECODE_TOKENS = 16  # up to this many tokens the decode configs apply; beyond, Sparse24Linear.prefill decides


@dataclass(frozen=True)
class Config:
    """One launch configuration: ``pairs`` is the CUDA-core pairs-of-groups variant (any ``block_n``); else
    ``use_dot`` the tensor-core variant (``expand``: its tile loaded column by column rather than rebuilt with
    joins), or with ``block_n == 1`` the one-token gather variant."""

    block_m: int
    block_k: int
    block_n: int = 16
    split_k: int = 1
    use_dot: bool = True
    num_warps: int = 4
    num_stages: int = 3
    pairs: bool = False
    expand: bool = False


def _decode_configs() -> list[Config]:
    """Candidates for 1–16 tokens; :func:`tune` times those that fit the token count. Bytes: a row tile of
    ``BLOCK_K`` columns is ``BLOCK_K · 9/8`` bytes of values + positions, 56.25 % of dense.

    - gather (one token; 16–32 words per thread per tile; the fastest of the first H200 run) with split-K 1, 2;
    - pairs (CUDA cores; ``block_n`` = the token bucket 1..16, so each weight byte is loaded once for all the
      tokens; per-thread accumulator ``block_m · block_n · block_k/8 / threads`` kept at 8–64 registers; small
      row tiles so that ``M / block_m`` gives several waves of 132 SMs and many loads in flight), split-K 1, 2;
    - tensor cores (``block_n`` 16), rebuilt with joins or expanded column by column, split-K 1, 2, 4.
    """
    cfgs = [Config(bm, bk, 1, sk, False, nw, 3)
            for bm, bk, nw in ((8, 1024, 4), (8, 2048, 8), (16, 2048, 8), (32, 512, 8)) for sk in (1, 2)]
    pairs = {1: ((4, 1024, 4), (4, 2048, 4), (8, 1024, 4), (8, 2048, 8), (16, 1024, 8), (16, 512, 4), (32, 512, 8)),
             2: ((4, 1024, 4), (8, 512, 4), (8, 1024, 8), (16, 512, 8)),
             4: ((4, 512, 4), (8, 256, 4), (8, 512, 8), (16, 256, 8)),
             8: ((2, 512, 4), (4, 256, 4), (8, 128, 4), (8, 256, 8)),
             16: ((2, 256, 4), (4, 128, 4), (4, 256, 8), (8, 128, 8))}
    cfgs += [Config(bm, bk, bn, sk, False, nw, 3, pairs=True)
             for bn, shapes in pairs.items() for bm, bk, nw in shapes for sk in (1, 2)]
    cfgs += [Config(bm, bk, 16, sk, True, nw, ns, expand=ex)
             for bm, bk, nw, ns in ((32, 256, 4, 3), (64, 128, 4, 4), (128, 128, 8, 3))
             for sk in (1, 2, 4) for ex in (False, True)]
    return cfgs


DECODE_CONFIGS: tuple[Config, ...] = tuple(_decode_configs())
PREFILL_CONFIGS: tuple[Config, ...] = (
    Config(128, 64, 128, 1, True, 8, 3),
    Config(128, 64, 64, 1, True, 4, 4),
    Config(64, 64, 128, 1, True, 4, 4),
    Config(128, 128, 128, 1, True, 8, 3),
)
_TUNED: dict[tuple, Config] = {}


def sparse24_reference(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None) -> Tensor:
    """Reference ``x (N, K) @ unpack(values, meta)ᵀ + bias -> (N, M)``: bit-identical to the dense-with-zeros
    ``F.linear`` (it is that call)."""
    return F.linear(x, unpack_24(values, meta), bias)


if triton is not None:

    @triton.jit
    def _load_tile(V, P, rows, rmask, k0, K, stride_v, stride_p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """``(lo, hi, i0, i1)``, each (BM, BK/4): the raw 16-bit kept values of each group and their positions."""
        G: tl.constexpr = BLOCK_K // 4  # groups of 4 columns per tile
        H: tl.constexpr = BLOCK_K // 8  # position bytes per tile row
        g = k0 // 4 + tl.arange(0, G)  # (G,) global group index
        w = tl.load(V + rows[:, None] * stride_v + g[None, :], mask=rmask[:, None] & (g < K // 4)[None, :],
                    other=0)  # (BM, G) int32: two kept 16-bit values per group
        hb = k0 // 8 + tl.arange(0, H)  # (H,)
        byte = tl.load(P + rows[:, None] * stride_p + hb[None, :],
                       mask=rmask[:, None] & (hb < K // 8)[None, :], other=0).to(tl.int32)  # (BM, H)
        nib = tl.reshape(tl.join(byte & 15, byte >> 4), (BLOCK_M, G))  # (BM, G) group g = 2h + t
        lo = w.to(tl.int16)  # raw 16-bit patterns, low half = first kept value
        hi = (w >> 16).to(tl.int16)
        return lo, hi, nib & 3, nib >> 2  # i0 in 0..2 < i1 in 1..3

    @triton.jit
    def _densify(lo, hi, i0, i1, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """The dense (BM, BK) int16 tile: column c of a group is lo if i0 == c, hi if i1 == c, else 0."""
        z = tl.zeros_like(lo)
        d0 = tl.where(i0 == 0, lo, z)
        d1 = tl.where(i0 == 1, lo, tl.where(i1 == 1, hi, z))
        d2 = tl.where(i0 == 2, lo, tl.where(i1 == 2, hi, z))
        d3 = tl.where(i1 == 3, hi, z)
        # join(join(d0, d2), join(d1, d3))[m, g, j, i] = d_{2j+i}: columns 4g + 0..3 in order
        return tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BLOCK_M, BLOCK_K))

    @triton.jit
    def _expand_tile(V, P, rows, rmask, k0, K, stride_v, stride_p, BLOCK_K: tl.constexpr):
        """The dense (BM, BK) int16 tile loaded column by column: column ``k`` reads word ``k // 4`` and byte
        ``k // 8`` (repeated addresses, served by L1), so the tile is born in the layout ``tl.dot`` takes — no
        join, no reshape."""
        kk = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        m2 = rmask[:, None] & (kk < K)[None, :]
        w = tl.load(V + rows[:, None] * stride_v + (kk // 4)[None, :], mask=m2, other=0)  # (BM, BK) int32
        byte = tl.load(P + rows[:, None] * stride_p + (kk // 8)[None, :], mask=m2, other=0).to(tl.int32)
        nib = byte >> (4 * ((kk // 4) & 1))[None, :]  # (BM, BK): this group's code in the low 4 bits
        c = (kk % 4)[None, :]  # (1, BK) column within the group
        z = tl.zeros_like(w)
        return tl.where((nib & 3) == c, w, tl.where(((nib >> 2) & 3) == c, w >> 16, z)).to(tl.int16)

    @triton.jit
    def _unpack24_kernel(V, P, D, M, K, stride_v, stride_p, stride_d, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        rmask = rows < M
        k0 = tl.program_id(1) * BLOCK_K
        lo, hi, i0, i1 = _load_tile(V, P, rows, rmask, k0, K, stride_v, stride_p, BLOCK_M, BLOCK_K)
        wd = _densify(lo, hi, i0, i1, BLOCK_M, BLOCK_K).to(D.dtype.element_ty, bitcast=True)  # (BM, BK)
        kk = k0 + tl.arange(0, BLOCK_K)
        tl.store(D + rows[:, None] * stride_d + kk[None, :], wd, mask=rmask[:, None] & (kk < K)[None, :])

    @triton.jit
    def _program_tile(M, K, N, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                      SPLIT_K: tl.constexpr):
        """This program's rows ``(BM,)`` and tokens ``(BN,)`` with their masks, and its K slice ``[k_begin,
        k_end)``: grid ``(row tiles, SPLIT_K, token tiles)``, slices a whole number of ``BLOCK_K`` tiles."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        toks = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        k_chunk = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_begin = tl.program_id(1) * k_chunk
        return rows, rows < M, toks, toks < N, k_begin, tl.minimum(k_begin + k_chunk, K)

    @triton.jit(do_not_specialize=["N"])  # one binary for every token count
    def _sparse24_kernel(
        X, V, P, Bias, Y, M, K, N, stride_x, stride_v, stride_p, stride_y,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
        USE_DOT: tl.constexpr, HAS_BIAS: tl.constexpr, EXPAND: tl.constexpr,
    ):
        G: tl.constexpr = BLOCK_K // 4
        rows, rmask, toks, nmask, k_begin, k_end = _program_tile(M, K, N, BLOCK_M, BLOCK_K, BLOCK_N, SPLIT_K)
        if USE_DOT:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, G), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            if EXPAND:
                wd = _expand_tile(V, P, rows, rmask, k0, K, stride_v, stride_p, BLOCK_K).to(
                    X.dtype.element_ty, bitcast=True)  # (BM, BK)
            else:
                lo, hi, i0, i1 = _load_tile(V, P, rows, rmask, k0, K, stride_v, stride_p, BLOCK_M, BLOCK_K)  # (BM, G)
                if USE_DOT:
                    wd = _densify(lo, hi, i0, i1, BLOCK_M, BLOCK_K).to(X.dtype.element_ty, bitcast=True)  # (BM, BK)
            if USE_DOT:
                xt = tl.load(X + toks[None, :] * stride_x + kk[:, None], mask=(kk < K)[:, None] & nmask[None, :],
                             other=0.0)  # (BK, BN)
                acc = tl.dot(wd, xt, acc)
            else:
                xr = tl.load(X + tl.program_id(2) * stride_x + kk, mask=kk < K, other=0.0).to(tl.float32)  # (BK,)
                xa, xb = tl.split(tl.reshape(xr, (G, 2, 2)))  # xa[g, t] = x[4g + 2t], xb[g, t] = x[4g + 2t + 1]
                x0, x2 = tl.split(xa)  # (G,) each
                x1, x3 = tl.split(xb)
                xs0 = tl.where(i0 == 0, x0[None, :], tl.where(i0 == 1, x1[None, :], x2[None, :]))  # (BM, G)
                xs1 = tl.where(i1 == 3, x3[None, :], tl.where(i1 == 2, x2[None, :], x1[None, :]))
                lo_f = lo.to(X.dtype.element_ty, bitcast=True).to(tl.float32)
                hi_f = hi.to(X.dtype.element_ty, bitcast=True).to(tl.float32)
                acc += lo_f * xs0 + hi_f * xs1
        if USE_DOT:
            out = acc  # (BM, BN)
        else:
            out = tl.sum(acc, axis=1)[:, None]  # (BM, 1): BLOCK_N == 1
        _epilogue(Y, Bias, out, rows, rmask, toks, nmask, stride_y, SPLIT_K, HAS_BIAS)

    @triton.jit
    def _epilogue(Y, Bias, out, rows, rmask, toks, nmask, stride_y, SPLIT_K: tl.constexpr,
                  HAS_BIAS: tl.constexpr):
        """Add the bias (slice 0 only) to ``out (BM, BN)`` float32 and store it (``SPLIT_K == 1``) or add it
        atomically to the float32 output."""
        if HAS_BIAS:
            b = tl.load(Bias + rows, mask=rmask, other=0.0).to(tl.float32) * (tl.program_id(1) == 0).to(tl.float32)  # (BM,)
            out += b[:, None]
        ptrs = Y + toks[None, :] * stride_y + rows[:, None]  # (BM, BN)
        omask = rmask[:, None] & nmask[None, :]
        if SPLIT_K == 1:
            tl.store(ptrs, out.to(Y.dtype.element_ty), mask=omask)
        else:
            tl.atomic_add(ptrs, out, mask=omask)

    @triton.jit
    def _half(w, HIGH: tl.constexpr, DT: tl.constexpr):
        """The low (or high) 16-bit value of int32 words ``w`` as float32 (``DT``: float16 or bfloat16)."""
        h = (w >> 16) if HIGH else w
        return h.to(tl.int16).to(DT, bitcast=True).to(tl.float32)

    @triton.jit
    def _pick(i, x0, x1, x2, x3, FIRST: tl.constexpr):
        """``x_i`` for codes ``i (BM, 1, H)`` and candidates ``x0..x3 (1, BN, H)`` -> (BM, BN, H). The first kept
        value of a group sits at 0..2, the second at 1..3: two selects each."""
        if FIRST:
            return tl.where(i == 0, x0, tl.where(i == 1, x1, x2))
        return tl.where(i == 3, x3, tl.where(i == 2, x2, x1))

    @triton.jit
    def _load_pairs(V, P, rows, rmask, k0, k_end, K, stride_v, stride_p, H: tl.constexpr):
        """Words ``(BM, 1, H) int64`` and position bytes ``(BM, 1, H) int32`` of columns ``k0 .. k0 + 8H`` if
        ``k0 < k_end`` (else zeros, no traffic). Born 3-D, in the layout of the ``(BM, BN, H)`` products (no
        layout conversion through shared memory); the slice test is a scalar choice of the bound (K/8 or 0), so the
        mask stays constant over runs of columns and the loads stay 16-byte vectors."""
        hh = k0 // 8 + tl.arange(0, H)  # (H,)
        h_stop = tl.where(k0 < k_end, K // 8, 0)  # scalar: past the slice, nothing is loaded
        m3 = rmask[:, None, None] & (hh < h_stop)[None, None, :]  # (BM, 1, H)
        w = tl.load(V + rows[:, None, None] * stride_v + hh[None, None, :], mask=m3, other=0)
        b = tl.load(P + rows[:, None, None] * stride_p + hh[None, None, :], mask=m3, other=0).to(tl.int32)
        return w, b

    @triton.jit(do_not_specialize=["N"])
    def _sparse24_pairs_kernel(
        X, V, P, Bias, Y, M, K, N, stride_x, stride_v, stride_p, stride_y,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
        HAS_BIAS: tl.constexpr,
    ):
        """CUDA-core variant for 1–16 tokens, laid out by *pairs of groups*: ``V`` is the values read as int64
        (one word = the 4 kept values of columns ``8h .. 8h+7``), so word ``h`` and position byte ``h`` share one
        index and one register layout (no join, no reshape). ``x`` columns ``8h .. 8h+7`` are two int64 words
        per ``(row, token, h)``, in the same layout; each kept value picks its ``x`` per token with two selects whose predicates are computed once
        per weight, then one FMA per token: every weight byte is loaded once for the ``BLOCK_N`` tokens."""
        H: tl.constexpr = BLOCK_K // 8  # pairs of groups (= position bytes = int64 words) per tile row
        DT: tl.constexpr = Bias.dtype.element_ty  # x's 16-bit dtype (Bias is x itself when there is no bias)
        rows, rmask, toks, nmask, k_begin, k_end = _program_tile(M, K, N, BLOCK_M, BLOCK_K, BLOCK_N, SPLIT_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N, H), dtype=tl.float32)
        w_nx, b_nx = _load_pairs(V, P, rows, rmask, k_begin, k_end, K, stride_v, stride_p, H)
        for k0 in range(k_begin, k_end, BLOCK_K):
            w, b = w_nx, b_nx  # (BM, 1, H) int64 values, int32 position bytes
            # the next tile's loads are issued before this tile's arithmetic: two tiles of bytes in flight
            w_nx, b_nx = _load_pairs(V, P, rows, rmask, k0 + BLOCK_K, k_end, K, stride_v, stride_p, H)
            hh = k0 // 8 + tl.arange(0, H)  # (H,) global pair index
            hmask = hh < K // 8  # a tile never straddles two K slices (k_chunk is a multiple of BLOCK_K)
            wl = w.to(tl.int32)  # even group: values of columns 8h .. 8h+3
            wh = (w >> 32).to(tl.int32)  # odd group: columns 8h+4 .. 8h+7
            # x columns 8h .. 8h+7 as two int64 words per (row, token, h): same shape, hence same register layout,
            # as the weights (the row axis only repeats addresses, served by L1), so nothing is converted
            xp = X + toks[None, :, None] * stride_x + 2 * hh[None, None, :] + 0 * rows[:, None, None]  # (BM, BN, H)
            xm = nmask[None, :, None] & hmask[None, None, :] & rmask[:, None, None]
            xa = tl.load(xp, mask=xm, other=0)  # int64: x[8h .. 8h+3]
            xb = tl.load(xp + 1, mask=xm, other=0)  # x[8h+4 .. 8h+7]
            x0, x1 = _half(xa.to(tl.int32), False, DT), _half(xa.to(tl.int32), True, DT)
            x2, x3 = _half((xa >> 32).to(tl.int32), False, DT), _half((xa >> 32).to(tl.int32), True, DT)
            x4, x5 = _half(xb.to(tl.int32), False, DT), _half(xb.to(tl.int32), True, DT)
            x6, x7 = _half((xb >> 32).to(tl.int32), False, DT), _half((xb >> 32).to(tl.int32), True, DT)
            acc += _half(wl, False, DT) * _pick(b & 3, x0, x1, x2, x3, True)
            acc += _half(wl, True, DT) * _pick((b >> 2) & 3, x0, x1, x2, x3, False)
            acc += _half(wh, False, DT) * _pick((b >> 4) & 3, x4, x5, x6, x7, True)
            acc += _half(wh, True, DT) * _pick(b >> 6, x4, x5, x6, x7, False)
        _epilogue(Y, Bias, tl.sum(acc, axis=2), rows, rmask, toks, nmask, stride_y, SPLIT_K, HAS_BIAS)


def _check(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None) -> None:
    if x.dim() != 2 or x.shape[1] != 2 * values.shape[1] or x.dtype != values.dtype:
        raise InputError(f"x must be (N, {2 * values.shape[1]}) {values.dtype}, got {tuple(x.shape)} {x.dtype}.")
    if bias is not None and bias.dtype != x.dtype:
        raise InputError(f"bias must be {x.dtype} like x, got {bias.dtype}.")
    if values.dtype not in (torch.float16, torch.bfloat16) or x.shape[1] % 8:
        raise InputError("the sparse24 kernel needs float16/bfloat16 values and K % 8 == 0; use the reference.")


def launch(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None, cfg: Config) -> Tensor:
    """Run the kernel with ``cfg``: ``x (N, K)``, ``values (M, K/2)``, ``meta (M, K/8)`` -> ``y (N, M)``."""
    _check(x, values, meta, bias)
    if cfg.expand and not cfg.use_dot:
        raise InputError("expand=True rebuilds the tile for tl.dot: it needs use_dot=True.")
    if not cfg.use_dot and not cfg.pairs and cfg.block_n != 1:
        raise InputError("the gather variant (use_dot=False) handles one token per program: block_n must be 1.")
    x = x.contiguous()
    N, K = x.shape
    M = values.shape[0]
    grid = (triton_cdiv(M, cfg.block_m), cfg.split_k, triton_cdiv(N, cfg.block_n))
    y = (torch.empty if cfg.split_k == 1 else torch.zeros)(
        N, M, dtype=x.dtype if cfg.split_k == 1 else torch.float32, device=x.device
    )  # (N, M)
    common = dict(BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, SPLIT_K=cfg.split_k,
                  HAS_BIAS=bias is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.pairs:
        v64 = values.view(torch.int64)  # (M, K/8): the 4 kept values of 8 columns per word
        x64 = (x if x.data_ptr() % 8 == 0 else x.clone()).view(torch.int64)  # (N, K/4): 4 columns per word
        _sparse24_pairs_kernel[grid](
            x64, v64, meta, bias if bias is not None else x, y, M, K, N, x64.stride(0), v64.stride(0), meta.stride(0),
            y.stride(0), **common,
        )
    else:
        v32 = values.view(torch.int32)  # (M, K/4): one word per group
        _sparse24_kernel[grid](
            x, v32, meta, bias if bias is not None else x, y, M, K, N, x.stride(0), v32.stride(0), meta.stride(0),
            y.stride(0), USE_DOT=cfg.use_dot, EXPAND=cfg.expand, **common,
        )
    return y if cfg.split_k == 1 else y.to(x.dtype)


def unpack(values: Tensor, meta: Tensor) -> Tensor:
    """The dense ``W (M, K)``: one Triton launch on CUDA for 16-bit values (the prefill path ``"rebuild"``),
    :func:`sparsekit.kernels.pack24.unpack_24` elsewhere (same result, bit for bit)."""
    if not values.is_cuda or values.dtype not in (torch.float16, torch.bfloat16):
        return unpack_24(values, meta)
    M, K = values.shape[0], 2 * values.shape[1]
    v32 = values.view(torch.int32)  # (M, K/4)
    dense = torch.empty(M, K, dtype=values.dtype, device=values.device)
    bm, bk = 32, 256
    _unpack24_kernel[(triton_cdiv(M, bm), triton_cdiv(K, bk))](
        v32, meta, dense, M, K, v32.stride(0), meta.stride(0), dense.stride(0), BLOCK_M=bm, BLOCK_K=bk, num_warps=4
    )
    return dense


def triton_cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints (Triton's ``cdiv`` without importing Triton)."""
    return -(-a // b)


def _bucket(n: int) -> int:
    """Token bucket of the tuning cache: 1, 2, 4, 8, 16, then one bucket for every prefill size."""
    return 1 << (n - 1).bit_length() if n <= MAX_DECODE_TOKENS else MAX_DECODE_TOKENS + 1


def _key(values: Tensor, n: int) -> tuple:
    return (values.shape[0], 2 * values.shape[1], _bucket(n), values.dtype, values.device.type)


def default_config(M: int, N: int) -> Config:
    """Untuned choice: the gather variant for one token, else tensor cores; split K until ≥ ~2 waves of 132 SMs."""
    if N > MAX_DECODE_TOKENS:
        return PREFILL_CONFIGS[0]
    bm = 32 if N == 1 else 64
    split = 1
    while triton_cdiv(M, bm) * split < 264 and split < 4:
        split *= 2
    return Config(bm, 256, 1, split, False, 4, 3) if N == 1 else Config(bm, 256, 16, split, True, 8, 3)


def sparse24_linear(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y (N, M) = x (N, K) Wᵀ + b``: the kernel on CUDA (tuned config if :func:`tune` ran for this shape and
    token bucket, else :func:`default_config`), the reference elsewhere."""
    if not x.is_cuda:
        return sparse24_reference(x, values, meta, bias)
    cfg = _TUNED.get(_key(values, x.shape[0])) or default_config(values.shape[0], x.shape[0])
    return launch(x, values, meta, bias, cfg)


def _cold_copies(values: Tensor, meta: Tensor, l2_multiple: int = 4, cap: int = 64) -> list[tuple[Tensor, Tensor]]:
    """``(values, meta)`` and enough clones that cycling through them streams ≥ ``l2_multiple`` × the device's L2
    per cycle: each call then reads its weight from HBM, as in a model whose weights dwarf the L2."""
    l2 = getattr(torch.cuda.get_device_properties(values.device), "L2_cache_size", 0) if values.is_cuda else 0
    n = min(cap, max(1, -(-l2_multiple * l2 // (values.nbytes + meta.nbytes))))
    return [(values, meta)] + [(values.clone(), meta.clone()) for _ in range(n - 1)]


def tune(values: Tensor, meta: Tensor, n_tokens: int, configs: tuple[Config, ...] | None = None,
         rep_ms: int = 20, bench: Callable | None = None) -> tuple[Config, list[dict[str, Any]]]:
    """Time each config (``triton.testing.do_bench``, median) on random ``x (n_tokens, K)``, cycling through
    copies of the weight so that it comes from HBM (:func:`_cold_copies`: a weight that sits in L2 would favour
    other configs), check it against the reference (error ≤ 2× that of the dense 16-bit matmul), cache and
    return the fastest valid one, with every row ``{config, us, err, ok}``."""
    from triton.testing import do_bench

    bench = bench or (lambda f: do_bench(f, warmup=5, rep=rep_ms, return_mode="median"))
    copies = _cold_copies(values, meta)
    turn = [0]

    def cold_launch(cfg: Config) -> Tensor:
        v, m = copies[turn[0] % len(copies)]
        turn[0] += 1
        return launch(x, v, m, None, cfg)

    if configs is None:
        configs = DECODE_CONFIGS if n_tokens <= MAX_DECODE_TOKENS else PREFILL_CONFIGS
    K = 2 * values.shape[1]
    x = torch.randn(n_tokens, K, device=values.device, dtype=values.dtype)
    dense = unpack_24(values, meta)  # (M, K)
    ref = x.double() @ dense.double().T  # (N, M) float64 reference
    dense_err = (F.linear(x, dense).double() - ref).abs().max().item()
    rows, best = [], None
    for cfg in configs:
        if cfg.pairs and cfg.block_n != _bucket(n_tokens):  # one token tile per bucket: no weight re-read
            continue
        if not cfg.use_dot and not cfg.pairs and n_tokens > 4:  # one program per token: not beyond a few tokens
            continue
        try:
            y = launch(x, values, meta, None, cfg)
            err = (y.double() - ref).abs().max().item()
            us = 1e3 * bench(lambda: cold_launch(cfg))
        except Exception as e:  # noqa: BLE001 - a config the compiler rejects (e.g. shared memory) is skipped
            log.info("config %s failed: %s", cfg, e)
            rows.append({"config": asdict(cfg), "us": None, "err": None, "ok": False, "reason": str(e)[:200]})
            continue
        ok = err <= 2 * dense_err  # flash-attention's rule
        rows.append({"config": asdict(cfg), "us": us, "err": err, "ok": ok})
        if ok and (best is None or us < best[1]):
            best = (cfg, us)
    if best is None:
        raise InputError(f"no sparse24 config ran correctly for {tuple(values.shape)} x {n_tokens} tokens.")
    _TUNED[_key(values, n_tokens)] = best[0]
    return best[0], rows


def choose_prefill(values: Tensor, meta: Tensor, tokens: tuple[int, ...] = (512, 2048), tolerance: float = 0.03,
                   allow_dense_cache: bool = False, rep_ms: int = 30) -> dict[str, Any]:
    """Pick the prefill path of one compact shape on its device: ``"rebuild"`` (unpack + cuBLAS) or ``"kernel"``
    (best of :data:`PREFILL_CONFIGS`), by the worst ratio to cuBLAS on the dense weight over ``tokens``; if that
    exceeds ``1 + tolerance`` and ``allow_dense_cache``, ``"dense"`` (a cached dense weight)."""
    from triton.testing import do_bench

    def bench(f):
        return 1e3 * do_bench(f, warmup=5, rep=rep_ms, return_mode="median")

    dense = unpack_24(values, meta)
    K = dense.shape[1]
    times: dict[str, list[float]] = {"dense": [], "rebuild": [], "kernel": []}
    for t in tokens:
        x = torch.randn(t, K, device=values.device, dtype=values.dtype)
        times["dense"].append(bench(lambda: F.linear(x, dense)))
        times["rebuild"].append(bench(lambda: F.linear(x, unpack(values, meta))))
        cfg, _ = tune(values, meta, t, PREFILL_CONFIGS, rep_ms=rep_ms)
        times["kernel"].append(bench(lambda: launch(x, values, meta, None, cfg)))
    ratio = {m: max(a / d for a, d in zip(times[m], times["dense"])) for m in ("rebuild", "kernel")}
    mode = min(ratio, key=ratio.get)
    if ratio[mode] > 1 + tolerance and allow_dense_cache:
        mode = "dense"
    return {"mode": mode, "tokens": list(tokens), "us": times, "ratio_to_dense": ratio}
