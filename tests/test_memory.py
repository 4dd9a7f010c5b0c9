"""The memory planner (sparsekit/memory.py): byte sizes, chunk arithmetic, budgets, OOM retries, and every
method's result independent of how its rows are chunked."""

import math

import pytest
import torch

from oracles import tiny_problem
from sparsekit import InputError, ResourceError, prune_weight
from sparsekit.memory import (
    FRAGMENTATION_MARGIN,
    Budget,
    device_budget,
    parse_bytes,
    plan_rows,
    run_chunked,
)
from sparsekit.pruners import METHODS

SEED_PATTERNS = ["2:4", "2:4-pairs", "coupled-2:4", "rowpair-16"]
GIB = 2**30
#: methods whose steps are only checked against the budget (every row at once) or that allocate nothing
UNCHUNKED = {"magnitude", "wanda"}


# ---- parse_bytes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("24GiB", 24 * 2**30), ("500MB", 500 * 10**6), ("1.5 GB", 1_500_000_000), ("4096", 4096), ("3kib", 3072),
    ("2T", 2 * 10**12), (12345, 12345), (2.0**20, 2**20), ("1e3", 1000),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["24 parsecs", "", "GiB", "-1GiB", 0, -5, True, None, [1], "nan", float("inf")])
def test_parse_bytes_rejects(bad):
    with pytest.raises(InputError):
        parse_bytes(bad)


# ---- plan_rows -----------------------------------------------------------------------------------------------
def _budget(n):
    return Budget(n, n, "test")


def test_plan_rows_arithmetic():
    b = _budget(1000)
    assert plan_rows(100, 10, 200, b) == 80  # (1000 − 200) // 10
    assert plan_rows(100, 10, 200, b, multiple=16) == 80
    assert plan_rows(100, 10, 200, b, multiple=32) == 64  # rounded down to the multiple
    assert plan_rows(50, 10, 200, b, multiple=16) == 50  # everything fits: all rows
    assert plan_rows(100, 10, 990, b) == 1
    assert plan_rows(8, 100, 0, b, multiple=16) == 8  # fewer rows than the multiple: all of them


def test_plan_rows_impossible_names_the_smallest_budget():
    with pytest.raises(ResourceError) as info:
        plan_rows(100, 10, 995, _budget(1000), what="demo step")
    err = info.value
    assert "demo step" in str(err) and "max_memory" in str(err)
    assert err.budget == 1000 and err.needed == math.ceil(1005 / (1 - FRAGMENTATION_MARGIN)) + 1
    ok = device_budget("cpu", err.needed)  # the reported size works, one byte less of usable budget does not
    assert ok.bytes >= 1005 and plan_rows(100, 10, 995, ok) == 1
    with pytest.raises(ResourceError):
        plan_rows(100, 10, 995, _budget(1004))
    with pytest.raises(ResourceError):
        plan_rows(64, 10, 0, _budget(100), multiple=16)  # 16 rows need 160


def test_device_budget_cpu():
    b = device_budget("cpu", "1MiB")
    assert b.limit == 2**20 and b.bytes == int(2**20 * (1 - FRAGMENTATION_MARGIN)) and "max_memory" in b.source
    auto = device_budget("cpu")
    assert auto.bytes > 0 and auto.source == "available RAM"


@pytest.fixture
def fake_cuda(monkeypatch):
    """A simulated 80 GiB device: 10 GiB allocated by this process, 14 GiB reserved (``pinned`` of it unused but
    inside segments live tensors hold), 50 GiB free on the device."""
    import types

    state = {"fraction": 1.0, "pinned": 0}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i=None: 10 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i=None: 14 * GIB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=None: (50 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda i=None: state["fraction"])
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda i=None: {"inactive_split_bytes.all.current": state["pinned"]})
    return state


def test_device_budget_cuda_counts_the_cache_the_cap_and_max_memory(fake_cuda):
    keep = 1 - FRAGMENTATION_MARGIN
    b = device_budget("cuda:0")  # free 50 + cached 4 (reserved − allocated)
    assert b.limit == 54 * GIB and b.bytes == int(54 * GIB * keep) and "allocator cache" in b.source
    fake_cuda["fraction"] = 0.3  # cap 24 GiB, 10 of it allocated
    b = device_budget("cuda:0")
    assert b.limit == 24 * GIB - 10 * GIB and "memory fraction" in b.source
    b = device_budget("cuda:0", "12GiB")  # an explicit cap on the process's allocated bytes
    assert b.limit == 2 * GIB and "max_memory" in b.source
    b = device_budget("cuda:0", "8GiB")  # already past it: nothing left
    assert b.limit == 0 and b.bytes == 0
    fake_cuda["fraction"], fake_cuda["pinned"] = 1.0, 3 * GIB  # 3 of the 4 cached GiB are pinned fragments
    assert device_budget("cuda:0").limit == 51 * GIB


