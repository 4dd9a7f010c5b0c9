"""True OBS (pruners/true_obs.py) against float64 oracles: exact greedy, maintained C, brute-force optimum."""

import pytest
import torch

from oracles import brute_force_optimum, exact_greedy, tiny_problem
from sparsekit import InputError, get_pattern, prune_weight
from sparsekit.hessian import scaled_inverse
from sparsekit.pruners.true_obs import COMPACT_EVERY, TrueOBSChunk, _geometry

# (pattern, M, K): tiny enough for the from-scratch greedy oracle
GREEDY_CASES = [("2:4", 3, 12), ("3:8", 2, 24), ("2:4-pairs", 2, 16), ("coupled-2:4", 2, 32), ("rowpair-16", 16, 32)]


@pytest.mark.parametrize("order", ["left_to_right", "largest_first"])
@pytest.mark.parametrize("pattern,M,K", GREEDY_CASES)
def test_ng1_joint_is_exact_greedy(pattern, M, K, order):
    W, H, _ = tiny_problem(M, K, seed=K + M)
    res = prune_weight(W, H, pattern, "true-obs", ng=1, scoring="joint", order=order, chunk_size=16)
    W_ref, mask_ref = exact_greedy(W, H, get_pattern(pattern).resolve(M, K), order=order)
    assert torch.equal(res.mask, mask_ref)
    assert torch.allclose(res.weight, W_ref, atol=1e-10, rtol=0)


def _hd(H, damp=0.01):
    Hd = H.double().clone()
    Hd.diagonal().add_(damp * Hd.diagonal().mean())
    return Hd


@pytest.mark.parametrize("pattern,M,K,ng,scoring", [
    ("2:4", 4, 24, 2, "independent"), ("2:4", 3, 20, 1, "joint"), ("coupled-2:4", 2, 48, 1, "joint"),
    ("rowpair-16", 16, 64, 2, "independent"), ("2:4", 3, 128, 1, "independent"),  # compacted every other step
])
def test_maintained_C_is_inverse_of_remaining_H(pattern, M, K, ng, scoring):
    W, H, _ = tiny_problem(M, K, seed=7)
    layout = get_pattern(pattern).resolve(M, K)
    inv = scaled_inverse(H, 0.01, "mean")
    chunk = TrueOBSChunk(W * inv.d, inv.C, _geometry(layout, M, W.device), scoring)
    Hd = _hd(H)
    while chunk.left:  # to the end: the compaction's moves differ from step to step
        chunk.step(ng, "largest_first")
        C = chunk.inverse()  # (M, K, K) scaled
        for r in range(M):
            R = (~chunk.pruned[r]).nonzero().flatten()
            ref = torch.linalg.inv(Hd[R][:, R]) * inv.d[R, None] * inv.d[None, R]
            assert torch.allclose(C[r][R][:, R], ref, atol=1e-9 * ref.abs().max().item(), rtol=0)
        # compaction: each row's remaining columns lie in the first n positions, n ≤ the most remaining + K/32
        # (+ the step); perm is a permutation and pos its inverse on them
        rem = ~chunk.pruned
        pending = sum(p.shape[1] for p, _ in chunk.stale)  # pruned since the last compaction, < K/32 of them
        assert pending * COMPACT_EVERY < K and chunk.n <= int(rem.sum(1).max()) + pending
        for r in range(M):
            assert torch.equal(chunk.perm[r].sort().values, torch.arange(K))
            assert bool(rem[r, chunk.perm[r, : chunk.n]].sum() == rem[r].sum())
            cols = rem[r].nonzero().flatten()
            assert torch.equal(chunk.perm[r, chunk.pos[r, cols]], cols)
        w = chunk.weights()
        assert (w[chunk.pruned] == 0).all()
        # pruned so far: the weights are the optimal refit of the original row (exact OBS = least squares)
        mask = ~chunk.pruned
        for r in range(M):
            Rk, P = mask[r].nonzero().flatten(), (~mask[r]).nonzero().flatten()
            w0 = W[r]
            ref = w0[Rk] + torch.linalg.solve(Hd[Rk][:, Rk], Hd[Rk][:, P] @ w0[P])
            assert torch.allclose(w[r][Rk] / inv.d[Rk], ref, atol=1e-9, rtol=0)


