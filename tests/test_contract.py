"""The contract every method obeys: one class, run over every entry of ``sparsekit.pruners.METHODS``.

For each method x the four seed patterns (plus an ``N:M`` other than 2:4) x odd shapes:
- the mask satisfies the pattern exactly (``check_mask``) and has the pattern's exact sparsity;
- pruned entries are exactly 0 and the result keeps the input's dtype, shape and device;
- the input weight and Hessian are untouched (``inplace=False``);
- the reported loss equals the relative output error measured here in float64, through H and through X;
- on tiny layers the loss is never below the brute-force global optimum (every mask, optimal refit);
- the same inputs give bit-identical results.
A new method added to ``METHODS`` is covered here without any edit.
"""

from __future__ import annotations

import pytest
import torch

from oracles import brute_force_optimum, tiny_problem
from sparsekit import get_pattern, prune_weight
from sparsekit.patterns import check_mask
from sparsekit.pruners import METHODS

SEED_PATTERNS = ("2:4", "2:4-pairs", "coupled-2:4", "rowpair-16")
#: options that keep the slow methods fast on tiny layers without changing what they compute
FAST = {"admm": {"iters": 60}}


def _rows(pattern: str, odd: int) -> int:
    return 32 if pattern == "rowpair-16" else odd  # rowpair-16 couples rows in chunks of 16


def _measured_loss(W0: torch.Tensor, W1: torch.Tensor, H: torch.Tensor) -> float:
    d = (W1.double() - W0.double())
    num = (d @ H.double() * d).sum()
    den = (W0.double() @ H.double() * W0.double()).sum()
    return float((num / den).clamp_min(0).sqrt())


@pytest.mark.parametrize("method", sorted(METHODS))
class TestContract:
    @pytest.mark.parametrize("pattern", SEED_PATTERNS + ("3:8",))
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_valid_exact_untouched_measured(self, method, pattern, dtype):
        M, K = _rows(pattern, 24), 48  # K = 48: three 16-column groups; M = 24: not a power of two
        W, H, X = tiny_problem(M, K, seed=11)
        W, H = W.to(dtype), H.to(dtype)
        W0, H0 = W.clone(), H.clone()
        r = prune_weight(W, H, pattern, method, **FAST.get(method, {}))

        assert torch.equal(W, W0) and torch.equal(H, H0), "input modified"
        assert r.weight.dtype == dtype and r.weight.shape == W.shape and r.mask.dtype == torch.bool
        check_mask(r.mask, pattern)
        lay = get_pattern(pattern).resolve(M, K)
        assert r.mask.sum().item() == M * K * lay.nnz // lay.blocks_per_scope
        assert torch.all(r.weight[~r.mask] == 0), "pruned entries must be exactly 0"
        assert torch.isfinite(r.weight).all()
        # reported loss == measured loss, through H and through the activations X (H = XᵀX / N)
        assert r.loss == pytest.approx(_measured_loss(W, r.weight, H), rel=1e-6, abs=1e-12)
        Y0, Y1 = X @ W.double().T, X @ r.weight.double().T
        assert r.loss == pytest.approx(float((Y1 - Y0).norm() / Y0.norm()), rel=1e-5)

    @pytest.mark.parametrize("pattern", SEED_PATTERNS)
    def test_not_below_brute_force(self, method, pattern):
        M, K = (16, 32) if pattern == "rowpair-16" else (3, 16)
        W, H, _ = tiny_problem(M, K, seed=3)
        opt, _ = brute_force_optimum(W, H, get_pattern(pattern).resolve(M, K))
        r = prune_weight(W, H, pattern, method, **FAST.get(method, {}))
        assert r.loss >= opt - 1e-12

    def test_deterministic(self, method):
        W, H, _ = tiny_problem(24, 48, seed=5)
        a = prune_weight(W.float(), H.float(), "2:4", method, **FAST.get(method, {}))
        b = prune_weight(W.float(), H.float(), "2:4", method, **FAST.get(method, {}))
        assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight) and a.loss == b.loss

    def test_inplace_writes_the_result(self, method):
        W, H, _ = tiny_problem(8, 32, seed=6)
        w = W.float().clone()
        r = prune_weight(w, H.float(), "2:4", method, inplace=True, **FAST.get(method, {}))
        assert r.weight.data_ptr() == w.data_ptr() and torch.all(w[~r.mask] == 0)
