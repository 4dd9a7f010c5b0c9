"""The reductions over row parts (sparsekit.coupling): the single part, threads and gloo ranks against the sums of
one process, the abort that releases waiting parts, and prune_weight(gather=...) on two ranks."""

from __future__ import annotations

import datetime
import os
import threading
import time
import traceback
from pathlib import Path

import pytest
import torch

from oracles import tiny_problem
from ranks import run_ranks
from sparsekit import prune_weight
from sparsekit.coupling import SINGLE, ThreadGather
from sparsekit.errors import CoupledPartError, InputError
from sparsekit.parallel import row_parts

#: per part: values spanning many decades, so that the order of a float sum shows (column 0: part order gives
#: (1 + 1e16) − 1e16 = 0, another order 1)
VALUES = [
    [1.0, 3.0, -2.5e-8, 7.0],
    [1e16, -1e16, 1e-9, 2.0],
    [-1e16, 0.25, 4e-8, -9.0],
]


def _part_order_sum(rows: list[list[float]]) -> torch.Tensor:
    """What every implementation must return: float64, part 0 + part 1 + ... elementwise."""
    out = torch.tensor(rows[0], dtype=torch.float64)
    for r in rows[1:]:
        out = out + torch.tensor(r, dtype=torch.float64)
    return out


def _t(row: list[float]) -> torch.Tensor:
    return torch.tensor(row, dtype=torch.float64)


def test_single_part_is_the_identity():
    x = torch.tensor([1.5, -2.0], dtype=torch.float32)
    assert SINGLE.sum(x).dtype == torch.float64 and torch.equal(SINGLE.sum(x), x.double())
    assert torch.equal(SINGLE.max(x), x.double())
    with SINGLE.unit():
        pass


def _in_threads(n: int, fn) -> list:
    gathers = ThreadGather.group(n)
    out: list = [None] * n

    def run(i: int) -> None:
        try:
            out[i] = fn(gathers[i])
        except Exception as e:  # the test reads it
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a part is still waiting"
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_threads_sum_in_part_order_and_max_exactly(n):
    rows = VALUES[:n]
    got = _in_threads(n, lambda g: (g.sum(_t(rows[g.index])), g.max(_t(rows[g.index])), g.parts))
    want_sum = _part_order_sum(rows)
    want_max = torch.tensor(rows, dtype=torch.float64).amax(0)
    for s, m, parts in got:
        assert parts == n and torch.equal(s, want_sum) and torch.equal(m, want_max)
    if n == 3:  # the order shows
        assert float(want_sum[0]) == 0.0 and (VALUES[2][0] + VALUES[1][0]) + VALUES[0][0] == 1.0


def test_an_aborted_thread_part_releases_the_others():
    def fn(g):
        g.sum(torch.ones(2))  # every part once
        if g.index == 1:
            with g.unit():
                raise InputError("part 1 broke")
        with g.unit():
            return g.sum(torch.ones(2))  # waits for part 1, which never comes

    out = _in_threads(3, fn)
    assert isinstance(out[1], InputError)
    assert isinstance(out[0], CoupledPartError) and isinstance(out[2], CoupledPartError)


