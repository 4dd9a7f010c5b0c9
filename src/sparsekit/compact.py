"""Compact 2:4 checkpoints: kept values + 2-bit positions, a ``Sparse24Linear`` module, save / load / export.

A weight ``W (M, K)`` is *2:4* when every group of 4 consecutive input columns ``W[m, 4g : 4g+4]`` holds at most
2 nonzeros (DESIGN.md §3, pattern ``2:4``). It is stored as

- ``values (M, K/2)`` in the weight's dtype: the two kept entries of each group, in column order;
- ``positions (M, K/8) uint8``: the position (0..3) inside its group of kept value ``j`` sits at bits
  ``2·(j mod 4)`` of byte ``j // 4``, least significant first; the two positions of a group strictly increase
  (a group with fewer than 2 nonzeros keeps its lowest zero positions, with value 0).

So ``W[m, 4·(j // 2) + pos(m, j)] = values[m, j]`` and every other entry is 0. In 16-bit dtypes the compact
weight is ``K·(2 + 1/8)`` bytes per row against ``2K`` dense: 56.25 %. Why one byte per four positions: a
byte then describes exactly the four kept values of eight columns, one 64-bit word of values, so the Triton
kernels (:mod:`sparsekit.kernels.sparse24`) load words and bytes as contiguous vector loads under one index; a
nibble ``(i0 | i1 << 2)`` serves one group of four columns.

A checkpoint is a folder: ``config.json`` (the model's Hugging Face config), ``model.safetensors`` (every tensor
of the state dict; a 2:4 linear ``name`` stores ``name.weight_values`` and ``name.weight_meta`` in place of
``name.weight``) and ``sparsekit_compact.json`` (format name, version, the compact modules with shapes and
dtypes, tied keys, the weights file's SHA-256). Loading executes no code from any file: JSON and safetensors
only, the architecture class looked up by name among transformers' own classes, ``trust_remote_code`` never set.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsekit.errors import CompactFormatError, InputError
from sparsekit.kernels.pack24 import is_24, pack_24, positions_24, unpack_24

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Sparse24Linear",
    "is_24",
    "is_compact_dir",
    "pack_24",
    "unpack_24",
    "check_packed_24",
    "sparsify_linears_",
    "save_compact",
    "load_compact",
    "export_compact",
    "tune_decode_",
    "tune_prefill_",
]

log = logging.getLogger(__name__)

FORMAT_NAME = "sparsekit-compact-2:4"
FORMAT_VERSION = 1
CONFIG_FILE = "sparsekit_compact.json"
WEIGHTS_FILE = "model.safetensors"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------- pack / unpack
def check_packed_24(values: Tensor, meta: Tensor, out_features: int, in_features: int, name: str = "") -> None:
    """Raise :class:`CompactFormatError` unless ``(values, meta)`` is a valid packed 2:4 ``(out, in)`` weight."""
    where = f" of module {name!r}" if name else ""
    if in_features <= 0 or in_features % 8 or out_features <= 0:
        raise CompactFormatError(f"compact shape ({out_features}, {in_features}){where} needs in_features % 8 == 0.")
    if tuple(values.shape) != (out_features, in_features // 2):
        raise CompactFormatError(
            f"values{where} have shape {tuple(values.shape)}, expected ({out_features}, {in_features // 2}); "
            "the file does not match its sparsekit_compact.json: re-export it."
        )
    if meta.dtype != torch.uint8 or tuple(meta.shape) != (out_features, in_features // 8):
        raise CompactFormatError(
            f"positions{where} are {meta.dtype} {tuple(meta.shape)}, expected uint8 ({out_features}, "
            f"{in_features // 8}): re-export the checkpoint."
        )
    pos = positions_24(meta)  # (M, K/4, 2)
    bad = (pos[..., 0] >= pos[..., 1]).sum().item()
    if bad:
        raise CompactFormatError(
            f"{bad} groups{where} repeat or misorder their two positions (the 2:4 rule needs two distinct "
            "positions in increasing order): the file is corrupt, re-export it."
        )
    if values.is_floating_point() and not torch.isfinite(values).all():
        raise CompactFormatError(f"values{where} contain NaN or Inf: the file is corrupt, re-export it.")


# ------------------------------------------------------------------------------------------------ module
class Sparse24Linear(nn.Module):
    """``y = x Wᵀ + b`` with a compact 2:4 ``W (out, in)``: buffers ``weight_values`` and ``weight_meta``.

    Forward: on CUDA with a 16-bit dtype, for ≤ 16 tokens the sparse tensor cores
    (:mod:`sparsekit.kernels.sparse24_mma`, when ``out % 16 == 0``, ``in % 256 == 0`` and compute capability
    ≥ 8.0; else the Triton kernels of :mod:`sparsekit.kernels.sparse24`), and the :attr:`prefill` mode beyond
    (``"rebuild"``: dense weight rebuilt then cuBLAS; ``"kernel"``: the compact kernel with GEMM tiles;
    ``"dense"``: a cached dense weight — chosen by :func:`tune_prefill_`). Elsewhere the reference: unpack to
    dense and ``F.linear``, bit-identical to the dense-with-zeros ``nn.Linear``.

    The first sparse-tensor-core forward permutes the two buffers in place into the kernel's fragment order
    (:attr:`layout` ``"mma"``: same shapes, same bytes, no second copy); :meth:`compact` gives them back in the
    compact order, and the state dict (hence :func:`save_compact`) is always in the compact order.
    """

    PREFILL_MODES = ("rebuild", "kernel", "dense")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=None, device=None):
        super().__init__()
        if in_features % 8:
            raise InputError(f"Sparse24Linear needs in_features % 8 == 0, got {in_features}.")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_values", torch.zeros(out_features, in_features // 2, dtype=dtype, device=device))
        self.register_buffer(
            "weight_meta", torch.full((out_features, in_features // 8), 0b11100100, dtype=torch.uint8, device=device)
        )
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.prefill = "rebuild"
        self.layout = "compact"  # or "mma": the buffers in sparse24_mma's fragment order
        self._dense_cache: Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Sparse24Linear":
        """Pack a dense-with-zeros ``nn.Linear`` whose weight is 2:4 (raises :class:`InputError` otherwise)."""
        values, meta = pack_24(linear.weight)
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  dtype=values.dtype, device=values.device)
        mod.weight_values.copy_(values)
        mod.weight_meta.copy_(meta)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    def compact(self) -> tuple[Tensor, Tensor]:
        """``(values (out, in/2), meta (out, in/8) uint8)`` in the compact order (a permuted copy when
        :attr:`layout` is ``"mma"``)."""
        if self.layout == "compact":
            return self.weight_values, self.weight_meta
        from sparsekit.kernels.sparse24_mma import mma_unlayout

        return mma_unlayout(*self._fragments())

    def _fragments(self) -> tuple[Tensor, Tensor]:
        """The buffers seen in fragment order: ``(M/16, K/256, 8, 32, 8)`` values, ``(M/16, K/256, 32, 4)`` int32."""
        MT, KC = self.out_features // 16, self.in_features // 256
        return (self.weight_values.view(MT, KC, 8, 32, 8),
                self.weight_meta.view(MT, KC, 32, 16).view(torch.int32))

    def _to_mma_layout_(self) -> None:
        from sparsekit.kernels.sparse24_mma import mma_layout

        fv, fm = mma_layout(self.weight_values, self.weight_meta)
        self.weight_values.copy_(fv.reshape(self.weight_values.shape))
        self.weight_meta.copy_(fm.view(torch.uint8).reshape(self.weight_meta.shape))
        self.layout = "mma"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout == "mma":
            destination[prefix + "weight_values"], destination[prefix + "weight_meta"] = self.compact()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.layout = "compact"  # the state dict is in the compact order

    def dense_weight(self) -> Tensor:
        """The dense ``W (out, in)`` with zeros."""
        return unpack_24(*self.compact())

    def set_prefill(self, mode: str) -> None:
        """Select the prefill path (one of :attr:`PREFILL_MODES`); ``"dense"`` caches the dense weight."""
        if mode not in self.PREFILL_MODES:
            raise InputError(f"prefill mode {mode!r} unknown; use one of {self.PREFILL_MODES}.")
        self.prefill = mode
        self._dense_cache = self.dense_weight() if mode == "dense" else None

    def forward(self, x: Tensor) -> Tensor:  # x (..., in) -> (..., out)
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and x.dtype == self.weight_values.dtype:
            from sparsekit.kernels import sparse24, sparse24_mma

            x2 = x.reshape(-1, self.in_features)  # (N, K)
            N = x2.shape[0]
            if N <= sparse24.MAX_DECODE_TOKENS and sparse24_mma.supports(self.out_features, self.in_features,
                                                                          x.dtype, x.device):
                if self.layout != "mma":
                    if torch.cuda.is_current_stream_capturing():  # the permutation would be replayed every time
                        raise InputError(
                            "Sparse24Linear's first decode forward permutes its weight buffers in place, which a "
                            "CUDA graph must not capture: run one forward (or tune_decode_(model)) before capturing.")
                    self._to_mma_layout_()
                y = sparse24_mma.sparse24_mma(x2, *self._fragments(), self.bias)
            elif N <= sparse24.MAX_DECODE_TOKENS or self.prefill == "kernel":
                y = sparse24.sparse24_linear(x2, *self.compact(), self.bias)
            elif self.prefill == "dense" and self._dense_cache is not None:
                y = F.linear(x2, self._dense_cache, self.bias)
            else:
                y = F.linear(x2, sparse24.unpack(*self.compact()), self.bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _shared_keys(state: dict[str, Tensor]) -> dict[str, str]:
    """``{dropped key: kept key}`` for state-dict entries that share storage with an earlier entry (tied)."""
    seen: dict[tuple, str] = {}
    tied = {}
    for k, v in state.items():
        key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            tied[k] = seen[key]
        else:
            seen[key] = k
    return tied


def _compactable(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules whose weight is exactly 2:4 and not tied to another tensor."""
    tied = _shared_keys(model.state_dict())
    tied_all = set(tied) | set(tied.values())
    return [
        n for n, m in model.named_modules()
        if type(m) is nn.Linear and f"{n}.weight" not in tied_all and is_24(m.weight)
    ]


