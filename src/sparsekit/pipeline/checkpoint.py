"""Per-block checkpoints of a run: atomic files, a fingerprint of what determines the result, and
``progress.json`` written last as the commit point (see :mod:`sparsekit.pipeline.run`).

Integrity (issue 15): the SHA-256 of every file is recorded in ``progress.json`` when its block commits and
checked when it is loaded; a missing, truncated, corrupted or misplaced file, or an empty or invalid
``progress.json``, is a :class:`~sparsekit.errors.CheckpointError` that names the file and the fix. Only the last
block's activations are kept, so a checkpoint with a bad file cannot be continued from an earlier block: the fix
is to delete the checkpoint folder and run the job again. The model is left untouched until every file a resume
needs has been verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from sparsekit.errors import CheckpointError, InputError
from sparsekit.pipeline.blocks import LayerPlan
from sparsekit.pipeline.config import PruneConfig
from sparsekit.pipeline.fingerprint import setup_digest, weight_digests
from sparsekit.pipeline.lazy import LazyWeights
from sparsekit.pipeline.report import LayerReport, atomic_write_bytes, atomic_write_text

__all__ = ["PROGRESS_FILE", "CHECKPOINT_SUBDIR", "CKPT_VERSION", "Checkpointer", "Fingerprint", "fingerprint",
           "check_writable", "rollback_on_error"]

#: Names of the checkpoint files inside ``checkpoint_dir``.
PROGRESS_FILE = "progress.json"
CHECKPOINT_SUBDIR = "checkpoints"
CKPT_VERSION = 2

_RESTART = "delete the checkpoint folder and run the job again (prune_model_ without resume=True discards it too)"


def check_writable(directory: "str | os.PathLike[str]", what: str) -> None:
    """Fail before any work, not after the first block, if ``directory`` could not be created and written:
    a probe file is written and deleted in it, or in its nearest existing parent if it does not exist yet
    (nothing is left behind). :class:`InputError` naming ``what`` (e.g. ``"--out"``)."""
    d = Path(directory).absolute()
    base = d
    while not base.exists() and base.parent != base:
        base = base.parent
    probe = base / f".sparsekit-probe-{uuid.uuid4().hex}"
    try:
        if not base.is_dir():
            raise NotADirectoryError(f"{base} is a file")
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as e:
        raise InputError(f"{what} {d} cannot be written ({e}); choose another {what}.") from None


def _atomic_torch_save(obj: Any, path: Path) -> str:
    """Write ``obj`` to ``path`` atomically; returns the SHA-256 of the bytes written."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    """What determines a run's result: ``setup`` (config, pattern specs, plan, calibration tokens) and the
    digest of every weight tensor (:mod:`sparsekit.pipeline.fingerprint`)."""

    setup: str
    weights: dict[str, str]


def fingerprint(
    model: nn.Module, config: PruneConfig, input_ids: Tensor, attention_mask: Tensor | None, plans: list[list[LayerPlan]]
) -> Fingerprint:
    """The :class:`Fingerprint` of a run, taken before it changes any weight."""
    return Fingerprint(setup_digest(model, config, input_ids, attention_mask, plans), weight_digests(model))


@contextlib.contextmanager
def rollback_on_error(plans: list[LayerPlan]) -> Iterator[None]:
    """Restore the block's linears to their weights on entry if the body raises (an aborted block leaves the
    model as it was before the block, so that a resume in the same process continues from the checkpoint).
    Keeps one block's weights on the host."""
    saved = {p.name: p.module.weight.detach().to("cpu", copy=True) for p in plans if not p.skipped}
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for p in plans:
                if p.name in saved:
                    p.module.weight.copy_(saved[p.name])
        raise


