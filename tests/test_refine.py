"""Refit and swap search (refine.py) against float64 oracles: least squares, exact ΔL, local optimality."""

import itertools

import pytest
import torch

from oracles import optimal_loss_for_mask, refit as refit_oracle, tiny_problem
from sparsekit import InputError, get_pattern, prune_weight
from sparsekit.hessian import scaled_hessian
from sparsekit.patterns import check_mask
from sparsekit.pruners import METHODS
from sparsekit.refine import (
    _candidates,
    _swap,
    _sweep,
    damped_hessian,
    refit,
    swap_search,
    swap_state,
)

# (pattern, M, K): odd sizes where the pattern allows; rowpair-16 needs 16-row chunks and K % 16 == 0
SEED_CASES = [("2:4", 3, 24), ("coupled-2:4", 3, 32), ("2:4-pairs", 3, 24), ("rowpair-16", 16, 32)]
# tiny enough to enumerate every single swap with exact refits
TINY_CASES = [("2:4", 2, 12), ("3:8", 2, 16), ("2:4-pairs", 2, 16), ("coupled-2:4", 1, 32), ("rowpair-16", 16, 32)]


def _hd(H, damp=0.01):
    Hd = H.double().clone()
    Hd.diagonal().add_(damp * Hd.diagonal().mean())
    return Hd


def _random_mask(layout, seed):
    g = torch.Generator().manual_seed(seed)
    return layout.project(torch.rand(layout.num_rows, layout.num_cols, generator=g, dtype=torch.float64))


def _damped_loss(W, Hd, mask):
    return optimal_loss_for_mask(W, Hd, mask).sum().item()


# ---- refit ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern,M,K", SEED_CASES)
@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_refit_equals_float64_least_squares(pattern, M, K, solver):
    W, H, _ = tiny_problem(M, K, seed=K + M)
    layout = get_pattern(pattern).resolve(M, K)
    Hd = _hd(H)
    for seed in range(3):
        mask = _random_mask(layout, seed)
        check_mask(mask, layout)
        out, stats = refit(W, Hd, mask, solver=solver)
        ref = refit_oracle(W, Hd, mask)
        assert stats["refit_solver"] == solver
        assert (out[~mask] == 0).all()
        assert torch.allclose(out, ref, atol=1e-9 * ref.abs().max().item(), rtol=0)


def test_refit_cg_tf32_flag_is_inert_on_cpu():
    """tf32 only switches CUDA matmuls: on the CPU the CG iterates are bit-identical with it on or off."""
    W, H, _ = tiny_problem(4, 64, seed=2)
    layout = get_pattern("2:4").resolve(4, 64)
    mask = _random_mask(layout, 0)
    a, sa = refit(W.float(), _hd(H).float(), mask, solver="cg", tf32=True)
    b, sb = refit(W.float(), _hd(H).float(), mask, solver="cg", tf32=False)
    assert torch.equal(a, b) and sa == sb and sa["refit_cg_iters"] > 10


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [False, True])
def test_refit_cg_on_cuda_reaches_the_float64_least_squares(tf32):
    """CUDA CG in float32, with TF32 products in its iterations or not: the float32 residual checks keep it at
    float32 accuracy (same loss as the float64 solve to 1e-5, weights to 1e-3 of their scale)."""
    W, H, _ = tiny_problem(64, 1024, seed=5)
    layout = get_pattern("2:4").resolve(64, 1024)
    Hd = _hd(H)
    mask = _random_mask(layout, 0)
    ref = refit_oracle(W, Hd, mask)
    out, stats = refit(W.float().cuda(), Hd.float().cuda(), mask.cuda(), solver="cg", tf32=tf32)
    out = out.double().cpu()
    assert stats["refit_cg_residual"] < 1e-4
    assert (out[~mask] == 0).all()
    loss = lambda w: ((w - W) @ Hd * (w - W)).sum().item()  # noqa: E731
    assert abs(loss(out) / loss(ref) - 1) < 1e-5
    assert (out - ref).abs().max() < 1e-3 * ref.abs().max()