def sparsify_linears_(model: nn.Module) -> list[str]:
    """Replace, in place, every 2:4 ``nn.Linear`` of ``model`` by a :class:`Sparse24Linear`; returns their names."""
    names = _compactable(model)
    for n in names:
        _set_submodule(model, n, Sparse24Linear.from_linear(model.get_submodule(n)))
    return names


# --------------------------------------------------------------------------------------------- save / load
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def save_compact(model: nn.Module, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write ``model`` (a Hugging Face ``PreTrainedModel``) as a compact checkpoint in ``out_dir``.

    Every ``nn.Linear`` whose weight is exactly 2:4 (and every :class:`Sparse24Linear`) is stored packed;
    everything else unchanged. The model is not modified. Returns the report: compact modules, bytes of their
    packed tensors vs the same weights dense, file sizes.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = dict(model.state_dict())
    tied = _shared_keys(state)
    for k in tied:
        del state[k]
    modules, compact_bytes, dense_bytes = [], 0, 0
    packed = {n: pack_24(model.get_submodule(n).weight) for n in _compactable(model)}
    for n, m in model.named_modules():
        if isinstance(m, Sparse24Linear):
            packed[n] = m.compact()
    for n, (values, meta) in sorted(packed.items()):
        M, K = values.shape[0], 2 * values.shape[1]
        state.pop(f"{n}.weight", None)
        state[f"{n}.weight_values"], state[f"{n}.weight_meta"] = values, meta
        modules.append({"name": n, "out_features": M, "in_features": K, "dtype": str(values.dtype).split(".")[1],
                        "bias": f"{n}.bias" in state})
        compact_bytes += values.nbytes + meta.nbytes
        dense_bytes += M * K * values.element_size()
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / WEIGHTS_FILE),
              metadata={"format": "pt", "sparsekit": FORMAT_NAME})
    hf_config = copy.deepcopy(model.config)
    hf_config.architectures = [type(model).__name__]
    hf_config.save_pretrained(str(out))
    config = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "weights_file": WEIGHTS_FILE,
        "sha256": _sha256(out / WEIGHTS_FILE),
        "positions_layout": "uint8 (out, in/8): position 0..3 of kept value j at bits 2*(j%4) of byte j//4",
        "modules": modules,
        "tied": tied,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    report = {
        "out_dir": str(out),
        "compact_modules": len(modules),
        "compact_bytes": compact_bytes,
        "dense_bytes": dense_bytes,
        "ratio": compact_bytes / dense_bytes if dense_bytes else None,
        "weights_file_bytes": (out / WEIGHTS_FILE).stat().st_size,
    }
    log.info("saved %d compact linears to %s (%.1f%% of their dense bytes)", len(modules), out,
             100 * (report["ratio"] or 0))
    return report


