"""OBS-ord (pruners/obs_ord.py) against a naive float64 re-implementation, the brute-force optimum and SparseGPT."""

import functools
import itertools
import math

import pytest
import torch

from oracles import brute_force_optimum, tiny_problem
from sparsekit import InputError, get_pattern, prune_weight


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the oracle -------------------------------------------------------------------------------------------
def obs_ord_naive(W, H, layout, ng, order, damp=0.01):
    """OBS-ord from its definition (DESIGN.md §2, §4), float64, everything recomputed from scratch per batch.

    A *scope column* is the set of scopes (of every row) covering the same columns. Per batch: ``C = inv(Hd_FF)``
    over the free columns ``F`` (``Hd = H + damp·mean(diag H)·I``); every scope's cheapest set of blocks by
    enumeration, cost ``Σ_rows w_S (C_SS)⁻¹ w_Sᵀ``; the batch is the next ``ng`` scope columns by first column
    (``left_to_right``) or the ``ng`` of largest total cheapest cost (``largest_first``); each row ``r`` with
    pruned set ``P`` gets ``δw_F = −w_P (C_PP)⁻¹ C_{P,F}``; the batch's columns leave ``F``.
    Returns ``(W (M, K), mask (M, K))``.
    """
    W = W.double().clone()
    Hd = H.double().clone()
    Hd.diagonal().add_(damp * Hd.diagonal().mean())
    M, K = W.shape
    rows, cols = layout.rows.tolist(), layout.cols.tolist()  # [scope][block][element]
    B = layout.blocks_per_scope
    choices = list(itertools.combinations(range(B), B - layout.nnz))
    groups = {}  # sorted column tuple -> scopes
    for s in range(len(rows)):
        groups.setdefault(tuple(sorted({c for blk in cols[s] for c in blk})), []).append(s)
    undecided = sorted(groups, key=lambda k: k[0])
    free = list(range(K))
    mask = torch.ones(M, K, dtype=torch.bool)
    batches = 0
    while undecided:
        F = torch.tensor(free)
        C = torch.zeros(K, K, dtype=torch.float64)
        C[F.unsqueeze(1), F.unsqueeze(0)] = torch.linalg.inv(Hd[F][:, F])

        def cheapest(s):
            best = (math.inf, None)
            for ch in choices:
                per_row = {}
                for b in ch:
                    for r, c in zip(rows[s][b], cols[s][b]):
                        per_row.setdefault(r, []).append(c)
                cost = 0.0
                for r, cs in per_row.items():
                    i = torch.tensor(cs)
                    cost += float(W[r, i] @ torch.linalg.solve(C[i][:, i], W[r, i]))
                if cost < best[0]:
                    best = (cost, ch)
            return best

        evals = {k: [cheapest(s) for s in groups[k]] for k in undecided}
        if order == "left_to_right":
            batch = undecided[:ng]
        else:
            total = {k: sum(c for c, _ in evals[k]) for k in undecided}
            batch = sorted(undecided, key=lambda k: -total[k])[:ng]
        P = {}
        for k in batch:
            for s, (_, ch) in zip(groups[k], evals[k]):
                for b in ch:
                    for r, c in zip(rows[s][b], cols[s][b]):
                        P.setdefault(r, []).append(c)
                        mask[r, c] = False
        for r, cs in P.items():
            i = torch.tensor(sorted(cs))
            W[r, F] -= W[r, i] @ torch.linalg.solve(C[i][:, i], C[i][:, F])
            W[r, i] = 0.0
        done = {c for k in batch for c in k}
        free = [c for c in free if c not in done]
        undecided = [k for k in undecided if k not in batch]
        batches += 1
    return W, mask, batches


def assert_pattern(mask, layout):
    """Independent check: every block all kept or all pruned, exactly ``nnz`` kept blocks per scope, and every
    element of the weight covered by the pattern."""
    m = mask[layout.rows, layout.cols]  # (S, B, e)
    assert ((m.all(-1)) | (~m.any(-1))).all(), "a block is partly pruned"
    assert (m.all(-1).sum(1) == layout.nnz).all(), "a scope keeps the wrong number of blocks"
    covered = torch.zeros_like(mask)
    covered[layout.rows, layout.cols] = True
    assert covered.all()


