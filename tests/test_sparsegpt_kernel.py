"""The fused SparseGPT batch kernel equals its torch reference and the general path (CUDA only)."""

import pytest
import torch

from oracles import sparsegpt_plain, tiny_problem
from sparsekit import prune_weight
from sparsekit.kernels import sparsegpt_nm as k

pytestmark = pytest.mark.gpu


def _batch(M, BS, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * BS, BS, generator=g) * torch.exp(torch.randn(BS, generator=g))
    C = torch.linalg.inv(X.T @ X / (4 * BS) + 0.01 * torch.eye(BS))
    U = torch.linalg.cholesky(C, upper=True)
    return torch.randn(M, BS, generator=g), U


@pytest.mark.parametrize("blocks,elems,nnz", [(4, 1, 2), (8, 1, 4), (4, 2, 2), (3, 1, 1)])
def test_kernel_equals_reference(blocks, elems, nnz):
    BS = 96 if blocks == 3 else 128
    if BS & (BS - 1):
        pytest.skip("kernel needs a power-of-two batch")
    W, U = _batch(100, BS, seed=blocks * 10 + elems)
    W_ref = W.double().clone()
    err_ref, pr_ref = k.sweep_batch_reference(W_ref, U.double(), blocks, elems, nnz)
    W_k = W.cuda().clone()
    err_k, pr_k = k.sweep_batch(W_k, U.cuda().contiguous(), blocks, elems, nnz)
    assert torch.equal(pr_k.cpu(), pr_ref)
    assert not torch.isnan(err_k).any() and not torch.isnan(W_k).any()
    rel = lambda a, b: (torch.linalg.norm(a.double().cpu() - b) / torch.linalg.norm(b)).item()
    assert rel(W_k, W_ref) < 1e-5 and rel(err_k, err_ref) < 1e-5


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_fused_prune_weight_matches_published_loop(pattern, n, m):
    W, H, _ = tiny_problem(64, 512, seed=3)
    ref = sparsegpt_plain(W, H, n, m)
    r = prune_weight(W.float().cuda(), H.float().cuda(), pattern, "sparsegpt")
    assert (torch.linalg.norm(r.weight.double().cpu() - ref) / torch.linalg.norm(ref)).item() < 1e-3