def is_compact_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a compact checkpoint (for loaders that accept either kind)."""
    return (Path(path) / CONFIG_FILE).is_file()


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise CompactFormatError(f"{folder} has no {CONFIG_FILE}: not a sparsekit compact checkpoint.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompactFormatError(f"{folder / CONFIG_FILE} is not valid JSON ({e}): re-export it.") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT_NAME:
        raise CompactFormatError(f"{folder / CONFIG_FILE} is not a {FORMAT_NAME!r} config.")
    if cfg.get("version") != FORMAT_VERSION:
        raise CompactFormatError(
            f"compact format version {cfg.get('version')!r} is not supported (this sparsekit reads version "
            f"{FORMAT_VERSION}): upgrade sparsekit or re-export the checkpoint."
        )
    wf = cfg.get("weights_file")
    if not isinstance(wf, str) or wf != Path(wf).name or not wf.endswith(".safetensors"):
        raise CompactFormatError(f"weights_file {wf!r} must be a .safetensors file name inside the folder.")
    mods, tied = cfg.get("modules"), cfg.get("tied", {})
    ok = isinstance(mods, list) and isinstance(tied, dict) and all(
        isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("out_features"), int)
        and isinstance(m.get("in_features"), int) and m.get("dtype") in _DTYPES and isinstance(m.get("bias"), bool)
        for m in mods
    ) and all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items())
    if not ok:
        raise CompactFormatError(f"{folder / CONFIG_FILE} has a malformed 'modules' or 'tied' entry: re-export it.")
    return cfg


def _model_class(config: Any):
    """The transformers class named by ``config.architectures`` (only transformers' own classes), else AutoModel."""
    import transformers
    from transformers import AutoModel, PreTrainedModel

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    return AutoModel


def load_compact(folder: str | os.PathLike, device: str | torch.device = "cpu", verify_hash: bool = True) -> nn.Module:
    """Load a compact checkpoint written by :func:`save_compact`; its 2:4 linears are :class:`Sparse24Linear`.

    The model is rebuilt from ``config.json`` (``AutoConfig``, ``trust_remote_code=False``), then the compact
    modules are swapped in and every tensor is loaded with its stored dtype. Raises
    :class:`CompactFormatError` on a wrong format or version, a hash mismatch, a missing/extra tensor, a wrong
    shape or dtype, or positions that break the 2:4 rule.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    folder = Path(folder)
    cfg = _read_config(folder)
    wpath = folder / cfg["weights_file"]
    if not wpath.is_file():
        raise CompactFormatError(f"{wpath} is missing.")
    if verify_hash and _sha256(wpath) != cfg.get("sha256"):
        raise CompactFormatError(f"{wpath} does not match the SHA-256 in {CONFIG_FILE}: the file is corrupt.")
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise CompactFormatError(f"{wpath} is not a readable safetensors file ({e}).") from None
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    cls = _model_class(config)
    model = cls.from_config(config) if cls is AutoModel else cls(config)
    for rec in cfg["modules"]:
        name, M, K = rec["name"], rec["out_features"], rec["in_features"]
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise CompactFormatError(f"compact module {name!r} does not exist in the model of config.json.") from None
        if type(lin) is not nn.Linear or (lin.out_features, lin.in_features) != (M, K):
            raise CompactFormatError(f"compact module {name!r} ({M}, {K}) does not match the model's {lin}.")
        try:
            values, meta = state.pop(f"{name}.weight_values"), state.pop(f"{name}.weight_meta")
        except KeyError:
            raise CompactFormatError(f"{wpath} lacks the packed tensors of module {name!r}.") from None
        if values.dtype != _DTYPES[rec["dtype"]]:
            raise CompactFormatError(f"values of {name!r} are {values.dtype}, the config says {rec['dtype']}.")
        check_packed_24(values, meta, M, K, name)
        mod = Sparse24Linear(K, M, bias=rec["bias"], dtype=values.dtype, device="meta")
        mod.weight_values, mod.weight_meta = values, meta
        if rec["bias"]:
            bias = state.pop(f"{name}.bias", None)
            if bias is None or tuple(bias.shape) != (M,):
                raise CompactFormatError(f"{wpath} lacks a ({M},) bias of module {name!r}.")
            mod.bias = nn.Parameter(bias, requires_grad=False)
        _set_submodule(model, name, mod)
    expected = model.state_dict()
    for k, v in state.items():
        if k in expected and tuple(expected[k].shape) != tuple(v.shape):
            raise CompactFormatError(f"tensor {k!r} has shape {tuple(v.shape)}, the model needs "
                                     f"{tuple(expected[k].shape)}.")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    compact_keys = {f"{r['name']}.{s}" for r in cfg["modules"] for s in ("weight_values", "weight_meta", "bias")}
    missing = [k for k in missing if k not in compact_keys and k not in cfg["tied"]]
    if missing or unexpected:
        raise CompactFormatError(f"{wpath} does not match config.json: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}.")
    if cfg["tied"] and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.to(device).eval()


#: files of a ``save_pretrained`` folder that :func:`export_compact` copies unchanged (no code: data files only)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")


def export_compact(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Any]:
    """``sparsekit export SRC --format compact --out OUT``: a ``save_pretrained`` folder (safetensors) with 2:4
    linears -> a compact checkpoint. Returns :func:`save_compact`'s report plus the source's safetensors bytes."""
    from transformers import AutoConfig

    src = Path(src_dir)
    config = AutoConfig.from_pretrained(str(src), trust_remote_code=False)
    model = _model_class(config).from_pretrained(str(src), trust_remote_code=False, use_safetensors=True,
                                                 dtype="auto")
    report = save_compact(model, out_dir)
    for f in src.iterdir():  # the tokenizer and generation settings travel with the weights
        if f.is_file() and f.name in TOKENIZER_FILES:
            shutil.copyfile(f, Path(out_dir) / f.name)
    report["src_weights_bytes"] = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    if not report["compact_modules"]:
        log.warning("no linear of %s is exactly 2:4: the export is the dense model", src)
    return report


def tune_decode_(model: nn.Module, tokens: tuple[int, ...] = (1, 2, 4, 8, 16)) -> dict[str, str]:
    """Autotune the decode kernel (every config checked against the reference, the fastest kept) for each
    distinct ``Sparse24Linear`` shape of ``model`` (on CUDA) and token count (a count serves its power-of-2
    bucket: 4 serves 3 and 4); call before capturing CUDA graphs.
    Modules that run on the sparse tensor cores (:func:`sparsekit.kernels.sparse24_mma.supports`) are put in
    the kernel's fragment order and their tile is tuned (:func:`sparsekit.kernels.sparse24_mma.tune`).
    Returns ``{"MxK n=T": config}``."""
    from sparsekit.kernels import sparse24, sparse24_mma

    done: dict[str, str] = {}
    for m in model.modules():
        if isinstance(m, Sparse24Linear):
            mma = sparse24_mma.supports(m.out_features, m.in_features, m.weight_values.dtype, m.weight_values.device)
            if mma and m.layout != "mma":
                m._to_mma_layout_()
            for t in tokens:
                key = f"{m.out_features}x{m.in_features} n={t}"
                if key in done:
                    continue
                if mma:
                    kw, mw = sparse24_mma.tune(*m._fragments(), t)[0]
                    done[key] = f"mma kw={kw} mw={mw}"
                else:
                    done[key] = str(sparse24.tune(*m.compact(), t)[0])
    return done


def tune_prefill_(model: nn.Module, tokens: tuple[int, ...] = (512, 2048), tolerance: float = 0.03,
                  allow_dense_cache: bool = False) -> dict[str, Any]:
    """Time, on the model's CUDA device, each prefill path of every distinct ``Sparse24Linear`` shape against
    cuBLAS dense and set each module's :attr:`Sparse24Linear.prefill` to the fastest (worst ratio over
    ``tokens``). If even that is slower than dense by more than ``tolerance`` and ``allow_dense_cache``, the
    module caches its dense weight (same speed as dense, dense memory). Returns ``{shape: timings and choice}``."""
    from sparsekit.kernels import sparse24

    mods = [m for m in model.modules() if isinstance(m, Sparse24Linear)]
    choices: dict[tuple, dict[str, Any]] = {}
    for m in mods:
        key = (m.out_features, m.in_features, m.weight_values.dtype)
        if key not in choices:
            choices[key] = sparse24.choose_prefill(*m.compact(), tokens, tolerance, allow_dense_cache)
        m.set_prefill(choices[key]["mode"])
    return {f"{k[0]}x{k[1]}": v for k, v in choices.items()}
