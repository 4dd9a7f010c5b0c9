"""Real layers ``(name, W, H)``: every linear layer inside a model's transformer blocks with ``H = XᵀX / N``.

The inputs ``X`` of each ``nn.Linear`` inside the blocks (not embeddings, pooler or ``lm_head``) are caught
with forward hooks during **one dense forward pass** of the unpruned model over calibration windows (each layer
sees the dense model's activations — the benchmark setting; sequential calibration is
:mod:`sparsekit.pipeline`'s job) and streamed into :class:`~sparsekit.hessian.HessianAccumulator`. Layers that
read the same tensor (q/k/v, gate/up) share one accumulation.

The Hessians are cached as safetensors under ``<cache_dir>/hessians/``, keyed by the model (name, class and a
checksum of its weights), the text (checksum of the documents), the token count, ``seq_len``, the seed and the
accumulation dtype. A cache file that cannot be read or holds a bad tensor is recomputed, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from sparsekit.errors import InputError
from sparsekit.hessian import HessianAccumulator
from sparsekit.pipeline.blocks import HessianHooks, StopForward, block_linears, probe_inputs
from sparsekit.data.text import default_cache_dir, text_fingerprint, tokenize_for_calibration

log = logging.getLogger(__name__)

__all__ = [
    "RealLayer",
    "block_linears",
    "filter_names",
    "collect_layers",
    "real_layers",
    "save_layers",
    "load_layers",
    "model_fingerprint",
]

#: bump when the way H is computed changes (invalidates cache files)
_CACHE_VERSION = 1


@dataclass
class RealLayer:
    """One linear layer ready for :func:`sparsekit.prune_weight`: ``W (M, K)`` and ``H = XᵀX / N (K, K)``."""

    name: str
    weight: Tensor  # (M, K) float32
    hessian: Tensor  # (K, K) float32, symmetric PSD
    num_tokens: int  # N, the rows of X behind H

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> "RealLayer":
        return RealLayer(self.name, self.weight.to(device), self.hessian.to(device), self.num_tokens)


def filter_names(names: Sequence[str], layer_filter: str | None) -> list[str]:
    """Names matching ``layer_filter``: a regular expression (``re.search``) or, failing that, a substring.

    Raises :class:`InputError` listing some layer names when nothing matches.
    """
    if layer_filter is None or layer_filter == "":
        return list(names)
    try:
        rx = re.compile(layer_filter)
        keep = [n for n in names if rx.search(n) or layer_filter in n]
    except re.error:
        keep = [n for n in names if layer_filter in n]
    if not keep:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise InputError(
            f"layer filter {layer_filter!r} matches none of the {len(names)} layers; names look like: {shown}"
        )
    return keep


def model_fingerprint(model: nn.Module) -> str:
    """SHA-1 of the model's class, name and a float64 sum of every parameter (cheap, changes with the weights)."""
    h = hashlib.sha1(type(model).__name__.encode())
    h.update(str(getattr(getattr(model, "config", None), "_name_or_path", "")).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}:{tuple(p.shape)}:{p.double().sum().item():.12e}".encode())
    return h.hexdigest()


def _slug(model: nn.Module) -> str:
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
    p = Path(name.rstrip("/"))
    base = f"{p.parent.name}-{p.name}" if p.name in ("model", "models", "") else p.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base)[:48] or "model"


def _read_cache(
    path: Path, names: Sequence[str], sizes: dict[str, int], warn: bool = True
) -> dict[str, tuple[Tensor, int]]:
    """Those of ``names`` found in a cache file: ``{name: (H, num_tokens)}``; a bad file warns and gives ``{}``."""
    if not path.is_file():
        return {}
    try:
        from safetensors import safe_open

        out = {}
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("num_tokens", "{}"))
            keys = set(f.keys())
            for n in names:
                if n in keys:
                    h = f.get_tensor(n)
                    k = sizes[n]
                    if h.shape != (k, k) or h.dtype != torch.float32 or not torch.isfinite(h).all():
                        raise ValueError(f"tensor {n!r} is {h.dtype} {tuple(h.shape)} or not finite")
                    out[n] = (h, int(meta[n]))
        return out
    except Exception as e:  # any unreadable / inconsistent file is recomputed
        if warn:
                log.warning("Hessian cache %s is corrupted (%s: %s); recomputing it.", path, type(e).__name__, e)
        return {}


