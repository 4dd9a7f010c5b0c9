"""``y = x Wᵀ (+ b)`` for 1–16 tokens on the sparse tensor cores: ``mma.sp`` with the 2:4 weight in fragment order.

Ampere and Hopper multiply a 2:4 matrix natively: ``mma.sp::ordered_metadata.sync.aligned.m16n8k32`` (PTX ISA,
"Multiply-and-Accumulate Instruction: mma.sp"; plain ``mma.sp`` where NVRTC predates ISA 8.5) takes the sparse
``A`` tile (16 rows × 32 columns) as its 16 × 16 kept values plus 2-bit positions, exactly the compact format of
:mod:`sparsekit.compact` (a nibble ``i0 | i1 << 2`` per group of four columns, ``i0 < i1``: ordered). Nothing is
rebuilt in registers: each weight byte is loaded once, 16 bytes per lane, and handed to the tensor core. Here ``A`` = ``W`` (output features × in features), ``B`` = ``xᵀ`` (in features ×
tokens, 8 tokens per ``n8`` tile), ``D`` = ``yᵀ``.

**Fragment order** (:func:`mma_layout`, done once when a layer is loaded). Per 16-row tile ``mt`` and per 256
columns ``kc`` (eight ``k32`` tiles), lane ``l = 4g + t`` of the warp reads

- values: eight 16-byte words ``(mt, kc, i, l)``, ``i`` = k32 tile; word = ``(A[g, 2t:2t+2], A[g+8, 2t:2t+2],
  A[g, 2t+8:2t+10], A[g+8, 2t+8:2t+10])`` of that tile's 16 × 16 kept values (the PTX ``A`` fragment of a
  ``m16n8k32`` sparse ``mma``, the same as the dense ``m16n8k16`` one);
- positions: one 16-byte word ``(mt, kc, l)``; its 32-bit word ``w`` serves k32 tiles ``2w`` (lanes ``t = 0, 1``,
  sparsity selector 0) and ``2w + 1`` (lanes ``t = 2, 3``, selector 1): lane ``t`` of the serving pair holds the
  positions of columns ``16·(t % 2) .. +16`` of the tile for row ``g`` (low half) and row ``g + 8`` (high half).

So a warp's loads are 512 contiguous bytes per k32 tile and the position bytes stay 1/8 of the value bytes: the
layout moves exactly the compact format's 56.25% of the dense bytes. ``x`` (a few KB) is read once per chunk
for the ``MW`` row tiles of a block: up to 4 tokens straight from the L1 in the ``B`` fragment order (four 32-bit
loads per lane and 8 tokens); beyond, each warp first copies its chunk of ``x`` (8 or 16 tokens × 256 columns) into
shared memory with 16-byte loads (XOR swizzled) and reads the fragments back with ``ldmatrix`` (a quarter of the
load instructions, whole cache lines). A block is ``KW`` warps on ``MW`` consecutive 16-row tiles, each warp taking every ``KW``-th 256-column chunk; the
warps' ``D`` fragments are added in warp order in shared memory (deterministic) and stored with the bias in the
output dtype.

Needs ``M % 16 == 0`` and ``K % 256 == 0`` (:func:`supports`), float16 or bfloat16, and a GPU of compute
capability ≥ 8.0. The kernel is compiled at run time by NVRTC (``torch.cuda._compile_kernel``, which ships with
PyTorch's CUDA wheels): no CUDA toolkit needed. :func:`mma_layout` is plain torch and runs anywhere; the tests
check it on the CPU against the fragment tables of the PTX ISA.
"""

from __future__ import annotations

import functools
import logging
import statistics
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsekit.errors import InputError
from sparsekit.kernels.pack24 import unpack_24

log = logging.getLogger(__name__)

__all__ = ["ROWS", "COLS", "KW_CHOICES", "MW_CHOICES", "TILE_TABLE", "supports", "fits", "default_tile", "tune", "mma_layout", "mma_unlayout", "sparse24_mma"]

ROWS, COLS = 16, 256  # a block's row tile; a warp's column chunk (8 k32 tiles)
KW_CHOICES = (2, 4, 8, 16)  # warps per block, splitting K
MW_CHOICES = (1, 2, 4)  # 16-row tiles per block, sharing each load of x
XS_MIN_TOKENS = 4  # beyond this many tokens x goes through shared memory

_SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {  // read once: do not keep in L1
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

__device__ __forceinline__ u32 ld_x(const u32* p) {
    u32 r;
    asm("ld.global.nc.u32 %0, [%1];" : "=r"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ uint4 ld_x4(const uint4* p) {
    uint4 r;
    asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ void ldsm_x4(u32 addr, u32& b0, u32& b1, u32& b2, u32& b3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3) : "r"(addr) : "memory");
}

__device__ __forceinline__ float to_f32(u16 h) {
#if IS_BF16
    return __int_as_float(((u32)h) << 16);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

__device__ __forceinline__ u16 from_f32(float f) {
    u16 h;
#if IS_BF16
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
    return h;
}

#if IS_BF16
#define MMA_TYPES "f32.bf16.bf16.f32"
#else
#define MMA_TYPES "f32.f16.f16.f32"
#endif

#define MMA_SP(SEL)                                                                                          \
    asm(MMA_SP_OP ".sync.aligned.m16n8k32.row.col." MMA_TYPES                                         \
                 " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, " #SEL ";"              \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                              \
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1), "r"(b2), "r"(b3), "r"(e))

__device__ __forceinline__ void mma_sp(float* d, uint4 a, u32 b0, u32 b1, u32 b2, u32 b3, u32 e, int odd) {
    if (odd) { MMA_SP(1); } else { MMA_SP(0); }
}

extern "C" __global__ void __launch_bounds__(KW * 32)
sparse24_mma(const uint4* __restrict__ V, const uint4* __restrict__ E, const u32* __restrict__ X,
             const u16* __restrict__ Bias, u16* __restrict__ Y, int M, int K, int N, int has_bias)
{
    // V (M/16, K/256, 8, 32) 16-byte words; E (M/16, K/256, 32); X (N, K/2) pairs; Y (N, M)
    __shared__ float part[KW][NT * 4][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int mt0 = blockIdx.x * MW, KC = K >> 8;
    float d[MW][NT][4];
#pragma unroll
    for (int r = 0; r < MW; ++r)
#pragma unroll
        for (int j = 0; j < NT; ++j) d[r][j][0] = d[r][j][1] = d[r][j][2] = d[r][j][3] = 0.f;
#if XSMEM
    // x of the warp's chunk, 16 tokens x 256 columns, in shared memory: 16-byte block c of row q stored at
    // q·32 + (c ^ (q & 7)), so that both the row-wise stores and ldmatrix's 8-row reads are conflict-free
    extern __shared__ uint4 xs_all[];
    uint4* xs = xs_all + warp * 512;
    const u32 xs_base = smem_addr(xs);
    const uint4* X4 = (const uint4*)X;
#else
    const int K2 = K >> 1;
    const u32* xr[NT];  // this lane's x row per n8 tile (token 8j + g), or none
    bool xv[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) { xv[j] = 8 * j + g < N; xr[j] = X + (size_t)(xv[j] ? 8 * j + g : 0) * K2 + t; }
#endif
    for (int kc = warp; kc < KC; kc += KW) {
#if XSMEM
        __syncwarp();  // the previous chunk's ldmatrix reads are done
#pragma unroll
        for (int q = 0; q < 8 * NT; ++q) {
            uint4 v;
            v.x = v.y = v.z = v.w = 0u;
            if (q < N) v = ld_x4(X4 + (size_t)q * (K >> 3) + kc * 32 + lane);
            xs[q * 32 + (lane ^ (q & 7))] = v;
        }
        __syncwarp();
#else
        u32 b[8][NT][4];  // the chunk's B fragments, loaded once for the MW row tiles
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int r = 0; r < 4; ++r)  // x word of column 32·(8kc + i) + 8r + 2t
                    b[i][j][r] = xv[j] ? ld_x(xr[j] + kc * 128 + i * 16 + 4 * r) : 0u;
#endif
#pragma unroll
        for (int r = 0; r < MW; ++r) {
            const size_t tile = (size_t)(mt0 + r) * KC + kc;
            uint4 a[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) a[i] = ld_stream(V + (tile * 8 + i) * 32 + lane);
            const uint4 ew = ld_stream(E + tile * 32 + lane);
            const u32 es[4] = {ew.x, ew.y, ew.z, ew.w};
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < NT; ++j) {
#if XSMEM
                    // matrix m of ldmatrix.x4 = tokens 8j..8j+7 x columns 32i + 8m .. +8 (16-byte block 4i + m);
                    // lane L gives the address of row L & 7 of matrix L >> 3 and gets b_m = x[8j + g, 32i + 8m + 2t]
                    u32 b0, b1, b2, b3;
                    const int row = 8 * j + (lane & 7), blk = (4 * i + (lane >> 3)) ^ (lane & 7);
                    ldsm_x4(xs_base + (u32)(row * 32 + blk) * 16u, b0, b1, b2, b3);
                    mma_sp(d[r][j], a[i], b0, b1, b2, b3, es[i >> 1], i & 1);
#else
                    mma_sp(d[r][j], a[i], b[i][j][0], b[i][j][1], b[i][j][2], b[i][j][3], es[i >> 1], i & 1);
#endif
                }
        }
    }
    // the warps' partial sums, one row tile at a time (KW · NT · 512 bytes of shared memory), added in warp order
#pragma unroll
    for (int r = 0; r < MW; ++r) {
        if (KW > 1) {
            if (r > 0) __syncthreads();  // warp 0 has read the previous tile's sums
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int c = 0; c < 4; ++c) part[warp][j * 4 + c][lane] = d[r][j][c];
            __syncthreads();
            if (warp == 0) {
#pragma unroll
                for (int j = 0; j < NT; ++j)
#pragma unroll
                    for (int c = 0; c < 4; ++c) {
                        float s = part[0][j * 4 + c][lane];
                        for (int w = 1; w < KW; ++w) s += part[w][j * 4 + c][lane];  // deterministic order
                        d[r][j][c] = s;
                    }
            }
        }
        if (warp == 0) {
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int c = 0; c < 4; ++c) {  // d[c]: row g + 8·(c >> 1), token 2t + (c & 1) of the n8 tile
                    const int m = (mt0 + r) * 16 + g + 8 * (c >> 1), n = 8 * j + 2 * t + (c & 1);
                    if (n < N) Y[(size_t)n * M + m] = from_f32(d[r][j][c] + (has_bias ? to_f32(Bias[m]) : 0.f));
                }
        }
    }
}
"""


def supports(M: int, K: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :func:`sparse24_mma` runs this shape: CUDA compute capability ≥ 8.0, 16-bit, ``M % 16 == 0``,
    ``K % 256 == 0``, and NVRTC available."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or M % ROWS or K % COLS:
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capable(device_index: int) -> bool:
    """Sparse tensor cores (compute capability ≥ 8.0) and NVRTC through torch: asked once per device, since
    :func:`supports` runs in every decode forward."""
    return torch.cuda.get_device_capability(device_index)[0] >= 8 and hasattr(torch.cuda, "_compile_kernel")


def fits(M: int, K: int, n_tokens: int, kw: int, mw: int) -> bool:
    """Whether the tile ``(kw, mw)`` runs ``(M, K)``: ``kw`` in :data:`KW_CHOICES`, ``mw`` in :data:`MW_CHOICES`
    dividing the row tiles ``M / 16``."""
    return kw in KW_CHOICES and mw in MW_CHOICES and (M // ROWS) % mw == 0


# (out, in, token bucket) -> (kw, mw): the fastest tile measured on an H200 in bf16 (benchmarks/sparse24_mma_gpu.py,
# torch 2.11, 2026-12-04; BENCHMARKS.md, issue 17); other shapes take the rule of default_tile or tune().
TILE_TABLE: dict[tuple[int, int, int], tuple[int, int]] = {
    (4096, 4096, 8): (8, 1), (4096, 4096, 16): (16, 2),
    (14336, 4096, 8): (8, 4), (14336, 4096, 16): (4, 2),
    (4096, 14336, 8): (8, 1), (4096, 14336, 16): (16, 2),
    (1024, 4096, 8): (16, 1), (1024, 4096, 16): (16, 1),
}
_TUNED: dict[tuple, tuple[int, int]] = {}


def _bucket(n_tokens: int) -> int:
    return 1 << (n_tokens - 1).bit_length()


def default_tile(M: int, K: int, n_tokens: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """``(kw, mw)``: the tile :func:`tune` chose for this shape and token bucket, else :data:`TILE_TABLE`, else the
    rule: 16 warps split K (the most bytes in flight; at most one per 256-column chunk), and ``mw`` row tiles per
    block share each load of ``x``: 1 up to 8 tokens, 2 beyond (where ``x`` is as many bytes per warp as the
    weight). On the H200 the rule is the measured best at 1–4 tokens on the four Llama-3-8B shapes and within
    17% beyond (BENCHMARKS.md, issue 17), where the table holds the measured best."""
    key = (M, K, _bucket(n_tokens))
    if (hit := _TUNED.get(key + (dtype,)) or TILE_TABLE.get(key)) is not None:
        return hit
    tiles, chunks = max(1, M // ROWS), max(1, K // COLS)
    kw = next((k for k in KW_CHOICES if k >= chunks), KW_CHOICES[-1])
    mw = 2 if n_tokens > 8 and tiles % 2 == 0 else 1
    return kw, mw


def tune(frag_values: Tensor, frag_meta: Tensor, n_tokens: int, rounds: int = 5) -> tuple[tuple[int, int], dict]:
    """Time every tile that fits on random ``x (n_tokens, K)`` as a decoding model runs it (back to back in a CUDA
    graph over weight copies ≥ 4× the L2: :class:`sparsekit.kernels.sparse24.GraphTimer`), after checking it
    against float64 (error ≤ 2× that of the dense 16-bit matmul); cache the fastest for the token bucket and
    return it with ``{tile: median µs}``."""
    from sparsekit.kernels.sparse24 import GraphTimer, cold_copies

    MT, KC = frag_values.shape[:2]
    M, K = MT * ROWS, KC * COLS
    # four draws of x: the largest rounding error of a few outputs alone is a noisy yardstick
    xs = [torch.randn(n_tokens, K, device=frag_values.device, dtype=frag_values.dtype) for _ in range(4)]
    dense = unpack_24(*mma_unlayout(frag_values, frag_meta))  # (M, K)
    refs = [x.double() @ dense.double().T for x in xs]

    def err(f: Callable[[Tensor], Tensor]) -> float:
        return max((f(x).double() - ref).abs().max().item() for x, ref in zip(xs, refs))

    dense_err = err(lambda x: F.linear(x, dense))
    copies = cold_copies(frag_values, frag_meta)
    x = xs[0]
    timers = {}
    for tile in [(kw, mw) for kw in KW_CHOICES for mw in MW_CHOICES if fits(M, K, n_tokens, kw, mw)]:
        if err(lambda x, t=tile: sparse24_mma(x, frag_values, frag_meta, tile=t)) > 2 * dense_err:
            log.warning("sparse24_mma tile %s is off by more than 2x dense's error on (%d, %d): skipped", tile, M, K)
            continue
        timers[tile] = GraphTimer(lambda i, t=tile: sparse24_mma(x, *copies[i % len(copies)], tile=t),
                                  max(32, len(copies)))
    if not timers:
        raise InputError(f"no sparse24_mma tile ran correctly for ({M}, {K}) x {n_tokens} tokens.")
    times = {tile: statistics.median(timer.once() for _ in range(rounds)) for tile, timer in timers.items()}
    best = min(times, key=times.get)
    _TUNED[(M, K, _bucket(n_tokens), frag_values.dtype)] = best
    return best, times


def mma_layout(values: Tensor, meta: Tensor) -> tuple[Tensor, Tensor]:
    """Compact ``values (M, K/2)`` / ``meta (M, K/8) uint8`` -> the fragment order of the module docstring:
    ``frag_values (M/16, K/256, 8, 32, 8)`` in the values' dtype and ``frag_meta (M/16, K/256, 32, 4) int32``."""
    M, K = values.shape[0], 2 * values.shape[1]
    if M % ROWS or K % COLS or meta.shape != (M, K // 8) or meta.dtype != torch.uint8:
        raise InputError(f"the mma layout needs M % {ROWS} == 0, K % {COLS} == 0 and meta (M, K/8) uint8; "
                         f"got values {tuple(values.shape)}, meta {tuple(meta.shape)} {meta.dtype}.")
    MT, KC = M // ROWS, K // COLS
    # kept value (row 16mt + 8h + g, column 128kc + 16i + 8c + 2t + e) -> [mt, kc, i, lane 4g + t, word 2c + h, e]
    v = values.reshape(MT, 2, 8, KC, 8, 2, 4, 2)  # (mt, h, g, kc, i, c, t, e)
    frag_values = v.permute(0, 3, 4, 2, 6, 5, 1, 7).reshape(MT, KC, 8, 32, 8)
    # position byte (row 16mt + 8h + g, byte 32kc + 8w + 4·odd + 2·half + b) -> [mt, kc, lane 4g + 2odd + half, w,
    # byte 2h + b of the 32-bit word]
    b = meta.reshape(MT, 2, 8, KC, 4, 2, 2, 2)  # (mt, h, g, kc, w, odd, half, b)
    frag_meta = b.permute(0, 3, 2, 5, 6, 4, 1, 7).reshape(MT, KC, 32, 4, 4).contiguous().view(torch.int32)
    return frag_values.contiguous(), frag_meta.reshape(MT, KC, 32, 4)


def mma_unlayout(frag_values: Tensor, frag_meta: Tensor) -> tuple[Tensor, Tensor]:
    """The inverse of :func:`mma_layout`: compact ``(values, meta)``."""
    MT, KC = frag_values.shape[:2]
    v = frag_values.reshape(MT, KC, 8, 8, 4, 2, 2, 2)  # (mt, kc, i, g, t, c, h, e)
    values = v.permute(0, 6, 3, 1, 2, 5, 4, 7).reshape(MT * ROWS, KC * COLS // 2)
    b = frag_meta.contiguous().view(torch.uint8).reshape(MT, KC, 8, 2, 2, 4, 2, 2)  # (mt, kc, g, odd, half, w, h, b)
    meta = b.permute(0, 6, 2, 1, 5, 3, 4, 7).reshape(MT * ROWS, KC * COLS // 8)
    return values.contiguous(), meta.contiguous()


@functools.lru_cache(maxsize=None)
def _kernel(dtype: torch.dtype, kw: int, mw: int, nt: int, xs: bool, device_index: int):
    src = (f"#define KW {kw}\n#define MW {mw}\n#define NT {nt}\n#define XSMEM {int(xs)}\n"
           f"#define IS_BF16 {int(dtype == torch.bfloat16)}\n" + _SOURCE)
    major, minor = torch.cuda.get_device_capability(device_index)
    cc = f"{major}{minor}"
    try:  # our positions are ordered (i0 < i1), which PTX ISA 8.5 lets us declare; older NVRTCs lack it
        kernel = torch.cuda._compile_kernel('#define MMA_SP_OP "mma.sp::ordered_metadata"\n' + src, "sparse24_mma",
                                            compute_capability=cc)
    except Exception as exc:  # noqa: BLE001 - NVRTC's compile error; the plain form is the fallback
        log.info("mma.sp::ordered_metadata unavailable (%s); using mma.sp", str(exc)[:200])
        kernel = torch.cuda._compile_kernel('#define MMA_SP_OP "mma.sp"\n' + src, "sparse24_mma", compute_capability=cc)
    if xs:
        kernel.set_shared_memory_config(_xs_bytes(kw))
    return kernel


def _xs_bytes(kw: int) -> int:
    """Dynamic shared memory of the kernel that stages ``x``: each warp's chunk, up to 16 tokens × 256 columns."""
    return kw * 16 * COLS * 2


def sparse24_mma(x: Tensor, frag_values: Tensor, frag_meta: Tensor, bias: Tensor | None = None,
                 tile: tuple[int, int] | None = None) -> Tensor:
    """``y (N, M) = x (N, K) Wᵀ + b`` for ``N ≤ 16`` with ``W`` in :func:`mma_layout` order; ``tile = (kw, mw)``
    (:func:`fits`; default :func:`default_tile`): ``kw`` warps split K, ``mw`` 16-row tiles per block."""
    MT, KC = frag_values.shape[:2]
    M, K = MT * ROWS, KC * COLS
    N = x.shape[0]
    if x.dim() != 2 or x.shape[1] != K or x.dtype != frag_values.dtype or not 1 <= N <= 16:
        raise InputError(f"x must be (N ≤ 16, {K}) {frag_values.dtype}, got {tuple(x.shape)} {x.dtype}.")
    kw, mw = tile if tile is not None else default_tile(M, K, N, x.dtype)
    if not fits(M, K, N, kw, mw):
        raise InputError(f"tile (kw={kw}, mw={mw}) does not fit ({M}, {K}): kw in {KW_CHOICES}, mw in "
                         f"{MW_CHOICES} dividing M/16 = {M // ROWS}.")
    if bias is not None and (bias.shape != (M,) or bias.dtype != x.dtype):
        raise InputError(f"bias must be ({M},) {x.dtype}, got {tuple(bias.shape)} {bias.dtype}.")
    x = x.contiguous()
    if x.data_ptr() % 16:  # read as 32-bit pairs, or 16-byte words for 9–16 tokens
        x = x.clone()
    y = torch.empty(N, M, dtype=x.dtype, device=x.device)  # (N, M)
    nt, xs = (1 if N <= 8 else 2), N > XS_MIN_TOKENS
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(device):  # the module is loaded into, and launched from, the tensors' device
        _kernel(x.dtype, kw, mw, nt, xs, device)(
            grid=(MT // mw, 1, 1), block=(32 * kw, 1, 1), shared_mem=_xs_bytes(kw) if xs else 0,
            args=[frag_values, frag_meta, x, bias if bias is not None else x, y, M, K, N, int(bias is not None)])
    return y
