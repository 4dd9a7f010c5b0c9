"""Perplexity per held-out domain and the gap ratio to SparseGPT (sparsekit.evaluate; issue 16)."""

from __future__ import annotations

import math

import pytest
import torch

from sparsekit import InputError
from sparsekit.evaluate import domain_windows, generalisation_summary, perplexity, perplexity_by_domain


def test_summary_on_tiny_numbers():
    dense = {"a": 10.0, "b": 20.0}
    values = {"sparsegpt": {"a": 30.0, "b": 24.0}, "obs": {"a": 20.0, "b": 25.0}, "dense": dense}
    s = generalisation_summary(values, dense)
    assert s["ratio"]["sparsegpt"] == {"a": 1.0, "b": 1.0}
    assert s["ratio"]["obs"] == {"a": 0.5, "b": 1.25}  # (20-10)/(30-10), (25-20)/(24-20)
    assert s["ratio"]["dense"] == {"a": 0.0, "b": 0.0}
    assert s["mean_ratio"]["obs"] == pytest.approx(0.875) and s["closes"]["obs"] == pytest.approx(0.125)
    assert s["wins"] == {"sparsegpt": 0, "obs": 1, "dense": 2}
    assert s["domains"] == ["a", "b"] and s["reference"] == "sparsegpt"
    # an encoder's cosine with the dense embeddings: dense is 1.0 everywhere, the same formula
    cos = generalisation_summary({"sparsegpt": {"a": 0.9}, "admm": {"a": 0.95}}, {"a": 1.0})
    assert cos["ratio"]["admm"]["a"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "values, dense, match",
    [
        ({"obs": {"a": 1.0}}, {"a": 1.0}, "reference"),
        ({"sparsegpt": {}}, {}, "no domains"),
        ({"sparsegpt": {"a": 2.0}}, {"b": 1.0}, "dense value"),
        ({"sparsegpt": {"a": 2.0}}, {"a": 2.0}, "undefined"),
        ({"sparsegpt": {"a": math.nan}}, {"a": 2.0}, "undefined"),
        ({"sparsegpt": {"a": 2.0, "b": 3.0}, "obs": {"a": 1.5}}, {"a": 1.0, "b": 1.0}, "every domain"),
    ],
)
def test_summary_bad_input(values, dense, match):
    with pytest.raises(InputError, match=match):
        generalisation_summary(values, dense)


class _Bigram(torch.nn.Module):
    """A causal LM whose next-token distribution depends on the current token only (logits = table[id])."""

    def __init__(self, V: int, seed: int) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(seed)))

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.table[input_ids]})()


class _Tok:
    eos_token_id = 9

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(c) for c in text if c.isdigit() and c != "9"]}


def test_perplexity_by_domain_matches_the_oracle():
    texts = {"x": ["0123456781" * 5, "8765432100" * 5], "y": ["1357" * 20]}
    win = domain_windows(_Tok(), texts, 40, 8)
    assert set(win) == {"x", "y"} and win["x"].shape == (5, 8) and win["y"].shape == (5, 8)
    model = _Bigram(10, 0)
    got = perplexity_by_domain(model, win)
    for name, w in win.items():
        logp = torch.log_softmax(model.table.detach().double(), -1)
        nll = -sum(logp[a, b].item() for row in w.tolist() for a, b in zip(row[:-1], row[1:]))
        assert got[name] == pytest.approx(math.exp(nll / (w.shape[0] * (w.shape[1] - 1))), rel=1e-5)
        assert got[name] == perplexity(model, w)