# (pattern, M, K): tiny for the oracle, several scope columns so that ng and order matter
ORACLE_CASES = [("2:4", 3, 16), ("3:8", 2, 24), ("2:4-pairs", 2, 24), ("coupled-2:4", 2, 32), ("rowpair-16", 16, 64)]


@pytest.mark.parametrize("ng", [1, 2, 1000])
@pytest.mark.parametrize("order", ["left_to_right", "largest_first"])
@pytest.mark.parametrize("pattern,M,K", ORACLE_CASES)
def test_equals_naive_float64_oracle(pattern, M, K, order, ng):
    W, H, _ = tiny_problem(M, K, seed=K + M)
    layout = get_pattern(pattern).resolve(M, K)
    W_ref, mask_ref, batches = obs_ord_naive(W, H, layout, ng, order)
    res = prune_weight(W, H, pattern, "obs-ord", ng=ng, order=order)
    assert torch.equal(res.mask, mask_ref)
    assert torch.allclose(res.weight, W_ref, atol=1e-9, rtol=0)
    assert res.stats["batches"] == batches


def test_oracle_cases_discriminate():
    """The oracle comparison is not vacuous: order and ng change the masks on these layers."""
    for pattern, M, K in ORACLE_CASES:
        W, H, _ = tiny_problem(M, K, seed=K + M)
        masks = {tuple(prune_weight(W, H, pattern, "obs-ord", ng=ng, order=o).mask.flatten().tolist())
                 for o in ("left_to_right", "largest_first") for ng in (1, 1000)}
        assert len(masks) >= 2, pattern


# ---- brute force, validity ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _brute_force(pattern, M, K):
    W, H, _ = tiny_problem(M, K, seed=3)
    return brute_force_optimum(W, H, get_pattern(pattern).resolve(M, K))[0]


@pytest.mark.parametrize("pattern,M,K", [("2:4", 2, 12), ("2:4-pairs", 2, 16), ("coupled-2:4", 1, 16),
                                         ("rowpair-16", 16, 32), ("3:8", 2, 16)])
@pytest.mark.parametrize("kw", [dict(ng=1), dict(ng=2, order="left_to_right"), dict(ng=256)])
def test_loss_above_brute_force_optimum(pattern, M, K, kw):
    W, H, _ = tiny_problem(M, K, seed=3)
    layout = get_pattern(pattern).resolve(M, K)
    opt = _brute_force(pattern, M, K)
    res = prune_weight(W, H, pattern, "obs-ord", **kw)
    assert res.loss >= opt - 1e-12
    assert_pattern(res.mask, layout)


@pytest.mark.parametrize("pattern,M,K", [("2:4", 5, 48), ("2:4-pairs", 3, 48), ("coupled-2:4", 3, 64),
                                         ("rowpair-16", 32, 48)])
@pytest.mark.parametrize("kw", [dict(ng=3, order="left_to_right"), dict(ng=2), dict(ng=2, c_dtype=torch.bfloat16)])
def test_masks_valid_and_exact_zeros(pattern, M, K, kw):
    W, H, _ = tiny_problem(M, K, seed=11)
    W, H = W.float(), H.float()
    layout = get_pattern(pattern).resolve(M, K)
    res = prune_weight(W, H, pattern, "obs-ord", **kw)
    assert res.weight.dtype == torch.float32
    assert_pattern(res.mask, layout)
    assert (res.weight[~res.mask] == 0).all()
    assert (res.weight[res.mask] != 0).all()
    assert res.loss < prune_weight(W, H, pattern, "magnitude").loss


def test_dead_inputs():
    """A column with H_jj = 0 (input always 0) is handled by the damping: finite result, no worse than magnitude."""
    W, H, X = tiny_problem(4, 32, seed=6)
    X[:, 5] = 0
    H = X.T @ X / X.shape[0]
    res = prune_weight(W, H, "2:4", "obs-ord", ng=3)
    assert torch.isfinite(res.weight).all() and res.loss <= prune_weight(W, H, "2:4", "magnitude").loss


