"""Hessian accumulation, damping rule and escalation, and the loss identities."""

import logging

import pytest
import torch

from oracles import tiny_problem
from sparsekit import HessianAccumulator, HessianError, InputError
from sparsekit.hessian import DampingWarning, damped_inverse, damping_value
from sparsekit.metrics import relative_error, relative_error_x


def test_streaming_equals_one_pass_any_leading_shape():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5, 12, generator=g, dtype=torch.float64)
    acc = HessianAccumulator(12, dtype=torch.float64)
    for part in x.split([1, 2], dim=0):  # batches of unequal size, leading shape (b, 7, 5)
        acc.add(part)
    flat = x.reshape(-1, 12)
    assert acc.num_tokens == 105
    torch.testing.assert_close(acc.hessian, flat.T @ flat / 105, rtol=1e-12, atol=1e-12)


def test_accumulator_rejects_bad_input():
    acc = HessianAccumulator(4)
    with pytest.raises(InputError, match="no calibration tokens"):
        acc.hessian
    with pytest.raises(InputError, match="features"):
        acc.add(torch.zeros(2, 5))
    with pytest.raises(InputError, match="NaN"):
        acc.add(torch.tensor([[1.0, float("nan"), 0, 0]]))


def test_loss_through_h_equals_loss_through_x():
    W, H, X = tiny_problem(6, 20, seed=3)
    W2 = W.clone()
    W2[:, ::3] = 0
    assert relative_error(W, W2, H) == pytest.approx(relative_error_x(W, W2, X), rel=1e-10)


def test_damping_rule():
    H = torch.diag(torch.tensor([1.0, 3.0]))
    assert damping_value(H, 0.5) == pytest.approx(1.0)  # relative: 0.5 * mean(diag) = 1
    assert damping_value(H, 2.0) == 2.0  # absolute when >= 1
    inv = damped_inverse(H, 0.5)
    torch.testing.assert_close(inv.inverse, torch.diag(torch.tensor([0.5, 0.25])))


def test_dead_columns_are_handled_by_damping():
    H = torch.diag(torch.tensor([2.0, 0.0, 1.0]))
    inv = damped_inverse(H, 0.01)
    assert torch.isfinite(inv.inverse).all() and inv.steps == 0


def test_escalation_reports_and_succeeds(caplog):
    # an indefinite H (eigenvalues 2, -1e-3·): the default damping is too small, escalation fixes it
    Q = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    H = Q @ torch.diag(torch.tensor([2.0, 2, 2, 2, 2, -0.05], dtype=torch.float64)) @ Q.T
    with caplog.at_level(logging.WARNING, logger="sparsekit.hessian"), pytest.warns(DampingWarning, match="damp"):
        inv = damped_inverse(H, 0.001)
    assert inv.steps > 0 and inv.damp > 0.001
    assert "raising" in caplog.text


def test_escalation_bound_raises_typed_error():
    H = -torch.eye(4, dtype=torch.float64)  # negative definite
    with pytest.raises(HessianError, match="not positive definite"):
        damped_inverse(H, 0.01, max_steps=2)


def test_accumulator_slices_large_batches_with_the_same_sum(monkeypatch):
    """A batch whose converted copy exceeds SLICE_BYTES is added slice by slice: the same Σ x xᵀ (float64: equal to
    rounding), the same token count; a NaN in its last slice raises with the sum untouched."""
    import sparsekit.hessian as hess

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 37, 24, generator=g)  # 148 tokens
    whole = hess.HessianAccumulator(24, dtype=torch.float64)
    whole.add(x)
    monkeypatch.setattr(hess, "SLICE_BYTES", 24 * 8 * 10)  # 10 rows per slice: 15 slices
    sliced = hess.HessianAccumulator(24, dtype=torch.float64)
    sliced.add(x)
    assert sliced.num_tokens == whole.num_tokens == 148
    assert torch.allclose(sliced._sum, whole._sum, rtol=1e-13, atol=1e-12)
    assert torch.allclose(sliced._sum, (x.reshape(-1, 24).double().T @ x.reshape(-1, 24).double()), rtol=1e-13,
                          atol=1e-12)
    before = sliced._sum.clone()
    bad = x.clone()
    bad[-1, -1, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        sliced.add(bad)
    assert torch.equal(sliced._sum, before) and sliced.num_tokens == 148
    # float64 inputs beyond float32's range overflow the float32 accumulator: refused too, sum untouched
    acc32 = hess.HessianAccumulator(24)  # float32
    big = x.double()
    big[-1, -1, 0] = 1e300
    with pytest.raises(InputError, match="NaN or Inf"):
        acc32.add(big)
    assert not acc32._sum.any() and acc32.num_tokens == 0


def test_relative_error_in_slices_equals_the_whole_product(monkeypatch):
    """Above SLICE_BYTES the metric sums over row slices of W and column blocks of H: the same value to float64
    rounding as the one-product path, on a problem whose slices do not divide the shape."""
    import sparsekit.metrics as metrics

    g = torch.Generator().manual_seed(3)
    W = torch.randn(23, 40, generator=g)
    X = torch.randn(300, 40, generator=g)
    H = X.double().T @ X.double() / 300  # float64: the oracle below is exact
    pruned = W * (torch.rand(23, 40, generator=g) > 0.5)
    whole = metrics.relative_error(W, pruned, H)
    monkeypatch.setattr(metrics, "SLICE_BYTES", 8 * 40 * 7)  # 7 rows / columns per slice
    sliced = metrics.relative_error(W, pruned, H)
    assert sliced == pytest.approx(whole, rel=1e-13)
    assert sliced == pytest.approx(relative_error_x(W, pruned, X), rel=1e-10)
