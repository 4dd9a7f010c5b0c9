"""The resume fingerprint: a hash of everything that determines a run's result (issue 15).

A checkpoint may only be continued by a run whose result would be the same, so the fingerprint covers

- the *setup* (:func:`setup_digest`): every field of the :class:`PruneConfig` except where it runs, each
  pattern by its full spec (scope, blocks, views, ``nnz``; never its name, which is ``"custom"`` for every
  user-built :class:`~sparsekit.patterns.Pattern`), the per-layer plan (method, pattern spec, options), the model
  class, and the calibration tokens and attention mask in full;
- every tensor of the model's state dict in full (:func:`weight_digests`): SHA-256 over its bytes, streamed in
  chunks of :data:`CHUNK_BYTES` (a tensor on an accelerator is copied to the host one chunk at a time). Tensors
  are hashed on a thread pool (``hashlib`` releases the GIL), tied tensors once. A lazily loaded model's blocks
  (on the ``meta`` device, :mod:`sparsekit.pipeline.lazy`) are read from its files one tensor per thread at a
  time and hashed as the whole-model load would hold them, so both give the same digests.

Cost (benchmarks/fingerprint_cost.py): one read of the weights, about 1.4 GB/s per core on the 2-core CI machine,
so an 8B model in bfloat16 (16 GB) takes about 12 s on one core and 1-2 s on 8, against a job of tens of minutes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor, nn

from sparsekit.patterns import Pattern, get_pattern
from sparsekit.pipeline.blocks import LayerPlan
from sparsekit.pipeline.config import PruneConfig, Rule
from sparsekit.pipeline.lazy import LazyWeights

__all__ = ["CHUNK_BYTES", "RUNTIME_FIELDS", "pattern_spec", "setup_digest", "tensor_digest", "weight_digests"]

#: Bytes hashed per ``update`` (and copied to the host per step for an accelerator tensor).
CHUNK_BYTES = 64 << 20
#: :class:`PruneConfig` fields that say where a run executes, not what it computes.
RUNTIME_FIELDS = frozenset({"device", "offload_activations", "prune_devices", "max_memory"})


def pattern_spec(pattern: "str | Pattern | None") -> Any:
    """A pattern's full specification as JSON-able data (its fields, without its display name)."""
    if pattern is None:
        return None
    p = get_pattern(pattern) if isinstance(pattern, str) else pattern
    spec = dataclasses.asdict(p)
    spec.pop("name", None)
    return spec


def _canonical(value: Any) -> Any:
    if isinstance(value, Pattern):
        return pattern_spec(value)
    if isinstance(value, Rule):
        return {"regex": value.regex, "method": value.method, "pattern": pattern_spec(value.pattern),
                "options": _canonical(dict(value.options)) if value.options is not None else None}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return repr(value)  # exact, and NaN/Inf survive
    return f"{type(value).__name__}:{value!r}"


def _update_tensor(h: "hashlib._Hash", t: Tensor) -> None:
    """Feed ``t``'s dtype, shape and bytes (in chunks) to ``h``."""
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.device.type == "meta":
        return  # no data to read
    flat = t.detach().reshape(-1)  # (numel,); a copy only if t is not contiguous
    step = max(1, CHUNK_BYTES // max(1, flat.element_size()))
    for i in range(0, flat.numel(), step):
        h.update(flat[i : i + step].cpu().contiguous().view(torch.uint8).numpy())


def tensor_digest(t: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and every byte of its data."""
    h = hashlib.sha256()
    _update_tensor(h, t)
    return h.hexdigest()


def setup_digest(
    model: nn.Module, config: PruneConfig, input_ids: Tensor, attention_mask: Tensor | None,
    plans: list[list[LayerPlan]],
) -> str:
    """SHA-256 of everything but the weights that determines the result (see the module docstring)."""
    h = hashlib.sha256()
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in RUNTIME_FIELDS}
    fields["pattern"] = pattern_spec(config.pattern)
    h.update(json.dumps(_canonical(fields), sort_keys=True).encode())
    h.update(type(model).__name__.encode())
    for t in (input_ids, attention_mask):
        h.update(b"none" if t is None else b"tensor")
        if t is not None:
            _update_tensor(h, t)
    layers = [[p.name, p.method, pattern_spec(p.pattern), _canonical(dict(p.options)), p.skip_reason]
              for bp in plans for p in bp]
    h.update(json.dumps(layers, sort_keys=True).encode())
    return h.hexdigest()


def weight_digests(model: nn.Module, workers: int | None = None) -> dict[str, str]:
    """``{state-dict name: tensor_digest}`` for every tensor of the model, hashed on ``workers`` threads
    (default: the CPU count, at most 16); tensors that share storage (tied embeddings) are hashed once. A lazily
    loaded model's tensors still on ``meta`` are read through :meth:`LazyWeights.read` (one per thread at a time)."""
    sd = model.state_dict(keep_vars=False)
    lazy = LazyWeights.of(model)
    key = {n: (t.device, n) if t.device.type == "meta" else (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
           for n, t in sd.items()}
    first: dict[Any, str] = {}
    for n in sd:
        first.setdefault(key[n], n)
    workers = workers or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # largest first: the pool stays busy to the end
        names = sorted(set(first.values()), key=lambda n: -sd[n].numel() * sd[n].element_size())
        digests = dict(zip(names, pool.map(
            lambda n: tensor_digest(lazy.read(n) if lazy is not None and sd[n].device.type == "meta" else sd[n]),
            names)))
    return {n: digests[first[key[n]]] for n in sd}
