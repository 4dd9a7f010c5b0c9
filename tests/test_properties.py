"""Property suite (issue 15): random patterns (presets, N:M, P%, custom views/blocks/scopes, int and fractional
nnz), odd shapes, weight dtypes, scales, ties and H conditioning (low rank, dead inputs, uneven columns), with and
without ``refine="swap"``/``refit``, for every method: a typed :class:`~sparsekit.SparsekitError` with the inputs
untouched, or a valid result — mask valid for the pattern, pruned entries exactly 0, loss finite, >= 0 and equal
to the loss measured here in float64 from ``(W, W', H)``, inputs untouched (or, with ``inplace=True``, the weight
holding the result). And powers of two: scaling W and H by them scales the result exactly.

Profiles: ``ci`` (few examples, derandomized, the whole file well under a minute on 2 cores) runs by default;
``slow`` (many random examples, failures kept in hypothesis' database) only with ``-m slow``.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sparsekit import SparsekitError, prune_weight
from sparsekit.patterns import PRESETS, BlockSpec, Pattern, ScopeSpec, check_mask, get_pattern
from sparsekit.pruners import METHODS

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=200, derandomize=True, database=None, **_COMMON)
settings.register_profile("slow", max_examples=1000, **_COMMON)
CI, SLOW = settings.get_profile("ci"), settings.get_profile("slow")
#: the ``slow`` profile's tests run only when asked for with ``-m slow`` (plain ``pytest``, as CI runs it, skips them)
slow_only = pytest.mark.skipif(
    "'slow' not in config.getoption('markexpr') or 'not slow' in config.getoption('markexpr')",
    reason="the large hypothesis profile: run with -m slow",
)

#: exponent ranges of the weight's scale 10^u that its dtype holds with margin
W_EXP = {torch.float16: (-2, 2), torch.bfloat16: (-30, 30), torch.float32: (-30, 30), torch.float64: (-200, 200)}
H_EXP = {torch.float32: (-25, 25), torch.float64: (-100, 100)}
#: (row period, column period) of each preset: the weight shape must be a multiple
PRESET_PERIOD = {"2:4": (1, 4), "4:8": (1, 8), "2:4-pairs": (1, 8), "coupled-2:4": (1, 16), "rowpair-16": (16, 16),
                 "50%": (1, 2)}


@st.composite
def nnz_for(draw, blocks: int) -> "int | float":
    """An int in [0, blocks] or a fraction in (0, 1) (which may round to 0% or 100%: a PatternError)."""
    if draw(st.booleans()):
        return draw(st.integers(0, blocks))
    return draw(st.floats(0.01, 0.99))


@st.composite
def patterns(draw) -> "tuple[str | Pattern, int, int]":
    """``(pattern, row period, column period)``."""
    kind = draw(st.sampled_from(["preset", "N:M", "P%", "grid", "interleaved"]))
    if kind == "preset":
        name = draw(st.sampled_from(PRESETS))
        return (name, *PRESET_PERIOD[name])
    if kind == "N:M":
        m = draw(st.integers(2, 8))
        return f"{draw(st.integers(1, m - 1))}:{m}", 1, m
    if kind == "P%":
        return f"{draw(st.integers(5, 95))}%", 1, 1
    if kind == "grid":  # default view (R, K), blocks (br, bc), scopes (sr, sc) blocks
        R = draw(st.sampled_from([1, 2, 4]))
        br = draw(st.sampled_from([d for d in (1, 2, 4) if R % d == 0]))
        sr = draw(st.sampled_from([d for d in (1, 2, 4) if (R // br) % d == 0]))
        bc, sc = draw(st.integers(1, 3)), draw(st.integers(1, 5))
        block = BlockSpec((br, bc), chunk_rows=R)
        return Pattern(ScopeSpec(block, (sr, sc)), draw(nnz_for(sr * sc))), R, bc * sc
    # interleaved view (1, K/(a b), a, b):(K, a b, 1, a): element (0, g, i, j) is column a b g + i + a j
    a, b = draw(st.sampled_from([2, 4])), draw(st.sampled_from([2, 4]))
    bb = draw(st.sampled_from([d for d in (1, 2, 4) if b % d == 0]))
    sa, sg = draw(st.sampled_from([d for d in (1, 2, 4) if a % d == 0])), draw(st.integers(1, 2))
    block = BlockSpec((1, 1, 1, bb), view_size=(1, f"K/{a * b}", a, b), view_stride=("K", a * b, 1, a))
    return Pattern(ScopeSpec(block, (1, sg, sa, b // bb)), draw(nnz_for(sg * sa * (b // bb)))), 1, a * b * sg


@st.composite
def problems(draw, wdtypes: "tuple[torch.dtype, ...]" = tuple(W_EXP)) -> dict:
    pattern, rp, cp = draw(patterns())
    M = rp * draw(st.integers(1, 3 if rp < 16 else 2))
    K = cp * draw(st.integers(1, max(1, 48 // cp)))
    assume(K >= 2)
    wdt = draw(st.sampled_from(wdtypes))
    hdt = draw(st.sampled_from(list(H_EXP)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(M, K, generator=g, dtype=torch.float64)
    if draw(st.booleans()):  # ties: small integers, and maybe a zero row
        W = W.mul(2).round()
        W[draw(st.integers(0, M - 1))] *= draw(st.sampled_from([0.0, 1.0]))
    W *= 10.0 ** draw(st.integers(*W_EXP[wdt]))
    # H = XᵀX/N: N < K gives a low-rank H; column scales 10^U(-c, c) its conditioning; dead inputs zero columns
    N = draw(st.sampled_from([max(1, K // 2), 4 * K]))
    c = draw(st.sampled_from([0.0, 1.0, 3.0]))
    X = torch.randn(N, K, generator=g, dtype=torch.float64) @ (torch.eye(K) + 0.3 * torch.randn(K, K, generator=g,
                                                                                                  dtype=torch.float64))
    X *= 10.0 ** ((2 * torch.rand(K, generator=g, dtype=torch.float64) - 1) * c)
    if draw(st.booleans()):
        X[:, torch.rand(K, generator=g) < 0.2] = 0.0
    H = X.T @ X / N * 10.0 ** draw(st.integers(*H_EXP[hdt]))
    assume(H.abs().max() > 0)
    return dict(
        W=W.to(wdt), H=((H + H.T) / 2).to(hdt), pattern=pattern,
        damp=draw(st.sampled_from([0.01, 1e-4, 0.1])), damp_mode=draw(st.sampled_from(["mean", "diag"])),
        refine=draw(st.sampled_from([None, None, "swap"])), refit=draw(st.booleans()),
    )


def measured_loss(W: torch.Tensor, new: torch.Tensor, H: torch.Tensor) -> float:
    """``sqrt(max(0, tr(δ H δᵀ)) / tr(W H Wᵀ))`` in float64, W, W' and H divided by their largest entries."""
    a, b = W.double().abs().max().clamp_min(1e-300), H.double().abs().max()
    w, p, h = W.double() / a, new.double() / a, H.double() / b
    num = max(0.0, float(((p - w) @ h * (p - w)).sum()))
    den = float((w @ h * w).sum())
    return 0.0 if num == den == 0 else math.sqrt(num / den)


