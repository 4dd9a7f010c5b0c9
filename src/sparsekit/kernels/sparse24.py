"""``y = x Wᵀ (+ b)`` with a compact 2:4 ``W``: Triton kernels + wrapper + tuner + torch reference.

The compact weight (:mod:`sparsekit.compact`): ``values (M, K/2)`` 16-bit and ``meta (M, K/8) uint8`` (byte ``h``
= the positions of the four kept values of columns ``8h .. 8h+7``, a nibble ``i0 | i1 << 2`` per group of four
columns, ``i0 < i1``). Four kernel kinds (:class:`Config` ``kind``), all timed by :func:`tune`:

- ``"stream"`` (CUDA cores; 1, 2 or 4 tokens per program): the values read as int64 words, word ``h`` = the four
  kept values of columns ``8h .. 8h+7``, so word ``h`` and position byte ``h`` share one index and, as two loads
  of one tile shape, one register layout (Triton's coalescing pass gives the loads of a shape one layout). ``x``
  of those columns is two int64 words per token, shared by the tile's rows; each kept value picks its ``x`` by its
  2-bit position with two selects, then one float32 FMA per token;
- ``"stream_dot"`` (tensor cores, any of 1–16 tokens in one 16-wide tile): the same tiles; the 8 columns of each
  word rebuilt in registers (per column: the kept value whose position it is, or 0, selected on the raw 16-bit
  patterns, so exact for fp16 and bf16), interleaved into the dense ``(BLOCK_M, BLOCK_K)`` tile and fed with the
  ``x`` tile to ``tl.dot`` (float32 accumulator);
- ``"gather"`` (one token per program) and ``"dot"`` (tensor cores; also the prefill kernel): the first kernels,
  32-bit words and nibbles split with ``tl.join``, kept as tuner candidates so that the newer kinds can never
  make a shape slower than it was.

Both stream kinds run one flat loop over a sequence of tiles — a *unit* is ``BLOCK_M`` rows × one ``1/SPLIT_K``
slice of K, program ``p`` of ``P`` runs units ``p, p + P, ...`` — under ``tl.range(num_stages=S)``: Triton's
software pipeliner then issues every load ``S − 1`` tiles ahead by ``cp.async`` into shared memory, so a program
keeps ``(S − 1) · BLOCK_M · BLOCK_K · 9/8`` bytes in flight (an H200 needs ≈ 30–40 KB in flight per SM to reach its
HBM bandwidth: Little's law, ≈ 4.8 TB/s × ≈ 1 µs / 132 SMs), and reads ``x`` back from shared memory directly in
the layout of the products (no layout conversion in the loop). ``per_sm > 0``: a persistent grid of ``per_sm``
programs per SM (capped by the occupancy of the compiled kernel), so no wave ends with idle SMs. The position-byte
mask is ``h < K8`` with ``K8 = K / 8`` a kernel argument, which Triton specialises as a multiple of 16: the byte
loads are then wide and pipelined (the first kernels compute ``K // 8`` in the kernel; their byte load, seen in
their TTGIR, stays synchronous: one memory latency per iteration).

Positions decoded in registers, float32 accumulation everywhere. ``SPLIT_K > 1``: each slice writes float32
partial sums to a workspace ``(SPLIT_K, N, M)`` and :func:`_splitk_reduce_kernel` adds them in slice order (plus the
bias) and casts: deterministic (no atomics), so a result is reproducible bit for bit.

:func:`tune` times the candidates for one ``(M, K, token bucket, dtype)`` as a decoding model runs them: back to
back in a CUDA graph (:class:`GraphTimer`: no launch overhead, no L2 flush — a flush leaves dirty lines that are
written back during the timed kernel), each call reading another copy of the weight (together ≥ 4× the L2, so
every call reads its weight from HBM); each candidate is checked against the float64 reference before it is timed,
and the few fastest are compared over ≥ 5 interleaved rounds (median). :data:`DECODE_TABLE` holds measured winners
for the Llama-3-8B shapes, used without tuning. :func:`choose_prefill` decides between the kernel and cuBLAS for
prefill-sized inputs.

The reference is :func:`sparse24_reference` (unpack to dense, ``F.linear``), used on CPU and by the tests.
Importing :mod:`sparsekit` or :mod:`sparsekit.compact` does not import this module (``Sparse24Linear`` imports it
in its CUDA forward), so neither imports Triton or initialises CUDA.
"""

from __future__ import annotations

import logging
import statistics
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
    "KINDS",
    "Config",
    "DECODE_CONFIGS",
    "PREFILL_CONFIGS",
    "DECODE_TABLE",
    "GraphTimer",
    "cold_copies",
    "sparse24_reference",
    "sparse24_linear",
    "launch",
    "unpack",
    "default_config",
    "token_bucket",
    "tune",
    "choose_prefill",
]

log = logging.getLogger(__name__)

