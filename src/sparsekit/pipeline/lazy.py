"""Models larger than host memory: a skeleton whose blocks are read from the safetensors shards one at a time
(issue 18).

:func:`sparsekit.data.load_model_lazy` builds the model from its config under :func:`empty_parameters` (every
parameter on the ``meta`` device: shapes and dtypes, no memory; buffers such as rotary tables computed as usual)
and attaches a :class:`LazyWeights` to it. The parts outside the blocks (embeddings, final norm, LM head) are
then read from the shards; each block's parameters stay on ``meta`` until
:func:`~sparsekit.pipeline.prune_model_` reaches it:

- :meth:`LazyWeights.block` materialises block ``i`` on the device that prunes it, reading only that block's
  tensors from the shards (each shard opened, read and closed per block), and on leaving writes the pruned block
  to its own safetensors file in a work folder (atomically) and puts its parameters back on ``meta``, then runs
  ``gc.collect()`` and glibc's ``malloc_trim(0)`` so that host memory stays flat from block to block
  (``sparsekit prune --low-memory`` also calls :func:`fix_mmap_threshold`, a process-wide setting left to the
  caller of the library, which keeps glibc from moving a block's large temporaries onto a fragmenting heap);
- :meth:`LazyWeights.read` reads one tensor as the model holds it (from the work folder for a block written
  there, else from the shards): the resume fingerprint hashes a lazy model's blocks through it, one tensor at a
  time (:func:`sparsekit.pipeline.fingerprint.weight_digests`), and a resume rebuilds finished blocks with it
  (:meth:`sparsekit.pipeline.checkpoint.Checkpointer.restore`);
- :meth:`LazyWeights.save` (through :func:`~sparsekit.pipeline.save_pruned`) writes the output shard by shard:
  one file per block (the work folder's file, hard-linked when it can be) and one for the rest, and
  ``model.safetensors.index.json`` last, every file through a temporary name and ``os.replace``. The tensors
  written are those a ``save_pretrained`` of the whole model would write (tied copies once), in the model's
  dtype, so ``transformers.AutoModel*.from_pretrained`` loads the folder.

A block's values are those the whole-model loader gives (the same tensors converted to the same dtype), so a
lazy run prunes bit for bit as a whole-model run does (``tests/test_lazy.py``). Every shard the index names is
opened when the model is attached (a missing, truncated or corrupt file, or a tensor the model needs and no
shard holds, is a :class:`~sparsekit.errors.ShardError` naming the file before any work).

Under ``torchrun`` every rank materialises the block being pruned (its linears' work is spread over the ranks);
rank 0 alone writes the work folder (:attr:`LazyWeights.writer`). The other ranks free the pruned blocks
unwritten: on a ``--resume`` with held-out regularisation they read the finished blocks, which the held-out slice
runs through again, from the shards with the checkpointed weights (:meth:`LazyWeights.block`'s ``weights``), and
:meth:`LazyWeights.save` refuses to run on them.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import json
import logging
import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from sparsekit.errors import InputError, ShardError
from sparsekit.pipeline.blocks import find_blocks
from sparsekit.pipeline.report import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["SHARD_INDEX", "MMAP_THRESHOLD", "LazyWeights", "empty_parameters", "fix_mmap_threshold",
           "release_memory", "safetensors_files", "write_safetensors"]

#: The index of a sharded safetensors checkpoint (``weight_map``: tensor name -> file name).
SHARD_INDEX = "model.safetensors.index.json"
_ATTR = "_sparsekit_lazy"  # the model attribute holding its LazyWeights
#: safetensors dtype names (the format's header strings)
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_FIX = "copy the model folder again (or load the whole model: --no-low-memory)"


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Inside the context every parameter a module registers is moved to the ``meta`` device (no memory, no
    initialisation cost); buffers stay where they are created, so tables computed in ``__init__`` (rotary
    frequencies) are real. (The idea of ``accelerate.init_empty_weights``.)"""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(self, name, param)
        p = self._parameters.get(name)
        if p is not None and p.device.type != "meta":
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


