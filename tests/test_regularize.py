"""sparsekit.regularize: the damping (and update shrink) chosen by a held-out layer loss (issue 16)."""

from __future__ import annotations

import pytest
import torch

from sparsekit import InputError, check_mask, get_pattern, prune_weight
from sparsekit.metrics import relative_error_x
from sparsekit.regularize import DEFAULT_GRID, choose_regularisation, heldout_loss, shrink_update

GRID = [(0.0001, "mean"), (0.01, "mean"), (0.3, "mean"), (2.0, "mean"), (0.05, "diag"), (0.5, "diag")]


def _layer(seed: int = 0, M: int = 12, K: int = 16, n_calib: int = 24, n_held: int = 200):
    """A tiny layer whose calibration inputs are few (a noisy H) and correlated, and held-out inputs from the
    same distribution: the grid points then differ on held-out loss. Float64 so the oracle is exact."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, K, dtype=torch.float64)
    xc = torch.randn(n_calib, K, generator=g, dtype=torch.float64) @ mix  # (Nc, K)
    xh = torch.randn(n_held, K, generator=g, dtype=torch.float64) @ mix  # (Nh, K)
    W = torch.randn(M, K, generator=g, dtype=torch.float64)
    return W, xc, xh, xc.T @ xc / n_calib, xh.T @ xh / n_held


def test_heldout_loss_equals_loss_through_heldout_activations():
    W, xc, xh, Hc, Hh = _layer()
    ch = choose_regularisation(W, Hc, Hh, "2:4", "sparsegpt", GRID, blocksize=8)
    assert ch.heldout_loss == pytest.approx(relative_error_x(W, ch.result.weight, xh), rel=1e-10)
    for row in ch.table:
        res = prune_weight(W, Hc, "2:4", "sparsegpt", damp=row["damp"], damp_mode=row["damp_mode"], blocksize=8)
        assert row["heldout_loss"] == pytest.approx(relative_error_x(W, res.weight, xh), rel=1e-10)
        assert row["calib_loss"] == pytest.approx(relative_error_x(W, res.weight, xc), rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", ["sparsegpt", "true-obs"])
def test_selection_is_the_brute_force_argmin(seed, method):
    W, xc, xh, Hc, Hh = _layer(seed)
    opts = {"blocksize": 8} if method == "sparsegpt" else {}
    ch = choose_regularisation(W, Hc, Hh, "2:4", method, GRID, **opts)
    brute = []
    for damp, mode in GRID:
        res = prune_weight(W, Hc, "2:4", method, damp=damp, damp_mode=mode, **opts)
        brute.append((relative_error_x(W, res.weight, xh), damp, mode, res))
    loss, damp, mode, res = min(brute, key=lambda b: b[0])
    assert (ch.damp, ch.damp_mode, ch.shrink) == (damp, mode, 0.0)
    assert torch.equal(ch.result.weight, res.weight) and torch.equal(ch.result.mask, res.mask)
    assert ch.heldout_loss == pytest.approx(loss, rel=1e-12)
    spread = max(b[0] for b in brute) / min(b[0] for b in brute)
    assert spread > 1.01, spread  # the grid matters on this layer, so the argmin is a real choice


def test_judging_on_the_calibration_h_picks_the_calibration_argmin():
    W, xc, xh, Hc, Hh = _layer(3)
    ch = choose_regularisation(W, Hc, Hc.clone(), "2:4", "sparsegpt", GRID, blocksize=8)
    assert ch.result.loss == min(r["calib_loss"] for r in ch.table)


def test_shrink_keeps_the_mask_and_interpolates_to_no_compensation():
    W, xc, xh, Hc, Hh = _layer(4)
    res = prune_weight(W, Hc, "2:4", "sparsegpt", blocksize=8)
    assert torch.equal(shrink_update(W, res.weight, res.mask, 0.0), res.weight)
    assert torch.equal(shrink_update(W, res.weight, res.mask, 1.0), torch.where(res.mask, W, torch.zeros_like(W)))
    half = shrink_update(W, res.weight, res.mask, 0.5)
    assert torch.allclose(half, (res.weight + torch.where(res.mask, W, torch.zeros_like(W))) / 2)
    ch = choose_regularisation(W, Hc, Hh, "2:4", "sparsegpt", GRID, shrinks=(0.0, 0.25, 0.5, 1.0), blocksize=8)
    assert len(ch.table) == 4 * len(GRID)
    assert ch.heldout_loss == min(r["heldout_loss"] for r in ch.table)
    assert ch.heldout_loss <= min(r["heldout_loss"] for r in ch.table if r["shrink"] == 0.0)
    check_mask(ch.result.mask, get_pattern("2:4"))
    assert (ch.result.weight[~ch.result.mask] == 0).all()
    assert ch.heldout_loss == pytest.approx(heldout_loss(W, ch.result.weight, Hh), rel=1e-12)


def test_inputs_untouched_and_float32():
    W, xc, xh, Hc, Hh = _layer(5)
    W, Hc, Hh = W.float(), Hc.float(), Hh.float()
    copies = [t.clone() for t in (W, Hc, Hh)]
    ch = choose_regularisation(W, Hc, Hh, "2:4", "sparsegpt", DEFAULT_GRID, shrinks=(0.0, 0.5), blocksize=8)
    assert all(torch.equal(a, b) for a, b in zip((W, Hc, Hh), copies))
    assert ch.result.weight.dtype == torch.float32 and ch.result.weight.data_ptr() != W.data_ptr()


@pytest.mark.parametrize(
    "grid, shrinks, match",
    [
        ([], (0.0,), "empty"),
        ([(0.01,)], (0.0,), "pair"),
        ([(0.01, "max")], (0.0,), "damp_mode"),
        ([(-0.1, "mean")], (0.0,), "damp must"),
        ([(float("nan"), "mean")], (0.0,), "damp must"),
        ([(1.5, "diag")], (0.0,), "diag"),
        ([(0.01, "mean"), (0.01, "mean")], (0.0,), "repeats"),
        ([(0.01, "mean")], (), "shrinks"),
        ([(0.01, "mean")], (1.5,), "shrinks"),
        ([(0.01, "mean")], (0.5, 0.5), "shrinks"),
    ],
)
def test_bad_grids(grid, shrinks, match):
    W, xc, xh, Hc, Hh = _layer()
    before = W.clone()
    with pytest.raises(InputError, match=match):
        choose_regularisation(W, Hc, Hh, "2:4", "sparsegpt", grid, shrinks=shrinks)
    assert torch.equal(W, before)


def test_bad_heldout_hessian_and_options():
    W, xc, xh, Hc, Hh = _layer()
    with pytest.raises(InputError, match="16, 16"):
        choose_regularisation(W, Hc, Hh[:8, :8], "2:4")
    with pytest.raises(InputError, match="h_heldout"):
        choose_regularisation(W, Hc, Hh.long(), "2:4")
    with pytest.raises(InputError, match="set by the grid"):
        choose_regularisation(W, Hc, Hh, "2:4", damp=0.1)
