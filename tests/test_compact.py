"""Compact 2:4 storage (sparsekit.compact) and the sparse24 kernel (sparsekit.kernels.sparse24)."""

import itertools
import json
from dataclasses import asdict
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from sparsekit.compact import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Sparse24Linear,
    _sha256,
    check_packed_24,
    is_24,
    is_compact_dir,
    load_compact,
    pack_24,
    save_compact,
    sparsify_linears_,
    unpack_24,
)
from sparsekit.errors import CompactFormatError, InputError

# every way to keep at most 2 of 4 (11 group masks), as rows of a (11, 4) bool table
GROUP_MASKS = torch.tensor([[i in s for i in range(4)] for r in range(3) for s in itertools.combinations(range(4), r)])


def random_24(M, K, dtype=torch.float32, seed=0):
    """A random weight whose groups each keep a random one of the 11 masks (so some keep fewer than 2)."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(GROUP_MASKS), (M, K // 4), generator=g)
    mask = GROUP_MASKS[pick].reshape(M, K)
    return (torch.randn(M, K, generator=g) * mask).to(dtype)


def prune_24_(model):
    """Magnitude 2:4 on every nn.Linear except lm_head, in place."""
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            w = m.weight.data.view(m.out_features, -1, 4)
            keep = w.abs().topk(2, dim=-1).indices
            m.weight.data = (w * torch.zeros_like(w).scatter_(-1, keep, 1.0)).view(m.out_features, -1)


def test_pack_unpack_every_group_mask_exhaustive():
    K = 4 * len(GROUP_MASKS) * 2  # every mask in every group slot parity, K % 8 == 0
    mask = torch.cat([GROUP_MASKS, GROUP_MASKS.flip(0)]).reshape(1, K).repeat(3, 1)  # (3, K)
    W = torch.randn(3, K) * mask
    values, meta = pack_24(W)
    assert values.shape == (3, K // 2) and meta.shape == (3, K // 8) and meta.dtype == torch.uint8
    assert torch.equal(unpack_24(values, meta), W)
    check_packed_24(values, meta, 3, K)


def test_pack_known_layout():
    """Hand-worked: positions of kept value j sit at bits 2*(j%4) of byte j//4."""
    W = torch.tensor([[0.0, 5.0, 0.0, 7.0, 1.0, 0.0, 0.0, 0.0]])  # groups keep (1, 3) and (0, 1 as zero)
    values, meta = pack_24(W)
    assert values.tolist() == [[5.0, 7.0, 1.0, 0.0]]
    assert meta.tolist() == [[1 | 3 << 2 | 0 << 4 | 1 << 6]]


def test_pack_refuses_non_24():
    W = random_24(4, 16)
    W[2, 4:8] = 1.0  # a group with 4 nonzeros
    before = W.clone()
    assert not is_24(W)
    with pytest.raises(InputError, match="not 2:4"):
        pack_24(W)
    assert torch.equal(W, before)
    with pytest.raises(InputError):
        pack_24(random_24(2, 12))  # K % 8 != 0


def test_reference_bit_exact_vs_dense_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 24)
    lin.weight.data = random_24(24, 40, seed=3)
    mod = Sparse24Linear.from_linear(lin)
    x = torch.randn(2, 5, 40)
    assert torch.equal(mod(x), lin(x))
    assert torch.equal(mod.dense_weight(), lin.weight)


def test_check_packed_refuses_misordered_positions():
    values, meta = pack_24(random_24(3, 16))
    bad = meta.clone()
    bad[1, 0] = 0  # both kept values of group 0 at position 0: breaks the 2:4 rule
    with pytest.raises(CompactFormatError, match="positions"):
        check_packed_24(values, bad, 3, 16)
    with pytest.raises(CompactFormatError, match="shape"):
        check_packed_24(values[:, :-1], meta, 3, 16)
    with pytest.raises(CompactFormatError, match="uint8"):
        check_packed_24(values, meta.to(torch.int16), 3, 16)


