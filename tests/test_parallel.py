"""prune_weight(devices=[...]): rows split across devices (one thread each, coupled by a ThreadGather) give the
one-device result for every method, bit for bit on the CPU; bad devices are refused; a failing part stops the
others."""

import threading

import pytest
import torch

from oracles import tiny_problem
from sparsekit import METHODS, InputError, prune_weight
from sparsekit.parallel import row_parts

SEED_PATTERNS = ["2:4", "2:4-pairs", "coupled-2:4", "rowpair-16"]


def test_row_parts_are_whole_units_balanced_and_cover_every_row():
    assert row_parts(48, 16, 2) == [(0, 32), (32, 48)]
    assert row_parts(48, 1, 3) == [(0, 16), (16, 32), (32, 48)]  # units of 16 rows even for one-row chunks
    assert row_parts(40, 8, 3) == [(0, 16), (16, 40)]  # 2 units; the 8 rows past them go to the last part
    assert row_parts(10, 1, 3) == [(0, 10)]  # less than a unit: one part
    assert row_parts(16, 16, 4) == [(0, 16)]  # one unit: one part, no empty ones
    assert row_parts(144, 3, 2) == [(0, 96), (96, 144)]  # unit lcm(3, 16) = 48
    for M, cr, n in ((96, 16, 4), (7, 1, 7), (64, 16, 3), (200, 8, 5), (1000, 1, 8)):
        parts = row_parts(M, cr, n)
        assert parts[0][0] == 0 and parts[-1][1] == M and len(parts) <= n
        assert all(b0 == a1 for (_, b0), (a1, _) in zip(parts, parts[1:]))
        assert all(a % 16 == 0 and a % cr == 0 for a, _ in parts) and all(b > a for a, b in parts)
        sizes = [(b - a) // 16 for a, b in parts]
        assert max(sizes) - min(sizes) <= 1


#: options that make the coupled methods' coupling matter on a 64-column layer (several OBS-ord batches)
OPTIONS = {"obs-ord": {"ng": 2}}


@pytest.mark.parametrize("pattern", SEED_PATTERNS)
@pytest.mark.parametrize("method", list(METHODS))
def test_split_rows_equal_the_one_device_result(pattern, method, one_thread):
    """Three row parts (on the CPU here; the code path is the one CUDA devices take) reproduce the mask and the
    weights bit for bit, ADMM and OBS-ord included (their rows couple through the ThreadGather), and the loss is
    the whole layer's."""
    W, H, _ = tiny_problem(48, 64, seed=3)
    opts = OPTIONS.get(method, {})
    one = prune_weight(W, H, pattern, method, **opts)
    split = prune_weight(W, H, pattern, method, devices=["cpu", "cpu", "cpu"], **opts)
    assert torch.equal(split.mask, one.mask)
    assert torch.equal(split.weight, one.weight)
    assert split.loss == pytest.approx(one.loss, rel=1e-12)  # float64 partial traces added in another order
    assert split.stats["rows_per_device"] == [16, 16, 16]
    assert len(split.stats["per_device"]) == 3


@pytest.mark.parametrize("method,opts", [("admm", {}), ("obs-ord", {"ng": 2})])
def test_parts_without_the_gather_would_not_give_it(method, opts, one_thread):
    """The control of the test above: the same parts pruned on their own (no reductions) give another result."""
    W, H, _ = tiny_problem(48, 64, seed=3)
    one = prune_weight(W, H, "2:4", method, **opts)
    alone = torch.cat([prune_weight(W[a:b], H, "2:4", method, **opts).weight for a, b in row_parts(48, 1, 3)])
    assert not torch.equal(alone, one.weight)


@pytest.mark.parametrize("method,opts", [
    ("admm", {"refit_solver": "cg"}),  # the refit's CG stops on the residual over every part
    ("admm", {"init": "obs-ord", "init_options": {"ng": 4}}),  # a coupled init inside a coupled method
    ("true-obs", {"refit": True, "refine": "swap"}),  # keep decisions on the whole layer's loss
])
def test_coupled_options_split_exactly(method, opts, one_thread):
    W, H, _ = tiny_problem(80, 96, seed=5)
    W, H = W.float(), H.float()
    one = prune_weight(W, H, "2:4", method, **opts)
    split = prune_weight(W, H, "2:4", method, devices=["cpu", "cpu", "cpu"], **opts)
    assert split.stats["rows_per_device"] == [32, 32, 16]
    assert torch.equal(split.mask, one.mask) and torch.equal(split.weight, one.weight)
    for key in ("admm_iters", "refit_cg_iters", "swap_kept", "refit_kept", "chosen"):
        assert split.stats.get(key) == one.stats.get(key), key


def test_a_failing_part_stops_the_others(monkeypatch):
    """Part 1 raises inside ADMM; parts 0 and 2 wait in the next reduction and are released at once, and the
    caller gets part 1's own error (not another part's CoupledPartError)."""
    from sparsekit.errors import HessianError
    from sparsekit.pruners import admm

    real = admm.admm_iterate

    def fail_in_part_1(ws0, *a, gather, **kw):
        if gather.index == 1:
            raise HessianError("part 1 broke")
        return real(ws0, *a, gather=gather, **kw)

    monkeypatch.setattr(admm, "admm_iterate", fail_in_part_1)
    W, H, _ = tiny_problem(48, 64, seed=3)
    w = W.clone()
    raised = []

    def call():
        try:
            prune_weight(W, H, "2:4", "admm", devices=["cpu", "cpu", "cpu"], inplace=True)
        except Exception as e:  # the test reads it
            raised.append(e)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(60)
    assert not caller.is_alive(), "the other parts are still waiting for part 1"
    assert len(raised) == 1 and isinstance(raised[0], HessianError) and "part 1 broke" in str(raised[0])
    assert torch.equal(W, w)


def test_progress_messages_name_the_device():
    W, H, _ = tiny_problem(32, 64, seed=2)
    msgs = []
    prune_weight(W, H, "2:4", "true-obs", ng=4, devices=["cpu", "cpu"], progress_fn=msgs.append)
    assert msgs and all(m.startswith("[cpu] true-obs:") for m in msgs)


def test_interleaved_tf32_contexts_of_the_parts_do_not_leak_into_the_caller():
    """Part 0 enters its TF32 context, part 1 enters (seeing TF32 on), part 0 exits, part 1 exits and would
    restore "on": after the call the caller's setting (off) must hold."""
    from sparsekit import PruneResult, parallel
    from sparsekit.kernels.obs_linalg import tf32

    entered0, entered1, exited0 = threading.Event(), threading.Event(), threading.Event()

    def fake(w, h, pattern, method, gather, progress_fn=None, **kw):
        first = gather.index == 0
        with tf32(True):
            if first:
                entered0.set()
                entered1.wait(5)
            else:
                entered0.wait(5)
                entered1.set()
                exited0.wait(5)
        if first:
            exited0.set()
        return PruneResult(w, torch.ones_like(w, dtype=torch.bool), 0.0, method, pattern, 0.0, None)

    W = torch.ones(32, 8)
    flags = torch.backends.cuda.matmul
    before = flags.allow_tf32
    flags.allow_tf32 = False
    try:
        out = parallel.prune_on_devices(fake, W, torch.eye(8), "2:4", "magnitude", [torch.device("cpu")] * 2)
        assert entered1.is_set() and exited0.is_set()  # the threads did interleave
        assert flags.allow_tf32 is False and torch.equal(out.weight, W)
    finally:
        flags.allow_tf32 = before


@pytest.mark.parametrize("devices,match", [
    ("cuda:0", "non-empty list"),
    ([], "non-empty list"),
    (["gpu7"], "not a device name"),
    (["cuda:99"], "does not exist here"),
    (["cuda"], "with their index"),
])
def test_bad_devices(devices, match):
    W, H, _ = tiny_problem(4, 16, seed=0)
    w = W.clone()
    with pytest.raises(InputError, match=match):
        prune_weight(W, H, "2:4", "sparsegpt", devices=devices)
    assert torch.equal(W, w)


def test_devices_and_gather_are_exclusive():
    from sparsekit.coupling import SINGLE

    W, H, _ = tiny_problem(4, 16, seed=0)
    with pytest.raises(InputError, match="not both"):
        prune_weight(W, H, "2:4", "admm", devices=["cpu", "cpu"], gather=SINGLE)


@pytest.mark.gpu
def test_a_gpu_part_and_a_cpu_part_gather_on_the_weights_device():
    """The CUDA thread path on one GPU: half the rows on cuda:0 (TF32), half on the CPU (float32). True OBS is
    row-separable, so each half is exactly what that device gives for those rows alone (same shapes, same kernels;
    the shared scale is a power of two); the two devices' roundings differ, so the whole is not compared bitwise
    with a one-device run."""
    W, H, _ = tiny_problem(64, 512, seed=7)
    W, H = W.float().cuda(), H.float().cuda()
    opts = dict(ng=8, order="largest_first", c_dtype=torch.float32)
    mixed = prune_weight(W, H, "2:4", "true-obs", devices=["cuda:0", "cpu"], **opts)
    assert mixed.weight.device == W.device and mixed.mask.device == W.device
    assert mixed.stats["devices"] == ["cuda:0", "cpu"] and mixed.stats["rows_per_device"] == [32, 32]
    gpu = prune_weight(W[:32].clone(), H, "2:4", "true-obs", **opts)
    cpu = prune_weight(W[32:].cpu(), H.cpu(), "2:4", "true-obs", **opts)
    assert torch.equal(mixed.mask[:32], gpu.mask) and torch.equal(mixed.weight[:32], gpu.weight)
    assert torch.equal(mixed.mask[32:].cpu(), cpu.mask) and torch.equal(mixed.weight[32:].cpu(), cpu.weight)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("method,opts,flips", [
    ("true-obs", dict(ng=8, order="largest_first"), 1e-3), ("sparsegpt", {}, 1e-3),
    ("admm", {}, 1e-2), ("obs-ord", dict(ng=16), 1e-2),
])
def test_two_gpus_equal_one_gpu(method, opts, flips):
    """TF32/fp16 ties may flip a few mask entries; in ADMM and OBS-ord a flip also moves the reduced counts or
    costs that steer every row, so their bound on flips is looser (not measured yet: no two-GPU machine lent)."""
    W, H, _ = tiny_problem(64, 512, seed=7)
    W, H = W.float().cuda(0), H.float().cuda(0)
    one = prune_weight(W, H, "2:4", method, **opts)
    two = prune_weight(W, H, "2:4", method, devices=["cuda:0", "cuda:1"], **opts)
    assert two.weight.device == W.device and two.stats["devices"] == ["cuda:0", "cuda:1"]
    assert (two.mask != one.mask).float().mean().item() < flips
    assert abs(two.loss / one.loss - 1) < 1e-3