MAX_DECODE_TOKENS = 16  # up to this many tokens the decode configs apply; beyond, Sparse24Linear.prefill decides
KINDS = ("stream", "stream_dot", "gather", "dot")
_BLOCK_N = {"stream": (1, 2, 4), "gather": (1,)}  # token tiles each CUDA-core kind supports; tensor cores: ≥ 16


@dataclass(frozen=True)
class Config:
    """One launch configuration. ``kind``: one of :data:`KINDS`; ``block_m`` rows × ``block_k`` columns per tile,
    ``block_n`` tokens per program; ``split_k`` K slices (deterministic reduction); ``num_stages``: pipelining
    depth; ``per_sm``: programs per SM of a persistent grid for ``stream*`` kinds (0: one program per unit)."""

    kind: str
    block_m: int
    block_k: int
    block_n: int = 1
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    per_sm: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"sparse24 kind {self.kind!r} unknown; use one of {KINDS}.")
        ok_n = _BLOCK_N.get(self.kind)
        if (ok_n is not None and self.block_n not in ok_n) or (ok_n is None and self.block_n < 16):
            raise InputError(f"kind {self.kind!r} takes block_n in {ok_n or '16, 32, ...'}, got {self.block_n}.")
        if self.per_sm and not self.kind.startswith("stream"):
            raise InputError("per_sm (a persistent grid) applies to the stream kinds only.")


def _decode_configs() -> list[Config]:
    """Candidates for 1–16 tokens (:func:`tune` times those that fit the token bucket). Each distinct kernel
    (everything but ``per_sm``) is one compilation (~1 s), so the list holds ~20 of them; ``per_sm`` only changes
    the grid: 0 (a program per unit, the hardware refills SMs as programs end) or a persistent grid.

    Cross-compiled for sm_90 with Triton 3.9 (registers; SASS instructions of the loop per (row, word) = 9 weight
    bytes): stream 1 token 46–75 registers, 53–67 instructions; 2 tokens 96, 75; 4 tokens 142–144, 35 per token;
    stream_dot 60–162 registers, 66–96 instructions (the densify; the first ``dot`` kernel: 71). Bytes in flight
    per program ≈ ``(num_stages − 1) · block_m · block_k · 9/8``: 13–40 KB, with 2–6 programs per SM.
    """
    stream = {1: ((4, 1024, 4, 4, 1), (8, 1024, 4, 4, 1), (8, 2048, 8, 3, 1), (16, 512, 4, 4, 1), (8, 1024, 4, 4, 2)),
              2: ((4, 1024, 4, 4, 1), (8, 1024, 4, 4, 1)),
              4: ((4, 1024, 4, 4, 1), (8, 512, 4, 4, 1))}
    cfgs = [Config("stream", bm, bk, bn, sk, nw, ns, per_sm)
            for bn, shapes in stream.items() for bm, bk, nw, ns, sk in shapes for per_sm in (0, 4, 8)]
    cfgs += [Config("stream_dot", bm, bk, 16, sk, nw, ns, per_sm)
             for bm, bk, nw, ns, splits in ((64, 128, 4, 5, (1, 2, 4)), (128, 128, 8, 4, (1, 2)), (64, 256, 4, 3, (1,)))
             for sk in splits for per_sm in ((0, 2, 4) if sk == 1 else (0,))]
    # the first kernels' winners on the H200 (BENCHMARKS.md, issue 17), kept so that tuning never loses them
    cfgs += [Config("gather", 8, 1024, 1, 1, 4, 3), Config("gather", 8, 2048, 1, 1, 8, 3)]
    cfgs += [Config("dot", bm, bk, 16, sk, 4, ns) for bm, bk, ns, sk in
             ((32, 256, 3, 1), (32, 256, 3, 4), (64, 128, 4, 2), (64, 128, 4, 4))]
    return cfgs


DECODE_CONFIGS: tuple[Config, ...] = tuple(_decode_configs())
PREFILL_CONFIGS: tuple[Config, ...] = (
    Config("dot", 128, 64, 128, 1, 8, 3),
    Config("dot", 128, 64, 64, 1, 4, 4),
    Config("dot", 64, 64, 128, 1, 4, 4),
    Config("dot", 128, 128, 128, 1, 8, 3),
)


