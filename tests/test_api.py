"""prune_weight: the contract every method obeys, and bad input (typed error, weight untouched)."""

import pytest
import torch

from oracles import brute_force_optimum, tiny_problem
from sparsekit import HessianError, InputError, PatternError, get_pattern, prune_weight
from sparsekit.pruners import METHODS

BASELINES = ["magnitude", "wanda", "sparsegpt"]
SEED_PATTERNS = ["2:4", "2:4-pairs", "coupled-2:4", "rowpair-16", "3:8", "50%"]


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("pattern", SEED_PATTERNS)
def test_contract_odd_shapes(method, pattern):
    M = 32 if pattern == "rowpair-16" else 24
    W, H, _ = tiny_problem(M, 48, seed=1)
    W0 = W.clone()
    r = prune_weight(W, H, pattern, method)
    assert torch.equal(W, W0)  # input untouched
    lay = get_pattern(pattern).resolve(M, 48)
    assert r.sparsity == pytest.approx(1 - lay.nnz / lay.blocks_per_scope)
    assert torch.all(r.weight[~r.mask] == 0)  # exact zeros
    assert r.loss == pytest.approx(
        float((((r.weight - W) @ H * (r.weight - W)).sum() / ((W @ H) * W).sum()).sqrt()), rel=1e-9
    )
    if method == "magnitude":  # no update: kept weights unchanged
        assert torch.equal(r.weight[r.mask], W[r.mask])


@pytest.mark.parametrize("pattern", ["2:4", "2:4-pairs", "rowpair-16"])
def test_loss_at_least_brute_force_optimum(pattern):
    M, K = (16, 32) if pattern == "rowpair-16" else (2, 16)
    W, H, _ = tiny_problem(M, K, seed=2)
    opt, _ = brute_force_optimum(W, H, get_pattern(pattern).resolve(M, K))
    for m in BASELINES:
        assert prune_weight(W, H, pattern, m).loss >= opt - 1e-12


def test_inplace_and_dtype_preserved():
    W, H, _ = tiny_problem(8, 16)
    w16 = W.to(torch.bfloat16)
    r = prune_weight(w16, H.float(), "2:4", "sparsegpt", inplace=True)
    assert r.weight is w16 and w16.dtype == torch.bfloat16
    assert torch.all(w16[~r.mask] == 0)


def test_deterministic():
    W, H, _ = tiny_problem(8, 32, seed=5)
    a = prune_weight(W.float(), H.float(), "2:4", "sparsegpt")
    b = prune_weight(W.float(), H.float(), "2:4", "sparsegpt")
    assert torch.equal(a.weight, b.weight)


def _bad(call, err, match):
    W, H, _ = tiny_problem(8, 16)
    W0, H0 = W.clone(), H.clone()
    with pytest.raises(err, match=match):
        call(W, H)
    assert torch.equal(W, W0) and torch.equal(H, H0)


def test_bad_k_not_tiling():
    W, H, _ = tiny_problem(4, 18)
    with pytest.raises(PatternError, match="does not tile"):
        prune_weight(W, H, "2:4")


def test_bad_nan_in_weight():
    def call(W, H):
        W2 = W.clone()
        W2[0, 0] = float("nan")
        prune_weight(W2, H, "2:4")

    _bad(call, InputError, "NaN")


def test_bad_inf_in_hessian():
    def call(W, H):
        H2 = H.clone()
        H2[1, 1] = float("inf")
        prune_weight(W, H2, "2:4")

    _bad(call, InputError, "NaN or Inf")


def test_bad_hessian_size():
    _bad(lambda W, H: prune_weight(W, H[:8, :8], "2:4"), InputError, r"must be \(16, 16\)")


def test_bad_hessian_not_symmetric():
    def call(W, H):
        H2 = H.clone()
        H2[0, 1] += 1.0
        prune_weight(W, H2, "2:4")

    _bad(call, HessianError, "not symmetric")


def test_bad_negative_definite_hessian():
    _bad(lambda W, H: prune_weight(W, -H, "2:4"), HessianError, "positive semi-definite")


def test_bad_nnz_out_of_range():
    from sparsekit.patterns import BlockSpec, Pattern, ScopeSpec

    pat = Pattern(ScopeSpec(BlockSpec((1, 1)), (1, 4)), 7)
    _bad(lambda W, H: prune_weight(W, H, pat), PatternError, "nnz")


def test_bad_unknown_pattern_and_method():
    _bad(lambda W, H: prune_weight(W, H, "2:5:1"), PatternError, "unknown pattern")
    _bad(lambda W, H: prune_weight(W, H, "2:4", "sparsegtp"), InputError, "unknown method")


def test_bad_unknown_option():
    _bad(lambda W, H: prune_weight(W, H, "2:4", "sparsegpt", blocksz=64), InputError, "blocksize")
    _bad(lambda W, H: prune_weight(W, H, "2:4", "sparsegpt", blocksize=0), InputError, "positive")


def test_bad_dtype_and_device_mismatch():
    _bad(lambda W, H: prune_weight(W.long(), H, "2:4"), InputError, "floating")
    _bad(lambda W, H: prune_weight(W, H.half(), "2:4"), InputError, "float32 or float64")
    if torch.cuda.is_available():
        _bad(lambda W, H: prune_weight(W, H.cuda(), "2:4"), InputError, "same device")
    else:
        _bad(lambda W, H: prune_weight(W, H.to("meta"), "2:4"), InputError, "same device")


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_callers_hessian_is_left_bit_identical(monkeypatch, method, dtype):
    """No method (nor the swap search and refit after it) writes into its hessian: prune_weight hands the caller's
    own H to the method when it needs no scaling or cast (max|H| in [0.5, 1), the working dtype), and the caller's H
    is bit-identical afterwards."""
    import sparsekit.api as api

    W, H, _ = tiny_problem(8, 16, seed=6)
    H = (H * (0.75 / H.abs().max())).to(dtype)  # pow2_scale(H) == 1: no scaled copy
    H = (H + H.T) / 2
    W = W.to(dtype)
    H0 = H.clone()
    seen = []
    real = api.get_pruner

    def spy(name):
        fn = real(name)

        def wrapped(weight, hessian, *args, **kwargs):
            seen.append(hessian.data_ptr())
            return fn(weight, hessian, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(api, "get_pruner", spy)
    prune_weight(W, H, "2:4", method, refine="swap", refit=True)
    assert seen == [H.data_ptr()]  # the caller's H itself
    assert torch.equal(H, H0)