def _rank_job(rank: int, world: int, port: int, out: str) -> None:
    """One gloo rank: reductions, a failing part on rank 1, and its row part of ADMM / OBS-ord."""
    torch.set_num_threads(1)
    import torch.distributed as dist

    from sparsekit.coupling import DistGather

    res: dict = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=30))
        g = DistGather(torch.device("cpu"))
        res["parts"] = (g.index, g.parts)
        res["sum"] = g.sum(_t(VALUES[rank]))
        res["max"] = g.max(_t(VALUES[rank]))
        # rank 1's part is refused by prune_weight (NaN); rank 0 must not wait for it until the timeout
        W, H, _ = tiny_problem(48, 64, seed=3)
        (a, b), = [p for i, p in enumerate(row_parts(48, 1, world)) if i == rank]
        w = W[a:b].clone()
        if rank == 1:
            w[0, 0] = float("nan")
        t0 = time.perf_counter()
        try:
            prune_weight(w, H, "2:4", "admm", gather=DistGather(torch.device("cpu")))
        except Exception as e:  # the test reads it
            res["failed"] = (type(e).__name__, time.perf_counter() - t0)
        for method, opts in (("admm", {}), ("obs-ord", {"ng": 2})):
            r = prune_weight(W[a:b], H, "2:4", method, gather=DistGather(torch.device("cpu")), **opts)
            res[method] = (r.weight, r.mask, r.loss)
        dist.destroy_process_group()
    except Exception:  # the test reads it
        res["error"] = traceback.format_exc()
    torch.save(res, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    res = run_ranks(_rank_job, 2, tmp_path_factory.mktemp("coupling"))
    for r, x in enumerate(res):
        assert x is not None and "error" not in x, f"rank {r}: {x and x['error']}"
    return res


def test_gloo_ranks_sum_in_part_order_and_max_exactly(two_ranks):
    rows = VALUES[:2]
    want_sum = _part_order_sum(rows)
    for r, x in enumerate(two_ranks):
        assert x["parts"] == (r, 2)
        assert torch.equal(x["sum"], want_sum)
        assert torch.equal(x["max"], torch.tensor(rows, dtype=torch.float64).amax(0))
    # the same bits as two threads
    threads = _in_threads(2, lambda g: g.sum(_t(rows[g.index])))
    assert all(torch.equal(t, want_sum) for t in threads)


def test_a_failing_rank_releases_the_other_at_once(two_ranks):
    name0, waited = two_ranks[0]["failed"]
    assert name0 == "CoupledPartError" and waited < 10  # the timeout is 30 s
    assert two_ranks[1]["failed"][0] == "InputError"


@pytest.mark.parametrize("method,opts", [("admm", {}), ("obs-ord", {"ng": 2})])
def test_two_ranks_prune_the_rows_of_one_process(two_ranks, method, opts, one_thread):
    """Bit for bit (the ranks run one thread each: the thread count changes how the CPU GEMMs round)."""
    W, H, _ = tiny_problem(48, 64, seed=3)
    one = prune_weight(W, H, "2:4", method, **opts)
    parts = [x[method] for x in two_ranks]
    assert torch.equal(torch.cat([p[1] for p in parts]), one.mask)
    assert torch.equal(torch.cat([p[0] for p in parts]), one.weight)
    assert parts[0][2] == parts[1][2] == pytest.approx(one.loss, rel=1e-12)  # the whole layer's loss on each


def _nccl_job(rank: int, world: int, port: int, out: str) -> None:
    """One NCCL rank: its row part of ADMM and OBS-ord on a float32 layer, reduced through NCCL."""
    import torch.distributed as dist

    from sparsekit.coupling import DistGather

    res: dict = {}
    try:
        os.environ["NCCL_NVLS_ENABLE"] = "0"
        torch.cuda.set_device(rank)
        dev = torch.device(f"cuda:{rank}")
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        W, H, _ = tiny_problem(64, 512, seed=7)
        (a, b), = [p for i, p in enumerate(row_parts(64, 1, world)) if i == rank]
        for method, opts in NCCL_CASES:
            r = prune_weight(W[a:b].float().to(dev), H.float().to(dev), "2:4", method,
                             gather=DistGather(dev), **opts)
            res[method] = (r.weight.cpu(), r.mask.cpu(), r.loss)
        dist.destroy_process_group()
    except Exception:  # the test reads it
        res["error"] = traceback.format_exc()
    torch.save(res, Path(out) / f"rank{rank}.pt")


NCCL_CASES = (("admm", {}), ("obs-ord", {"ng": 16}))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_nccl_ranks_prune_close_to_one_gpu(tmp_path):
    """Through NCCL the parts' GEMMs have other shapes than the whole layer's (cuBLAS rounds differently, TF32):
    the bounds of tests/test_parallel.py's two-GPU test, and every rank reports the same whole-layer loss."""
    res = run_ranks(_nccl_job, 2, tmp_path, cuda=True, timeout_s=300)
    for r, x in enumerate(res):
        assert x is not None and "error" not in x, f"rank {r}: {x and x['error']}"
    W, H, _ = tiny_problem(64, 512, seed=7)
    for method, opts in NCCL_CASES:
        one = prune_weight(W.float().cuda(0), H.float().cuda(0), "2:4", method, **opts)
        mask = torch.cat([x[method][1] for x in res])
        assert (mask != one.mask.cpu()).float().mean().item() < 1e-2  # as tests/test_parallel.py's two GPUs
        assert res[0][method][2] == res[1][method][2]
        assert abs(res[0][method][2] / one.loss - 1) < 1e-3