# ------------------------------------------------------------------------------------- whole-model round trip
def tiny_llama(tie=False, dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=136, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    prune_24_(model)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip_bit_exact(tmp_path, tie):
    model = tiny_llama(tie)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    assert not is_compact_dir(tmp_path)
    report = save_compact(model, tmp_path)
    assert is_compact_dir(tmp_path)
    assert report["compact_modules"] == 2 * 7  # q k v o gate up down per layer
    loaded = load_compact(tmp_path)
    kinds = {type(m).__name__ for n, m in loaded.named_modules() if n.endswith(("q_proj", "down_proj"))}
    assert kinds == {"Sparse24Linear"}
    with torch.no_grad():
        out = loaded(ids).logits
    assert torch.equal(out, ref)
    if tie:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert cfg["version"] == 1 and len(cfg["modules"]) == 14


def test_compact_size_ratio_bf16(tmp_path):
    model = tiny_llama(dtype=torch.bfloat16)
    report = save_compact(model, tmp_path)
    assert report["ratio"] == pytest.approx((1 + 1 / 8) / 2)  # (K/2 values x 2 B + K/8 B) / 2K B = 56.25 %
    assert report["ratio"] <= 0.60
    loaded = load_compact(tmp_path)
    assert loaded.model.layers[0].mlp.down_proj.weight_values.dtype == torch.bfloat16


def test_export_from_save_pretrained_folder(tmp_path):
    from sparsekit.compact import export_compact

    model = tiny_llama(dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "dense")
    report = export_compact(tmp_path / "dense", tmp_path / "compact")
    assert report["compact_modules"] == 14
    # the whole file: compact linears at 56.25 %, the rest (embeddings, lm_head, norms) unchanged
    saved = report["dense_bytes"] - report["compact_bytes"]
    assert report["src_weights_bytes"] - report["weights_file_bytes"] == pytest.approx(saved, abs=4096)
    # the reference is the dense folder loaded by transformers (its rotary buffers stay float32, as in ours)
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype="auto")
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        ref = dense(ids).logits
        out = load_compact(tmp_path / "compact")(ids).logits
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)


def test_sparsify_linears_in_place_same_outputs():
    model = tiny_llama()
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        ref = model(ids).logits
    names = sparsify_linears_(model)
    assert len(names) == 14 and "lm_head" not in names
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


@pytest.fixture
def saved(tmp_path):
    save_compact(tiny_llama(), tmp_path)
    return tmp_path