# ---- run_chunked ---------------------------------------------------------------------------------------------
def test_run_chunked_retries_at_half_the_chunk():
    seen, stats = [], {}

    def step(a, b):
        if b - a > 12:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        seen.append((a, b))

    assert run_chunked(step, 100, 64, multiple=4, stats=stats) == 8  # 64 -> 32 -> 16 -> 8
    assert stats["oom_retries"] == 3
    covered = [i for a, b in seen for i in range(a, b)]
    assert covered == list(range(100))  # every item once, in order


def test_run_chunked_gives_up_at_the_minimum():
    def step(a, b):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    stats = {}
    with pytest.raises(ResourceError, match="smallest chunk"):
        run_chunked(step, 64, 64, multiple=16, stats=stats, what="demo")
    assert stats["oom_retries"] == 2  # 64 -> 32 -> 16, then the error


# ---- every method: chunking does not change the result ---------------------------------------------------------
CASES = [(m, p) for m in METHODS for p in SEED_PATTERNS] + [
    ("sparsegpt", "2:4", "refit"), ("true-obs", "2:4", "swap"), ("sparsegpt", "rowpair-16", "swap"),
]


def _problem(pattern):
    W, H, _ = tiny_problem(32, 64, seed=3)
    return W.float(), H.float()


def _run(W, H, pattern, method, extra, max_memory):
    kw = {"refit": True} if extra == "refit" else {"refine": "swap", "max_sweeps": 8} if extra == "swap" else {}
    if method == "true-obs":
        kw.update(ng=3, order="largest_first")
    return prune_weight(W, H, pattern, method, max_memory=max_memory, **kw)


def _smallest_budget(W, H, pattern, method, extra):
    """Raise the budget to each failing step's reported minimum until the whole call fits."""
    budget = 1
    for _ in range(20):
        try:
            return budget, _run(W, H, pattern, method, extra, budget)
        except ResourceError as err:
            assert err.needed is not None and err.needed > budget
            budget = err.needed
    raise AssertionError("the budget did not converge")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_tiny_budget_gives_identical_results(case):
    method, pattern, extra = (*case, None)[:3]
    W, H = _problem(pattern)
    ref = _run(W, H, pattern, method, extra, None)
    budget, res = _smallest_budget(W, H, pattern, method, extra)
    assert torch.equal(res.mask, ref.mask)
    assert torch.equal(res.weight, ref.weight)
    if method == "true-obs":  # the smallest budget runs one row chunk at a time
        assert res.stats["chunk_size"] < ref.stats["chunk_size"] == 32
        if extra is None:
            assert res.stats["chunk_size"] == (16 if pattern == "rowpair-16" else 1)
    if extra == "refit":
        assert res.stats["refit_chunk_size"] < 32
    if extra == "swap":
        assert res.stats["swap_chunk_rows"] < 32


@pytest.mark.parametrize("method", [m for m in METHODS if m not in UNCHUNKED])
@pytest.mark.parametrize("inplace", [False, True])
def test_impossible_budget_raises_and_leaves_the_weight(method, inplace):
    W, H = _problem("2:4")
    W0 = W.clone()
    with pytest.raises(ResourceError, match="max_memory"):
        prune_weight(W, H, "2:4", method, max_memory="1KiB", inplace=inplace)
    assert torch.equal(W, W0)


def test_bad_max_memory_is_an_input_error():
    W, H = _problem("2:4")
    with pytest.raises(InputError):
        prune_weight(W, H, "2:4", "true-obs", max_memory="lots")


