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

With ``SPLIT_K > 1`` the programs add float32 partial sums atomically (the bias once, by slice 0) and the wrapper
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

from sparsekit.compact import unpack_24
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
    """One launch configuration. ``block_n == 1`` with ``use_dot=False`` is the one-token gather variant."""

    block_m: int
    block_k: int
    block_n: int = 16
    split_k: int = 1
    use_dot: bool = True
    num_warps: int = 4
    num_stages: int = 3


def _decode_configs() -> list[Config]:
    """Gather variant (one token; small row tiles so that M = 4096 gives ≥ 256 programs without split-K; 16–32
    words per thread per tile, enough loads in flight without spilling) and tensor-core variant (2–16 tokens),
    each with split-K 1, 2, 4."""
    cfgs = [Config(bm, bk, 1, sk, False, nw, 3)
            for bm, bk, nw in ((8, 1024, 4), (8, 2048, 8), (16, 1024, 8), (16, 2048, 8), (32, 512, 8),
                                (64, 256, 8))
            for sk in (1, 2, 4)]
    cfgs += [Config(bm, bk, 16, sk, True, nw, ns)
             for bm, bk, nw, ns in ((16, 256, 4, 3), (32, 256, 4, 3), (64, 128, 4, 4), (64, 256, 8, 3),
                                    (128, 128, 8, 3))
             for sk in (1, 2, 4)]
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
    def _unpack24_kernel(V, P, D, M, K, stride_v, stride_p, stride_d, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        rmask = rows < M
        k0 = tl.program_id(1) * BLOCK_K
        lo, hi, i0, i1 = _load_tile(V, P, rows, rmask, k0, K, stride_v, stride_p, BLOCK_M, BLOCK_K)
        wd = _densify(lo, hi, i0, i1, BLOCK_M, BLOCK_K).to(D.dtype.element_ty, bitcast=True)  # (BM, BK)
        kk = k0 + tl.arange(0, BLOCK_K)
        tl.store(D + rows[:, None] * stride_d + kk[None, :], wd, mask=rmask[:, None] & (kk < K)[None, :])

    @triton.jit(do_not_specialize=["N"])  # one binary for every token count
    def _sparse24_kernel(
        X, V, P, Bias, Y, M, K, N, stride_x, stride_v, stride_p, stride_y,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
        USE_DOT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):
        G: tl.constexpr = BLOCK_K // 4
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_n = tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        rmask = rows < M
        toks = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        nmask = toks < N
        k_chunk = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_begin = pid_k * k_chunk
        k_end = tl.minimum(k_begin + k_chunk, K)
        if USE_DOT:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, G), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            lo, hi, i0, i1 = _load_tile(V, P, rows, rmask, k0, K, stride_v, stride_p, BLOCK_M, BLOCK_K)  # (BM, G)
            kk = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            if USE_DOT:
                wd = _densify(lo, hi, i0, i1, BLOCK_M, BLOCK_K).to(X.dtype.element_ty, bitcast=True)  # (BM, BK)
                xt = tl.load(X + toks[None, :] * stride_x + kk[:, None], mask=(kk < K)[:, None] & nmask[None, :],
                             other=0.0)  # (BK, BN)
                acc = tl.dot(wd, xt, acc)
            else:
                xr = tl.load(X + pid_n * stride_x + kk, mask=kk < K, other=0.0).to(tl.float32)  # (BK,)
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
            ptrs = Y + toks[None, :] * stride_y + rows[:, None]
            omask = rmask[:, None] & nmask[None, :]
        else:
            out = tl.sum(acc, axis=1)  # (BM,)
            ptrs = Y + pid_n * stride_y + rows
            omask = rmask
        if HAS_BIAS:
            b = tl.load(Bias + rows, mask=rmask, other=0.0).to(tl.float32) * (pid_k == 0).to(tl.float32)  # (BM,)
            if USE_DOT:
                out += b[:, None]
            else:
                out += b
        if SPLIT_K == 1:
            tl.store(ptrs, out.to(Y.dtype.element_ty), mask=omask)
        else:
            tl.atomic_add(ptrs, out, mask=omask)


def _check(x: Tensor, values: Tensor, meta: Tensor) -> None:
    if x.dim() != 2 or x.shape[1] != 2 * values.shape[1] or x.dtype != values.dtype:
        raise InputError(f"x must be (N, {2 * values.shape[1]}) {values.dtype}, got {tuple(x.shape)} {x.dtype}.")
    if values.dtype not in (torch.float16, torch.bfloat16) or x.shape[1] % 8:
        raise InputError("the sparse24 kernel needs float16/bfloat16 values and K % 8 == 0; use the reference.")


def launch(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None, cfg: Config) -> Tensor:
    """Run the kernel with ``cfg``: ``x (N, K)``, ``values (M, K/2)``, ``meta (M, K/8)`` -> ``y (N, M)``."""
    _check(x, values, meta)
    if not cfg.use_dot and cfg.block_n != 1:
        raise InputError("the gather variant (use_dot=False) handles one token per program: block_n must be 1.")
    x = x.contiguous()
    N, K = x.shape
    M = values.shape[0]
    v32 = values.view(torch.int32)  # (M, K/4): one word per group
    grid = (triton_cdiv(M, cfg.block_m), cfg.split_k, triton_cdiv(N, cfg.block_n))
    y = (torch.empty if cfg.split_k == 1 else torch.zeros)(
        N, M, dtype=x.dtype if cfg.split_k == 1 else torch.float32, device=x.device
    )  # (N, M)
    _sparse24_kernel[grid](
        x, v32, meta, bias if bias is not None else x, y, M, K, N, x.stride(0), v32.stride(0), meta.stride(0),
        y.stride(0), BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, SPLIT_K=cfg.split_k,
        USE_DOT=cfg.use_dot, HAS_BIAS=bias is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y if cfg.split_k == 1 else y.to(x.dtype)


def unpack(values: Tensor, meta: Tensor) -> Tensor:
    """The dense ``W (M, K)``: one Triton launch on CUDA for 16-bit values (the prefill path ``"rebuild"``),
    :func:`sparsekit.compact.unpack_24` elsewhere (same result, bit for bit)."""
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


def tune(values: Tensor, meta: Tensor, n_tokens: int, configs: tuple[Config, ...] | None = None,
         rep_ms: int = 20, bench: Callable | None = None) -> tuple[Config, list[dict[str, Any]]]:
    """Time each config (``triton.testing.do_bench``, median) on random ``x (n_tokens, K)``, check it against the
    reference (error ≤ 2× that of the dense 16-bit matmul), cache and return the fastest valid
    one, with every row ``{config, us, err, ok}``."""
    from triton.testing import do_bench

    bench = bench or (lambda f: do_bench(f, warmup=5, rep=rep_ms, return_mode="median"))
    if configs is None:
        configs = DECODE_CONFIGS if n_tokens <= MAX_DECODE_TOKENS else PREFILL_CONFIGS
    K = 2 * values.shape[1]
    x = torch.randn(n_tokens, K, device=values.device, dtype=values.dtype)
    dense = unpack_24(values, meta)  # (M, K)
    ref = x.double() @ dense.double().T  # (N, M) float64 reference
    dense_err = (F.linear(x, dense).double() - ref).abs().max().item()
    rows, best = [], None
    for cfg in configs:
        if not cfg.use_dot and n_tokens > 4:  # one program per token: never competitive beyond a few tokens
            continue
        try:
            y = launch(x, values, meta, None, cfg)
            err = (y.double() - ref).abs().max().item()
            us = 1e3 * bench(lambda: launch(x, values, meta, None, cfg))
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