def _rewrite(folder, edit):
    """Apply ``edit(state)`` to the weights and re-record the hash (so the loader's own checks are exercised)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / WEIGHTS_FILE))
    edit(state)
    save_file(state, str(folder / WEIGHTS_FILE))
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    cfg["sha256"] = _sha256(folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))


def _edit_config(folder, **kv):
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    cfg.update(kv)
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))


KEY = "model.layers.1.mlp.up_proj"


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda f: _rewrite(f, lambda s: s.__setitem__(f"{KEY}.weight_meta",
                                                       torch.zeros_like(s[f"{KEY}.weight_meta"]))), "positions"),
        (lambda f: _rewrite(f, lambda s: s.__setitem__(f"{KEY}.weight_values",
                                                       s[f"{KEY}.weight_values"][:, :-4].contiguous())), "shape"),
        (lambda f: _rewrite(f, lambda s: s.__setitem__(f"{KEY}.weight_values",
                                                       s[f"{KEY}.weight_values"].half())), "float16"),
        (lambda f: _rewrite(f, lambda s: s.pop(f"{KEY}.weight_meta")), "lacks"),
        (lambda f: _rewrite(f, lambda s: s.__setitem__("model.norm.weight", torch.ones(3))), "shape"),
        (lambda f: _edit_config(f, version=2), "version"),
        (lambda f: _edit_config(f, format="other"), "format|config"),
        (lambda f: _edit_config(f, weights_file="../x.safetensors"), "weights_file"),
        (lambda f: _edit_config(f, modules=[{"name": "lm_head", "out_features": 96, "in_features": 64,
                                             "dtype": "float32", "bias": False}]), "lacks"),
        (lambda f: _edit_config(f, modules="__import__('os')"), "malformed"),
        (lambda f: (f / CONFIG_FILE).write_text("{not json"), "JSON"),
    ],
)
def test_load_refuses_bad_files(saved, corrupt, match):
    corrupt(saved)
    with pytest.raises(CompactFormatError, match=match):
        load_compact(saved)


def test_load_refuses_flipped_bytes(saved):
    path = saved / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CompactFormatError, match="SHA-256"):
        load_compact(saved)


def test_load_refuses_broken_header_without_hash(saved):
    path = saved / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[10:20] = b"\xff" * 10  # inside the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(CompactFormatError):
        load_compact(saved, verify_hash=False)


def test_import_and_cpu_forward_do_not_load_triton_or_init_cuda():
    code = ("import sys, torch, sparsekit, sparsekit.compact as c\n"
            "m = c.Sparse24Linear(16, 4)\nm(torch.randn(2, 16))\n"
            "assert 'triton' not in sys.modules and 'sparsekit.kernels.sparse24' not in sys.modules\n"
            "assert not torch.cuda.is_initialized()\n")
    subprocess.run([sys.executable, "-c", code], check=True)


INTERPRETED = """
import dataclasses, torch
from sparsekit.compact import pack_24
from sparsekit.kernels import sparse24 as s
from test_compact import random_24
# row and column tails (M % 8, K / 8 odd); float16 (the interpreter's bfloat16 tl.dot is wrong), and bfloat16 for
# the stream kind, whose bfloat16 decode is integer shifts. The interpreter casts float32 to bfloat16 toward zero
# (the GPU rounds to nearest), so there the dense oracle is cast the same way.
def to_dtype(t, dtype):
    if dtype != torch.bfloat16:
        return t.to(dtype)
    return (t.float().view(torch.int32) & -65536).view(torch.float32).to(dtype)  # exact: low half already zero

M, K = 44, 1032
kernels = sorted({dataclasses.replace(c, per_sm=0) for c in s.DECODE_CONFIGS + s.PREFILL_CONFIGS}, key=str)
runs = [(c, c.block_n, torch.float16) for c in kernels]  # every kernel, one token tile
runs += [(c, 1, torch.bfloat16) for c in kernels if c.kind == "stream" and c.block_n == 1]
# two token tiles (the second one partial); for the stream kinds with per_sm=2: on the CPU two programs then run
# every unit of the persistent loop between them (row blocks x K slices, each program every other unit)
firsts = {}
for c in kernels:
    firsts.setdefault((c.kind, c.block_n), c)
more = set(firsts.values()) | {c for c in kernels if c.kind.startswith("stream") and c.split_k > 1}
runs += [(dataclasses.replace(c, per_sm=2) if c.kind.startswith("stream") else c, min(c.block_n + 1, 17),
          torch.float16) for c in sorted(more, key=str)]
for i, (cfg, n, dtype) in enumerate(runs):
    W = random_24(M, K, seed=7).to(dtype)
    values, meta = pack_24(W)
    bias = torch.randn(M).to(dtype) if i % 2 else None
    x = torch.randn(n, K).to(dtype)
    ref = x.double() @ W.double().T + (bias.double() if bias is not None else 0)
    dense = to_dtype(torch.nn.functional.linear(x.float(), W.float(), None if bias is None else bias.float()), dtype)
    dense_err = (dense.double() - ref).abs().max()
    err = (s.launch(x, values, meta, bias, cfg).double() - ref).abs().max()
    assert err <= 2 * dense_err, (cfg, n, dtype, err.item(), dense_err.item())
