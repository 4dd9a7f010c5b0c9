"""Faults an adversarial user can produce (issue 15): each gets a typed error naming the fix, or documented
correct behaviour, and the user's weight is never touched by a call that fails.

Sections: ``core`` (prune_weight, StructuredOBS, HessianAccumulator, patterns, the loss) here; the pipeline's
cases (checkpoints, resume, the CLI) follow in their own section.
"""

import math
import re
import warnings

import numpy as np
import pytest
import torch

from oracles import tiny_problem
from sparsekit import HessianAccumulator, HessianError, InputError, PatternError, prune_weight
from sparsekit.hessian import MAX_ESCALATED_DAMP, DampingWarning, damped_inverse
from sparsekit.metrics import relative_error
from sparsekit.patterns import BlockSpec, Pattern, ScopeSpec
from sparsekit.pruners import METHODS
from sparsekit.pruners.obs import StructuredOBS

#: the seed's patterns, each with a weight shape it tiles
SEED_PATTERNS = {"2:4": (8, 32), "2:4-pairs": (8, 32), "coupled-2:4": (8, 32), "rowpair-16": (16, 32),
                 "4:8": (8, 32), "50%": (8, 12)}


def problem(M: int = 8, K: int = 32, seed: int = 0, dtype: torch.dtype = torch.float32):
    W, H, _ = tiny_problem(M, K, seed=seed)
    return W.to(dtype), H.to(dtype)


def assert_fails_untouched(exc, match, W, H, *args, **kw):
    """``prune_weight(W, H, *args, inplace=True, **kw)`` raises ``exc`` matching ``match``; W and H unchanged."""
    W0, H0 = W.clone(), H.clone()
    with pytest.raises(exc, match=match):
        prune_weight(W, H, *args, inplace=True, **kw)
    assert torch.equal(W, W0) and torch.equal(H, H0)


# ==== core ==================================================================================================

# ---- 4: the loss is never NaN --------------------------------------------------------------------------------


