"""The verdict: perplexity (causal LMs) and embedding cosine similarity (encoders), on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsekit import InputError  # noqa: E402
from sparsekit.evaluate import (  # noqa: E402
    Verdict,
    embedding_similarity,
    eval_windows,
    evaluate,
    is_causal_lm,
    perplexity,
    sentence_embeddings,
    split_sentences,
)
from sparsekit.pipeline import PruneConfig, prune_model_  # noqa: E402

VOCAB = 64

pytestmark = pytest.mark.usefixtures("one_thread")



class CharTokenizer:
    """A stand-in tokenizer: one id per character (``ord % (V-1)``), EOS = V-1, right padding with 0."""

    eos_token_id = VOCAB - 1

    def __call__(self, text, add_special_tokens=True, padding=False, truncation=False, max_length=None,
                 return_tensors=None):
        if isinstance(text, str):
            return {"input_ids": [ord(c) % (VOCAB - 1) for c in text]}
        seqs = [[ord(c) % (VOCAB - 1) for c in t][: max_length or None] for t in text]
        T = max(len(s) for s in seqs)
        ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
        return transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask})


def llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


TEXTS = [
    "The quick brown fox jumps over the lazy dog. It was not amused by this at all.",
    "Sparse matrices keep two of every four weights. The rest are exactly zero here.",
    "Held-out text must differ from calibration text. Otherwise the verdict flatters the method.",
]


def test_is_causal_lm() -> None:
    assert is_causal_lm(llama()) and not is_causal_lm(bert())


def test_eval_windows_are_consecutive_and_deterministic() -> None:
    tok = CharTokenizer()
    w = eval_windows(tok, TEXTS, num_tokens=40, seq_len=20)
    flat = [i for t in TEXTS for i in tok(t)["input_ids"] + [tok.eos_token_id]]
    assert w.shape == (2, 20) and w.flatten().tolist() == flat[:40]
    assert torch.equal(w, eval_windows(tok, TEXTS, 40, 20))
    assert eval_windows(tok, TEXTS, 10**6, 20).shape[0] == len(flat) // 20  # short text: fewer windows
    with pytest.raises(InputError):
        eval_windows(tok, ["ab"], 100, 50)


def test_perplexity_matches_the_models_own_loss() -> None:
    """exp(mean NLL) over equal windows equals exp(mean of HF's per-window mean losses)."""
    model = llama()
    win = torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        losses = [model(input_ids=win[i : i + 1], labels=win[i : i + 1]).loss.item() for i in range(5)]
    ppl = perplexity(model, win, batch_size=2)
    assert ppl == pytest.approx(math.exp(sum(losses) / 5), rel=1e-5)
    assert 1.0 < ppl < 10 * VOCAB


def test_split_sentences() -> None:
    s = split_sentences(TEXTS, 100)
    assert s[0] == "The quick brown fox jumps over the lazy dog." and len(s) == 6
    assert len(split_sentences(TEXTS, 2)) == 2
    assert split_sentences(["too short. ok"], 5) == []


def test_sentence_embeddings_ignore_padding() -> None:
    """Mean pooling over real tokens: a sentence's embedding does not depend on what it is batched with."""
    model, tok = bert(), CharTokenizer()
    alone = sentence_embeddings(model, tok, [TEXTS[0][:20]], max_length=60)
    batched = sentence_embeddings(model, tok, [TEXTS[0][:20], TEXTS[1]], max_length=60)
    assert torch.allclose(alone[0], batched[0], atol=1e-5)
    assert embedding_similarity(model, model, tok, TEXTS, max_length=60) == pytest.approx(1.0, abs=1e-6)


def test_verdict_encoder_pruned_below_dense_and_sparsegpt_beats_magnitude() -> None:
    tok = CharTokenizer()
    ids = torch.tensor([tok(t)["input_ids"][:32] for t in TEXTS * 4])  # (12, 32)
    dense, sgpt, mag = bert(), bert(), bert()
    prune_model_(sgpt, PruneConfig(method="sparsegpt"), ids)
    prune_model_(mag, PruneConfig(method="magnitude"), ids)
    v = evaluate(sgpt, dense, tok, baselines={"magnitude": mag}, texts={"toy": TEXTS})
    assert v.metric == "cosine" and v.rows[0]["n"] == 6
    cos, cos_mag = v.value("pruned"), v.value("magnitude")
    assert cos_mag < cos < 1.0
    assert "magnitude" in v.format() and "toy" in v.format()
    with pytest.raises(InputError, match="reference"):
        evaluate(sgpt, None, tok, texts={"toy": TEXTS})


def test_verdict_causal_lm_reports_every_text_kind() -> None:
    tok = CharTokenizer()
    dense, pruned = llama(), llama()
    ids = torch.tensor([tok(t)["input_ids"][:32] for t in TEXTS * 4])
    prune_model_(pruned, PruneConfig(), ids)
    v = evaluate(pruned, dense, tok, texts={"a": TEXTS, "b": TEXTS[::-1]}, max_tokens=64, seq_len=16)
    assert v.metric == "perplexity" and [r["text"] for r in v.rows] == ["a", "b"]
    for r in v.rows:
        assert set(r["values"]) == {"dense", "pruned"} and r["n"] == 64
        assert r["values"]["dense"] != r["values"]["pruned"]
    assert v.value("dense", "a") == pytest.approx(perplexity(dense, eval_windows(tok, TEXTS, 64, 16)))
    assert Verdict(**v.to_dict()).to_dict() == v.to_dict()