def _write_cache(path: Path, hess: dict[str, tuple[Tensor, int]], info: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        meta = {"num_tokens": json.dumps({n: t for n, (_, t) in hess.items()}), "info": json.dumps(info)}
        save_file({n: h.contiguous() for n, (h, _) in hess.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not write the Hessian cache %s: %s", path, e)


def _accumulate(
    model: nn.Module,
    modules: dict[str, nn.Linear],
    ids: Tensor,
    batch_size: int,
    dtype: torch.dtype,
    progress: Callable[[int, int], None] | None,
) -> dict[str, tuple[Tensor, int]]:
    """One dense forward pass over ``ids (n_seq, seq_len)`` with hooks; ``{name: (H float32, N)}``."""
    device = next(model.parameters()).device
    # BERT-like encoders take an attention mask; decoders run causally on full windows (no padding).
    body = getattr(model, "base_model", model)

    def forward(start: int) -> None:
        batch = ids[start:start + batch_size].to(device)  # (b, seq_len)
        body(input_ids=batch, attention_mask=torch.ones_like(batch))

    with torch.no_grad():
        # the first batch once with probes: layers fed the same input tensor share one accumulator (its leader)
        order, inputs = probe_inputs(modules, lambda: forward(0))
        missing = sorted(set(modules) - set(order))[:5]
        if missing:
            raise InputError(f"layers {missing} were not called in the forward pass; filter them out.")
        leader: dict[str, str] = {}
        owner: dict[int, tuple[Tensor, str]] = {}  # id(input) -> (input, layer)
        for name in order:
            x = inputs[name][0]
            leader[name] = owner[id(x)][1] if id(x) in owner and owner[id(x)][0] is x else name
            owner.setdefault(id(x), (x, name))
        calls = sum(len(inputs[n]) for n in order if leader[n] == n)
        del inputs, owner
        accs = {n: HessianAccumulator(modules[n].in_features, dtype, device) for n in order if leader[n] == n}
        with HessianHooks([(modules[n], acc) for n, acc in accs.items()], stop_after=calls) as hooks:
            for start in range(0, ids.shape[0], batch_size):
                hooks.batch()
                try:
                    forward(start)
                except StopForward:  # every wanted layer has seen the batch
                    pass
                if progress is not None:
                    progress(min(start + batch_size, ids.shape[0]), ids.shape[0])
    out = {}
    for name in modules:
        acc = accs[leader[name]]
        h = acc.hessian
        out[name] = (((h + h.T) / 2).float().cpu(), acc.num_tokens)  # (K, K)
    return out


def collect_layers(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    num_tokens: int = 8192,
    seq_len: int = 128,
    layer_filter: str | None = None,
    cache_dir: str | Path | None = None,
    *,
    seed: int = 0,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int, int], None] | None = None,
) -> list[RealLayer]:
    """``RealLayer(name, W, H = XᵀX/N, N)`` for every linear layer in the blocks that matches ``layer_filter``.

    Args:
        model, tokenizer: e.g. from :func:`sparsekit.data.models.load_model` (eval mode, float32).
        texts: calibration documents (:func:`sparsekit.data.text.load_texts`).
        num_tokens, seq_len, seed: calibration windows, see :func:`~sparsekit.data.text.tokenize_for_calibration`
            (``N = ceil(num_tokens / seq_len) * seq_len`` tokens).
        layer_filter: regex or substring of layer names (``None``: all).
        cache_dir: folder for the safetensors cache (``None``: no cache).
        batch_size: windows per forward pass.
        dtype: accumulation dtype of H (float32 or float64); H is returned as float32.
        progress: called with ``(windows done, windows total)`` during the forward pass.
    """
    linears = dict(block_linears(model))
    names = filter_names(list(linears), layer_filter)
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise InputError(f"seq_len={seq_len} exceeds the model's {max_pos} positions; use a smaller seq_len.")
    sizes = {n: linears[n].in_features for n in names}
    path = None
    info = {"version": _CACHE_VERSION, "model": model_fingerprint(model), "text": text_fingerprint(texts),
            "tokenizer": f"{type(tokenizer).__name__}:{len(tokenizer)}", "num_tokens": num_tokens,
            "seq_len": seq_len, "seed": seed, "dtype": str(dtype)}
    hess: dict[str, tuple[Tensor, int]] = {}
    if cache_dir is not None:
        key = hashlib.sha1(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(cache_dir) / "hessians" / f"{_slug(model)}-{key}.safetensors"
        hess = _read_cache(path, names, sizes)
        log.info("Hessian cache %s: %d of %d layers present", path, sum(n in hess for n in names), len(names))
    todo = [n for n in names if n not in hess]
    if todo:
        ids = tokenize_for_calibration(tokenizer, texts, num_tokens, seq_len, seed)  # (n_seq, seq_len)
        log.info("collecting H of %d layers from %d tokens", len(todo), ids.numel())
        hess.update(_accumulate(model, {n: linears[n] for n in todo}, ids, batch_size, dtype, progress))
        if path is not None:  # keep the layers other filters cached in the same file
            others = [n for n in linears if n not in hess]
            kept = _read_cache(path, others, {n: linears[n].in_features for n in others}, warn=False)
            _write_cache(path, {**kept, **hess}, info)
    return [RealLayer(n, linears[n].weight.detach().float().cpu().clone(), hess[n][0], hess[n][1]) for n in names]


def real_layers(
    model: str = "minilm",
    text: str = "mixed",
    num_tokens: int = 8192,
    seq_len: int = 128,
    layer_filter: str | None = None,
    cache_dir: str | Path | None = "default",
    *,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[RealLayer]:
    """Load a model by name or path (:func:`~sparsekit.data.models.load_model`) and collect its layers on the
    calibration split of ``text``. ``cache_dir="default"`` caches H under :func:`default_cache_dir`."""
    from sparsekit.data.models import load_model
    from sparsekit.data.text import load_texts

    cache = default_cache_dir() if cache_dir == "default" else cache_dir
    texts = load_texts(text, "calib")
    mdl, tok = load_model(model, cache)
    return collect_layers(mdl, tok, texts, num_tokens, seq_len, layer_filter, cache, seed=seed, progress=progress)


def save_layers(layers: Sequence[RealLayer], path: str | Path) -> None:
    """Write layers to one safetensors file (``<name>.weight``, ``<name>.hessian``; token counts as metadata)."""
    from safetensors.torch import save_file

    tensors = {}
    for lay in layers:
        tensors[f"{lay.name}.weight"] = lay.weight.detach().float().cpu().contiguous()
        tensors[f"{lay.name}.hessian"] = lay.hessian.detach().float().cpu().contiguous()
    save_file(tensors, str(path), metadata={"num_tokens": json.dumps({l.name: l.num_tokens for l in layers})})


def load_layers(path: str | Path, layer_filter: str | None = None) -> list[RealLayer]:
    """Read layers written by :func:`save_layers` (your own ``(W, H)`` pairs work too: ``<name>.weight`` (M, K)
    and ``<name>.hessian`` (K, K) tensors in one safetensors file)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such layer file: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("num_tokens", "{}"))
            keys = list(f.keys())
            names = [k[: -len(".weight")] for k in keys if k.endswith(".weight") and k[:-7] + ".hessian" in keys]
            if not names:
                raise InputError(f"{path} holds no '<name>.weight' + '<name>.hessian' pairs.")
            names = filter_names(names, layer_filter)
            return [RealLayer(n, f.get_tensor(n + ".weight").float(), f.get_tensor(n + ".hessian").float(),
                              int(meta.get(n, 0))) for n in names]
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot read layers from {path}: {type(e).__name__}: {e}") from e