def test_factor_jitter_rescues_rounding_and_rejects_indefinite():
    """``_factor``: a matrix indefinite by rounding (eigenvalue −1e-7·mean diag) gets a small diagonal jitter;
    a truly indefinite one raises InputError instead of yielding NaN."""
    from sparsekit.pruners.obs_ord import _factor

    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    ev = torch.tensor([-1e-7, 1e-3, 0.1, 1.0, 2.0, 3.0], dtype=torch.float64)
    A = (Q * ev) @ Q.T
    stats = {"jitter_steps": 0, "c_dtype": "bfloat16"}
    X = _factor(A.unsqueeze(0), "C_QQ", stats)[0]
    assert 1 <= stats["jitter_steps"] <= 3
    L = torch.linalg.inv(X)  # X = L⁻¹ of A + jitter·I, the jitter a small multiple of mean diag
    assert torch.allclose(L @ L.T, A, atol=1e-4 * A.diagonal().mean().item(), rtol=0)
    with pytest.raises(InputError):
        _factor(((Q * (ev - 1)) @ Q.T).unsqueeze(0), "C_PP", stats)


# ---- options ------------------------------------------------------------------------------------------------
def test_progress_and_stats():
    W, H, _ = tiny_problem(4, 32, seed=4)  # 2:4 at K=32: 8 scope columns
    msgs = []
    res = prune_weight(W, H, "2:4", "obs-ord", ng=3, progress_fn=msgs.append)
    assert [m.split(",")[0] for m in msgs] == [f"obs-ord: scope columns {d}/8" for d in (3, 6, 8)]
    assert all("ETA" in m and "elapsed" in m for m in msgs) and msgs[-1].endswith("ETA 0.0s")
    assert res.stats["batches"] == 3 and res.stats["ng"] == 3 and res.stats["order"] == "largest_first"
    assert res.stats["c_dtype"] == "float64"
    assert prune_weight(W.float(), H.float(), "2:4", "obs-ord", c_dtype=torch.float16).stats["c_dtype"] == "float16"


@pytest.mark.parametrize("opts", [
    dict(ng=0), dict(ng=-3), dict(ng=1.5), dict(ng=2.0), dict(ng=True), dict(ng="4"), dict(order="random"),
    dict(order=None), dict(c_dtype=torch.int32), dict(c_dtype="float16"), dict(c_dtype=torch.bool),
    dict(chunk_size=4),
])
def test_bad_options(opts):
    W, H, _ = tiny_problem(2, 8, seed=0)
    for w in (W, W.float()):
        w0 = w.clone()
        with pytest.raises(InputError):
            prune_weight(w, H.to(w.dtype), "2:4", "obs-ord", **opts)
        assert torch.equal(w, w0)


# ---- real layer -----------------------------------------------------------------------------------------------
@pytest.mark.real
def test_real_layer_beats_sparsegpt(minilm_ffn_out):
    W, H = minilm_ffn_out[1]
    W = W[:32]  # 32 rows: OBS-ord's cost is per-row q×q solves (q = 512 here); rows never interact
    sgpt = prune_weight(W, H, "2:4", "sparsegpt").loss
    ord_ = prune_weight(W, H, "2:4", "obs-ord", ng=256).loss  # the seed's setting, largest_first
    assert ord_ < 0.95 * sgpt, (ord_, sgpt)  # measured: 0.1050 vs 0.1270 (-17%); all 384 rows: -13%


@pytest.mark.real
@pytest.mark.parametrize("c_dtype", [torch.float16, torch.bfloat16])
def test_real_layer_16bit_downdate_within_half_percent(minilm_ffn_out, c_dtype):
    """DESIGN.md §5: a 16-bit path counts only within 0.5% of the full-precision loss. ng=64 gives 6 batches
    (5 downdates) at K=1536, as many as ng=256 gives at K≈6000. On this layer, storing C itself in 16 bits
    (the first implementation) moved the loss by +4.5% (float16) and made C_PP indefinite (bfloat16)."""
    W, H = minilm_ffn_out[2]
    W = W[:32]
    ref = prune_weight(W, H, "2:4", "obs-ord", ng=64).loss
    low = prune_weight(W, H, "2:4", "obs-ord", ng=64, c_dtype=c_dtype)
    assert abs(low.loss / ref - 1) < 5e-3, (c_dtype, low.loss, ref)