def test_relative_error_clamps_a_negative_quadratic_form():
    # δ H δᵀ < 0 by rounding: H has a tiny negative eigenvalue along δ (as float32 XᵀX of few tokens does)
    K = 8
    q = torch.linalg.qr(torch.randn(K, K, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[0]
    ev = torch.ones(K, dtype=torch.float64)
    ev[0] = -1e-12
    H = (q * ev) @ q.T
    W = torch.randn(2, K, dtype=torch.float64)
    pruned = W + 1e-3 * q[:, 0]  # δ along the negative direction
    assert ((pruned - W) @ H * (pruned - W)).sum() < 0
    assert relative_error(W, pruned, H) == 0.0


@pytest.mark.parametrize("method", list(METHODS))
def test_low_rank_hessian_light_damping_gives_finite_loss(method):
    # 8 tokens for K = 32 inputs (rank 8), damp 1e-6: obs-ord and true-obs reported NaN before
    g = torch.Generator().manual_seed(3)
    W, X = torch.randn(8, 32, generator=g), torch.randn(8, 32, generator=g)
    r = prune_weight(W, X.T @ X / 8, "2:4", method, damp=1e-6)
    assert math.isfinite(r.loss) and r.loss >= 0


def test_zero_output_weight_reports_zero_loss():
    # documented: an all-zero weight has nothing to lose (loss 0, not 0/0)
    W, H = problem()
    r = prune_weight(torch.zeros_like(W), H, "2:4", "sparsegpt")
    assert r.loss == 0.0 and torch.all(r.weight == 0)


# ---- 5: damp and damp_mode are checked for every method -------------------------------------------------------

BAD_DAMPS = [float("nan"), float("inf"), -1.0, "0.01", True, None, torch.tensor(0.01)]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("damp", BAD_DAMPS, ids=repr)
def test_bad_damp_is_rejected_for_every_method(method, damp):
    W, H = problem()
    assert_fails_untouched(InputError, r"damp must be a finite number >= 0.*0\.01", W, H, "2:4", method, damp=damp)


@pytest.mark.parametrize("method", list(METHODS))
def test_bad_damp_mode_is_rejected_for_every_method(method):
    W, H = problem()
    assert_fails_untouched(InputError, "damp_mode must be one of", W, H, "2:4", method, damp_mode="bogus")
    assert_fails_untouched(InputError, "needs 0 <= damp < 1", W, H, "2:4", method, damp_mode="diag", damp=2.0)


def test_structured_obs_checks_damp():
    _, H = problem()
    with pytest.raises(InputError, match="damp must be"):
        StructuredOBS(ScopeSpec(BlockSpec((1, 1)), (1, 4)), H, damp=float("nan"))
    with pytest.raises(InputError, match="damp_mode"):
        StructuredOBS(ScopeSpec(BlockSpec((1, 1)), (1, 4)), H, damp_mode="bogus")


# ---- 6: HessianAccumulator ------------------------------------------------------------------------------------


def test_accumulator_keeps_no_autograd_graph():
    x = torch.randn(3, 5, 8, requires_grad=True)
    acc = HessianAccumulator(8)
    acc.add(torch.tanh(x))  # a layer's output, part of a graph
    assert acc.hessian.grad_fn is None and not acc.hessian.requires_grad
    t = torch.tanh(x).detach().reshape(-1, 8)
    torch.testing.assert_close(acc.hessian, t.T @ t / 15)


@pytest.mark.parametrize("k", [-1, 0, 16.0, True, "16", None])
def test_accumulator_size_must_be_a_positive_int(k):
    with pytest.raises(InputError, match="num_features must be a positive int"):
        HessianAccumulator(k)


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.tensor(1.0), "0-D tensor"),
        ([[1.0, 2.0, 3.0, 4.0]], "must be a tensor.*torch.as_tensor"),
        (torch.randn(3, 5), "5 features"),
        (torch.tensor([[1.0, float("nan"), 0.0, 0.0]]), "NaN or Inf"),
        (torch.ones(2, 4, dtype=torch.long), "floating activations"),
        (np.ones((2, 4), dtype=np.int64), "numpy array of int64"),
        (torch.ones(2, 4, device="meta"), "meta device"),
    ],
    ids=["0d", "list", "wrong-K", "nan", "int", "numpy-int", "meta"],
)
def test_accumulator_rejects_bad_batches(x, match):
    acc = HessianAccumulator(4)
    acc.add(torch.ones(1, 4))
    before = acc.hessian.clone()
    with pytest.raises(InputError, match=match):
        acc.add(x)
    assert torch.equal(acc.hessian, before) and acc.num_tokens == 1


def test_accumulator_accepts_numpy_float_arrays():
    # documented: floating numpy arrays are converted (torch.from_numpy), same H as the tensor
    x = np.random.default_rng(0).standard_normal((6, 4))
    a, b = HessianAccumulator(4, dtype=torch.float64), HessianAccumulator(4, dtype=torch.float64)
    a.add(x)
    b.add(torch.from_numpy(x))
    assert torch.equal(a.hessian, b.hessian)


@pytest.mark.parametrize("device, match", [("bogus", "not a device name"), ("meta", "runs on 'cpu' or 'cuda'")])
def test_accumulator_device_must_exist(device, match):
    with pytest.raises(InputError, match=match):
        HessianAccumulator(4, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_accumulator_cuda_without_cuda():
    with pytest.raises(InputError, match="does not exist here.*use 'cpu'"):
        HessianAccumulator(4, device="cuda")


# ---- 7: scale cannot change a mask ------------------------------------------------------------------------------

SCALES = [1e-30, 1e-25, 3e-7, 1e10, 1e30]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("pattern", list(SEED_PATTERNS))
def test_masks_are_scale_invariant(method, pattern):
    M, K = SEED_PATTERNS[pattern]
    if pattern == "50%" and method.startswith("obs-") and method != "obs-ord":
        pytest.skip("StructuredOBS enumerates subsets: a whole-row scope is too large")
    W, H = problem(M, K, seed=4)
    ref = prune_weight(W, H, pattern, method)
    for c in SCALES:
        for w, h in [(W * c, H), (W, H * c)]:
            r = prune_weight(w, h, pattern, method)
            assert torch.equal(r.mask, ref.mask), (c, "W" if h is H else "H")
            assert r.loss == pytest.approx(ref.loss, rel=1e-4)
    # a power of two scales the result exactly
    r = prune_weight(W * 2.0**-90, H * 2.0**70, pattern, method)
    assert torch.equal(r.weight, ref.weight * 2.0**-90) and r.loss == ref.loss


@pytest.mark.parametrize("c", [1e200, 1e-200])
def test_float64_extreme_scale_gives_the_same_loss(c):
    W, H = problem(dtype=torch.float64)
    ref = prune_weight(W, H, "2:4", "sparsegpt")
    r = prune_weight(W * c, H, "2:4", "sparsegpt")
    assert torch.equal(r.mask, ref.mask) and r.loss == pytest.approx(ref.loss, rel=1e-12)


def test_structured_obs_is_scale_invariant_in_h():
    W, H = problem(seed=5)
    masks = []
    for c in [1.0, 1e30, 1e-30]:
        obs = StructuredOBS(ScopeSpec(BlockSpec((1, 2)), (1, 4)), H * c, damp=0.01, weight=W.clone())
        obs.prune(2, compensate="full")
        masks.append(obs.mask)
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])