#: glibc ``mallopt`` parameter number of ``M_MMAP_THRESHOLD`` (malloc.h)
_M_MMAP_THRESHOLD = -3
#: allocations from this size up get their own mapping, returned to the system when freed (glibc's default start)
MMAP_THRESHOLD = 128 << 10


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc
        return None


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the system (glibc ``malloc_trim(0)``; a no-op
    elsewhere): without it, freed blocks stay in the allocator's arenas and the resident size creeps up."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def fix_mmap_threshold() -> None:
    """Keep glibc's mmap threshold at :data:`MMAP_THRESHOLD` for the process (``mallopt(M_MMAP_THRESHOLD)``; a
    no-op elsewhere). glibc raises the threshold each time a mapped chunk is freed (up to 32 MiB), after which
    a block's temporaries come from the heap and fragment it: measured on the CPU benchmark
    (``benchmarks/lazy_memory.py``), the peak then grew by a block's working memory every few blocks. With the
    threshold fixed every large temporary is mapped and unmapped, and the peak stays flat (0.82 instead of
    0.99 GiB after 4 blocks there, at the same speed). Process-wide and irreversible: the CLI calls it for
    ``--low-memory``; a library caller decides."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def safetensors_files(folder: "str | os.PathLike[str]") -> list[Path]:
    """The ``*.safetensors`` files of a model folder (empty when it has none)."""
    return sorted(Path(folder).glob("*.safetensors"))


def write_safetensors(path: Path, tensors: Sequence[tuple[str, Tensor, Callable[[], Tensor]]]) -> int:
    """Write a safetensors file atomically (a synced temporary file renamed over ``path``), one tensor in memory
    at a time: ``tensors`` are ``(name, like, fetch)`` with ``like`` giving the dtype and shape (a ``meta``
    tensor will do) and ``fetch()`` the values. Returns the bytes of tensor data written.

    The format: an 8-byte little-endian header length, a JSON header (``{name: {dtype, shape, data_offsets}}``
    and ``__metadata__ {"format": "pt"}``, space-padded to a multiple of 8 bytes), then the tensors' bytes in
    order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, like, _ in tensors:
        nbytes = like.numel() * like.element_size()
        header[name] = {"dtype": _ST_DTYPES[like.dtype], "shape": list(like.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name, like, fetch in tensors:
            t = fetch().detach()
            if t.dtype != like.dtype or t.shape != like.shape:
                raise RuntimeError(f"{name}: got {t.dtype} {tuple(t.shape)}, declared {like.dtype} {tuple(like.shape)}")
            f.write(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return offset


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src`` atomically: a hard link when the file system allows, else a copy."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)


class _Shards:
    """Where each tensor of a safetensors checkpoint is: ``file[key]`` and its header's ``shape[key]``."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        self.safe_open = safe_open
        index = folder / SHARD_INDEX
        self.index = index if index.is_file() else None
        if self.index is not None:
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                named = {str(k): folder / str(v) for k, v in weight_map.items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise ShardError(f"{index} is not a safetensors index with a weight_map ({e}); {_FIX}.") from None
            files = sorted(set(named.values()))
        else:
            files = safetensors_files(folder)
            if not files:
                raise ShardError(f"{folder} holds no safetensors weights (model.safetensors, or shards with "
                                 f"{SHARD_INDEX}); low-memory loading reads safetensors only: load the whole model "
                                 "(--no-low-memory).")
            named = {}
        shapes: dict[Path, dict[str, tuple[int, ...]]] = {}  # file -> its header's tensors and shapes
        for path in files:
            with self.open(path) as f:
                shapes[path] = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        self.file: dict[str, Path] = named  # the index decides where a tensor is
        for key, path in named.items():
            if key not in shapes[path]:
                raise ShardError(f"{self.index} places {key} in {path}, which does not hold it; {_FIX}.")
        for path, held in shapes.items() if self.index is None else ():
            for key in held:
                if key in self.file:
                    raise ShardError(f"{key} is in both {self.file[key]} and {path}; {_FIX}.")
                self.file[key] = path
        self.shape = {key: shapes[path][key] for key, path in self.file.items()}

    @contextlib.contextmanager
    def open(self, path: Path) -> Iterator[Any]:
        """``safe_open(path)``; a missing, truncated or corrupt file is a :class:`ShardError` naming it."""
        where = f" (named in {self.index})" if self.index is not None else ""
        try:
            handle = self.safe_open(str(path), framework="pt", device="cpu")
        except FileNotFoundError:
            raise ShardError(f"{path} is missing{where}; {_FIX}.") from None
        except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
            raise ShardError(f"{path} is not a readable safetensors file ({e}): it is truncated or corrupt; "
                             f"{_FIX}.") from None
        with handle as f:
            yield f

    def read(self, path: Path, keys: Sequence[str]) -> Iterator[Tensor]:
        """The tensors ``keys`` of one file, in order (the file opened once)."""
        with self.open(path) as f:
            for key in keys:
                try:
                    yield f.get_tensor(key)
                except Exception as e:  # noqa: BLE001
                    raise ShardError(f"{path}: cannot read {key} ({e}); {_FIX}.") from None


class LazyWeights:
    """The weights of a model whose blocks live in safetensors shards until they are worked on (module
    docstring). Made by :meth:`attach`; :meth:`of` finds it from the model."""

    def __init__(self, model: nn.Module, folder: Path, work_dir: "str | os.PathLike[str] | None"):
        self.folder = folder
        self.shards = _Shards(folder)
        self.blocks_path, self.blocks = find_blocks(model)
        prefix = f"{self.blocks_path}." if self.blocks_path else ""
        base = getattr(model, "base_model_prefix", "") or ""
        # every name of the state dict -> its tensor (tied parameters appear under each of their names)
        self.tensors: dict[str, Tensor] = dict(model.named_parameters(remove_duplicate=False))
        self.key: dict[str, str] = {}  # state-dict name -> the shards' name
        saved: list[str] = []  # what a save writes: one name per parameter object, every persistent buffer
        groups: dict[int, list[str]] = {}
        for name, p in self.tensors.items():
            groups.setdefault(id(p), []).append(name)
        for group in groups.values():  # a tie group is read and written under the first name the shards hold
            held = [(n, k) for n in group if (k := self._source_key(n, base)) is not None]
            if not held:
                raise ShardError(
                    f"{group[0]} of {type(model).__name__} is in none of the safetensors files of {folder}"
                    + (f" (their index: {self.shards.index})" if self.shards.index else "")
                    + "; the folder is incomplete, or this architecture renames its weights when loading: load "
                    "the whole model (--no-low-memory)."
                )
            self.key.update({n: held[0][1] for n in group})
            saved.append(held[0][0])
        for mod_name, mod in model.named_modules():
            for b, t in mod._buffers.items():
                if t is not None and b not in mod._non_persistent_buffers_set:
                    name = f"{mod_name}.{b}" if mod_name else b
                    self.tensors[name] = t
                    saved.append(name)
                    if (key := self._source_key(name, base)) is not None:
                        self.key[name] = key  # (a persistent buffer the shards lack keeps its computed value)
        for name, key in self.key.items():
            want, got = tuple(self.tensors[name].shape), self.shards.shape[key]
            if want != got:
                raise ShardError(f"{self.shards.file[key]} holds {key} with shape {list(got)} but "
                                 f"{type(model).__name__} expects {list(want)}; {_FIX}.")
        self.saved = set(saved)
        block_of = re.compile(rf"{re.escape(prefix)}(\d+)\.")
        self.block_of: dict[str, int | None] = {}
        self.block_names: list[list[str]] = [[] for _ in self.blocks]
        self.rest_names: list[str] = []
        for name in self.tensors:
            m = block_of.match(name)
            self.block_of[name] = int(m.group(1)) if m else None
            (self.block_names[int(m.group(1))] if m else self.rest_names).append(name)
        self.writer = True  # writes finished blocks to the work folder (rank 0 alone under torch.distributed)
        if work_dir is not None:
            Path(work_dir).mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="sparsekit-lazy-", dir=work_dir))
        weakref.finalize(self, shutil.rmtree, self.work, True)
        self._written: set[int] = set()  # blocks whose current values are in the work folder
        self._dropped: set[int] = set()  # blocks changed and then freed unwritten (not the writer)

    def _source_key(self, name: str, base: str) -> str | None:
        """The shards' name of the model's tensor ``name``: the same, or without/with the base model's prefix
        (a checkpoint of ``LlamaModel`` read into ``LlamaForCausalLM`` and back)."""
        cands = [name]
        if base:
            cands.append(name[len(base) + 1:] if name.startswith(base + ".") else f"{base}.{name}")
        return next((k for k in cands if k in self.shards.file), None)

    @classmethod
    def attach(cls, model: nn.Module, folder: "str | os.PathLike[str]",
               work_dir: "str | os.PathLike[str] | None" = None) -> nn.Module:
        """Make ``model`` (built under :func:`empty_parameters`) a lazily loaded model of the checkpoint in
        ``folder``: check every shard and tensor, read the parts outside the blocks and every persistent buffer.
        ``work_dir``: where finished blocks are written until the model is saved (a temporary folder inside it,
        removed when the model is garbage-collected; default: the system's temporary folder — put it on the
        output's file system, so that saving links the files instead of copying them). Returns ``model``."""
        lazy = cls(model, Path(folder), work_dir)
        buffers = [n for names in lazy.block_names for n in names if not isinstance(lazy.tensors[n], nn.Parameter)]
        lazy._read_into(lazy._unique([*lazy.rest_names, *buffers]), torch.device("cpu"))
        setattr(model, _ATTR, lazy)
        log.info("lazily loaded %s from %s: its %d blocks stay on disk until worked on", type(model).__name__,
                 folder, len(lazy.blocks))
        return model

    @staticmethod
    def of(model: nn.Module) -> "LazyWeights | None":
        """The :class:`LazyWeights` of a lazily loaded model, ``None`` for any other model."""
        return getattr(model, _ATTR, None)

    def _unique(self, names: Sequence[str]) -> list[str]:
        """``names`` with one name per tensor object (a tied parameter once)."""
        seen: set[int] = set()
        out = []
        for n in names:
            if id(self.tensors[n]) not in seen:
                seen.add(id(self.tensors[n]))
                out.append(n)
        return out

    def _spill(self, i: int) -> Path:
        return self.work / f"block_{i:05d}.safetensors"

    def _set(self, name: str, value: Tensor | None, device: torch.device) -> None:
        """Put ``value`` (converted to the tensor's dtype), or the tensor itself, on ``device`` into the model's
        tensor ``name``, keeping the tensor object (ties, hooks and references to it stay valid)."""
        t = self.tensors[name]
        if value is None:
            if t.device == device:
                return
            value = torch.empty_like(t, device="meta") if device.type == "meta" else t.detach()
        new = value.to(device=device, dtype=t.dtype)
        torch.utils.swap_tensors(t, nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter)
                                 else new)

    def _read_into(self, names: Sequence[str], device: torch.device) -> None:
        """Read the tensors ``names`` (one per tensor object) from the work folder or the shards onto ``device``."""
        files: dict[Path, tuple[list[str], list[str]]] = {}
        for n in names:
            i = self.block_of[n]
            if i is not None and i in self._written:
                path, key = self._spill(i), n
            elif n in self.key:
                path, key = self.shards.file[self.key[n]], self.key[n]
            else:
                continue  # a persistent buffer the shards lack
            files.setdefault(path, ([], []))
            files[path][0].append(n)
            files[path][1].append(key)
        with torch.no_grad():
            for path, (ns, keys) in files.items():
                for n, t in zip(ns, self.shards.read(path, keys)):
                    self._set(n, t, device)

    def read(self, name: str) -> Tensor:
        """The model's tensor ``name`` as it holds it now, in its dtype: in memory if materialised, else read
        from the work folder (a block written there) or the shards onto the CPU."""
        t = self.tensors[name]
        if t.device.type != "meta":
            return t.detach()
        i = self.block_of[name]
        path, key = ((self._spill(i), name) if i is not None and i in self._written
                     else (self.shards.file[self.key[name]], self.key[name]))
        (v,) = self.shards.read(path, [key])
        return v.to(t.dtype)

    @contextlib.contextmanager
    def block(self, i: int, device: "str | torch.device", changed: bool = True,
              weights: "Mapping[str, Tensor] | None" = None) -> Iterator[nn.Module]:
        """Block ``i`` materialised on ``device`` for the body (its current values: from the work folder if it was
        written there, else from the shards), its buffers moved there. On leaving, if ``changed`` and the body
        raised nothing, the writer writes the block to the work folder; then its parameters go back to ``meta``,
        its buffers to the CPU, and the host memory is released (:func:`release_memory`).

        ``weights``: values (by parameter name) put into the block once it is read: the pruned linears of a
        finished block from a checkpoint. A block that this rank changed and freed unwritten (not the writer)
        opens only with them (its values are then the shards' and these): on a resume under ``torch.distributed``
        every rank runs the held-out slice through the finished blocks (:meth:`HeldOut.resume`)."""
        if i in self._dropped and weights is None:
            raise RuntimeError(f"block {i} was changed and freed unwritten on this rank (not the writer): it cannot "
                               "be read back without its changed weights")
        device = torch.device(device)
        names = self._unique(self.block_names[i])
        params = [n for n in names if isinstance(self.tensors[n], nn.Parameter)]
        ok = False
        try:
            self._read_into(params, device)
            for n, w in (weights or {}).items():
                self._set(n, w, device)
            for n in names:
                if n not in params:
                    self._set(n, None, device)
            yield self.blocks[i]
            ok = True
        finally:
            try:
                if ok and changed:
                    if self.writer:
                        self._write(self._spill(i), self.block_names[i])
                        self._written.add(i)
                    else:
                        self._dropped.add(i)
            finally:
                for n in names:
                    self._set(n, None, torch.device("meta" if n in params else "cpu"))
                release_memory()

    def _write(self, path: Path, names: Sequence[str]) -> int:
        return write_safetensors(path, [(n, self.tensors[n], functools.partial(self.read, n))
                                        for n in names if n in self.saved])

    def save(self, out_dir: "str | os.PathLike[str]") -> list[Path]:
        """Write the model's weights to ``out_dir``: ``model-KKKKK-of-NNNNN.safetensors``, one per block and the
        last for the rest, then ``model.safetensors.index.json``; older ``model*.safetensors`` files there are
        removed. A block written to the work folder is linked (or copied) from it, the others are written one
        tensor at a time. Returns the files written (the index last)."""
        out = Path(out_dir)
        if self._dropped:
            raise InputError(f"this rank pruned blocks ({', '.join(map(str, sorted(self._dropped)[:3]))}, ...) without "
                             "keeping them: under torch.distributed rank 0 alone writes the pruned blocks; save on "
                             "rank 0 (sparsekit.pipeline.distributed.is_lead()).")
        if out.resolve() == self.folder.resolve():
            raise InputError(f"cannot save a lazily loaded model over the folder it reads its blocks from ({out}); "
                             "choose another output folder.")
        out.mkdir(parents=True, exist_ok=True)
        n = len(self.blocks) + 1
        files = [out / f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
        weight_map: dict[str, str] = {}
        total = 0
        for i, (path, names) in enumerate(zip(files, [*self.block_names, self.rest_names])):
            kept = [m for m in names if m in self.saved]
            in_memory = any(isinstance(t, nn.Parameter) and t.device.type != "meta"
                            for t in (self.tensors[m] for m in names))
            if i in self._written and not in_memory:  # (the rest, i == len(blocks), is never written)
                _link_or_copy(self._spill(i), path)
                total += sum(self.tensors[m].numel() * self.tensors[m].element_size() for m in kept)
            else:
                total += self._write(path, kept)
            weight_map.update({m: path.name for m in kept})
        index = out / SHARD_INDEX
        atomic_write_text(index, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        keep = {p.name for p in files}
        for old in out.glob("model*.safetensors"):
            if old.name not in keep:
                old.unlink()
        return [*files, index]