def check_method(prob: dict, method: str, inplace: bool) -> str:
    """Run ``method`` on ``prob`` and assert the contract; returns the outcome (``"ok"`` or the error type)."""
    W, H = prob["W"].clone(), prob["H"]
    W0, H0 = W.clone(), H.clone()
    try:
        r = prune_weight(W, H, prob["pattern"], method, damp=prob["damp"], damp_mode=prob["damp_mode"],
                         refine=prob["refine"], refit=prob["refit"], inplace=inplace)
    except SparsekitError as e:
        assert torch.equal(W, W0) and torch.equal(H, H0), f"{method} failed ({e}) and touched its input"
        return type(e).__name__
    assert torch.equal(H, H0)
    assert torch.equal(W, r.weight if inplace else W0)
    assert r.weight.dtype == W0.dtype and r.mask.dtype == torch.bool and r.mask.shape == W0.shape
    check_mask(r.mask, prob["pattern"])
    assert torch.all(r.weight[~r.mask] == 0)
    assert torch.isfinite(r.weight).all()
    if method in ("magnitude", "wanda") and not prob["refit"] and prob["refine"] is None:  # kept weights: the input's
        assert torch.equal(r.weight[r.mask], W0[r.mask])
    assert math.isfinite(r.loss) and r.loss >= 0
    ref = measured_loss(W0, r.weight, H0)
    assert r.loss == pytest.approx(ref, rel=1e-9, abs=1e-7), (method, r.loss, ref)
    return "ok"