def test_float16_overflow_of_compensation_is_a_typed_error():
    # all inputs equal (H = 11ᵀ + εI): pruning half of a row moves its weight onto the kept half, past 65504
    W = torch.full((2, 8), 60000.0, dtype=torch.float16)
    H = torch.ones(8, 8) + 1e-3 * torch.eye(8)
    assert_fails_untouched(InputError, "overflow torch.float16; prune a float32 copy", W, H, "2:4", "sparsegpt")


# ---- 9: raw exceptions where a typed one belongs ---------------------------------------------------------------


def test_nan_nnz():
    W, H = problem()
    with pytest.raises(PatternError, match="nnz must be an int"):
        prune_weight(W, H, Pattern(ScopeSpec(BlockSpec((1, 1)), (1, 4)), float("nan")))


def test_meta_weight():
    W, H = problem()
    with pytest.raises(InputError, match="meta device.*load"):
        prune_weight(W.to("meta"), H.to("meta"), "2:4")
    with pytest.raises(InputError, match="meta device"):
        prune_weight(W.to("meta"), H, "2:4")
    with pytest.raises(InputError, match="move both to the same device"):
        prune_weight(W, H.to("meta"), "2:4")


@pytest.mark.parametrize("devices, match", [(["bogus"], "not a device name"), (["cuda:7"], "does not exist here")])
def test_absent_devices(devices, match):
    W, H = problem()
    assert_fails_untouched(InputError, match, W, H, "2:4", "sparsegpt", devices=devices)


@pytest.mark.gpu
def test_cpu_hessian_with_cuda_weight():
    W, H = problem()
    assert_fails_untouched(InputError, "same device", W.cuda(), H, "2:4")


# ---- 10: silent surprises ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern, match", [("99.9%", "rounds to 0 kept, i.e. 100% sparsity"),
                                            ("0.1%", "rounds to 32 kept, i.e. 0% sparsity")])
def test_percentages_that_round_to_all_or_nothing(pattern, match):
    W, H = problem()
    assert_fails_untouched(PatternError, match, W, H, pattern)


@pytest.mark.parametrize("nnz, match", [(0.01, "100% sparsity"), (0.99, "0% sparsity"), (True, "nnz must be an int"),
                                        (False, "nnz must be an int"), ("2", "nnz must be an int"), (2.5, "int in")])
def test_bad_fractional_or_typed_nnz(nnz, match):
    W, H = problem()
    with pytest.raises(PatternError, match=match):
        prune_weight(W, H, Pattern(ScopeSpec(BlockSpec((1, 1)), (1, 4)), nnz))


@pytest.mark.parametrize("nnz, sparsity", [(0, 1.0), (4, 0.0), (0.5, 0.5), (2.0, 0.5)])
def test_exact_nnz_is_honoured(nnz, sparsity):
    # documented: an int nnz in [0, B] (or an integral float) is exact, 0 and B included
    W, H = problem()
    r = prune_weight(W, H, Pattern(ScopeSpec(BlockSpec((1, 1)), (1, 4)), nnz), "sparsegpt")
    assert r.sparsity == sparsity


@pytest.mark.parametrize("inplace", ["no", 1, None])
def test_inplace_must_be_a_bool(inplace):
    W, H = problem()
    W0 = W.clone()
    with pytest.raises(InputError, match="inplace must be True or False"):
        prune_weight(W, H, "2:4", inplace=inplace)
    assert torch.equal(W, W0)