# ---- injected out-of-memory errors -----------------------------------------------------------------------------
def _fail_first(monkeypatch, module, name):
    """Replace ``module.name`` by a wrapper that raises a CUDA OOM on its first call."""
    real = getattr(module, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 25.00 GiB (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.parametrize("pattern", SEED_PATTERNS)
def test_oom_in_true_obs_is_retried(monkeypatch, pattern, caplog):
    from sparsekit.pruners import true_obs

    W, H = _problem(pattern)
    ref = _run(W, H, pattern, "true-obs", None, None)
    calls = _fail_first(monkeypatch, true_obs, "_run_chunk")
    res = _run(W, H, pattern, "true-obs", None, None)
    assert calls["n"] > 1 and res.stats["oom_retries"] == 1 and res.stats["chunk_size"] == 16
    assert torch.equal(res.mask, ref.mask) and torch.equal(res.weight, ref.weight)
    assert any("out of memory" in r.message for r in caplog.records if r.levelname == "WARNING")


@pytest.mark.parametrize("name, extra, key", [
    ("_refit_rows", "refit", "refit_oom_retries"), ("_swap_chunk", "swap", "swap_oom_retries"),
])
def test_oom_in_refine_is_retried(monkeypatch, name, extra, key):
    from sparsekit import refine

    W, H = _problem("2:4")
    ref = _run(W, H, "2:4", "sparsegpt", extra, None)
    _fail_first(monkeypatch, refine, name)
    res = _run(W, H, "2:4", "sparsegpt", extra, None)
    assert res.stats[key] == 1
    assert torch.equal(res.mask, ref.mask) and torch.equal(res.weight, ref.weight)


def test_oom_in_obs_ord_is_retried(monkeypatch):
    from sparsekit.pruners import obs_ord

    W, H = _problem("2:4")
    ref = prune_weight(W, H, "2:4", "obs-ord")
    _fail_first(monkeypatch, obs_ord, "_best")
    res = prune_weight(W, H, "2:4", "obs-ord")
    assert res.stats["oom_retries"] == 1
    assert torch.equal(res.mask, ref.mask) and torch.equal(res.weight, ref.weight)


def test_oom_in_admm_refit_is_retried(monkeypatch):
    from sparsekit import refine

    W, H = _problem("2:4")
    ref = prune_weight(W, H, "2:4", "admm", iters=20)
    _fail_first(monkeypatch, refine, "_refit_rows")
    res = prune_weight(W, H, "2:4", "admm", iters=20)
    assert res.stats["refit_oom_retries"] == 1
    assert torch.equal(res.mask, ref.mask) and torch.equal(res.weight, ref.weight)


# ---- GPU: a capped process ---------------------------------------------------------------------------------------
@pytest.fixture
def capped_gpu():
    """Cap this process at 3 GiB of the device (restored after), with an empty cache."""
    dev = torch.device("cuda", torch.cuda.current_device())  # the fraction getter needs an index
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(dev).total_memory
    cap = 3 * 2**30
    before = torch.cuda.get_per_process_memory_fraction(dev)
    torch.cuda.set_per_process_memory_fraction(cap / total, dev)
    torch.cuda.reset_peak_memory_stats(dev)
    yield dev, cap
    torch.cuda.set_per_process_memory_fraction(before, dev)
    torch.cuda.empty_cache()


def _gpu_layer(M, K, dev, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    X = torch.randn(4 * K, K, generator=g) * torch.exp(torch.randn(K, generator=g))
    H = (X.T @ X / X.shape[0]).to(dev)
    return torch.randn(M, K, generator=g).to(dev), H


@pytest.mark.gpu
def test_capped_gpu_true_obs_fits(capped_gpu):
    from sparsekit.patterns import get_pattern
    from sparsekit.pruners.true_obs import chunk_bytes

    dev, cap = capped_gpu
    M, K = 512, 4096
    W, H = _gpu_layer(M, K, dev)
    layout = get_pattern("2:4").resolve(M, K, device=dev)
    per_row, fixed = chunk_bytes(layout, 16, torch.float16, torch.float32)
    assert fixed + M * per_row > 2 * cap  # all rows at once (what the old sizing picked on an idle GPU) do not fit
    res = prune_weight(W, H, "2:4", "true-obs", ng=16, order="largest_first")
    assert torch.cuda.max_memory_allocated(dev) <= cap
    assert 0 < res.stats["chunk_size"] < M and res.stats["oom_retries"] == 0
    small = prune_weight(W, H, "2:4", "true-obs", ng=16, order="largest_first", chunk_size=16)  # other chunking
    assert (small.mask == res.mask).float().mean() > 0.999 and small.loss == pytest.approx(res.loss, rel=1e-4)


@pytest.mark.gpu
def test_capped_gpu_admm_refit_fits(capped_gpu):
    dev, cap = capped_gpu
    M, K = 4096, 2048  # direct refit of all rows at once: 4096 × (2·1024²·4 + 8·1024²) B = 64 GiB
    W, H = _gpu_layer(M, K, dev, seed=1)
    res = prune_weight(W, H, "2:4", "admm", iters=10, refit_solver="direct")
    assert torch.cuda.max_memory_allocated(dev) <= cap
    assert res.stats["refit_chunk_size"] < M and res.stats.get("refit_oom_retries", 0) == 0  # planned, not retried


@pytest.mark.gpu
def test_gpu_max_memory_caps_the_peak():
    dev = torch.device("cuda")
    torch.cuda.empty_cache()
    W, H = _gpu_layer(1024, 4096, dev, seed=2)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    res = prune_weight(W, H, "2:4", "true-obs", ng=16, max_memory=base + 2 * 2**30)
    assert torch.cuda.max_memory_allocated(dev) <= base + 2 * 2**30
    assert res.stats["chunk_size"] < 1024


@pytest.mark.gpu
def test_gpu_injected_oom_is_retried(monkeypatch):
    from sparsekit.pruners import true_obs

    dev = torch.device("cuda")
    W, H = _gpu_layer(256, 1024, dev, seed=3)
    ref = prune_weight(W, H, "2:4", "true-obs", ng=16, c_dtype=torch.float32)
    _fail_first(monkeypatch, true_obs, "_run_chunk")
    res = prune_weight(W, H, "2:4", "true-obs", ng=16, c_dtype=torch.float32)
    assert res.stats["oom_retries"] == 1 and res.stats["chunk_size"] == 128
    assert (res.mask == ref.mask).float().mean() > 0.999
    assert res.loss == pytest.approx(ref.loss, rel=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern, ng", [("2:4", 16), ("2:4", 256), ("rowpair-16", 16)])
def test_gpu_true_obs_peak_within_the_estimate(pattern, ng):
    """The planner's bytes are an upper bound of what a chunk really takes (and not a wild one)."""
    from sparsekit.patterns import get_pattern
    from sparsekit.pruners.true_obs import _inverse_bytes, chunk_bytes

    dev = torch.device("cuda")
    M, K, R = 256, 2048, 64
    W, H = _gpu_layer(M, K, dev, seed=4)
    layout = get_pattern(pattern).resolve(M, K, device=dev)
    per_row, fixed = chunk_bytes(layout, ng, torch.float16, torch.float32)
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    res = prune_weight(W, H, pattern, "true-obs", ng=ng, order="largest_first", chunk_size=R)
    used = torch.cuda.max_memory_allocated(dev) - base
    copies = 3 * M * K * 4 + K * K * 4  # prune_weight's own copies of W and H and its result
    estimate = max(fixed + R * per_row, _inverse_bytes(K, torch.float32)) + copies
    assert res.stats["chunk_size"] == R
    assert used <= estimate
    assert used >= 0.4 * (fixed + R * per_row)


@pytest.mark.gpu
def test_gpu_budget_leaves_out_pinned_fragments():
    """A large block freed and then split by a small live tensor is unused cache that one large tensor cannot
    use: the budget leaves it out, so that a tensor of the budget's size can really be allocated."""
    dev = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.empty_cache()
    big = torch.empty(8 * GIB, dtype=torch.uint8, device=dev)
    del big
    small = torch.empty(64 * 2**20, dtype=torch.uint8, device=dev)  # best fit: the freed 8 GiB block, split
    assert torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev) > GIB  # a pinned fragment
    whole = torch.empty(device_budget(dev).bytes, dtype=torch.uint8, device=dev)  # no OOM
    del whole, small
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_gpu_chunked_method_returns_its_cache():
    """A chunked method leaves none of its chunks' blocks in the allocator's cache (so later small tensors cannot
    pin them): the unused cache grows by less than half of one chunk's planned bytes."""
    from sparsekit.patterns import get_pattern
    from sparsekit.pruners.true_obs import chunk_bytes

    dev = torch.device("cuda", torch.cuda.current_device())
    W, H = _gpu_layer(256, 2048, dev, seed=4)
    torch.cuda.empty_cache()
    cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    res = prune_weight(W, H, "2:4", "true-obs", ng=16, order="largest_first")
    per_row, _ = chunk_bytes(get_pattern("2:4").resolve(256, 2048, device=dev), 16, torch.float16, torch.float32)
    grown = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev) - cached
    assert grown < per_row * res.stats["chunk_size"] / 2
