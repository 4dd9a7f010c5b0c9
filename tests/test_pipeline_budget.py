"""The pipeline's memory budget (issue 14): ``PruneConfig.max_memory`` / ``--max-memory``, the budget each
``prune_weight`` call gets, the pipeline's own memory plan (offload or ResourceError), and the overhead changes
(probe batch reused, outputs written over inputs) checked bit for bit against a run stored from the old code.

Oracles: an unlimited run (a budget only changes chunking, never the result), a spy on ``prune_weight``, and
``tests/pipeline_reference.json`` (per-layer mask digest, ``Σ|w|`` and a random projection of the pruned weights of
float64 tiny models, written by the pipeline before these changes, commit ace89fb).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from sparsekit import InputError  # noqa: E402
from sparsekit.cli.prune import add_cli, config_from_args  # noqa: E402
from sparsekit.errors import ResourceError  # noqa: E402
from sparsekit.memory import FRAGMENTATION_MARGIN, Budget  # noqa: E402
from sparsekit.pipeline import PruneConfig, find_blocks, prune_model_  # noqa: E402
from sparsekit.pipeline import budget as budget_mod  # noqa: E402
from sparsekit.pipeline import run as run_mod  # noqa: E402
from sparsekit.pipeline.checkpoint import fingerprint  # noqa: E402

VOCAB = 96
REFERENCE = os.path.join(os.path.dirname(__file__), "pipeline_reference.json")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(kind: str = "llama", dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **common))
    else:
        model = transformers.BertModel(transformers.BertConfig(**common))
    return model.to(dtype).eval()


def ids(n: int = 6, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(1))


def linears(model: nn.Module) -> dict[str, torch.Tensor]:
    path, _ = find_blocks(model)
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith(path + ".")}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_cli(p.add_subparsers())
    return p


# ---- PruneConfig.max_memory and --max-memory -----------------------------------------------------------------


def test_max_memory_round_trip() -> None:
    assert PruneConfig().max_memory is None
    cfg = PruneConfig(max_memory="24GiB")
    assert cfg.max_memory == 24 * 2**30
    assert PruneConfig(max_memory="1.5 GB").max_memory == 1_500_000_000
    assert PruneConfig(max_memory=4096).max_memory == 4096
    assert dataclasses.replace(cfg, batch_size=2).max_memory == 24 * 2**30
    assert PruneConfig(max_memory=cfg.max_memory) == cfg  # bytes in, the same bytes out
    # where it runs, not what it computes: not in the JSON form, so checkpoints resume under another budget
    assert "max_memory" not in cfg.to_dict()
    m, x = tiny(), ids()
    assert fingerprint(m, cfg, x, None, []) == fingerprint(m, PruneConfig(), x, None, [])
    args = _parser().parse_args(["prune", "--max-memory", "500MB"])
    assert config_from_args(args).max_memory == 500_000_000
    assert config_from_args(_parser().parse_args(["prune"])).max_memory is None


@pytest.mark.parametrize("bad", ["24 gigs", "", "GiB", "24GiBs", "-3GiB", "1e400GB"])
def test_bad_max_memory_strings_name_the_format(bad: str) -> None:
    with pytest.raises(InputError, match="24GiB"):
        PruneConfig(max_memory=bad)
    with pytest.raises(InputError, match="24GiB"):
        config_from_args(_parser().parse_args(["prune", f"--max-memory={bad}"]))


@pytest.mark.parametrize("bad", [0, -1, 0.5, True, [24]])
def test_bad_max_memory_values(bad: object) -> None:
    with pytest.raises(InputError):
        PruneConfig(max_memory=bad)  # type: ignore[arg-type]


# ---- the budget each prune_weight call gets ------------------------------------------------------------------


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[int, int], int | None]]:
    calls: list[tuple[tuple[int, int], int | None]] = []
    real = run_mod.prune_weight

    def spy(weight, hessian, *args, **kwargs):
        calls.append((tuple(weight.shape), kwargs["max_memory"]))
        return real(weight, hessian, *args, **kwargs)

    monkeypatch.setattr(run_mod, "prune_weight", spy)
    return calls


def test_pipeline_passes_the_budget_to_every_prune_weight_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch)
    prune_model_(tiny(), PruneConfig(method="sparsegpt", options={}), ids())
    assert len(calls) == 14 and all(mem is None for _, mem in calls)  # no budget: the device's own view
    calls.clear()
    cap = 2**20
    model, x = tiny(), ids()
    _, blocks = find_blocks(model)
    block_bytes = budget_mod.module_bytes(blocks[0])
    acts = x.numel() * 32 * 4  # one set of hidden states, float32
    prune_model_(model, PruneConfig(method="sparsegpt", options={}, max_memory=cap), x)
    assert len(calls) == 14
    for (M, K), mem in calls:
        # on the CPU: the cap less what the pipeline holds (the block, the activations, at least this layer's H)
        assert isinstance(mem, int) and 0 < mem <= cap - block_bytes - acts - K * K * 4, (M, K, mem)


def test_cuda_budget_is_the_cap_itself() -> None:
    """On CUDA the method's device_budget subtracts the process's allocated bytes (the pipeline's included)."""
    cuda = torch.device("cuda", 0)
    assert budget_mod.layer_max_memory(5 * 2**30, cuda, held=4 * 2**30) == 5 * 2**30
    assert budget_mod.layer_max_memory(None, cuda, held=4 * 2**30) is None
    assert budget_mod.layer_max_memory(5 * 2**30, torch.device("cpu"), held=2**30) == 4 * 2**30
    with pytest.raises(ResourceError, match="larger max_memory"):
        budget_mod.layer_max_memory(2**30, torch.device("cpu"), held=2**30)


def test_tiny_budget_forces_chunks_and_gives_identical_weights() -> None:
    cfg = PruneConfig(method="true-obs", options={"chunk_size": None})
    free, capped = tiny(), tiny()
    r_free = prune_model_(free, cfg, ids())
    r_cap = prune_model_(capped, dataclasses.replace(cfg, max_memory=300_000), ids())
    chunks = [(r.stats["chunk_size"], r.shape[0]) for r in r_cap.layers]
    assert all(c < m for c, m in chunks), chunks  # every layer was split into several chunks
    assert all(r.stats["chunk_size"] == r.shape[0] for r in r_free.layers)
    a, b = linears(free), linears(capped)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert r_cap.extra["memory"]["max_memory"] == 300_000


def test_budget_too_small_for_the_pipeline_raises_before_any_work() -> None:
    model = tiny()
    before = linears(model)
    with pytest.raises(ResourceError, match="max_memory") as e:
        prune_model_(model, PruneConfig(method="sparsegpt", options={}, max_memory="100KB"), ids())
    assert e.value.needed > 100_000
    after = linears(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_layer_resource_error_names_the_pipelines_max_memory() -> None:
    """True OBS needs ~174 KiB for one row here; the pipeline's own bytes fit in 200 kB, the row does not."""
    with pytest.raises(ResourceError, match="to prune_model_") as e:
        prune_model_(tiny(), PruneConfig(method="true-obs", options={"chunk_size": None}, max_memory=200_000), ids())
    needed = e.value.needed
    assert needed > 200_000
    # the named max_memory is enough
    prune_model_(tiny(), PruneConfig(method="true-obs", options={"chunk_size": None}, max_memory=needed), ids())


def _plan(monkeypatch: pytest.MonkeyPatch, usable: int, offload: bool = False) -> tuple[bool, dict]:
    monkeypatch.setattr(budget_mod, "device_budget", lambda device, cap: Budget(usable, usable, "test"))
    model = tiny()
    path, blocks = find_blocks(model)
    lin = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(path + ".")]
    return budget_mod.plan_memory(model, blocks, lin, ids(), PruneConfig(), torch.device("cuda", 0), offload)


def test_cuda_plan_offloads_activations_only_when_they_do_not_fit(monkeypatch, caplog) -> None:
    _, rec = _plan(monkeypatch, 2**40)
    est = budget_mod.PipelineMemory(**rec["estimate"])
    # the model is on the CPU: its block moves to the device, so it counts; activations: n_tokens x d float32,
    # twice in layer-sequential mode (the finished attention's outputs are kept)
    assert est.block > 0 and est.activations == 2 * 6 * 16 * 32 * 4 and est.hessians == 64 * 64 * 4
    assert _plan(monkeypatch, est.total(offload=False))[0] is False
    with caplog.at_level(logging.WARNING):
        off, rec = _plan(monkeypatch, est.total(offload=False) - 1)
    assert off is True and rec["offload_activations"] and "keeping them on the CPU" in caplog.text
    assert _plan(monkeypatch, est.total(offload=True), offload=True)[0] is True
    with pytest.raises(ResourceError, match="batch_size") as e:
        _plan(monkeypatch, est.total(offload=True) - 1)
    assert e.value.needed == est.total(offload=True)


class _Llama70BBlock(nn.Module):
    """The linears of one Llama-3-70B block (d 8192, ffn 28672, 8 KV heads of 128), bfloat16 on the meta device."""

    def __init__(self) -> None:
        super().__init__()
        d, f, kv = 8192, 28672, 1024
        shapes = {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d), "gate": (d, f), "up": (d, f), "down": (f, d)}
        for name, (k, m) in shapes.items():
            setattr(self, name, nn.Linear(k, m, bias=False, device="meta", dtype=torch.bfloat16))


