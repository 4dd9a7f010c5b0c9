"""prune_weight(devices=[...]): rows split across devices give the one-device result; bad devices are refused."""

import pytest
import torch

from oracles import tiny_problem
from sparsekit import InputError, get_pattern, prune_weight
from sparsekit.parallel import ROW_SEPARABLE, row_parts

SEED_PATTERNS = ["2:4", "2:4-pairs", "coupled-2:4", "rowpair-16"]


def test_row_parts_are_whole_chunks_balanced_and_cover_every_row():
    assert row_parts(48, 16, 2) == [(0, 32), (32, 48)]
    assert row_parts(10, 1, 3) == [(0, 4), (4, 7), (7, 10)]
    assert row_parts(16, 16, 4) == [(0, 16)]  # one chunk: one part, no empty ones
    for M, cr, n in ((96, 16, 4), (7, 1, 7), (64, 16, 3)):
        parts = row_parts(M, cr, n)
        assert parts[0][0] == 0 and parts[-1][1] == M
        assert all(b0 == a1 for (_, b0), (a1, _) in zip(parts, parts[1:]))
        sizes = [(b - a) // cr for a, b in parts]
        assert all((b - a) % cr == 0 for a, b in parts) and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("pattern", SEED_PATTERNS)
@pytest.mark.parametrize("method", ROW_SEPARABLE)
def test_split_rows_equal_the_one_device_result(pattern, method):
    """Three row parts (on the CPU here; the code path is the one CUDA devices take) reproduce the mask exactly
    and the weights to float64 round-off, and the loss is computed on the whole layer."""
    W, H, _ = tiny_problem(48, 64, seed=3)
    one = prune_weight(W, H, pattern, method)
    split = prune_weight(W, H, pattern, method, devices=["cpu", "cpu", "cpu"])
    assert torch.equal(split.mask, one.mask)
    assert torch.allclose(split.weight, one.weight, rtol=0, atol=1e-12 * W.abs().max().item())
    assert split.loss == pytest.approx(one.loss, rel=1e-12)
    assert split.stats["rows_per_device"] == [16, 16, 16]
    assert len(split.stats["per_device"]) == 3


def test_refine_and_refit_run_after_the_gather():
    W, H, _ = tiny_problem(8, 32, seed=1)
    one = prune_weight(W, H, "2:4", "sparsegpt", refit=True, refine="swap")
    split = prune_weight(W, H, "2:4", "sparsegpt", refit=True, refine="swap", devices=["cpu", "cpu"])
    assert torch.equal(split.mask, one.mask) and split.loss == pytest.approx(one.loss, rel=1e-10)
    assert split.stats["swap_loss_after"] <= split.stats["swap_loss_before"]


def test_progress_messages_name_the_device():
    W, H, _ = tiny_problem(32, 64, seed=2)
    msgs = []
    prune_weight(W, H, "2:4", "true-obs", ng=4, devices=["cpu", "cpu"], progress_fn=msgs.append)
    assert msgs and all(m.startswith("[cpu] true-obs:") for m in msgs)


def test_interleaved_tf32_contexts_of_the_parts_do_not_leak_into_the_caller():
    """Part 0 enters its TF32 context, part 1 enters (seeing TF32 on), part 0 exits, part 1 exits and would
    restore "on": after the call the caller's setting (off) must hold."""
    import threading

    from sparsekit.kernels.obs_linalg import tf32
    from sparsekit.parallel import prune_rows_on_devices
    from sparsekit.pruners import PrunerOutput

    entered0, entered1, exited0 = threading.Event(), threading.Event(), threading.Event()

    def fake(w, h, layout, progress_fn=None, **kw):
        first = bool(w[0, 0] == 0)
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
        return PrunerOutput(w, torch.ones_like(w, dtype=torch.bool))

    W = torch.ones(4, 8)
    W[0, 0] = 0
    flags = torch.backends.cuda.matmul
    before = flags.allow_tf32
    flags.allow_tf32 = False
    try:
        out = prune_rows_on_devices(fake, W, torch.eye(8), get_pattern("2:4"), [torch.device("cpu")] * 2)
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


@pytest.mark.parametrize("method", ["obs-ord", "admm"])
def test_methods_that_couple_rows_are_refused(method):
    W, H, _ = tiny_problem(4, 16, seed=0)
    with pytest.raises(InputError, match=f"run '{method}' on one device"):
        prune_weight(W, H, "2:4", method, devices=["cpu", "cpu"])


@pytest.mark.gpu
def test_a_gpu_part_and_a_cpu_part_gather_on_the_weights_device():
    """The CUDA thread path on one GPU: half the rows on cuda:0 (TF32), half on the CPU (float32)."""
    W, H, _ = tiny_problem(64, 512, seed=7)
    W, H = W.float().cuda(), H.float().cuda()
    opts = dict(ng=8, order="largest_first", c_dtype=torch.float32)
    one = prune_weight(W, H, "2:4", "true-obs", **opts)
    mixed = prune_weight(W, H, "2:4", "true-obs", devices=["cuda:0", "cpu"], **opts)
    assert mixed.weight.device == W.device and mixed.mask.device == W.device
    assert mixed.stats["devices"] == ["cuda:0", "cpu"] and mixed.stats["rows_per_device"] == [32, 32]
    assert (mixed.mask != one.mask).float().mean().item() < 1e-3
    assert abs(mixed.loss / one.loss - 1) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("method,opts", [("true-obs", dict(ng=8, order="largest_first")), ("sparsegpt", {})])
def test_two_gpus_equal_one_gpu(method, opts):
    W, H, _ = tiny_problem(64, 512, seed=7)
    W, H = W.float().cuda(0), H.float().cuda(0)
    one = prune_weight(W, H, "2:4", method, **opts)
    two = prune_weight(W, H, "2:4", method, devices=["cuda:0", "cuda:1"], **opts)
    assert two.weight.device == W.device and two.stats["devices"] == ["cuda:0", "cuda:1"]
    assert (two.mask != one.mask).float().mean().item() < 1e-3  # TF32/fp16 ties may flip a few
    assert abs(two.loss / one.loss - 1) < 1e-3
