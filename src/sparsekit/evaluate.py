"""The verdict on a pruned model, on held-out text (DESIGN.md §7).

- Causal LMs: perplexity ``exp(mean NLL)`` of the dense and the pruned model on consecutive, non-overlapping
  windows of held-out text, for more than one kind of text when available (the calibration text dominates the
  result, so one kind alone can mislead).
- Encoders: mean over held-out sentences of the cosine similarity between the pruned and the dense model's
  mean-pooled sentence embeddings (``1.0`` means unchanged).

``sparsekit eval MODEL_DIR [--reference DENSE]`` (:mod:`sparsekit.cli.eval`) runs it on a saved model.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsekit.errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "Verdict",
    "is_causal_lm",
    "eval_windows",
    "perplexity",
    "split_sentences",
    "sentence_embeddings",
    "embedding_similarity",
    "heldout_sources",
    "evaluate",
    "domain_windows",
    "perplexity_by_domain",
    "generalisation_summary",
]


def is_causal_lm(model: nn.Module) -> bool:
    """True for decoder-only language models (``*ForCausalLM`` and the like), False for encoders."""
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "is_encoder_decoder", False):
        return False
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return True
    can = getattr(model, "can_generate", None)
    try:
        return bool(can()) if callable(can) else False
    except Exception:  # noqa: BLE001 - some remote-code models raise here; they are not generators then
        return False


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------------------------


def eval_windows(tokenizer: Any, texts: Sequence[str], num_tokens: int, seq_len: int) -> Tensor:
    """Consecutive non-overlapping ``(n, seq_len)`` windows of the texts' tokens, ``n = num_tokens // seq_len``.

    Texts are tokenized without special tokens and joined with the EOS token (if the tokenizer has one), in
    order: deterministic, no sampling. Fewer windows are returned if the texts are shorter; none → InputError.
    """
    if seq_len < 2:
        raise InputError(f"seq_len must be >= 2 for perplexity, got {seq_len}.")
    eos = getattr(tokenizer, "eos_token_id", None)
    want = max(1, num_tokens // seq_len) * seq_len
    ids: list[int] = []
    for t in texts:
        if not t.strip():
            continue
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= want:
            break
    n = min(len(ids), want) // seq_len
    if n == 0:
        raise InputError(f"held-out text has {len(ids)} tokens, fewer than one window of {seq_len}.")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def perplexity(
    model: nn.Module,
    windows: Tensor,
    *,
    batch_size: int = 4,
    device: "str | torch.device | None" = None,
    progress_fn: Callable[[int, int], None] | None = None,
) -> float:
    """``exp(Σ NLL / #predicted tokens)`` over ``windows (n, T)``; every window predicts its tokens 1..T-1.

    The model runs where it is unless ``device`` is given (then it is moved there and back).
    """
    dev = torch.device(device) if device is not None else _device_of(model)
    home = _device_of(model)
    was_training = model.training
    model.eval().to(dev)
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for s in range(0, windows.shape[0], batch_size):
                ids = windows[s : s + batch_size].to(dev)  # (b, T)
                logits = model(input_ids=ids).logits[:, :-1].float()  # (b, T-1, V)
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
                total += nll.item()
                count += ids[:, 1:].numel()
                if progress_fn is not None:
                    progress_fn(min(s + batch_size, windows.shape[0]), windows.shape[0])
    finally:
        model.to(home).train(was_training)
    return math.exp(total / count)


# ---------------------------------------------------------------------------------------------------------------
# Sentence-embedding similarity
# ---------------------------------------------------------------------------------------------------------------

_SENT_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])|\n\s*\n")


def split_sentences(texts: Sequence[str], max_sentences: int, min_words: int = 4, max_words: int = 80) -> list[str]:
    """Sentences of ``min_words``..``max_words`` words from the texts, in order, whitespace collapsed."""
    out: list[str] = []
    for t in texts:
        for s in _SENT_END.split(t):
            s = " ".join(s.split())
            if min_words <= len(s.split()) <= max_words:
                out.append(s)
                if len(out) >= max_sentences:
                    return out
    return out


def sentence_embeddings(
    model: nn.Module,
    tokenizer: Any,
    sentences: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = 128,
    device: "str | torch.device | None" = None,
) -> Tensor:
    """Mean-pooled (over real tokens) last hidden states, ``(n, d)`` float32 — the sentence-transformers recipe."""
    dev = torch.device(device) if device is not None else _device_of(model)
    home = _device_of(model)
    was_training = model.training
    model.eval().to(dev)
    outs = []
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))  # batches of similar length: less padding
    try:
        with torch.no_grad():
            for s in range(0, len(order), batch_size):
                batch = [sentences[i] for i in order[s : s + batch_size]]
                enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt").to(dev)
                out = model(**enc)
                h = out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.hidden_states[-1]
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # (b, T, 1)
                outs.append(((h * m).sum(1) / m.sum(1).clamp_min(1)).float().cpu())  # (b, d)
    finally:
        model.to(home).train(was_training)
    emb = torch.cat(outs)  # (n, d) in length order
    return emb[torch.argsort(torch.tensor(order))]


def embedding_similarity(
    pruned: nn.Module, dense: nn.Module, tokenizer: Any, sentences: Sequence[str], **kw: Any
) -> float:
    """Mean cosine similarity of pruned vs dense sentence embeddings."""
    a = sentence_embeddings(pruned, tokenizer, sentences, **kw)
    b = sentence_embeddings(dense, tokenizer, sentences, **kw)
    return F.cosine_similarity(a, b, dim=-1).mean().item()


# ---------------------------------------------------------------------------------------------------------------
# The verdict
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    """Per held-out text kind, the metric of each model (``rows[i]["values"][label]``).

    ``metric`` is ``"perplexity"`` (labels ``dense``, ``pruned``, baselines) or ``"cosine"`` (cosine with the
    dense model: labels ``pruned``, baselines).
    """

    metric: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    calibration: str | None = None
    time_s: float = 0.0
    #: :func:`generalisation_summary` of the models against a ``"sparsegpt"`` baseline, when one was evaluated
    summary: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "rows": self.rows, "calibration": self.calibration, "time_s": self.time_s,
                "summary": self.summary}

    def value(self, label: str = "pruned", text: str | None = None) -> float:
        row = self.rows[0] if text is None else next(r for r in self.rows if r["text"] == text)
        return row["values"][label]

    def format(self, pruned_label: str = "pruned") -> str:
        labels = list(self.rows[0]["values"]) if self.rows else []
        head = "perplexity on held-out text" if self.metric == "perplexity" else "mean cosine similarity to the dense embeddings, held-out sentences"
        unit = "tokens" if self.metric == "perplexity" else "sentences"
        names = [pruned_label if lb == "pruned" else lb for lb in labels]
        lines = [f"verdict: {head}" + (f" (calibrated on {self.calibration})" if self.calibration else "")]
        lines.append(f"  {'text':<12} {unit:>9}  " + "  ".join(f"{n:>11}" for n in names))
        for r in self.rows:
            vals = "  ".join(f"{r['values'][lb]:>11.4f}" if self.metric == "cosine" else f"{r['values'][lb]:>11.2f}" for lb in labels)
            mark = "*" if r.get("in_calibration") else " "
            lines.append(f" {mark}{r['text']:<12} {r['n']:>9}  {vals}")
        if any(r.get("in_calibration") for r in self.rows):
            lines.append("  (* the held-out split of a kind of text the calibration used; the others are not in it)")
        s = self.summary
        if s:
            cells = "  ".join(f"{s['mean_ratio'][lb]:>11.3f}" if lb in s["mean_ratio"] else f"{'':>11}" for lb in labels)
            lines.append(f"  {'gap ratio':<12} {'mean':>9}  {cells}")
            lines.append("  (gap ratio: (metric - dense) / (sparsegpt - dense) per text, averaged; lower is better, "
                         "1 = as far from dense as SparseGPT)")
        return "\n".join(lines)


def heldout_sources() -> list[str]:
    """The kinds of held-out text to report on: every named source available here (``stdlib``, ``pydoc``, and
    ``docs`` when the Debian docs are installed), so the verdict never rests on one kind of text alone."""
    from sparsekit.data.text import available_sources

    return list(available_sources()) or ["mixed"]


def _heldout_texts(source: str) -> list[str]:
    from sparsekit.data.text import load_texts

    return load_texts(source, split="heldout")


def evaluate(
    pruned: nn.Module,
    dense: nn.Module | None,
    tokenizer: Any,
    *,
    baselines: Mapping[str, nn.Module] | None = None,
    sources: Sequence[str] | None = None,
    texts: Mapping[str, Sequence[str]] | None = None,
    max_tokens: int = 8192,
    seq_len: int = 512,
    max_sentences: int = 256,
    device: "str | torch.device | None" = None,
    progress_fn: Callable[[str], None] | None = None,
    calibration: str | None = None,
) -> Verdict:
    """Dense vs pruned (and baselines) on held-out text; the metric follows the model kind (see module doc).

    Args:
        pruned, dense: the models; ``dense`` may be None for a causal LM (perplexity of the pruned one alone).
        baselines: other pruned versions (e.g. ``{"magnitude": model}``) reported alongside.
        sources: held-out text kinds for ``load_texts(source, split="heldout")`` (default: :func:`heldout_sources`).
        texts: ``{kind: texts}`` given directly instead of ``sources``.
        max_tokens, seq_len: perplexity windows per kind; max_sentences: sentences per kind for encoders.
        calibration: the model's calibration source (``"mixed"``, a named source or a path): without ``sources``
            or ``texts``, evaluate on its :func:`sparsekit.data.text.heldout_domains` (the held-out split of the
            kinds it used, marked ``in_calibration``, and every other kind whole).

    With a baseline labelled ``"sparsegpt"`` (and the dense model), ``summary`` is the
    :func:`generalisation_summary` of every model against it.
    """
    t0 = time.perf_counter()
    causal = is_causal_lm(pruned)
    if dense is None and not causal:
        raise InputError("the embedding similarity of an encoder needs the dense model as reference (--reference).")
    used: set[str] = set()
    if texts is None and sources is None and calibration is not None:
        from sparsekit.data.text import domain_texts, heldout_domains

        domains = heldout_domains(calibration)
        used = {d.name for d in domains if d.in_calibration}
        texts = domain_texts(domains)
    if texts is None:
        texts = {s: _heldout_texts(s) for s in (sources or heldout_sources())}
    models: dict[str, nn.Module] = {}
    if dense is not None and causal:
        models["dense"] = dense
    models["pruned"] = pruned
    models.update(baselines or {})
    verdict = Verdict("perplexity" if causal else "cosine")
    for kind, tx in texts.items():
        if progress_fn is not None:
            progress_fn(f"held-out text {kind!r}")
        if causal:
            win = eval_windows(tokenizer, tx, max_tokens, seq_len)
            vals = {label: perplexity(m, win, device=device) for label, m in models.items()}
            verdict.rows.append({"text": kind, "n": win.numel(), "values": vals, "in_calibration": kind in used})
        else:
            sents = split_sentences(tx, max_sentences)
            if not sents:
                raise InputError(f"held-out text {kind!r} has no usable sentences.")
            ref = sentence_embeddings(dense, tokenizer, sents, device=device)
            vals = {}
            for label, m in models.items():
                emb = sentence_embeddings(m, tokenizer, sents, device=device)
                vals[label] = F.cosine_similarity(emb, ref, dim=-1).mean().item()
            verdict.rows.append({"text": kind, "n": len(sents), "values": vals, "in_calibration": kind in used})
    if "sparsegpt" in models and dense is not None and verdict.rows:
        per = {label: {r["text"]: r["values"][label] for r in verdict.rows} for label in models if label != "dense"}
        ref = {r["text"]: r["values"]["dense"] if causal else 1.0 for r in verdict.rows}
        try:
            verdict.summary = generalisation_summary(per, ref)
        except InputError as e:  # SparseGPT left some text unchanged: no ratio there
            log.warning("no gap ratio: %s", e)
    verdict.time_s = time.perf_counter() - t0
    return verdict


# ---------------------------------------------------------------------------------------------------------------
# Generalisation: several held-out kinds of text, and the gap to SparseGPT's
# ---------------------------------------------------------------------------------------------------------------


def domain_windows(
    tokenizer: Any, texts: Mapping[str, Sequence[str]], num_tokens: int, seq_len: int
) -> dict[str, Tensor]:
    """``{domain: (n, seq_len) windows}`` (:func:`eval_windows` per domain); ``texts`` from
    :func:`sparsekit.data.text.domain_texts`. Tokenise once, evaluate every model on the same windows."""
    return {name: eval_windows(tokenizer, tx, num_tokens, seq_len) for name, tx in texts.items()}


def perplexity_by_domain(
    model: nn.Module,
    windows: Mapping[str, Tensor],
    *,
    batch_size: int = 4,
    device: "str | torch.device | None" = None,
) -> dict[str, float]:
    """``{domain: perplexity}`` of one causal LM on each domain's windows (:func:`perplexity`)."""
    return {name: perplexity(model, w, batch_size=batch_size, device=device) for name, w in windows.items()}


def generalisation_summary(
    values: Mapping[str, Mapping[str, float]],
    dense: Mapping[str, float],
    *,
    reference: str = "sparsegpt",
) -> dict[str, Any]:
    """Each method's damage relative to the reference method's, per domain and on average (lower is better).

    ``ratio[method][domain] = (v − dense) / (v_reference − dense)``: for perplexity, the share of SparseGPT's
    increase over the dense model that the method still has (0: as good as dense, 1: as bad as SparseGPT); for
    an encoder's cosine similarity to the dense embeddings pass ``dense = {domain: 1.0}``, the same formula.

    Args:
        values: ``{method: {domain: metric}}``, including ``reference``; every method must cover every domain
            of the reference.
        dense: ``{domain: metric of the dense model}``.

    Returns:
        ``{"reference", "domains", "ratio": {method: {domain: r}}, "mean_ratio": {method: mean r},
        "closes": {method: 1 − mean r}, "wins": {method: number of domains with r < 1}}``.

    Raises:
        InputError: the reference is missing, a domain lacks a value, or the reference does not change the
            metric on some domain (the ratio is undefined there).
    """
    if reference not in values:
        raise InputError(f"the reference method {reference!r} is not among {sorted(values)}; add its results.")
    domains = list(values[reference])
    if not domains:
        raise InputError("no domains to summarise.")
    gaps = {}
    for d in domains:
        if d not in dense:
            raise InputError(f"no dense value for domain {d!r}; evaluate the dense model on it.")
        gaps[d] = values[reference][d] - dense[d]
        if not math.isfinite(gaps[d]) or gaps[d] == 0:
            raise InputError(f"the reference {reference!r} does not change the metric on {d!r} "
                             f"({values[reference][d]} vs dense {dense[d]}): the gap ratio is undefined there.")
    ratio: dict[str, dict[str, float]] = {}
    for method, per in values.items():
        missing = [d for d in domains if d not in per]
        if missing:
            raise InputError(f"method {method!r} has no value for domains {missing}; evaluate it on every domain.")
        ratio[method] = {d: (per[d] - dense[d]) / gaps[d] for d in domains}
    mean = {m: sum(r.values()) / len(domains) for m, r in ratio.items()}
    return {
        "reference": reference,
        "domains": domains,
        "ratio": ratio,
        "mean_ratio": mean,
        "closes": {m: 1.0 - v for m, v in mean.items()},
        "wins": {m: sum(v < 1.0 for v in r.values()) for m, r in ratio.items()},
    }