def test_refit_with_undamped_full_rank_H_is_the_plain_least_squares():
    W, H, X = tiny_problem(4, 24, seed=1)
    res = prune_weight(W, H, "2:4", "magnitude", refit=True, damp=0.0)
    assert torch.equal(res.mask, prune_weight(W, H, "2:4", "magnitude").mask)
    ref = refit_oracle(W, H, res.mask)
    assert torch.allclose(res.weight, ref, atol=1e-10, rtol=0)
    # the optimum through X: no least-squares solution for this mask has a lower output error
    Xw = X @ W.T
    for r in range(4):
        R = res.mask[r].nonzero().flatten()
        sol = torch.linalg.lstsq(X[:, R], Xw[:, r]).solution
        assert torch.allclose(res.weight[r, R], sol, atol=1e-10, rtol=0)


@pytest.mark.parametrize("method", list(METHODS))
def test_refit_never_increases_the_loss_of_any_method(method):
    W, H, _ = tiny_problem(16, 32, seed=9)
    opts = {"init": "magnitude"} if method == "admm" else {}
    plain = prune_weight(W, H, "2:4", method, **opts)
    res = prune_weight(W, H, "2:4", method, refit=True, **opts)
    assert torch.equal(res.mask, plain.mask)
    assert res.stats["refit_loss_before"] == pytest.approx(plain.loss, rel=1e-12)
    assert res.loss <= plain.loss
    if res.stats["refit_kept"]:
        assert torch.allclose(res.weight, refit_oracle(W, _hd(H), res.mask), atol=1e-10, rtol=0)
    else:
        assert torch.equal(res.weight, plain.weight)


def test_refit_lowers_sparsegpt_and_magnitude():
    W, H, _ = tiny_problem(16, 32, seed=9)
    for method in ("sparsegpt", "magnitude"):
        plain = prune_weight(W, H, "2:4", method)
        res = prune_weight(W, H, "2:4", method, refit=True)
        assert res.stats["refit_kept"] and res.loss < plain.loss


# ---- swap search: exact ΔL and the rank-e updates ------------------------------------------------------------
def _state(W, Hd, mask):
    hs, d = scaled_hessian(Hd)
    w = W * d
    A = swap_state(w, hs, mask)
    delta = torch.where(mask, torch.bmm(A, (w * ~mask).unsqueeze(2)).squeeze(2), -w)
    t = torch.where(mask, delta, -(delta @ hs))
    return hs, w, A, delta, t


@pytest.mark.parametrize("pattern,M,K", SEED_CASES)
def test_swept_matrix_and_refit_deltas(pattern, M, K):
    W, H, _ = tiny_problem(M, K, seed=5)
    Hd = _hd(H)
    mask = _random_mask(get_pattern(pattern).resolve(M, K), 0)
    hs, w, A, delta, _ = _state(W, Hd, mask)
    for r in range(M):  # eq. (2): A_RR = −H_RR⁻¹, A_RP = H_RR⁻¹ H_RP, A_PP = (H⁻¹_PP)⁻¹
        R, P = mask[r].nonzero().flatten(), (~mask[r]).nonzero().flatten()
        G = torch.linalg.inv(hs[R][:, R])
        S = torch.linalg.inv(torch.linalg.inv(hs)[P][:, P])
        assert torch.allclose(A[r][R][:, R], -G, atol=1e-9)
        assert torch.allclose(A[r][R][:, P], G @ hs[R][:, P], atol=1e-9)
        assert torch.allclose(A[r][P][:, P], S, atol=1e-9)
    assert torch.allclose((w + delta) / scaled_hessian(Hd)[1], refit_oracle(W, Hd, mask), atol=1e-9)
    for build_rows in (1, 2):  # built a few rows at a time: the same matrices
        assert torch.equal(swap_state(w, hs, mask, build_rows), A)


@pytest.mark.parametrize("pattern,M,K", SEED_CASES)
def test_exact_delta_equals_recomputed_loss_difference(pattern, M, K):
    """ΔL of eq. (3) for random in-scope swaps (cross-row for rowpair-16) = loss(after) − loss(before), refit."""
    W, H, _ = tiny_problem(M, K, seed=2)
    layout = get_pattern(pattern).resolve(M, K)
    Hd = _hd(H)
    mask = _random_mask(layout, 1)
    _, w, A, _, t = _state(W, Hd, mask)
    keep = layout.keep_of_mask(mask)
    delta, pb, kb = _candidates(A, w, t, keep, layout.rows, layout.cols, layout.nnz)
    before = _damped_loss(W, Hd, mask)
    g = torch.Generator().manual_seed(0)
    for s in torch.randperm(layout.num_scopes, generator=g)[:6].tolist():
        for a, b in itertools.product(range(pb.shape[1]), range(kb.shape[1])):
            bi, bj = pb[s, a], kb[s, b]
            new = mask.clone()
            new[layout.rows[s, bi], layout.cols[s, bi]] = True
            new[layout.rows[s, bj], layout.cols[s, bj]] = False
            check_mask(new, layout)
            exact = _damped_loss(W, Hd, new) - before
            assert delta[s, a, b].item() == pytest.approx(exact, rel=1e-7, abs=1e-9 * before)
    if pattern == "rowpair-16":  # the two blocks of a scope lie in different rows
        assert bool((layout.rows[:, 0, 0] != layout.rows[:, 1, 0]).all())