@pytest.mark.parametrize("pattern,M,K", [("2:4", 2, 12), ("2:4-pairs", 2, 16), ("coupled-2:4", 1, 16), ("3:8", 2, 16)])
@pytest.mark.parametrize("kw", [dict(ng=1, scoring="joint"), dict(ng=64, order="largest_first"), dict(ng=2)])
def test_loss_above_brute_force_optimum(pattern, M, K, kw):
    W, H, _ = tiny_problem(M, K, seed=3)
    opt, _ = brute_force_optimum(W, H, get_pattern(pattern).resolve(M, K))
    res = prune_weight(W, H, pattern, "true-obs", **kw)
    assert res.loss >= opt - 1e-12


@pytest.mark.parametrize("pattern,M,K", [
    ("2:4", 3, 48), ("2:4-pairs", 5, 48), ("coupled-2:4", 3, 48), ("rowpair-16", 16, 48), ("rowpair-16", 32, 48),
    ("3:8", 3, 48), ("50%", 3, 20),
])
@pytest.mark.parametrize("order,scoring", [("left_to_right", "independent"), ("largest_first", "joint")])
def test_masks_valid_and_exact_zeros(pattern, M, K, order, scoring):
    if pattern == "50%" and scoring == "joint":
        pytest.skip("a whole-row scope has too many subsets for joint scoring")
    W, H, _ = tiny_problem(M, K, seed=11)
    W = W.float()
    res = prune_weight(W, H.float(), pattern, "true-obs", ng=3, order=order, scoring=scoring, chunk_size=5)
    assert res.weight.dtype == torch.float32
    assert (res.weight[~res.mask] == 0).all()  # prune_weight checked the mask against the pattern
    assert (res.weight[res.mask] != 0).all()
    mag = prune_weight(W, H.float(), pattern, "magnitude")
    assert res.loss <= mag.loss


def test_largest_first_not_worse_on_correlated_layer():
    W, H, _ = tiny_problem(16, 64, seed=5)
    lf = prune_weight(W, H, "2:4", "true-obs", ng=4, order="largest_first").loss
    l2r = prune_weight(W, H, "2:4", "true-obs", ng=4, order="left_to_right").loss
    assert lf <= l2r


def test_chunking_and_dtypes_do_not_change_the_result():
    W, H, _ = tiny_problem(32, 64, seed=2)
    ref = prune_weight(W, H, "rowpair-16", "true-obs", ng=2, order="largest_first", chunk_size=32)
    for cs in (None, 1, 17):  # rounded up to whole 16-row chunks
        res = prune_weight(W, H, "rowpair-16", "true-obs", ng=2, order="largest_first", chunk_size=cs)
        assert torch.equal(res.mask, ref.mask) and torch.allclose(res.weight, ref.weight, atol=1e-12)
    for dt in (torch.float32, torch.bfloat16, torch.float16):  # 16-bit C factors, float32 accumulation
        res = prune_weight(W, H, "rowpair-16", "true-obs", ng=2, order="largest_first", c_dtype=dt)
        assert res.loss <= ref.loss * (1.02 if dt == torch.bfloat16 else 1.005)
        assert res.stats["c_dtype"] == str(dt).replace("torch.", "")
    # c_dtype=None: the working dtype on the CPU (float16 only on CUDA, test_obs_linalg.py)
    assert ref.stats["c_dtype"] == "float64"
    assert prune_weight(W.float(), H.float(), "2:4", "true-obs", ng=8).stats["c_dtype"] == "float32"


def test_progress_and_stats():
    W, H, _ = tiny_problem(8, 32, seed=4)
    msgs = []
    res = prune_weight(W, H, "2:4", "true-obs", ng=3, chunk_size=4, progress_fn=msgs.append)
    assert len(msgs) == 2 and "rows 8/8" in msgs[-1] and "ETA" in msgs[0]
    assert res.stats["steps"] == 2 * 3 and res.stats["chunk_size"] == 4  # 8 scopes per row, ng=3: 3 steps


@pytest.mark.parametrize("opts", [
    dict(ng=0), dict(ng=1.5), dict(chunk_size=0), dict(chunk_size=-2), dict(order="random"),
    dict(scoring="exact"), dict(c_dtype=torch.int32), dict(c_dtype="float16"), dict(c_dtype=torch.bool),
])
def test_bad_options(opts):
    W, H, _ = tiny_problem(2, 8, seed=0)
    W0 = W.clone()
    with pytest.raises(InputError):
        prune_weight(W, H, "2:4", "true-obs", **opts)
    assert torch.equal(W, W0)