class Checkpointer:
    """Per-block checkpoints in one directory; ``progress.json`` is written last and is the commit point."""

    def __init__(self, directory: "str | os.PathLike[str]", fingerprint: Fingerprint):
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.files: dict[str, str] = {}  # file name -> SHA-256 of the committed files

    def _block(self, i: int) -> Path:
        return self.dir / f"block_{i:04d}.pt"

    def _acts(self, i: int) -> Path:
        return self.dir / f"acts_{i:04d}.pt"

    def exists(self) -> bool:
        return (self.dir / PROGRESS_FILE).exists()

    def state(self) -> dict[str, Any] | None:
        """The committed ``progress.json`` (``None`` if there is none); :class:`CheckpointError` if it is empty,
        not JSON, or lacks what a resume needs."""
        p = self.dir / PROGRESS_FILE
        if not p.exists():
            return None
        try:
            state = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{p} is empty or not valid JSON ({e}); {_RESTART}.") from None
        if isinstance(state, dict) and state.get("version") != CKPT_VERSION:
            raise CheckpointError(f"{p} was not written by this version of sparsekit; {_RESTART}.")
        ok = isinstance(state, dict) and isinstance(state.get("last_block"), int) and state["last_block"] >= 0
        ok = ok and isinstance(state.get("layers"), list) and isinstance(state.get("files"), dict)
        if not (ok and isinstance(state.get("weights"), dict)):
            raise CheckpointError(f"{p} lacks the fields of a sparsekit checkpoint; {_RESTART}.")
        return state

    def clear(self) -> None:
        if not self.dir.exists():
            return
        for f in self.dir.iterdir():
            if f.name == PROGRESS_FILE or re.fullmatch(r"(block|acts)_\d{4}\.pt(\.tmp)?|progress\.json\.tmp", f.name):
                f.unlink()

    def save(self, i: int, weights: dict[str, Tensor], acts: list[Tensor], all_reports: list[LayerReport],
             extra: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.files[self._block(i).name] = _atomic_torch_save({"block": i, "weights": weights}, self._block(i))
        self.files[self._acts(i).name] = _atomic_torch_save({"block": i, "hidden": [a.cpu() for a in acts]},
                                                            self._acts(i))
        self.files.pop(self._acts(i - 1).name, None)
        state = {
            "version": CKPT_VERSION,
            "fingerprint": self.fingerprint.setup,
            "weights": self.fingerprint.weights,
            "last_block": i,
            "files": dict(self.files),
            "layers": [r.to_dict() for r in all_reports],
            **extra,
        }
        atomic_write_text(self.dir / PROGRESS_FILE, json.dumps(state, indent=1, allow_nan=False))
        if i > 0 and self._acts(i - 1).exists():
            self._acts(i - 1).unlink()  # only the last block's outputs are needed to continue

    def _load(self, path: Path, block: int, key: str) -> Any:
        """Read ``path``, check its SHA-256 against progress.json and that it holds ``block``; its ``key``."""
        want = self.files.get(path.name)
        if want is None:
            raise CheckpointError(f"progress.json in {self.dir} records no {path.name}; {_RESTART}.")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing (progress.json records it); {_RESTART}.") from None
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            raise CheckpointError(
                f"{path} is corrupted or truncated: its SHA-256 {got[:16]}... differs from {want[:16]}... recorded "
                f"in progress.json ({len(data)} bytes); {_RESTART}."
            )
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable payload is a bad checkpoint
            raise CheckpointError(f"{path} cannot be read ({e}); {_RESTART}.") from None
        if not isinstance(obj, dict) or obj.get("block") != block or key not in obj:
            raise CheckpointError(f"{path} does not hold block {block}'s {key}; {_RESTART}.")
        return obj[key]

    def load_block(self, i: int) -> dict[str, Tensor]:
        return self._load(self._block(i), i, "weights")

    def load_acts(self, i: int) -> list[Tensor]:
        return self._load(self._acts(i), i, "hidden")

    def restore(self, model: nn.Module, state: dict[str, Any], num_blocks: int) -> tuple[int, list[Tensor] | None]:
        """Check that ``state`` was made by this run (:class:`CheckpointError` if not), verify every file, then
        copy the finished blocks' weights into ``model``. Returns ``(last finished block, its outputs or None
        when no block is left)``. The model is untouched when this raises.

        The model may be the dense one (a new process) or the one an aborted run left (the same process): a
        weight that differs from the recorded dense digest must equal its checkpointed pruned value. A lazily
        loaded model's finished blocks are materialised one at a time, given their checkpointed weights, written
        to its work folder and freed (:meth:`LazyWeights.block`).
        """
        if state.get("fingerprint") != self.fingerprint.setup:
            raise CheckpointError(
                f"the checkpoint in {self.dir} was made with another model, config or calibration; delete it or "
                "run without resume."
            )
        dense = state["weights"]
        now = self.fingerprint.weights
        changed = {n for n in now if dense.get(n) != now[n]}
        if set(dense) != set(now):
            changed |= set(dense) ^ set(now)
        self.files = {str(k): str(v) for k, v in state["files"].items()}
        last = int(state["last_block"])
        if last >= num_blocks:
            raise CheckpointError(f"{self.dir / PROGRESS_FILE} records block {last} of a {num_blocks}-block run; "
                                  f"{_RESTART}.")
        params = dict(model.named_parameters())
        lazy = LazyWeights.of(model)
        for i in range(last + 1):  # verify everything before touching the model
            for name, w in self.load_block(i).items():
                key = name + ".weight"
                if key in changed and key in params and torch.equal(
                        (lazy.read(key) if lazy is not None else params[key].detach()).cpu(), w):
                    changed.discard(key)  # pruned by the aborted run in this process: the checkpointed value
        if changed:
            raise CheckpointError(
                f"the checkpoint in {self.dir} was made with another model (weights differ: "
                f"{', '.join(sorted(changed)[:3])}{', ...' if len(changed) > 3 else ''}); delete it or run without "
                "resume."
            )
        hidden = self.load_acts(last) if last + 1 < num_blocks else None
        mods = dict(model.named_modules())
        with torch.no_grad():
            for i in range(last + 1):
                weights = self.load_block(i)
                with lazy.block(i, "cpu") if lazy is not None else contextlib.nullcontext():
                    for name, w in weights.items():
                        mods[name].weight.copy_(w)
        return last, hidden