"""


@pytest.mark.slow
def test_kernel_logic_in_triton_interpreter():
    """Every distinct kernel's program logic on the CPU (TRITON_INTERPRET=1), where Triton is installed: one and two
    token tiles, with and without bias, split K, and the persistent loop running several units per program."""
    pytest.importorskip("triton")
    import os

    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", INTERPRETED], check=True, env=env, cwd=os.path.dirname(__file__))


def test_sparse24_configs_and_defaults():
    """Configs refuse impossible combinations; the measured table's configs are tuner candidates and serve its
    shapes untuned; other shapes get a stream kernel for 1–4 tokens and tensor cores beyond."""
    pytest.importorskip("triton")
    from sparsekit.kernels.sparse24 import DECODE_CONFIGS, DECODE_TABLE, Config, default_config, token_bucket

    for bad in (dict(kind="nope"), dict(kind="stream", block_n=16), dict(kind="gather", block_n=2),
                dict(kind="stream_dot", block_n=4), dict(kind="dot", block_n=16, per_sm=2)):
        with pytest.raises(InputError):
            Config(**{"block_m": 8, "block_k": 256, **bad})
    assert set(DECODE_TABLE.values()) <= set(DECODE_CONFIGS)
    assert [token_bucket(n) for n in (1, 2, 3, 4, 5, 9, 16, 17, 4096)] == [1, 2, 4, 4, 8, 16, 16, 17, 17]
    for (M, K, bucket), cfg in DECODE_TABLE.items():
        assert default_config(M, K, bucket) == cfg
    assert default_config(1000, 1032, 3) == Config("stream", 8, 1024, 4, 1, 4, 4)
    assert default_config(1000, 1032, 9).kind == "stream_dot"


# --------------------------------------------------------------------------------------------------- GPU
ODD_SHAPES = [(200, 328), (1000, 1032), (24, 4104)]


def _dense_err(x, W):
    ref = x.double() @ W.double().T
    return (F.linear(x, W).double() - ref).abs().max().item(), ref


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K", ODD_SHAPES)
def test_kernel_default_configs_vs_reference(M, K, dtype):
    from sparsekit.kernels.sparse24 import sparse24_linear, unpack

    W = random_24(M, K, seed=M).to(dtype).cuda()
    values, meta = pack_24(W)
    assert torch.equal(unpack(values, meta), W)  # the Triton rebuild (prefill path "rebuild")
    for n in (1, 2, 3, 5, 8, 13, 16):
        x = torch.randn(n, K, device="cuda", dtype=dtype)
        dense_err, ref = _dense_err(x, W)
        err = (sparse24_linear(x, values, meta).double() - ref).abs().max().item()
        assert err <= 2 * dense_err, (n, err, dense_err)


@pytest.mark.gpu
def test_kernel_every_config_vs_reference():
    from sparsekit.kernels.sparse24 import DECODE_CONFIGS, PREFILL_CONFIGS, launch

    M, K = 1000, 1032
    W = random_24(M, K, seed=7).to(torch.bfloat16).cuda()
    values, meta = pack_24(W)
    bias = torch.randn(M, device="cuda", dtype=torch.bfloat16)
    for cfg in DECODE_CONFIGS + PREFILL_CONFIGS:
        for n in ((1, 3) if cfg.kind == "gather" else (1, 2, 4, 7) if cfg.kind == "stream" else (1, 7, 16, 300)):
            x = torch.randn(n, K, device="cuda", dtype=torch.bfloat16)
            ref = x.double() @ W.double().T + bias.double()
            dense_err = (F.linear(x, W, bias).double() - ref).abs().max().item()
            err = (launch(x, values, meta, bias, cfg).double() - ref).abs().max().item()
            assert err <= 2 * dense_err, (cfg, n, err, dense_err)


@pytest.mark.gpu
def test_kernel_split_k_and_persistent_grids_are_deterministic():
    """Split K adds its float32 partial sums in a fixed order (no atomics): a launch repeated on the same input is
    bit-identical, for every split and grid; and the grid's size does not change the result of a stream kernel."""
    from dataclasses import replace

    from sparsekit.kernels.sparse24 import DECODE_CONFIGS, launch

    W = random_24(1000, 4104, seed=3).to(torch.bfloat16).cuda()
    values, meta = pack_24(W)
    bias = torch.randn(1000, device="cuda", dtype=torch.bfloat16)
    for cfg in [c for c in DECODE_CONFIGS if c.split_k > 1 or c.per_sm]:
        x = torch.randn(cfg.block_n if cfg.kind == "stream" else 5, 4104, device="cuda", dtype=torch.bfloat16)
        ys = [launch(x, values, meta, bias, cfg) for _ in range(3)]
        assert all(torch.equal(ys[0], y) for y in ys[1:]), cfg
        if cfg.per_sm:
            assert torch.equal(ys[0], launch(x, values, meta, bias, replace(cfg, per_sm=0))), cfg