@pytest.mark.parametrize("pattern,M,K", SEED_CASES)
def test_swap_updates_equal_the_state_recomputed_from_scratch(pattern, M, K):
    W, H, _ = tiny_problem(M, K, seed=4)
    layout = get_pattern(pattern).resolve(M, K)
    Hd = _hd(H)
    mask = _random_mask(layout, 2)
    hs, w, A, d, t = _state(W, Hd, mask)
    keep = layout.keep_of_mask(mask)
    m = mask.clone()
    for step in range(3):  # three swaps in a row, each in the first scope of the first row (group)
        s = 0 if layout.row_local else step % layout.num_scopes
        bi = (~keep[s]).nonzero()[0, 0]
        bj = keep[s].nonzero()[-1, 0]
        rI, cI = layout.rows[s, bi], layout.cols[s, bi]
        rJ, cJ = layout.rows[s, bj], layout.cols[s, bj]
        if layout.row_local:  # fused update on one row
            r = int(rI[0])
            Ak, dk, mk = A[r : r + 1], d[r : r + 1], m[r : r + 1]
            _swap(Ak, dk, mk, w[r : r + 1], t[r : r + 1], cI[None], cJ[None])
        else:  # rowpair-16: un-prune in one row, prune in the other
            for rr, cc, unprune in ((int(rI[0]), cI, True), (int(rJ[0]), cJ, False)):
                _sweep(A[rr : rr + 1], d[rr : rr + 1], m[rr : rr + 1], w[rr : rr + 1], t[rr : rr + 1], cc[None],
                       unprune)
        keep[s, bi], keep[s, bj] = True, False
        assert torch.equal(m, layout.mask_from_keep(keep))
        A_ref = swap_state(w, hs, m)
        assert torch.allclose(A, A_ref, atol=1e-9 * A_ref.abs().max().item(), rtol=0)
        d_ref = refit_oracle(W, Hd, m) * scaled_hessian(Hd)[1] - w
        assert torch.allclose(d, d_ref, atol=1e-9, rtol=0)
        t = torch.where(m, d, -(d @ hs))


# ---- swap search: monotone, and ends at a local optimum --------------------------------------------------------
def _single_swaps(mask, layout):
    keep = layout.keep_of_mask(mask)
    for s in range(layout.num_scopes):
        for bi, bj in itertools.product((~keep[s]).nonzero().flatten().tolist(), keep[s].nonzero().flatten().tolist()):
            new = mask.clone()
            new[layout.rows[s, bi], layout.cols[s, bi]] = True
            new[layout.rows[s, bj], layout.cols[s, bj]] = False
            yield new


@pytest.mark.parametrize("pattern,M,K", TINY_CASES)
def test_swap_search_ends_where_no_single_swap_improves(pattern, M, K):
    W, H, _ = tiny_problem(M, K, seed=13)
    layout = get_pattern(pattern).resolve(M, K)
    Hd = _hd(H)
    start = prune_weight(W, H, pattern, "magnitude").mask  # a poor start: the search has work to do
    mask, stats = swap_search(W, Hd, layout, start, max_sweeps=1000)
    check_mask(mask, layout)
    final, initial = _damped_loss(W, Hd, mask), _damped_loss(W, Hd, start)
    assert stats["swaps"] > 0 and stats["swap_sweeps"] < 1000
    assert final < initial
    den = ((W @ Hd) * W).sum().item()
    assert stats["swap_damped_loss_before"] == pytest.approx((initial / den) ** 0.5, rel=1e-9)
    assert stats["swap_damped_loss_after"] == pytest.approx((final / den) ** 0.5, rel=1e-9)
    for new in _single_swaps(mask, layout):  # brute force: every single in-scope swap, exact refit, float64
        assert _damped_loss(W, Hd, new) >= final * (1 - 1e-9)