def test_plan_counts_prune_weights_floor_and_offloads_a_70b_block() -> None:
    """The measured case: a Llama-3-70B block under a 24 GiB cap, 128 × 2048 calibration tokens, batches of 8,
    layer-sequential. The down projection's prune_weight holds (4 K² + 2 M K) · 4 + 16 M K B = 17.5 GiB besides the
    pipeline's float32 H: counted, the activations go to the CPU; uncounted (the old plan), they stayed and the run
    ran out of memory in the down projection. A smaller budget raises, naming the pruning floor."""
    block = _Llama70BBlock()
    lin = list(block.children())
    mem = budget_mod._estimate(nn.ModuleList([block]), lin, 128 * 2048, 8 * 2048, 8192, torch.bfloat16, "layer",
                               on_device=False)
    K, M = 28672, 8192
    assert mem.pruning == (4 * K * K + 2 * M * K) * 4 + 16 * M * K == int(17.5 * 2**30)
    assert mem.activations == 8 * 2**30 and mem.hessians == K * K * 4  # two sets of 262144 × 8192 bf16; 3.06 GiB
    assert 1.5 * 2**30 < mem.block < 1.7 * 2**30 and 3.3 * 2**30 < mem.working < 3.4 * 2**30
    # the forwards' batch and the pruning are not held together
    assert mem.total(offload=True) == mem.block + mem.hessians + mem.pruning
    cap = 24 * 2**30
    budget = Budget(int(cap * (1 - FRAGMENTATION_MARGIN)), cap, "test")
    cuda = torch.device("cuda", 0)
    old = dataclasses.replace(mem, pruning=0)
    assert old.total(offload=False) <= budget.bytes < mem.total(offload=False)  # the old plan kept them
    assert budget_mod.decide_offload(mem, budget, cuda, offload=False) is True
    assert budget_mod.decide_offload(mem, budget, cuda, offload=True) is True
    assert budget_mod.decide_offload(mem, Budget(2**40, 2**40, "test"), cuda, offload=False) is False
    small = Budget(mem.total(offload=True) - 1, cap, "test")
    with pytest.raises(ResourceError, match="pruning the widest layer 17.5 GiB") as e:
        budget_mod.decide_offload(mem, small, cuda, offload=False)
    assert e.value.needed == mem.total(offload=True)
    # the CPU cannot offload: what does not fit as configured raises, the activations and the floor counted
    with pytest.raises(ResourceError, match="activations 8.0 GiB") as e:
        budget_mod.decide_offload(mem, budget, torch.device("cpu"), offload=False)
    assert e.value.needed == mem.total(offload=False)


