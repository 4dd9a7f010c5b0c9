"""The batched OBS linear algebra: fast paths equal their references; True OBS / OBS-ord on CUDA equal float64 CPU.

The blocked inverse Cholesky factor is also checked on the CPU (it is plain torch); the 16-bit GEMM path and the
whole methods on CUDA are checked on a GPU machine (marked ``gpu``).
"""

import pytest
import torch

from oracles import tiny_problem
from sparsekit import prune_weight
from sparsekit.kernels import obs_linalg as la


def _spd(n, q, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3 * q, q, generator=g, dtype=dtype) * torch.exp(torch.randn(n, 1, q, generator=g, dtype=dtype))
    return X.mT @ X / (3 * q) + 1e-3 * torch.eye(q, dtype=dtype)


@pytest.mark.parametrize("q", [5, 64, 65, 200])
def test_blocked_inverse_factor_equals_reference(q):
    A = _spd(3, q, seed=q)
    X, info = la._chol_inv_blocked(A, base=16)
    Xr, info_r = la.chol_inv_factor_reference(A)
    assert torch.equal(info, info_r) and not bool((info > 0).any())
    assert torch.allclose(X, Xr, rtol=1e-9, atol=1e-9)
    assert torch.allclose(X @ A @ X.mT, torch.eye(q, dtype=A.dtype).expand_as(A), atol=1e-8)
    assert torch.equal(X, X.tril())


def test_blocked_inverse_factor_reports_failure_position():
    A = _spd(2, 100, seed=1)
    A[1, 70, 70] = -1.0  # not positive definite from pivot 70 on
    _, info = la._chol_inv_blocked(A, base=16)
    _, info_r = la.chol_inv_factor_reference(A)
    assert info[0] == 0 and info[1] > 0 and info[1] == info_r[1]


def test_baddbmm_reference_upcasts_exactly():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 8, 12, generator=g).to(torch.bfloat16)
    b = torch.randn(4, 12, 5, generator=g).to(torch.bfloat16)
    out = torch.randn(4, 8, 5, generator=g)
    exp = out.double() - a.double() @ b.double()
    la.baddbmm_(out, a, b, alpha=-1.0)
    assert torch.allclose(out.double(), exp, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_baddbmm_fast_path_equals_reference(dtype):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 64, 300, generator=g).to("cuda", dtype)
    b = torch.randn(6, 500, 300, generator=g).to("cuda", dtype).mT  # strided, as U[:, :, :t].mT
    base = torch.randn(6, 64, 500, generator=g).cuda()
    ref = la._baddbmm_reference_(base.clone(), a, b, -1.0)
    out = la.baddbmm_(base.clone(), a, b, alpha=-1.0)
    assert la._fast_mode("cuda:0", dtype) != "reference"
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-3 * ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("q", [65, 256, 512])
def test_blocked_inverse_factor_cuda_equals_float64(q):
    A = _spd(8, q, seed=q)
    X, info = la.chol_inv_factor(A.float().cuda())
    Xr, _ = la.chol_inv_factor_reference(A)
    assert not bool((info > 0).any())
    err = torch.linalg.matrix_norm(X.double().cpu() @ A @ X.double().cpu().mT - torch.eye(q, dtype=A.dtype))
    assert err.max().item() < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["2:4", "coupled-2:4", "2:4-pairs", "rowpair-16"])
@pytest.mark.parametrize("method,opts", [
    ("true-obs", dict(ng=8, order="largest_first")),  # c_dtype None: float16 U on CUDA
    ("true-obs", dict(ng=8, order="largest_first", c_dtype=torch.float32)),  # TF32
    ("true-obs", dict(ng=8, order="largest_first", c_dtype=torch.bfloat16)),
    ("obs-ord", dict(ng=8)),
    ("obs-interleaved", dict(n_splits=8)),
])
def test_cuda_fast_path_matches_float64_cpu(pattern, method, opts):
    """Same algorithm, CUDA float32/TF32 (or 16-bit C) vs CPU float64: valid masks, loss within 0.5%."""
    W, H, _ = tiny_problem(32, 512, seed=7)
    ref = prune_weight(W, H, pattern, method, **{k: v for k, v in opts.items() if k != "c_dtype"})
    fast = prune_weight(W.float().cuda(), H.float().cuda(), pattern, method, **opts)
    assert fast.weight.is_cuda and torch.equal(fast.weight.cpu() == 0, ~fast.mask.cpu())
    assert abs(fast.loss / ref.loss - 1) < 5e-3
    if method == "true-obs" and "c_dtype" not in opts:
        assert fast.stats["c_dtype"] == "float16"