# ---- real layer -------------------------------------------------------------------------------------------
@pytest.mark.real
@pytest.mark.slow
def test_real_layer_beats_sparsegpt(minilm_ffn_out):
    W, H = minilm_ffn_out[1]
    W, H = W[:64].double(), H.double()
    losses = {}
    for pattern in ("2:4", "2:4-pairs", "coupled-2:4", "rowpair-16"):
        sgpt = prune_weight(W, H, pattern, "sparsegpt").loss
        tobs = prune_weight(W, H, pattern, "true-obs", ng=32, order="largest_first", chunk_size=64).loss
        losses[pattern] = (tobs, sgpt)
        assert tobs < 0.95 * sgpt, (pattern, tobs, sgpt)
    l2r = prune_weight(W, H, "2:4", "true-obs", ng=32, order="left_to_right", chunk_size=64).loss
    assert losses["2:4"][0] <= l2r


@pytest.mark.parametrize("checked", [True, False])
@pytest.mark.parametrize("order", ["left_to_right", "largest_first"])
def test_row_local_step_syncs_the_host_only_when_checked(order, checked):
    """An unchecked row-local step reads nothing back from the device, a checked one one value (the Cholesky check of
    ``C_PP``): no boolean-mask indexing (nonzero) in the selection, the pruned sets or the compaction, which runs
    every step here (q = K/32), so on CUDA the host can queue the next steps' small kernels behind a GEMM."""
    W, H, _ = tiny_problem(8, 256, seed=6)
    inv = scaled_inverse(H, 0.01, "mean")
    layout = get_pattern("2:4").resolve(8, 256)
    chunk = TrueOBSChunk((W * inv.d).float(), inv.C.float(), _geometry(layout, 8, W.device), "independent",
                         checked=checked)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            chunk.step(4, order)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("aten::nonzero", 0) == 0
    assert counts.get("aten::_local_scalar_dense", 0) == (4 if checked else 0)


def test_failed_unchecked_chunk_is_rerun_checked(monkeypatch):
    """A ``C_PP`` reported indefinite in an unchecked step makes the driver discard the chunk and run it, and every
    later chunk of the layer, checked: the result is bit-identical to a run without the failure."""
    import sparsekit.pruners.true_obs as true_obs

    W, H, _ = tiny_problem(32, 64, seed=11)
    clean = prune_weight(W, H, "2:4", "true-obs", ng=2, chunk_size=16)
    assert clean.stats["checked_chunks"] == 0
    real, calls = true_obs.chol_inv_factor, []

    def fails_once(A):
        X, info = real(A)
        calls.append(1)
        if len(calls) == 3:  # the third unchecked factorisation, in the first chunk
            info = info.clone()
            info[0] = 1
        return X, info

    monkeypatch.setattr(true_obs, "chol_inv_factor", fails_once)
    res = prune_weight(W, H, "2:4", "true-obs", ng=2, chunk_size=16)
    assert torch.equal(res.mask, clean.mask) and torch.equal(res.weight, clean.weight)
    assert res.stats["checked_chunks"] == 2  # the failed chunk, then the second chunk straight away
    assert res.stats["steps"] == clean.stats["steps"]  # the discarded run's steps are not counted
    assert len(calls) == 8  # the 8 steps of the first chunk's unchecked run; checked runs factor elsewhere


@pytest.mark.parametrize("pattern,M,K,opts", [
    ("2:4", 6, 64, dict(ng=8, order="largest_first")), ("rowpair-16", 16, 64, dict(ng=4)),
    ("2:4", 4, 48, dict(ng=6, scoring="joint")),
])
def test_update_split_in_pieces_is_the_whole_update(monkeypatch, pattern, M, K, opts):
    """A step's columns pruned a few at a time (``FUSED_MAX_Q`` = 3, so every step is split, unevenly) give the
    result of pruning them at once, in float64: the same masks, the weights to rounding."""
    import sparsekit.pruners.true_obs as true_obs

    W, H, _ = tiny_problem(M, K, seed=9)
    whole = prune_weight(W, H, pattern, "true-obs", **opts)
    monkeypatch.setattr(true_obs, "FUSED_MAX_Q", 3)
    split = prune_weight(W, H, pattern, "true-obs", **opts)
    assert torch.equal(split.mask, whole.mask)
    assert torch.allclose(split.weight, whole.weight, atol=1e-10, rtol=0)