def test_offloaded_activations_give_identical_weights() -> None:
    a, b = tiny(), tiny()
    prune_model_(a, PruneConfig(method="sparsegpt", options={}), ids())
    prune_model_(b, PruneConfig(method="sparsegpt", options={}, offload_activations=True), ids())
    wa, wb = linears(a), linears(b)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)


# ---- the overhead changes leave the result unchanged ----------------------------------------------------------


def _digest(model: nn.Module) -> dict[str, list]:
    out = {}
    g = torch.Generator().manual_seed(5)
    for n, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and ".layer" in n and "lm_head" not in n:
            w = mod.weight.detach()
            r = torch.randn(w.shape, generator=g, dtype=torch.float64)
            out[n] = [hashlib.sha256((w != 0).numpy().tobytes()).hexdigest()[:12], float(w.abs().sum()),
                      float((w * r).sum())]
    return out


@pytest.mark.parametrize("kind,sequential,method,pad", [
    ("llama", "layer", "sparsegpt", False), ("llama", "block", "true-obs", False), ("bert", "layer", "sparsegpt", True),
])
def test_same_result_as_the_stored_run_of_the_old_pipeline(kind: str, sequential: str, method: str, pad: bool) -> None:
    ref = json.load(open(REFERENCE))[f"{kind}-{sequential}-{method}"]
    model, x = tiny(kind, torch.float64), ids()
    mask = None
    if pad:  # padded tokens: the probe batch's inputs are reused through the same token mask as a hook's
        mask = torch.ones_like(x)
        mask[0, 10:] = 0
        mask[3, 5:] = 0
    prune_model_(model, PruneConfig(method=method, options={}, sequential=sequential, batch_size=4), x,
                 attention_mask=mask)
    got = _digest(model)
    assert got.keys() == ref.keys()
    for name, (mask_digest, abs_sum, proj) in ref.items():
        assert got[name][0] == mask_digest, name
        assert got[name][1] == pytest.approx(abs_sum, rel=1e-9, abs=1e-12), name
        assert got[name][2] == pytest.approx(proj, rel=1e-9, abs=1e-9), name