# (out, in, token bucket) -> the fastest config measured on an H200 in bf16, used without tuning: the winners of
# benchmarks/sparse24_gpu.py on an H200 (torch 2.11, triton 3.6, 2026-12-04; BENCHMARKS.md, issue 17), which prints
# this table from its own winners.
DECODE_TABLE: dict[tuple[int, int, int], Config] = {
    (4096, 4096, 1): Config("stream", 4, 1024, 1, 1, 4, 4, 4),
    (4096, 4096, 4): Config("stream_dot", 64, 128, 16, 4, 4, 5, 0),
    (4096, 4096, 16): Config("stream_dot", 64, 128, 16, 4, 4, 5, 0),
    (14336, 4096, 1): Config("stream", 4, 1024, 1, 1, 4, 4, 4),
    (14336, 4096, 4): Config("dot", 64, 128, 16, 4, 4, 4, 0),
    (14336, 4096, 16): Config("dot", 64, 128, 16, 4, 4, 4, 0),
    (4096, 14336, 1): Config("stream", 4, 1024, 1, 1, 4, 4, 4),
    (4096, 14336, 4): Config("stream_dot", 64, 128, 16, 4, 4, 5, 0),
    (4096, 14336, 16): Config("stream_dot", 64, 128, 16, 4, 4, 5, 0),
    (1024, 4096, 1): Config("stream", 4, 1024, 1, 1, 4, 4, 0),
    (1024, 4096, 4): Config("stream", 4, 1024, 4, 1, 4, 4, 0),
    (1024, 4096, 16): Config("dot", 32, 256, 16, 4, 4, 3, 0),
}
_TUNED: dict[tuple, Config] = {}
_OCCUPANCY: dict[tuple, int] = {}  # (config, dtype, has_bias) -> programs per SM the compiled kernel allows


def sparse24_reference(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None) -> Tensor:
    """Reference ``x (N, K) @ unpack(values, meta)ᵀ + bias -> (N, M)``: bit-identical to the dense-with-zeros
    ``F.linear`` (it is that call)."""
    return F.linear(x, unpack_24(values, meta), bias)