@pytest.mark.gpu
def test_tune_checks_then_times_finalists_in_rounds():
    from sparsekit.kernels import sparse24

    W = random_24(1000, 1032, seed=5).to(torch.bfloat16).cuda()
    values, meta = pack_24(W)
    cfg, rows = sparse24.tune(values, meta, 3, rounds=5)
    best = [r for r in rows if r["config"] == asdict(cfg)][0]
    assert best["ok"] and len(best["rounds"]) == 5
    finalists = [r for r in rows if "rounds" in r]
    assert len(finalists) == 4 and all(r["ok"] for r in finalists)
    assert best["us"] == min(r["us"] for r in finalists)
    assert {r["config"]["kind"] for r in rows} == {"stream", "stream_dot", "gather", "dot"}  # every kind timed
    assert all(r["config"]["block_n"] == 4 for r in rows if r["config"]["kind"] == "stream")  # bucket of 3
    x = torch.randn(3, 1032, device="cuda", dtype=torch.bfloat16)
    dense_err, ref = _dense_err(x, W)
    assert (sparse24.sparse24_linear(x, values, meta).double() - ref).abs().max().item() <= 2 * dense_err


@pytest.mark.gpu
def test_sparse24_linear_module_cuda_matches_dense():
    lin = torch.nn.Linear(1032, 200, dtype=torch.bfloat16)
    lin.weight.data = random_24(200, 1032, seed=2).to(torch.bfloat16)
    lin = lin.cuda()
    mod = Sparse24Linear.from_linear(lin)
    for n, mode in ((1, "rebuild"), (9, "rebuild"), (300, "rebuild"), (300, "kernel"), (300, "dense")):
        mod.set_prefill(mode)
        x = torch.randn(n, 1032, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ lin.weight.double().T + lin.bias.double()
        dense_err = (lin(x).double() - ref).abs().max().item()
        assert (mod(x).double() - ref).abs().max().item() <= 2 * dense_err


def test_cli_export_then_eval_loads_same_perplexity(tmp_path):
    """`sparsekit export` -> the loader `sparsekit eval` uses -> the same perplexity as the dense-with-zeros model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sparsekit.cli import main
    from sparsekit.data.models import load_model
    from sparsekit.evaluate import perplexity

    model = tiny_llama(dtype=torch.float32)
    model.save_pretrained(tmp_path / "dense")
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)} | {"[UNK]": 95}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "dense")
    assert main(["export", str(tmp_path / "dense"), "--out", str(tmp_path / "compact")]) == 0
    assert main(["export", str(tmp_path / "dense"), "--out", str(tmp_path / "compact")]) == 2  # no silent overwrite
    dense, _ = load_model(str(tmp_path / "dense"))
    compact, tokenizer = load_model(str(tmp_path / "compact"))
    assert isinstance(compact.model.layers[1].mlp.down_proj, Sparse24Linear)
    ids = torch.randint(0, 95, (3, 16), generator=torch.Generator().manual_seed(4))
    assert tokenizer("w3 w5")["input_ids"] == [3, 5]
    assert perplexity(compact, ids) == perplexity(dense, ids)