def _indefinite(neg: float) -> torch.Tensor:
    """A float64 (32, 32) H with eigenvalues 1 and one ``-neg``."""
    q = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[0]
    ev = torch.ones(32, dtype=torch.float64)
    ev[0] = -neg
    return (q * ev) @ q.T


def test_indefinite_hessian_within_the_bound_warns():
    W, _ = problem(dtype=torch.float64)
    with pytest.warns(DampingWarning, match="not XᵀX up to rounding"):
        r = prune_weight(W, _indefinite(0.05), "2:4", "sparsegpt", damp=0.01)
    assert r.stats["damp_steps"] == 1 and r.damp == pytest.approx(0.1)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("magnitude", "wanda")])
def test_indefinite_hessian_past_the_bound_is_an_error(method):
    # needs relative damping > MAX_ESCALATED_DAMP: refused instead of pruning with a damping-dominated H
    W, _ = problem(dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DampingWarning on the way to the error
        assert_fails_untouched(HessianError, "not positive definite.*larger damp", W, _indefinite(0.5), "2:4", method)


def test_escalation_may_exceed_the_bound_only_from_the_callers_damp():
    # a caller's damp above the bound is used as is; escalation from it is refused
    with pytest.raises(HessianError, match="after 0 escalations"):
        damped_inverse(_indefinite(0.5), 0.3)
    assert damped_inverse(_indefinite(0.5), 0.6).steps == 0
    assert MAX_ESCALATED_DAMP == 0.1


@pytest.mark.parametrize("method", list(METHODS))
def test_all_zero_hessian_is_an_error(method):
    W, _ = problem()
    assert_fails_untouched(HessianError, "all zero.*0/0.*attention mask", W, torch.zeros(32, 32), "2:4", method)


# ---- found by the property suite (tests/test_properties.py) ------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_keep_every_block_is_the_identity(method):
    # nnz = blocks per scope: StructuredOBS enumerated C(B, 0) subsets into a raw RuntimeError
    W, H = problem()
    r = prune_weight(W, H, Pattern(ScopeSpec(BlockSpec((2, 1), chunk_rows=2), (1, 2)), 2), method)
    assert r.mask.all() and torch.equal(r.weight, W) and r.loss == 0.0


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt", "true-obs"])
@pytest.mark.parametrize("dtype, c", [(torch.float32, 1e-40), (torch.bfloat16, 1e-40), (torch.float64, 1e-310)])
def test_subnormal_weights(method, dtype, c):
    # the power of two that normalises a subnormal weight overflowed float32 ("produced NaN/Inf")
    W, H = problem(seed=6)
    w = (W.double() * c).to(dtype)
    r = prune_weight(w, H, "2:4", method)
    assert torch.isfinite(r.weight).all() and torch.all(r.weight[~r.mask] == 0) and math.isfinite(r.loss)
    assert torch.equal(r.mask, prune_weight(w.double() / c, H, "2:4", method).mask) or dtype != torch.float64


@pytest.mark.parametrize("nnz", [0, 2])
def test_swap_search_with_nothing_to_swap(nnz):
    # every block pruned (or kept): refine="swap" took the min of zero candidates, a raw IndexError
    W, H = problem()
    r = prune_weight(W, H, Pattern(ScopeSpec(BlockSpec((1, 1)), (1, 2)), nnz), "magnitude", refine="swap")
    assert r.sparsity == 1 - nnz / 2 and r.stats["swaps"] == 0


# ==== pipeline ================================================================================================
# Checkpoints, resume, the CLI and the report (tiny random models from tests/test_pipeline.py: seconds on a CPU).

import json as _json  # noqa: E402
import random  # noqa: E402

transformers = pytest.importorskip("transformers")

from sparsekit.errors import CheckpointError  # noqa: E402
from sparsekit.pipeline import PROGRESS_FILE, LayerReport, ModelReport, PruneConfig, prune_model_, save_pruned  # noqa: E402
from test_pipeline import VOCAB, _tiny_tokenizer, block_linears, calib, tiny_model  # noqa: E402

#: the job of the kill/corrupt/resume tests: 3 Llama blocks, SparseGPT (fast), 2 calibration batches
JOB = PruneConfig(method="sparsegpt", batch_size=4)


class Abort(Exception):
    pass


def _abort_at(event: str, block: int, after: int = 0):
    seen = {"n": 0}

    def fn(ev):
        if ev.event == event and ev.block == block:
            seen["n"] += 1
            if seen["n"] > after:
                raise Abort

    return fn


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted job: (calibration, final state dict, layer reports without times)."""
    torch.set_num_threads(1)
    ids = calib(6, 16)
    model = tiny_model("llama", layers=3)
    report = prune_model_(model, JOB, ids)
    return ids, _state(model), [r.to_dict() | {"time_s": 0} for r in report.layers]


def _killed_job(ck, ids, block: int, inside: bool):
    """Run the job into ``ck`` and abort it in (``inside``) or right after ``block``; returns the aborted model."""
    model = tiny_model("llama", layers=3)
    killer = _abort_at("layer_done", block, after=2) if inside else _abort_at("block_done", block)
    with pytest.raises(Abort):
        prune_model_(model, JOB, ids, killer, checkpoint_dir=ck)
    return model


# ---- 1-2: the fingerprint covers the full pattern spec, every option, the tokens and every weight -------------


def test_resume_under_another_custom_pattern_is_refused(tmp_path):
    # both patterns are named "custom": the fingerprint hashes their fields
    nm = lambda n, m: Pattern(ScopeSpec(BlockSpec((1, 1)), (1, m)), n)  # noqa: E731
    ids, ck = calib(6, 16), tmp_path / "ck"
    with pytest.raises(Abort):
        prune_model_(tiny_model("llama", 3), PruneConfig(pattern=nm(2, 4), method="wanda"), ids,
                     _abort_at("block_done", 0), checkpoint_dir=ck)
    model = tiny_model("llama", 3)
    before = _state(model)
    with pytest.raises(CheckpointError, match="another model, config or calibration"):
        prune_model_(model, PruneConfig(pattern=nm(2, 8), method="wanda"), ids, checkpoint_dir=ck, resume=True)
    assert _same(model.state_dict(), before)
    r = prune_model_(model, PruneConfig(pattern=nm(2, 4), method="wanda"), ids, checkpoint_dir=ck, resume=True)
    assert r.resumed_blocks == 1


@pytest.mark.parametrize("change", ["option", "damp", "max_blocks", "token", "weight_past_256", "norm_weight"])
def test_resume_after_any_change_is_refused(change, tmp_path):
    ids, ck = calib(6, 16), tmp_path / "ck"
    _killed_job(ck, ids, 0, inside=False)
    model, cfg = tiny_model("llama", 3), JOB
    if change == "option":
        cfg = PruneConfig(method="sparsegpt", batch_size=4, options={"blocksize": 16})
    elif change == "damp":
        cfg = PruneConfig(method="sparsegpt", batch_size=4, damp=0.02)
    elif change == "max_blocks":
        cfg = PruneConfig(method="sparsegpt", batch_size=4, max_blocks=2)
    elif change == "token":
        ids = ids.clone()
        ids[5, 15] = (ids[5, 15] + 1) % VOCAB  # the very last token
    elif change == "weight_past_256":
        with torch.no_grad():
            model.model.layers[2].mlp.down_proj.weight.view(-1)[-1] += 1e-6  # element 2047 of block 2
    else:
        with torch.no_grad():
            model.model.norm.weight[-1] += 1e-6
    with pytest.raises(CheckpointError, match="another model"):
        prune_model_(model, cfg, ids, checkpoint_dir=ck, resume=True)


def test_resume_in_the_same_process_after_an_abort(reference, tmp_path):
    # the aborted block is rolled back; the finished blocks equal their checkpoint: the resume is accepted
    ids, ref, ref_layers = reference
    ck = tmp_path / "ck"
    model = _killed_job(ck, ids, 1, inside=True)
    report = prune_model_(model, JOB, ids, checkpoint_dir=ck, resume=True)
    assert report.resumed_blocks == 1
    assert _same(model.state_dict(), ref)
    assert [r.to_dict() | {"time_s": 0} for r in report.layers] == ref_layers


# ---- 3 + fuzz: kill, corrupt, resume: bit-identical or a CheckpointError, never a silent difference ----------

CORRUPTIONS = ["flip", "flip64", "truncate", "delete", "swap", "empty_progress", "bad_progress", "none"]


def _corrupt(ck, how: str, rng: random.Random) -> bool:
    """Damage the checkpoint in ``ck``; returns whether a resume must fail."""
    files = sorted(p for p in ck.iterdir() if p.suffix == ".pt")
    f = rng.choice(files)
    data = bytearray(f.read_bytes())
    if how in ("flip", "flip64"):
        for _ in range(1 if how == "flip" else 64):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        f.write_bytes(bytes(data))
    elif how == "truncate":
        f.write_bytes(bytes(data[: rng.randrange(len(data))]))
    elif how == "delete":
        f.unlink()
    elif how == "swap":
        blocks = [p for p in files if p.name.startswith("block_")]
        if len(blocks) < 2:
            return _corrupt(ck, "flip", rng)
        a, b = rng.sample(blocks, 2)
        tmp = a.read_bytes()
        a.write_bytes(b.read_bytes())
        b.write_bytes(tmp)
    elif how == "empty_progress":
        (ck / PROGRESS_FILE).write_text("")
    elif how == "bad_progress":
        (ck / PROGRESS_FILE).write_text('{"version": 2, "last_block": "x"}')
    return how != "none"


@pytest.mark.parametrize("seed", range(8))
def test_kill_corrupt_resume_fuzz(seed, reference, tmp_path):
    ids, ref, ref_layers = reference
    rng = random.Random(seed)
    how = CORRUPTIONS[seed % len(CORRUPTIONS)]
    ck = tmp_path / "ck"
    inside = rng.random() < 0.5
    block = rng.randrange(2) + inside  # at least block 0 is committed
    _killed_job(ck, ids, block, inside)
    must_fail = _corrupt(ck, how, rng)
    model = tiny_model("llama", 3)  # a new process: the dense model again
    before = _state(model)
    if must_fail:
        with pytest.raises(CheckpointError, match=r"(\.pt|progress\.json).*delete the checkpoint folder and run the job again"):
            prune_model_(model, JOB, ids, checkpoint_dir=ck, resume=True)
        assert _same(model.state_dict(), before)  # nothing was loaded into the model
        return
    report = prune_model_(model, JOB, ids, checkpoint_dir=ck, resume=True)
    assert _same(model.state_dict(), ref)
    assert [r.to_dict() | {"time_s": 0} for r in report.layers] == ref_layers


def test_checkpoint_records_each_files_sha256(reference, tmp_path):
    import hashlib

    ids = reference[0]
    ck = tmp_path / "ck"
    _killed_job(ck, ids, 1, inside=False)
    state = _json.loads((ck / PROGRESS_FILE).read_text())
    assert set(state["files"]) == {"block_0000.pt", "block_0001.pt", "acts_0001.pt"}
    for name, sha in state["files"].items():
        assert hashlib.sha256((ck / name).read_bytes()).hexdigest() == sha


# ---- 8: an unwritable checkpoint_dir / --out fails before any work ---------------------------------------------


def test_unwritable_checkpoint_dir_fails_before_any_work(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    model = tiny_model("llama", 2)
    before, events = _state(model), []
    with pytest.raises(InputError, match="checkpoint_dir .* cannot be written"):
        prune_model_(model, JOB, calib(), events.append, checkpoint_dir=tmp_path / "file" / "ck")
    assert events == [] and _same(model.state_dict(), before)


def test_cli_unwritable_out_fails_before_loading_the_model(tmp_path, capsys):
    from sparsekit.cli import main

    (tmp_path / "file").write_text("not a folder")
    rc = main(["prune", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "file" / "out")])
    assert rc == 2 and "--out" in capsys.readouterr().err  # not "unknown model": checked first


# ---- 9-10: bad calibration and CLI values ---------------------------------------------------------------------


def test_negative_token_ids():
    ids = calib()
    ids[0, 3] = -1
    with pytest.raises(InputError, match="negative token id"):
        prune_model_(tiny_model("llama", 1), JOB, ids)


def test_bert_sequence_longer_than_its_positions():
    model = tiny_model("bert", 1)  # 64 positions
    with pytest.raises(InputError, match="exceed the model's 64 positions"):
        prune_model_(model, JOB, calib(2, 65))


def test_all_zero_attention_mask_is_an_error():
    ids = calib()
    model = tiny_model("llama", 1)
    before = _state(model)
    with pytest.raises(InputError, match="all zeros"):
        prune_model_(model, JOB, ids, attention_mask=torch.zeros_like(ids))
    assert _same(model.state_dict(), before)


def _saved_tiny(tmp_path, kind):
    src = tmp_path / kind
    tiny_model(kind, 2).save_pretrained(src)
    _tiny_tokenizer(VOCAB).save_pretrained(src)
    return src


@pytest.mark.parametrize("argv, match", [
    (["--option", "damp=abc"], "damp=abc is not a number"),
    (["--tokens", "0"], "--tokens must be >= 1"),
    (["--seq-len", "0"], "--seq-len must be >= 1"),
    (["--max-blocks", "0"], "max_blocks must be an int >= 1"),
])
def test_cli_bad_values_fail_before_any_work(argv, match, tmp_path, capsys):
    from sparsekit.cli import main

    rc = main(["prune", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o"), *argv])
    assert rc == 2 and re.search(match, capsys.readouterr().err)


def test_cli_bert_sequence_longer_than_its_positions(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from sparsekit.cli import main

    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i % 90}" for i in range(400)))
    rc = main(["prune", "--model", str(_saved_tiny(tmp_path, "bert")), "--seq-len", "100", "--tokens", "200",
               "--calib", str(text), "--out", str(tmp_path / "o"), "--no-eval"])
    assert rc == 2 and "--seq-len 64" in capsys.readouterr().err


# ---- max_blocks ------------------------------------------------------------------------------------------------


def test_max_blocks_prunes_only_the_first_blocks():
    model = tiny_model("llama", 3)
    before = _state(model)
    report = prune_model_(model, PruneConfig(method="sparsegpt", max_blocks=1), calib())
    assert {r.block for r in report.layers} == {0} and report.config["max_blocks"] == 1
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{n}.weight" for n in block_linears(model) if n.startswith("model.layers.0.")}


# ---- 4: no NaN in a JSON report --------------------------------------------------------------------------------


def test_report_with_nan_is_valid_json(tmp_path):
    lay = LayerReport("l", 0, (4, 4), "2:4", "sparsegpt", "pruned", loss=float("nan"), damp=float("inf"),
                      stats={"x": float("-inf"), "t": torch.tensor(float("nan"))})
    rep = ModelReport("M", "layers", 1, {"damp": float("nan")}, {}, layers=[lay], extra={"v": [float("nan"), 1.5]})
    text = rep.to_json(tmp_path / "r.json")
    d = _json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in the report"))
    assert d["layers"][0]["loss"] is None and d["layers"][0]["damp"] is None and d["layers"][0]["stats"]["t"] is None
    assert d["config"]["damp"] is None and d["extra"]["v"] == [None, 1.5]


# ---- 0: a dequantised GGUF load saves as a plain model ---------------------------------------------------------


def test_gguf_flagged_model_saves_and_reloads(tmp_path):
    # transformers flags a dequantised GGUF load as quantised; its save_pretrained then refuses
    model = tiny_model("llama", 2)
    qc = transformers.GgufConfig(gguf_file="x.gguf", dequantize=True)
    model.hf_quantizer = type("FakeGgufQuantizer", (), {"quantization_config": qc})()
    model.config.quantization_config = qc
    model.is_quantized = True
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "raw")
    prune_model_(model, PruneConfig(method="sparsegpt", max_blocks=1), calib())
    save_pruned(model, tmp_path / "out")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert getattr(loaded, "hf_quantizer", None) is None
    assert _same(loaded.state_dict(), model.state_dict())


@pytest.mark.parametrize("kw, match", [
    ({"device": "bogus"}, "not a device name"), ({"device": "cuda:99"}, "does not exist here"),
    ({"damp": float("nan")}, "damp must be a finite number"), ({"damp": "0.01"}, "damp must be a finite number"),
])
def test_bad_config_fails_when_built(kw, match):
    with pytest.raises(InputError, match=match):
        PruneConfig(method="sparsegpt", **kw)