if triton is not None:

    # ------------------------------------------------------------------------------------ the first kernels
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
    def _unpack24_kernel(V, P, D, M, K, stride_v, stride_p, stride_d, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        rmask = rows < M
        k0 = tl.program_id(1) * BLOCK_K
        lo, hi, i0, i1 = _load_tile(V, P, rows, rmask, k0, K, stride_v, stride_p, BLOCK_M, BLOCK_K)
        wd = _densify(lo, hi, i0, i1, BLOCK_M, BLOCK_K).to(D.dtype.element_ty, bitcast=True)  # (BM, BK)
        kk = k0 + tl.arange(0, BLOCK_K)
        tl.store(D + rows[:, None] * stride_d + kk[None, :], wd, mask=rmask[:, None] & (kk < K)[None, :])

    @triton.jit
    def _epilogue(Y, Bias, out, rows, rmask, toks, nmask, s, N, stride_y, HAS_BIAS: tl.constexpr):
        """Store ``out (BM, BN)`` float32 (+ bias) at ``Y[s·N + tok, row]``: ``y (N, M)`` in its dtype when there is
        one K slice (``s == 0``), else the float32 workspace ``(SPLIT_K, N, M)`` (the bias then comes in the
        reduction, so ``HAS_BIAS`` is False here)."""
        if HAS_BIAS:
            out += tl.load(Bias + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
        ptrs = Y + (s * N + toks)[None, :] * stride_y + rows[:, None]  # (BM, BN)
        tl.store(ptrs, out.to(Y.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])

    @triton.jit(do_not_specialize=["N"])  # one binary for every token count
    def _sparse24_kernel(
        X, V, P, Bias, Y, M, K, N, stride_x, stride_v, stride_p, stride_y,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
        USE_DOT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):
        """Kinds ``"dot"`` (``USE_DOT``: the dense tile rebuilt with joins, ``tl.dot``) and ``"gather"`` (one token
        per program: ``x`` split into the four columns of each group, two selects per kept value, one FMA). Grid
        ``(row tiles, SPLIT_K, token tiles)``; each slice is a whole number of ``BLOCK_K`` tiles."""
        G: tl.constexpr = BLOCK_K // 4
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        rmask = rows < M
        toks = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        nmask = toks < N
        k_chunk = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_begin = tl.program_id(1) * k_chunk
        if USE_DOT:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, G), dtype=tl.float32)
        for k0 in range(k_begin, tl.minimum(k_begin + k_chunk, K), BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            lo, hi, i0, i1 = _load_tile(V, P, rows, rmask, k0, K, stride_v, stride_p, BLOCK_M, BLOCK_K)  # (BM, G)
            if USE_DOT:
                wd = _densify(lo, hi, i0, i1, BLOCK_M, BLOCK_K).to(X.dtype.element_ty, bitcast=True)  # (BM, BK)
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
        _epilogue(Y, Bias, out, rows, rmask, toks, nmask, tl.program_id(1), N, stride_y, HAS_BIAS)

    # ------------------------------------------------------------------------------------- the stream kinds
    @triton.jit
    def _half(w, HIGH: tl.constexpr, DT: tl.constexpr):
        """The low (or high) 16-bit value of int32 words ``w`` as float32 (``DT``: float16 or bfloat16; a bfloat16
        is the upper half of its float32, so one shift or mask is the exact conversion)."""
        if DT == tl.bfloat16:
            return ((w & -65536) if HIGH else (w << 16)).to(tl.float32, bitcast=True)
        h = (w >> 16) if HIGH else w
        return h.to(tl.int16).to(DT, bitcast=True).to(tl.float32)

    @triton.jit
    def _pick(i, x0, x1, x2, x3, FIRST: tl.constexpr):
        """``x_i`` for 2-bit codes ``i (BM, H)`` among ``x0..x3 (1, H)``: the first kept value of a group sits at
        0..2, the second at 1..3 — two selects each."""
        if FIRST:
            return tl.where(i == 0, x0, tl.where(i == 1, x1, x2))
        return tl.where(i == 3, x3, tl.where(i == 2, x2, x1))

    @triton.jit
    def _stream_tile(unit, kt, KT, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, H: tl.constexpr):
        """Tile ``kt`` of unit ``unit`` = row block ``unit // SPLIT_K`` × K slice ``s = unit % SPLIT_K`` (``KT``
        tiles of ``H`` words each): its rows ``(BM,)``, its first word index, and ``s``. Program ``p`` of ``P``
        runs units ``p, p + P, ...`` one tile after another (:func:`_stream_next`)."""
        s = unit % SPLIT_K
        rows = (unit // SPLIT_K) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        return rows, (s * KT + kt) * H, s

    @triton.jit
    def _stream_next(unit, kt, KT):
        """The tile after ``(unit, kt)`` in this program's sequence (no division in the loop)."""
        last = kt == KT - 1
        return tl.where(last, unit + tl.num_programs(0), unit), tl.where(last, 0, kt + 1)

    @triton.jit
    def _load_words(V, P, rows, rmask, hh, K8, stride_v, stride_p):
        """Values ``(BM, H) int64`` (word ``h`` = kept values of columns ``8h .. 8h+7``) and their position bytes
        ``(BM, H) int32``: one tile shape, hence one register layout; masked words read as 0 (no traffic)."""
        m2 = rmask[:, None] & (hh < K8)[None, :]
        w = tl.load(V + rows[:, None] * stride_v + hh[None, :], mask=m2, other=0)
        b = tl.load(P + rows[:, None] * stride_p + hh[None, :], mask=m2, other=0).to(tl.int32)
        return w, b

    @triton.jit
    def _stream_token(acc, X, tok, N, stride_x, hh, K8, w0, w1, w2, w3, p0, p1, p2, p3, DT: tl.constexpr):
        """``acc (BM, H) += Σ_j w_j · x[tok, 8h + 4·(j // 2) + p_j]``: ``x`` of columns ``8h .. 8h+7`` is one
        16-byte load ``(H, 2) int64`` per word, shared by the rows; the selects work on float32 ``(1, H)`` rows."""
        xm = hh < tl.where(tok < N, K8, 0)  # (H,): a scalar bound keeps the mask's alignment
        xa = tl.load(X + tok * stride_x + 2 * hh, mask=xm, other=0)  # (H,) int64: x[8h .. 8h+3]
        xb = tl.load(X + tok * stride_x + 2 * hh + 1, mask=xm, other=0)  # x[8h+4 .. 8h+7]
        xa_lo, xa_hi = xa.to(tl.int32), (xa >> 32).to(tl.int32)
        xb_lo, xb_hi = xb.to(tl.int32), (xb >> 32).to(tl.int32)
        x0, x1 = _half(xa_lo, False, DT)[None, :], _half(xa_lo, True, DT)[None, :]
        x2, x3 = _half(xa_hi, False, DT)[None, :], _half(xa_hi, True, DT)[None, :]
        x4, x5 = _half(xb_lo, False, DT)[None, :], _half(xb_lo, True, DT)[None, :]
        x6, x7 = _half(xb_hi, False, DT)[None, :], _half(xb_hi, True, DT)[None, :]
        acc += w0 * _pick(p0, x0, x1, x2, x3, True)  # one statement per product: four FFMAs
        acc += w1 * _pick(p1, x0, x1, x2, x3, False)
        acc += w2 * _pick(p2, x4, x5, x6, x7, True)
        acc += w3 * _pick(p3, x4, x5, x6, x7, False)
        return acc

    @triton.jit
    def _stream_store(acc, Y, Bias, rows, M, tok, s, N, stride_y, HAS_BIAS: tl.constexpr):
        """One token's unit result ``Σ_h acc (BM, H)`` (+ bias) stored at ``Y[s·N + tok, rows]`` as in
        :func:`_epilogue`, but 1-D: a ``(BM, 1)`` store would make Triton lay the whole loop out along rows."""
        out = tl.sum(acc, axis=1)  # (BM,)
        rmask = rows < tl.where(tok < N, M, 0)  # (BM,): nothing stored for a token past N
        if HAS_BIAS:
            out += tl.load(Bias + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(Y + (s * N + tok) * stride_y + rows, out.to(Y.dtype.element_ty), mask=rmask)

    @triton.jit(do_not_specialize=["N"])
    def _stream_kernel(
        X, V, P, Bias, Y, M, K8, N, stride_x, stride_v, stride_p, stride_y,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
        NUM_STAGES: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):
        """Kind ``"stream"``: ``X`` is ``x`` read as int64 ``(N, K/4)``, ``V`` the values as int64 ``(M, K8)``,
        ``P`` the position bytes ``(M, K8)``; ``BLOCK_N`` (1, 2 or 4) tokens per program (grid axis 1), each with
        its own ``(BM, H)`` float32 accumulator so that every weight byte is read once for all of them."""
        H: tl.constexpr = BLOCK_K // 8  # int64 words (= position bytes) per tile row
        DT: tl.constexpr = Bias.dtype.element_ty  # x's 16-bit dtype (Bias is x itself when there is no bias)
        KT = tl.cdiv(tl.cdiv(K8, H), SPLIT_K)  # tiles per K slice
        T = tl.cdiv(tl.cdiv(M, BLOCK_M) * SPLIT_K - tl.program_id(0), tl.num_programs(0)) * KT  # this program's tiles
        tok = tl.program_id(1) * BLOCK_N
        acc0 = tl.zeros((BLOCK_M, H), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_M, H), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, H), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_M, H), dtype=tl.float32)
        unit, kt = tl.program_id(0), 0
        for _ in tl.range(0, T, num_stages=NUM_STAGES):
            rows, h0, s = _stream_tile(unit, kt, KT, SPLIT_K, BLOCK_M, H)
            rmask = rows < M
            hh = h0 + tl.arange(0, H)  # (H,) word index
            w, b = _load_words(V, P, rows, rmask, hh, K8, stride_v, stride_p)  # (BM, H)
            lo, hi = w.to(tl.int32), (w >> 32).to(tl.int32)
            w0, w1, w2, w3 = _half(lo, False, DT), _half(lo, True, DT), _half(hi, False, DT), _half(hi, True, DT)
            p0, p1, p2, p3 = b & 3, (b >> 2) & 3, (b >> 4) & 3, b >> 6  # kept value j sits at 4(j // 2) + p_j
            acc0 = _stream_token(acc0, X, tok, N, stride_x, hh, K8, w0, w1, w2, w3, p0, p1, p2, p3, DT)
            if BLOCK_N > 1:
                acc1 = _stream_token(acc1, X, tok + 1, N, stride_x, hh, K8, w0, w1, w2, w3, p0, p1, p2, p3, DT)
            if BLOCK_N > 2:
                acc2 = _stream_token(acc2, X, tok + 2, N, stride_x, hh, K8, w0, w1, w2, w3, p0, p1, p2, p3, DT)
                acc3 = _stream_token(acc3, X, tok + 3, N, stride_x, hh, K8, w0, w1, w2, w3, p0, p1, p2, p3, DT)
            if kt == KT - 1:  # the unit's last tile: store, start the next unit from zero
                _stream_store(acc0, Y, Bias, rows, M, tok, s, N, stride_y, HAS_BIAS)
                acc0 = tl.zeros((BLOCK_M, H), dtype=tl.float32)
                if BLOCK_N > 1:
                    _stream_store(acc1, Y, Bias, rows, M, tok + 1, s, N, stride_y, HAS_BIAS)
                    acc1 = tl.zeros((BLOCK_M, H), dtype=tl.float32)
                if BLOCK_N > 2:
                    _stream_store(acc2, Y, Bias, rows, M, tok + 2, s, N, stride_y, HAS_BIAS)
                    _stream_store(acc3, Y, Bias, rows, M, tok + 3, s, N, stride_y, HAS_BIAS)
                    acc2 = tl.zeros((BLOCK_M, H), dtype=tl.float32)
                    acc3 = tl.zeros((BLOCK_M, H), dtype=tl.float32)
            unit, kt = _stream_next(unit, kt, KT)

    @triton.jit
    def _column(v0, v1, p0, p1, c: tl.constexpr, z):
        """Dense column ``c`` (0..3) of a group whose kept raw values ``v0, v1`` sit at ``p0 < p1``."""
        if c == 0:
            return tl.where(p0 == 0, v0, z)
        if c == 3:
            return tl.where(p1 == 3, v1, z)
        return tl.where(p0 == c, v0, tl.where(p1 == c, v1, z))

    @triton.jit
    def _densify_words(w, b, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """The dense ``(BM, BK)`` int16 tile from words ``w (BM, H) int64`` and bytes ``b (BM, H)``: 8 columns per
        word, interleaved by three joins — ``join`` adds a last axis, so columns ``c = 4a + 2j + i`` come out of
        ``join(join(join(·, ·), ·), ·)[..., a, j, i]`` with ``i`` the outermost join (even/odd columns)."""
        lo, hi = w.to(tl.int32), (w >> 32).to(tl.int32)
        v0, v1, v2, v3 = lo.to(tl.int16), (lo >> 16).to(tl.int16), hi.to(tl.int16), (hi >> 16).to(tl.int16)
        p0, p1, p2, p3 = b & 3, (b >> 2) & 3, (b >> 4) & 3, b >> 6
        z = tl.zeros_like(v0)
        even = tl.join(tl.join(_column(v0, v1, p0, p1, 0, z), _column(v2, v3, p2, p3, 0, z)),
                       tl.join(_column(v0, v1, p0, p1, 2, z), _column(v2, v3, p2, p3, 2, z)))  # columns 0 4 2 6
        odd = tl.join(tl.join(_column(v0, v1, p0, p1, 1, z), _column(v2, v3, p2, p3, 1, z)),
                      tl.join(_column(v0, v1, p0, p1, 3, z), _column(v2, v3, p2, p3, 3, z)))  # columns 1 5 3 7
        return tl.reshape(tl.join(even, odd), (BLOCK_M, BLOCK_K))

    @triton.jit(do_not_specialize=["N"])
    def _stream_dot_kernel(
        X, V, P, Bias, Y, M, K8, N, stride_x, stride_v, stride_p, stride_y,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
        NUM_STAGES: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):
        """Kind ``"stream_dot"``: the stream loop with the tile rebuilt dense (:func:`_densify_words`) and
        ``tl.dot`` against ``x`` ``(BK, BN)`` (``X`` in its 16-bit dtype); grid axis 1 = token tiles."""
        H: tl.constexpr = BLOCK_K // 8
        KT = tl.cdiv(tl.cdiv(K8, H), SPLIT_K)
        T = tl.cdiv(tl.cdiv(M, BLOCK_M) * SPLIT_K - tl.program_id(0), tl.num_programs(0)) * KT
        toks = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        nmask = toks < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        unit, kt = tl.program_id(0), 0
        for _ in tl.range(0, T, num_stages=NUM_STAGES):
            rows, h0, s = _stream_tile(unit, kt, KT, SPLIT_K, BLOCK_M, H)
            rmask = rows < M
            w, b = _load_words(V, P, rows, rmask, h0 + tl.arange(0, H), K8, stride_v, stride_p)  # (BM, H)
            wd = _densify_words(w, b, BLOCK_M, BLOCK_K).to(X.dtype.element_ty, bitcast=True)  # (BM, BK)
            kk = 8 * h0 + tl.arange(0, BLOCK_K)  # (BK,)
            xt = tl.load(X + toks[None, :] * stride_x + kk[:, None], mask=(kk < 8 * K8)[:, None] & nmask[None, :],
                         other=0.0)  # (BK, BN)
            acc = tl.dot(wd, xt, acc)
            if kt == KT - 1:
                _epilogue(Y, Bias, acc, rows, rmask, toks, nmask, s, N, stride_y, HAS_BIAS)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            unit, kt = _stream_next(unit, kt, KT)

    @triton.jit
    def _splitk_reduce_kernel(Part, Bias, Y, M, NM, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                              BLOCK: tl.constexpr):
        """``y (N, M) = Σ_s part[s] (+ bias)``, slices added in order 0..SPLIT_K−1 in float32: deterministic."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat (token, row) index
        mask = offs < NM
        acc = tl.load(Part + offs, mask=mask, other=0.0)
        for s in tl.static_range(1, SPLIT_K):
            acc += tl.load(Part + s * NM + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(Bias + offs % M, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)


def _check(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None) -> None:
    if x.dim() != 2 or x.shape[1] != 2 * values.shape[1] or x.dtype != values.dtype:
        raise InputError(f"x must be (N, {2 * values.shape[1]}) {values.dtype}, got {tuple(x.shape)} {x.dtype}.")
    if bias is not None and bias.dtype != x.dtype:
        raise InputError(f"bias must be {x.dtype} like x, got {bias.dtype}.")
    if values.dtype not in (torch.float16, torch.bfloat16) or x.shape[1] % 8:
        raise InputError("the sparse24 kernel needs float16/bfloat16 values and K % 8 == 0; use the reference.")


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the Triton interpreter on the CPU)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _occupancy(compiled: Any, device: torch.device) -> int | None:
    """Programs of ``compiled`` (a launched Triton kernel) that fit on one SM at once: the least of the register,
    warp, shared-memory and block limits (registers go to warps in units of 256); None if unknown."""
    n_regs = getattr(compiled, "n_regs", None)
    if not n_regs or device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    warps = compiled.metadata.num_warps
    regs_per_warp = -(-n_regs * 32 // 256) * 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (regs_per_warp * warps)
    by_warps = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps)
    shared = compiled.metadata.shared
    smem = getattr(props, "shared_memory_per_multiprocessor", 233472)
    by_smem = smem // (shared + 1024) if shared else 32  # 1 KB per block reserved by the driver
    return max(1, min(by_regs, by_warps, by_smem, 32))


def launch(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None, cfg: Config) -> Tensor:
    """Run the kernel with ``cfg``: ``x (N, K)``, ``values (M, K/2)``, ``meta (M, K/8)`` -> ``y (N, M)``."""
    _check(x, values, meta, bias)
    x = x.contiguous()
    N, K = x.shape
    M, S = values.shape[0], cfg.split_k
    y = torch.empty(N, M, dtype=x.dtype, device=x.device)  # (N, M)
    out = y if S == 1 else torch.empty(S, N, M, dtype=torch.float32, device=x.device)  # (S, N, M) partial sums
    bias_arg = bias if bias is not None else x  # a 16-bit pointer either way (the stream kinds read its dtype)
    common = dict(BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, SPLIT_K=S,
                  HAS_BIAS=bias is not None and S == 1, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.kind in ("gather", "dot"):
        v32 = values.view(torch.int32)  # (M, K/4): one word per group
        grid = (triton_cdiv(M, cfg.block_m), S, triton_cdiv(N, cfg.block_n))
        _sparse24_kernel[grid](x, v32, meta, bias_arg, out, M, K, N, x.stride(0), v32.stride(0), meta.stride(0), M,
                               USE_DOT=cfg.kind == "dot", **common)
    else:
        units = triton_cdiv(M, cfg.block_m) * S
        key = (cfg, x.dtype, bias is not None)
        programs = units
        if cfg.per_sm:
            programs = min(units, _sm_count(x.device) * min(cfg.per_sm, _OCCUPANCY.get(key, cfg.per_sm)))
        v64 = values.view(torch.int64)  # (M, K/8): the 4 kept values of 8 columns per word
        if cfg.kind == "stream":
            xk = (x if x.data_ptr() % 8 == 0 else x.clone()).view(torch.int64)  # (N, K/4): 4 columns per word
            kernel = _stream_kernel
        else:
            xk, kernel = x, _stream_dot_kernel
        compiled = kernel[(programs, triton_cdiv(N, cfg.block_n))](
            xk, v64, meta, bias_arg, out, M, K // 8, N, xk.stride(0), v64.stride(0), meta.stride(0), M,
            NUM_STAGES=cfg.num_stages, **common,
        )
        if key not in _OCCUPANCY and (occ := _occupancy(compiled, x.device)) is not None:
            _OCCUPANCY[key] = occ
    if S > 1:
        block = 1024
        _splitk_reduce_kernel[(triton_cdiv(N * M, block),)](out, bias_arg, y, M, N * M, SPLIT_K=S,
                                                            HAS_BIAS=bias is not None, BLOCK=block)
    return y


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


def token_bucket(n: int) -> int:
    """Token bucket of the tuning cache: 1, 2, 4, 8, 16, then one bucket for every prefill size."""
    return 1 << (n - 1).bit_length() if n <= MAX_DECODE_TOKENS else MAX_DECODE_TOKENS + 1


def _key(values: Tensor, n: int) -> tuple:
    return (values.shape[0], 2 * values.shape[1], token_bucket(n), values.dtype, values.device.type)


def _fits(cfg: Config, n_tokens: int) -> bool:
    """Whether :func:`tune` times ``cfg`` for ``n_tokens``: a stream config when its token tile is the bucket (the
    weight read once), the gather kernel (one program per token) up to 4 tokens, tensor cores always (16 tokens
    per tile, the padding costs no memory traffic)."""
    bucket = token_bucket(n_tokens)
    if cfg.kind == "stream":
        return cfg.block_n == bucket
    return cfg.kind != "gather" or bucket <= 4


def default_config(M: int, K: int, N: int) -> Config:
    """Untuned choice: :data:`DECODE_TABLE` for its shapes, else a stream kernel for 1–4 tokens and tensor cores
    beyond (split K until ≥ ~2 programs per SM of an H200), :data:`PREFILL_CONFIGS` for prefill sizes."""
    if N > MAX_DECODE_TOKENS:
        return PREFILL_CONFIGS[0]
    bucket = token_bucket(N)
    if (M, K, bucket) in DECODE_TABLE:
        return DECODE_TABLE[(M, K, bucket)]
    if bucket <= 4:
        return Config("stream", 8, 1024, bucket, 1, 4, 4)
    split = 1
    while triton_cdiv(M, 64) * split < 264 and split < 4:
        split *= 2
    return Config("stream_dot", 64, 128, 16, split, 4, 5)


def sparse24_linear(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y (N, M) = x (N, K) Wᵀ + b``: the kernel on CUDA (tuned config if :func:`tune` ran for this shape and
    token bucket, else :func:`default_config`), the reference elsewhere."""
    if not x.is_cuda:
        return sparse24_reference(x, values, meta, bias)
    cfg = _TUNED.get(_key(values, x.shape[0])) or default_config(values.shape[0], x.shape[1], x.shape[0])
    return launch(x, values, meta, bias, cfg)


class GraphTimer:
    """Times ``fn(0), fn(1), ..., fn(calls − 1)`` run back to back, as a model's layers run: captured once in a
    CUDA graph (no launch overhead, no L2 flush between calls), each :meth:`once` replays it between two events
    and returns µs per call. ``fn(i)`` should read a different weight copy for each ``i`` so that, the copies
    together exceeding the L2, every call reads its weight from HBM."""

    def __init__(self, fn: Callable[[int], Any], calls: int, warmup: int = 2):
        self.calls = calls
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # allocator and autotuner warm-up outside the capture
            for i in range(calls):
                fn(i)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            for i in range(calls):
                fn(i)
        for _ in range(warmup):
            self.graph.replay()

    def once(self) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.graph.replay()
        end.record()
        end.synchronize()
        return 1e3 * start.elapsed_time(end) / self.calls

    def median(self, replays: int) -> float:
        return statistics.median(self.once() for _ in range(replays))


def cold_copies(values: Tensor, meta: Tensor, l2_multiple: int = 4, cap: int = 64) -> list[tuple[Tensor, Tensor]]:
    """``(values, meta)`` and enough clones that cycling through them streams ≥ ``l2_multiple`` × the device's L2
    per cycle: each call then reads its weight from HBM, as in a model whose weights dwarf the L2."""
    l2 = getattr(torch.cuda.get_device_properties(values.device), "L2_cache_size", 0) if values.is_cuda else 0
    n = min(cap, max(1, -(-l2_multiple * l2 // (values.nbytes + meta.nbytes))))
    return [(values, meta)] + [(values.clone(), meta.clone()) for _ in range(n - 1)]


def tune(values: Tensor, meta: Tensor, n_tokens: int, configs: tuple[Config, ...] | None = None,
         finalists: int = 4, rounds: int = 7, min_calls: int = 32) -> tuple[Config, list[dict[str, Any]]]:
    """Pick the fastest correct config for ``values``/``meta`` and ``n_tokens`` on their CUDA device; cache it for
    the token bucket and return it with every row ``{config, err, ok, us, rounds}``.

    1. Each candidate that fits the bucket runs twice on random ``x (n_tokens, K)`` (the first run compiles it and
       learns its occupancy, the second is the persistent grid the timing uses) and is checked against the
       float64 reference: error ≤ 2× that of the dense 16-bit matmul (flash-attention's rule), or it is out.
    2. Screening: :class:`GraphTimer` over ≥ ``min_calls`` calls cycling through :func:`cold_copies` of the weight,
       median of 3 replays.
    3. The ``finalists`` fastest: ``rounds`` interleaved rounds (each round replays every finalist once, in a
       rotated order, so clock or thermal drift hits all alike); the winner has the least median.
    """
    if configs is None:
        configs = DECODE_CONFIGS if n_tokens <= MAX_DECODE_TOKENS else PREFILL_CONFIGS
    configs = tuple(c for c in configs if n_tokens > MAX_DECODE_TOKENS or _fits(c, n_tokens))
    K = 2 * values.shape[1]
    x = torch.randn(n_tokens, K, device=values.device, dtype=values.dtype)
    dense = unpack_24(values, meta)  # (M, K)
    ref = x.double() @ dense.double().T  # (N, M) float64 reference
    dense_err = (F.linear(x, dense).double() - ref).abs().max().item()
    copies = cold_copies(values, meta)
    calls = max(min_calls, len(copies))
    rows, timers = [], {}
    for cfg in configs:
        row: dict[str, Any] = {"config": asdict(cfg), "us": None, "err": None, "ok": False}
        rows.append(row)
        try:
            launch(x, values, meta, None, cfg)
            err = (launch(x, values, meta, None, cfg).double() - ref).abs().max().item()
            row.update(err=err, ok=err <= 2 * dense_err)
            if row["ok"]:
                timer = GraphTimer(lambda i, c=cfg: launch(x, *copies[i % len(copies)], None, c), calls)
                row["us"] = timer.median(3)
                timers[cfg] = (row, timer)
        except Exception as e:  # noqa: BLE001 - a config the compiler or device rejects (e.g. resources) is skipped
            log.info("config %s failed: %s", cfg, e)
            row["reason"] = str(e)[:200]
    if not timers:
        raise InputError(f"no sparse24 config ran correctly for {tuple(values.shape)} x {n_tokens} tokens.")
    final = sorted(timers.values(), key=lambda rt: rt[0]["us"])[:finalists]
    for r in range(rounds):
        for row, timer in final[r % len(final):] + final[:r % len(final)]:
            row.setdefault("rounds", []).append(timer.once())
    for row, _ in final:
        row["us"] = statistics.median(row["rounds"])
    best = min(final, key=lambda rt: rt[0]["us"])[0]
    cfg = Config(**best["config"])
    _TUNED[_key(values, n_tokens)] = cfg
    return cfg, rows


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
        cfg, _ = tune(values, meta, t, PREFILL_CONFIGS, finalists=2, rounds=3)
        times["kernel"].append(bench(lambda: launch(x, values, meta, None, cfg)))
    ratio = {m: max(a / d for a, d in zip(times[m], times["dense"])) for m in ("rebuild", "kernel")}
    mode = min(ratio, key=ratio.get)
    if ratio[mode] > 1 + tolerance and allow_dense_cache:
        mode = "dense"
    return {"mode": mode, "tokens": list(tokens), "us": times, "ratio_to_dense": ratio}
