"""A synthetic layer at the seed's shape (W 2560×9728, N = 244 449 tokens) with a realistic Hessian.

The generator (all random numbers drawn on the CPU from ``seed``, so the layer is the same on every device up
to floating-point rounding):

1. **Channel scales** ``d (K,)``: log-normal, ``d_j = exp(σ_d z_j)``, and a few **outlier channels**
   (``max(1, K/1000)`` of them) multiplied by ``U(5, 20)`` — the massive activations of LLMs.
2. **Correlation** ``R = Q Λ Qᵀ`` rescaled to unit diagonal, ``Q`` a random orthogonal matrix (QR of a Gaussian)
   and a power-law spectrum with a soft edge, ``λ_k ∝ k^(−β) (1 − (k/(K+1))^p)`` (``β = 0.8``, ``p = 4``): a few
   dominant shared directions, a long tail, and near-null directions that compensation can use.
3. **Population covariance** ``Σ = D R D`` with ``D = diag(d)``; its Cholesky factor is ``L = D chol(R)``.
4. **Finite-sample H** for ``N`` tokens, without materialising ``X (N, K)``: ``N·H = XᵀX`` with rows of X drawn
   from ``N(0, Σ)`` is Wishart(Σ, N); by Bartlett's decomposition ``XᵀX = L A Aᵀ Lᵀ`` with ``A`` lower
   triangular, ``A_ii = sqrt(χ²(N − i))``, ``A_ij ~ N(0, 1)`` below the diagonal. So ``H = G Gᵀ / N`` with
   ``G = L A`` — a Gram matrix, exactly PSD, full rank when ``N ≥ K``: ``O(K³)`` work instead of ``O(N K²)``
   (:func:`wishart_gram`). ``tokens=None`` returns ``Σ`` itself.
5. **Weight** ``W_ij = r_i c_j t_ij / sqrt(K)`` with log-normal row and column scales ``r, c`` (σ = 0.25) and
   Student-t entries ``t`` (4 degrees of freedom, unit variance: heavier tails than Gaussian, like trained
   weights).

Calibration, against the real layer closest to the seed's (a decoder's ``mlp.down_proj``; SmolLM2-135M layer 15,
576×1536, H from 8192 tokens of mixed text) with the synthetic layer at the same M, K, N: the correlation
spectrum puts 5.6% / 21% / 50% of its trace in the top 1 / 10 / 100 directions (real: 5.9% / 18% / 47%),
channel scales have log-std 0.37 (real 0.39), and at 2:4 magnitude / Wanda / SparseGPT lose 25.1% / 20.3% /
14.4% (real: 33.6% / 27.1% / 19.0%): SparseGPT gains over Wanda as much as on the real layer (0.71× vs
0.70×) — the structure the seed's comparisons depend on. The seed's own Qwen3 layer is not available here.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from sparsekit.data.layers import RealLayer
from sparsekit.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["seed_shape_layer", "wishart_gram", "SEED_SHAPE", "SEED_TOKENS"]

#: the seed's layer: Qwen3-4B layer 0, W (2560, 9728) (the MLP down projection)
SEED_SHAPE = (2560, 9728)
#: tokens behind the seed's H (X was 244 449 × 9728)
SEED_TOKENS = 244449


def wishart_gram(L: torch.Tensor, tokens: int, generator: torch.Generator, rng: np.random.Generator) -> torch.Tensor:
    """``XᵀX / N`` for ``N = tokens`` rows ``x ~ N(0, L Lᵀ)``, by Bartlett's decomposition, without forming X.

    ``XᵀX ~ Wishart(Σ, N) = L A Aᵀ Lᵀ`` with ``A (K, K)`` lower triangular, ``A_ii = sqrt(χ²(N − i))``
    (``i = 0 .. K−1``) and ``A_ij ~ N(0, 1)`` for ``i > j``. Returns ``G Gᵀ / N`` with ``G = L A`` (exactly PSD).
    """
    K = L.shape[0]
    A = torch.tril(torch.randn(K, K, generator=generator, dtype=L.dtype), diagonal=-1).to(L.device)  # (K, K)
    chi2 = rng.chisquare(tokens - np.arange(K, dtype=np.float64))  # (K,) dof N, N-1, ..., N-K+1
    A.diagonal().copy_(torch.from_numpy(np.sqrt(chi2)).to(device=L.device, dtype=L.dtype))
    G = L @ A  # (K, K)
    del A
    return (G @ G.T) / tokens


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_shape_layer(
    M: int = SEED_SHAPE[0],
    K: int = SEED_SHAPE[1],
    tokens: int | None = SEED_TOKENS,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    channel_sigma: float = 0.35,
    decay: float = 0.8,
    edge: float = 4.0,
) -> RealLayer:
    """``RealLayer("synthetic", W (M, K), H (K, K), tokens)`` from the generator in the module docstring.

    Args:
        M, K: weight shape (default the seed's 2560 × 9728; e.g. 64 × 256 for CPU tests).
        tokens: ``N`` behind the empirical ``H`` (must be ``>= K`` for full rank); ``None`` for the population ``Σ``.
        seed: all randomness.
        device: where the matrices are multiplied and returned (default CUDA if available, else CPU).
        dtype: float32 or float64.
        channel_sigma: ``σ_d`` of the log-normal channel scales.
        decay: ``β``, the power-law exponent of the correlation spectrum (larger: fewer dominant directions).
        edge: ``p``, the soft edge of the spectrum (``0``: none, the smallest eigenvalues stay large).
    """
    if M < 1 or K < 2:
        raise InputError(f"need M >= 1 and K >= 2, got M={M}, K={K}.")
    if tokens is not None and tokens < K:
        raise InputError(f"tokens={tokens} < K={K} gives a singular H; use tokens >= K (the seed has {SEED_TOKENS}).")
    if dtype not in (torch.float32, torch.float64):
        raise InputError(f"dtype must be float32 or float64, got {dtype}.")
    if decay < 0 or edge < 0:
        raise InputError(f"decay and edge must be >= 0, got {decay} and {edge}.")
    dev = _default_device() if device is None else torch.device(device)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype).to(dev)

    # 1. channel scales with outliers
    d = torch.exp(channel_sigma * torch.randn(K, generator=g, dtype=dtype))  # (K,)
    n_out = max(1, K // 1000)
    idx = torch.randperm(K, generator=g)[:n_out]
    d[idx] *= 5 + 15 * torch.rand(n_out, generator=g, dtype=dtype)
    d = d.to(dev)
    # 2. correlation R = Q Λ Qᵀ with a power-law spectrum and a soft edge, unit diagonal
    k = torch.arange(1, K + 1, dtype=torch.float64)
    lam = k.pow(-decay) * (1 - (k / (K + 1)).pow(edge)) if edge > 0 else k.pow(-decay)
    lam = (lam / lam.mean()).to(device=dev, dtype=dtype)  # (K,)
    Q, T = torch.linalg.qr(randn(K, K))  # (K, K) Haar-distributed once the signs are fixed
    Q *= torch.sign(T.diagonal())
    del T
    R = (Q * lam) @ Q.T  # (K, K)
    del Q
    e = torch.rsqrt(R.diagonal())  # (K,)
    R = e[:, None] * R * e[None, :]
    R = (R + R.T) / 2
    # 3. Σ = D R D, L = D chol(R)
    L = d[:, None] * torch.linalg.cholesky(R)  # (K, K) lower
    del R
    H = L @ L.T if tokens is None else wishart_gram(L, tokens, g, rng)
    del L
    H = (H + H.T) / 2  # exact symmetry against matmul rounding
    # 5. W with row/column scales and Student-t(4) entries of unit variance
    nu = 4
    chi = torch.randn(nu, M, K, generator=g, dtype=dtype).square_().sum(0)  # (M, K) χ²(ν)
    t = torch.randn(M, K, generator=g, dtype=dtype) * torch.rsqrt(chi / nu) / (nu / (nu - 2)) ** 0.5
    del chi
    rows = torch.exp(0.25 * torch.randn(M, 1, generator=g, dtype=dtype))
    cols = torch.exp(0.25 * torch.randn(1, K, generator=g, dtype=dtype))
    W = (t * rows * cols / K**0.5).to(dev)  # (M, K)
    log.debug("synthetic layer (%d, %d), N=%s, %d outlier channels", M, K, tokens, n_out)
    return RealLayer("synthetic", W, H, tokens if tokens is not None else 0)
