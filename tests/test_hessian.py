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


def _check_hessian_whole(hessian: torch.Tensor) -> None:
    """The one-pass check_hessian before the row slices (the oracle): full-size float64 temporaries."""
    if not torch.isfinite(hessian).all():
        raise InputError("hessian contains NaN or Inf; recompute it from finite inputs.")
    h = hessian.double()
    scale = h.abs().max().clamp_min(1e-300)
    if ((h - h.T).abs().max() / scale).item() > 1e-4:
        raise HessianError("hessian is not symmetric; pass (H + H.T) / 2 or recompute it as XᵀX.")
    if (h.diagonal() < -1e-6 * scale).any():
        raise HessianError("hessian has negative diagonal entries, so it is not positive semi-definite; it must be "
                           "XᵀX of real inputs.")
    if not (h.diagonal() > 0).any():
        raise HessianError("hessian is all zero")


def _outcome(fn, H):
    try:
        fn(H)
    except (InputError, HessianError) as e:
        return type(e), str(e)[:19]  # the oracle abbreviates the messages
    return None


def _defects(K: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """H with one defect each, in the last row (the last slice's), and valid ones decided by entries there."""
    W, H, _ = tiny_problem(4, K, seed=4)
    H = H.to(dtype)
    last = K - 1
    out = {"valid": H}
    for name, v in (("nan", float("nan")), ("inf", float("inf")), ("-inf", float("-inf"))):
        out[name] = H.clone()
        out[name][last, last] = v
    asym = H.clone()
    asym[last, 0] += 1e-3 * H.abs().max()  # H[0, last] unchanged: asymmetric only by the last row
    out["asymmetric"] = asym
    neg = H.clone()
    neg[last, last] = -1e-5 * H.abs().max()
    out["negative diagonal"] = neg
    # the largest entry sits in the last slice: a defect too small for it passes only if the scale saw that slice
    big = H.clone()
    big[last, last] = 1e6 * H.abs().max()
    big[0, 0] = -1e-7 * big[last, last]  # within -1e-6 · max|H|
    big[1, 2] += 1e-5 * big[last, last]  # within 1e-4 · max|H|
    out["valid, max in the last slice"] = big
    out["all zero"] = torch.zeros(K, K, dtype=dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [1, 3, 1000])
def test_check_hessian_in_slices_raises_what_the_whole_check_raised(monkeypatch, dtype, rows):
    """check_hessian reads H in float64 row slices of SLICE_BYTES: with many slices (the last one shorter) every
    defect sitting in the last slice only still raises, the same error as the one-pass check, and valid H pass."""
    import sparsekit.hessian as hess

    K = 13
    monkeypatch.setattr(hess, "SLICE_BYTES", 8 * K * rows)
    for name, H in _defects(K, dtype).items():
        got = _outcome(lambda h: hess.check_hessian(h, K), H)
        assert got == _outcome(_check_hessian_whole, H), name
        assert (got is None) == name.startswith("valid"), (name, got)


def test_check_hessian_holds_no_full_size_temporary(monkeypatch):
    """Every tensor check_hessian makes (views included) is at most one SLICE_BYTES slice."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import sparsekit.hessian as hess

    K, limit = 40, 8 * 40 * 3
    sizes: list[int] = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    sizes.append(t.numel() * t.element_size())
            return out

    monkeypatch.setattr(hess, "SLICE_BYTES", limit)
    H = tiny_problem(4, K, seed=2)[1]
    with Sizes():
        hess.check_hessian(H, K)
    assert sizes and max(sizes) <= limit


def _scaled_inverse_whole(H: torch.Tensor, damp: float, damp_mode: str):
    """scaled_inverse before the in-place scaling and the blocked symmetrisation (the oracle)."""
    inv = damped_inverse(H, damp, damp_mode)
    d = inv.chol.square().sum(1).sqrt()
    C = inv.inverse * d[:, None] * d[None, :]
    return (C + C.T) / 2, d, inv.damp, inv.steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [1, 7, 24, 37])
@pytest.mark.parametrize("side", [1, 5, 8, 64])
def test_scaled_inverse_in_place_equals_the_old_formula_bit_for_bit(monkeypatch, dtype, K, side):
    """C̃ scaled in place and symmetrised by blocks (side × side, also blocks that do not divide K) is the old
    ``(D C D + (D C D)ᵀ) / 2`` bit for bit, exactly symmetric, and owns its memory."""
    import sparsekit.hessian as hess

    W, H, _ = tiny_problem(4, K, seed=K)
    H = H.to(dtype)
    H[0, 0] = 0  # a dead input
    H[0, 1:] = H[1:, 0] = 0
    monkeypatch.setattr(hess, "SLICE_BYTES", side * side * H.element_size())
    for damp, mode in ((0.01, "mean"), (0.1, "diag")):
        C0, d0, rel0, steps0 = _scaled_inverse_whole(H, damp, mode)
        H0 = H.clone()
        got = hess.scaled_inverse(H, damp, mode)
        assert torch.equal(got.C, C0) and torch.equal(got.d, d0) and (got.damp, got.steps) == (rel0, steps0)
        assert got.C.stride() == C0.stride() and torch.equal(got.C, got.C.T)
        assert torch.equal(H, H0)  # the input untouched
        assert got.C.untyped_storage().nbytes() == K * K * H.element_size()


def test_escalation_rebuilds_h_plus_lambda_from_h():
    """Each retry starts again from H (dead inputs at 1): the result is H + λ I for the final λ alone, and H is
    untouched."""
    from sparsekit.hessian import damped_hessian

    Q = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    H = Q @ torch.diag(torch.tensor([2.0, 2, 2, 2, 2, -0.05], dtype=torch.float64)) @ Q.T
    H = (H + H.T) / 2
    H0 = H.clone()
    with pytest.warns(DampingWarning):
        hd, rel, steps = damped_hessian(H, 0.001)
    assert steps > 0 and torch.equal(H, H0)
    off = ~torch.eye(6, dtype=torch.bool)
    assert torch.equal(hd[off], H[off])
    lam = rel * H.diagonal().mean().item()
    torch.testing.assert_close(hd.diagonal(), H.diagonal() + lam, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_pow2_scale_from_aminmax_equals_the_power_of_two_of_max_abs(dtype):
    """``pow2_scale`` takes ``max|x|`` as ``max(max x, −min x)`` (no ``|x|`` copy of a ``K × K`` H): the power of two
    that brings the old ``x.abs().max()`` into [0.5, 1), whether the largest magnitude is positive or negative."""
    import math

    from sparsekit.metrics import pow2_scale

    g = torch.Generator().manual_seed(3)
    for sign in (1.0, -1.0):
        for mag in (1e-3, 0.7, 3.0, 1e4):
            x = (torch.randn(37, 41, generator=g, dtype=torch.float64) * mag).to(dtype)
            x[5, 7] = sign * 4 * float(x.abs().max())  # the extreme entry has this sign
            amax = float(x.abs().max())
            want = math.ldexp(1.0, -math.frexp(amax)[1])
            assert pow2_scale(x) == want and 0.5 <= amax * want < 1.0
    assert pow2_scale(torch.zeros(3, 3, dtype=dtype)) == 1.0