@pytest.mark.parametrize("pattern,M,K", SEED_CASES)
@pytest.mark.parametrize("method", ["sparsegpt", "true-obs", "magnitude"])
def test_refine_swap_never_increases_the_loss(pattern, M, K, method):
    W, H, _ = tiny_problem(M, K, seed=21)
    for dt in (torch.float64, torch.float32):
        Wd, Hdt = W.to(dt), H.to(dt)
        plain = prune_weight(Wd, Hdt, pattern, method)
        res = prune_weight(Wd, Hdt, pattern, method, refine="swap")
        check_mask(res.mask, pattern)
        assert (res.weight[~res.mask] == 0).all() and res.weight.dtype == dt
        assert res.loss <= plain.loss
        assert res.stats["swap_loss_before"] == pytest.approx(plain.loss, rel=1e-6)
        if not res.stats["swap_kept"]:
            assert torch.equal(res.mask, plain.mask)


def test_max_sweeps_bounds_the_search_and_zero_is_a_refit():
    W, H, _ = tiny_problem(4, 48, seed=3)
    start = prune_weight(W, H, "2:4", "magnitude")
    zero = prune_weight(W, H, "2:4", "magnitude", refine="swap", max_sweeps=0)
    assert zero.stats["swaps"] == 0 and torch.equal(zero.mask, start.mask)
    assert torch.allclose(zero.weight, refit_oracle(W, _hd(H), start.mask), atol=1e-10, rtol=0)
    one = prune_weight(W, H, "2:4", "magnitude", refine="swap", max_sweeps=1)
    assert one.stats["swap_sweeps"] == 1 and 0 < one.stats["swaps"] <= 4  # at most one swap per row
    full = prune_weight(W, H, "2:4", "magnitude", refine="swap", refit=True)
    assert full.loss < one.loss < zero.loss and full.stats["refit_by"] == "swap"


# ---- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,fix", [
    (dict(refine="anneal"), "refine=None or one of: swap"),
    (dict(refine=True), "refine=None or one of: swap"),
    (dict(refit=1), "refit must be True or False"),
    (dict(refit="yes"), "refit must be True or False"),
    (dict(refine="swap", max_sweeps=-1), "max_sweeps must be an int >= 0"),
    (dict(refine="swap", max_sweeps=2.5), "max_sweeps must be an int >= 0"),
    (dict(refine="swap", max_sweeps=True), "max_sweeps must be an int >= 0"),
    (dict(refit=True, damp_mode="diag", damp=2.0), "damp_mode='diag' needs 0 <= damp < 1"),
])
def test_bad_refine_options(kw, fix):
    W, H, _ = tiny_problem(2, 8, seed=0)
    W0 = W.clone()
    with pytest.raises(InputError, match=fix):
        prune_weight(W, H, "2:4", "magnitude", inplace=True, **kw)
    assert torch.equal(W, W0)


def test_refit_rejects_unknown_solver():
    W, H, _ = tiny_problem(2, 8, seed=0)
    with pytest.raises(InputError, match="auto, direct, cg"):
        refit(W, _hd(H), torch.ones(2, 8, dtype=torch.bool), solver="qr")
    assert damped_hessian(H, 0.01, "mean")[2] == 0


def test_bench_variants_pass_refine_options_to_prune_weight():
    from sparsekit import bench as B
    from sparsekit.data.synthetic import seed_shape_layer

    lay = seed_shape_layer(16, 64, tokens=256, seed=0, device="cpu")
    specs = ["sparsegpt", "sparsegpt+refit", "true-obs+swap", "admm-true-obs+swap", "magnitude:refine=swap,max_sweeps=2"]
    rows = B.run_bench([lay], ["2:4"], specs, "cpu", strict=True)
    assert [r.status for r in rows] == ["ok"] * len(specs)
    for r in rows:
        ref = prune_weight(lay.weight, lay.hessian, "2:4", r.method, **r.options)
        assert r.loss == pytest.approx(ref.loss, rel=1e-9, abs=0)
    assert rows[1].loss < rows[0].loss and rows[1].label == "SparseGPT + refit"
    assert rows[-1].options == {"refine": "swap", "max_sweeps": 2}
    assert B.variant_status(B.parse_variant("sparsegpt:refine=swap,bogus=1")).startswith("sparsegpt does not take bogus")
