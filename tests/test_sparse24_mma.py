"""The mma.sp fragment order (sparsekit.kernels.sparse24_mma) against the PTX ISA's fragment tables, and the
kernel against the dense matmul (GPU)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from sparsekit.compact import pack_24, unpack_24
from sparsekit.errors import InputError
from sparsekit.kernels.sparse24_mma import (KW_CHOICES, MW_CHOICES, TILE_TABLE, default_tile, fits, mma_layout, mma_unlayout,
                                            sparse24_mma, supports)

from test_compact import random_24


def emulate_mma_sp(x, frag_values, frag_meta):
    """``y (N, M)`` computed the way the warps of the kernel see the data, written from the PTX ISA's tables for
    ``mma.sp.m16n8k32`` (f16/bf16) with no reuse of :func:`mma_layout`'s index algebra:

    - A fragment, lane ``l`` (``g = l // 4``, ``t = l % 4``), register ``r`` (0..3), half ``e``: compressed row
      ``g + 8·(r % 2)``, compressed column ``2t + e + 8·(r // 2)`` of the 16 × 16 kept values;
    - metadata, selector ``F`` (0 for even k32 tiles, 1 for odd): lanes with ``t = 2F`` and ``2F + 1`` give it;
      lane ``t`` covers dense columns ``16·(t % 2) .. +16`` of the tile, low 16 bits row ``g``, high row ``g + 8``,
      4 bits per group of four columns (``i0 | i1 << 2``), the two kept values of compressed columns
      ``2q, 2q + 1`` of group ``q``.
    """
    MT, KC = frag_values.shape[:2]
    M, K = 16 * MT, 256 * KC
    A = torch.zeros(M, K, dtype=torch.float64)
    fv = frag_values.double()
    fm = frag_meta.to(torch.int64) & 0xFFFFFFFF
    for mt in range(MT):
        for kc in range(KC):
            for i in range(8):
                sel = i % 2
                comp = torch.zeros(16, 16, dtype=torch.float64)  # kept values of the tile
                pos = torch.zeros(16, 8, 2, dtype=torch.int64)  # (row, group, which kept) -> column in group
                for lane in range(32):
                    g, t = divmod(lane, 4)
                    for r in range(4):
                        for e in range(2):
                            comp[g + 8 * (r % 2), 2 * t + e + 8 * (r // 2)] = fv[mt, kc, i, lane, 2 * r + e]
                    if t // 2 == sel:
                        word = int(fm[mt, kc, lane, i // 2])
                        for hrow, bits in ((g, word & 0xFFFF), (g + 8, word >> 16)):
                            for q4 in range(4):  # the 4 groups of this lane's 16 columns
                                nib = (bits >> (4 * q4)) & 15
                                q = 4 * (t % 2) + q4
                                pos[hrow, q, 0], pos[hrow, q, 1] = nib & 3, nib >> 2
                for row in range(16):
                    for q in range(8):
                        for j in range(2):
                            col = kc * 256 + i * 32 + 4 * q + int(pos[row, q, j])
                            A[mt * 16 + row, col] += comp[row, 2 * q + j]
    return x.double() @ A.T


@pytest.mark.parametrize("M,K", [(16, 256), (32, 512), (48, 768)])
def test_layout_matches_the_ptx_fragment_tables(M, K):
    W = random_24(M, K, seed=M + K)
    values, meta = pack_24(W)
    fv, fm = mma_layout(values, meta)
    assert fv.shape == (M // 16, K // 256, 8, 32, 8) and fm.shape == (M // 16, K // 256, 32, 4)
    assert fm.dtype == torch.int32 and fv.dtype == values.dtype
    x = torch.randn(3, K, dtype=torch.float64)
    assert torch.allclose(emulate_mma_sp(x, fv, fm), x @ W.double().T, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(mt=st.integers(1, 3), kc=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_layout_roundtrip_is_identity(mt, kc, seed):
    values, meta = pack_24(random_24(16 * mt, 256 * kc, seed=seed))
    back_v, back_m = mma_unlayout(*mma_layout(values, meta))
    assert torch.equal(back_v, values) and torch.equal(back_m, meta)


def test_layout_moves_exactly_the_compact_bytes():
    values, meta = pack_24(random_24(64, 1024).to(torch.bfloat16))
    fv, fm = mma_layout(values, meta)
    assert fv.nbytes + fm.nbytes == values.nbytes + meta.nbytes == 64 * 1024 * 2 * 9 // 16


@pytest.mark.parametrize("M,K", [(8, 256), (16, 264), (16, 128)])
def test_layout_refuses_shapes_it_cannot_tile(M, K):
    values, meta = pack_24(random_24(M, K))
    with pytest.raises(InputError, match="M % 16"):
        mma_layout(values, meta)


def test_default_tile_fits_and_follows_the_rule():
    for M, K in [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096), (6144, 2560), (16, 256), (48, 768)]:
        for n in (1, 4, 8, 9, 16):
            kw, mw = default_tile(M, K, n)
            assert fits(M, K, n, kw, mw), (M, K, n)
            assert mw == 1 or n > 8 or (M, K, 8) in TILE_TABLE  # the rule, where no measurement overrides it
    assert default_tile(6144, 2560, 1) == (16, 1) and default_tile(6144, 2560, 16) == (16, 2)  # the rule
    assert default_tile(14336, 4096, 16) == (4, 2) and default_tile(14336, 4096, 9) == (4, 2)  # TILE_TABLE
    assert default_tile(16, 512, 1) == (2, 1)  # at most one warp per 256-column chunk
    assert not fits(48, 768, 16, 4, 2)  # 3 row tiles


def test_supports_is_false_off_cuda():
    assert not supports(4096, 4096, torch.bfloat16, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K", [(16, 256), (48, 768), (1040, 4352)])
def test_kernel_matches_dense_within_rounding(dtype, M, K):
    """Every token count 1–16 and every kw: error vs float64 ≤ 2× that of the dense 16-bit matmul."""
    W = random_24(M, K, seed=M).to(dtype).cuda()
    values, meta = pack_24(W)
    fv, fm = mma_layout(values, meta)
    bias = torch.randn(M, device="cuda", dtype=dtype)
    def err(y, ref):
        return max((a.double() - b).abs().max().item() for a, b in zip(y, ref))

    for n in (1, 2, 3, 7, 8, 9, 15, 16):
        # 8 draws of x: the max rounding error of a few outputs is too noisy a yardstick on its own
        xs = [torch.randn(n, K, device="cuda", dtype=dtype) for _ in range(8)]
        refs = [x.double() @ W.double().T + bias.double() for x in xs]
        dense_err = err([F.linear(x, W, bias) for x in xs], refs)
        tiles = [(kw, mw) for kw in KW_CHOICES for mw in MW_CHOICES if fits(M, K, n, kw, mw)]
        assert len(tiles) >= 4
        for tile in tiles:
            assert err([sparse24_mma(x, fv, fm, bias, tile=tile) for x in xs], refs) <= 2 * dense_err, (n, tile)
        nobias = [r - bias.double() for r in refs]
        assert err([sparse24_mma(x, fv, fm, None) for x in xs], nobias) <= 2 * dense_err


@pytest.mark.gpu
def test_kernel_is_deterministic_and_leaves_inputs_alone():
    W = random_24(256, 2048, seed=1).to(torch.bfloat16).cuda()
    fv, fm = mma_layout(*pack_24(W))
    fv0, fm0 = fv.clone(), fm.clone()
    x = torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16)
    y1, y2 = sparse24_mma(x, fv, fm, tile=(8, 2)), sparse24_mma(x, fv, fm, tile=(8, 2))
    assert torch.equal(y1, y2) and torch.equal(fv, fv0) and torch.equal(fm, fm0)
    assert torch.equal(unpack_24(*mma_unlayout(fv, fm)), W)


def _module(M=32, K=512, dtype=torch.float32, seed=2):
    from sparsekit.compact import Sparse24Linear

    lin = torch.nn.Linear(K, M).to(dtype)
    lin.weight.data = random_24(M, K, seed=seed).to(dtype)
    return lin, Sparse24Linear.from_linear(lin)


def test_module_in_mma_layout_keeps_its_state_dict_and_outputs():
    """The in-place permutation changes neither the state dict (compact order), nor the dense weight, nor the
    CPU forward (bit for bit), and a state dict loaded into a permuted module resets it to the compact order."""
    lin, mod = _module()
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    x = torch.randn(5, 512)
    y0 = mod(x)
    mod._to_mma_layout_()
    assert mod.layout == "mma" and not torch.equal(mod.weight_values, before["weight_values"])
    after = mod.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(mod.dense_weight(), lin.weight.data) and torch.equal(mod(x), y0)
    mod.load_state_dict(before)
    assert mod.layout == "compact" and torch.equal(mod.weight_values, before["weight_values"])


def test_save_compact_of_permuted_modules_writes_the_same_file(tmp_path):
    """A model whose Sparse24Linear modules were permuted to the mma order saves byte-identical tensors, and
    loads back to the same logits."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file
    from sparsekit.compact import load_compact, save_compact, sparsify_linears_

    from test_compact import prune_24_

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    prune_24_(model)
    names = sparsify_linears_(model)
    assert len(names) == 7
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    save_compact(model, tmp_path / "plain")
    for n in names:
        model.get_submodule(n)._to_mma_layout_()
    save_compact(model, tmp_path / "permuted")
    a, b = load_file(str(tmp_path / "plain" / "model.safetensors")), load_file(str(tmp_path / "permuted" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
        assert torch.equal(load_compact(tmp_path / "permuted")(ids).logits, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 4, 16, 17])
def test_module_cuda_forward_uses_the_sparse_tensor_cores(n):
    lin, mod = _module(M=1024, K=4096, dtype=torch.bfloat16)
    lin, mod = lin.cuda(), mod.cuda()
    x = torch.randn(n, 4096, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ lin.weight.double().T + lin.bias.double()
    err = (mod(x).double() - ref).abs().max().item()
    assert err <= 2 * (lin(x).double() - ref).abs().max().item() + 1e-6
    assert mod.layout == ("mma" if n <= 16 else "compact")


@pytest.mark.gpu
def test_tune_picks_a_correct_tile_and_the_default_follows_it():
    from sparsekit.kernels import sparse24_mma as mod

    W = random_24(512, 1024, seed=4).to(torch.bfloat16).cuda()
    fv, fm = mma_layout(*pack_24(W))
    best, times = mod.tune(fv, fm, 3)
    assert best == min(times, key=times.get) and len(times) >= 8
    assert default_tile(512, 1024, 4, torch.bfloat16) == best  # same token bucket (3 and 4)
    mod._TUNED.clear()


def test_tune_skips_wrong_tiles_and_keeps_the_fastest_correct_one(monkeypatch):
    """tune's logic on the CPU, with the kernel and the CUDA-graph timer replaced by fakes: a tile that is fast but
    wrong is skipped (and logged), the fastest correct tile is chosen and becomes default_tile's answer."""
    from sparsekit.kernels import sparse24, sparse24_mma as mod

    W = random_24(32, 512, seed=9).to(torch.bfloat16)
    fv, fm = mma_layout(*pack_24(W))
    used = []

    def fake_kernel(x, frag_values, frag_meta, bias=None, tile=None):
        used.append(tile)
        y = F.linear(x, unpack_24(*mma_unlayout(frag_values, frag_meta)))
        return y + 1.0 if tile == (16, 1) else y  # (16, 1) is wrong

    class FakeTimer:
        def __init__(self, fn, calls):
            fn(0)
            self.tile = used[-1]

        def once(self):
            kw, mw = self.tile
            return 100.0 / kw + mw  # (16, 1) would be the fastest; (16, 2) is the fastest correct one

    monkeypatch.setattr(mod, "sparse24_mma", fake_kernel)
    monkeypatch.setattr(sparse24, "GraphTimer", FakeTimer)
    mod._TUNED.clear()
    best, times = mod.tune(fv, fm, 2)
    assert best == (16, 2) and (16, 1) not in times and len(times) == len(KW_CHOICES) * 2 - 1
    assert default_tile(32, 512, 2, torch.bfloat16) == (16, 2)
    mod._TUNED.clear()
    assert default_tile(32, 512, 2, torch.bfloat16) == (2, 1)  # the rule again: 2 chunks