@pytest.mark.gpu
def test_half_inputs_hessian_on_cuda_matches_float64() -> None:
    from sparsekit import HessianAccumulator

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 512, 384, generator=g).to(torch.bfloat16)
    acc = HessianAccumulator(384, torch.float32, "cuda")
    for xb in x.cuda():
        acc.add(xb)
    ref = x.double().reshape(-1, 384)
    ref = ref.T @ ref / ref.shape[0]
    torch.testing.assert_close(acc.hessian.double().cpu(), ref, rtol=1e-5, atol=1e-5)


def test_finished_attention_is_not_recomputed_in_later_passes() -> None:
    """Layer-sequential Llama, 2 batches: q_proj runs in the probe (1 batch), the q/k/v pass (the probe's batch
    reused: 1), the o pass (2) and the gate/up pass (2, which stores the finished attention's outputs); the down
    pass and the output pass reuse them: 6 calls instead of 1 + 5 × 2 = 11."""
    model = tiny()
    _, blocks = find_blocks(model)
    q = blocks[0].self_attn.q_proj
    runs: list[int] = []
    handle = q.register_forward_hook(lambda mod, args, out: runs.append(args[0].shape[0]))
    try:
        prune_model_(model, PruneConfig(method="sparsegpt", options={}, batch_size=4), ids())
    finally:
        handle.remove()
    assert len(runs) == 6, runs
    assert "forward" not in blocks[0].self_attn.__dict__  # the wrappers are gone


@pytest.mark.gpu
def test_cuda_run_offloaded_by_the_plan_gives_identical_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA (bf16): a budget the activations do not fit offloads them (and turns the reuse of finished
    children off); the pruned weights are those of the unconstrained run, bit for bit."""
    free = tiny(dtype=torch.bfloat16)
    r_free = prune_model_(free, PruneConfig(method="sparsegpt", options={}, device="cuda"), ids())
    assert r_free.extra["memory"]["offload_activations"] is False
    est = budget_mod.PipelineMemory(**r_free.extra["memory"]["estimate"])
    usable = est.total(offload=True)
    monkeypatch.setattr(budget_mod, "device_budget", lambda device, cap: Budget(usable, usable, "test"))
    off = tiny(dtype=torch.bfloat16)
    r_off = prune_model_(off, PruneConfig(method="sparsegpt", options={}, device="cuda"), ids())
    assert r_off.extra["memory"]["offload_activations"] is True
    a, b = linears(free), linears(off)
    assert all(torch.equal(a[n], b[n]) for n in a)