def check_all_methods(prob: dict, inplace: bool) -> None:
    for method in METHODS:
        check_method(prob, method, inplace)


@CI
@given(problems(), st.booleans())
def test_every_method_gives_a_typed_error_or_a_valid_result(prob, inplace):
    check_all_methods(prob, inplace)


@pytest.mark.slow
@slow_only
@SLOW
@given(problems(), st.booleans())
def test_every_method_gives_a_typed_error_or_a_valid_result_slow(prob, inplace):
    check_all_methods(prob, inplace)


def check_power_of_two_scaling(prob: dict, method: str, kw: int, kh: int) -> None:
    """Scaling W by 2^kw and H by 2^kh (relative damping) scales the result by 2^kw exactly."""
    W, H = prob["W"], prob["H"]
    for x, k in [(W, kw), (H, kh)]:  # x and x 2^k normal (with margin for compensated weights): exact scaling
        fi, nz = torch.finfo(x.dtype), x.double().abs()[x != 0]
        assume(not len(nz) or (nz.min() * 2.0 ** min(k, 0) > fi.tiny * 2.0**30
                               and nz.max() * 2.0 ** max(k, 0) < fi.max / 2.0**30))
    opts = dict(damp=prob["damp"], damp_mode=prob["damp_mode"], refine=prob["refine"], refit=prob["refit"])
    try:
        ref = prune_weight(W, H, prob["pattern"], method, **opts)
    except SparsekitError:
        return
    r = prune_weight(W * 2.0**kw, H * 2.0**kh, prob["pattern"], method, **opts)
    assert torch.equal(r.mask, ref.mask)
    assert torch.equal(r.weight, ref.weight * 2.0**kw)
    assert r.loss == pytest.approx(ref.loss, rel=1e-12, abs=1e-15)


@st.composite
def scaled(draw) -> tuple:
    prob = draw(problems((torch.bfloat16, torch.float32, torch.float64)))  # float16: small weights are subnormal
    return prob, draw(st.sampled_from(list(METHODS))), draw(st.integers(-40, 40)), draw(st.integers(-40, 40))


@settings(CI, max_examples=150)
@given(scaled())
def test_power_of_two_scales_give_the_same_masks_and_scaled_weights(case):
    check_power_of_two_scaling(*case)


@pytest.mark.slow
@slow_only
@settings(SLOW, max_examples=500)
@given(scaled())
def test_power_of_two_scales_give_the_same_masks_and_scaled_weights_slow(case):
    check_power_of_two_scaling(*case)


def test_strategy_covers_every_kind_of_pattern():
    # the pattern strategy can produce a preset, N:M, P%, and custom grid and interleaved views (all parse)
    seen = set()

    @settings(CI, max_examples=150)
    @given(patterns())
    def collect(p):
        pat = get_pattern(p[0])
        seen.add(pat.name if pat.name in PRESETS else ("custom-" + str(len(pat.scope.block.block_shape))
                                                       if pat.name == "custom" else pat.name[-1]))

    collect()
    assert {"custom-2", "custom-4", "%"} <= seen and seen & set(PRESETS)
