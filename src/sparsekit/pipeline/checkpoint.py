"""Per-block checkpoints of a run: atomic files, a fingerprint of what determines the result, and
``progress.json`` written last as the commit point (see :mod:`sparsekit.pipeline.run`)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparsekit.errors import InputError
from sparsekit.pipeline.blocks import LayerPlan
from sparsekit.pipeline.config import PruneConfig, pattern_name
from sparsekit.pipeline.report import LayerReport, atomic_write_text

__all__ = ["PROGRESS_FILE", "CHECKPOINT_SUBDIR", "CKPT_VERSION", "Checkpointer", "fingerprint"]

#: Names of the checkpoint files inside ``checkpoint_dir``.
PROGRESS_FILE = "progress.json"
CHECKPOINT_SUBDIR = "checkpoints"
CKPT_VERSION = 1

def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fingerprint(
    model: nn.Module, config: PruneConfig, input_ids: Tensor, attention_mask: Tensor | None, plans: list[list[LayerPlan]]
) -> str:
    """Hash of what determines the result: config, calibration tokens, layer plan and a sample of the weights."""
    h = hashlib.sha256()
    h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    h.update(f"batch_size={config.batch_size}".encode())  # the activations are stored per batch
    h.update(f"row_parts={config.row_parts}".encode())  # the row parts of a distributed run
    h.update(type(model).__name__.encode())
    for t in (input_ids, attention_mask):
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for bp in plans:
        for p in bp:
            h.update(f"{p.name}|{p.method}|{pattern_name(p.pattern)}|{p.skip_reason}".encode())
    for name, t in model.state_dict().items():
        # a sample of every tensor: cheap, and catches another checkpoint of the same architecture
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()


class Checkpointer:
    """Per-block checkpoints in one directory; ``progress.json`` is written last and is the commit point."""

    def __init__(self, directory: "str | os.PathLike[str]", fingerprint: str):
        self.dir = Path(directory)
        self.fingerprint = fingerprint

    def _block(self, i: int) -> Path:
        return self.dir / f"block_{i:04d}.pt"

    def _acts(self, i: int) -> Path:
        return self.dir / f"acts_{i:04d}.pt"

    def state(self) -> dict[str, Any] | None:
        p = self.dir / PROGRESS_FILE
        if not p.exists():
            return None
        return json.loads(p.read_text())

    def clear(self) -> None:
        if not self.dir.exists():
            return
        for f in self.dir.iterdir():
            if f.name == PROGRESS_FILE or re.fullmatch(r"(block|acts)_\d{4}\.pt(\.tmp)?|progress\.json\.tmp", f.name):
                f.unlink()

    def save(self, i: int, weights: dict[str, Tensor], acts: list[Tensor], all_reports: list[LayerReport],
             extra: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save({"block": i, "weights": weights}, self._block(i))
        _atomic_torch_save({"block": i, "hidden": [a.cpu() for a in acts]}, self._acts(i))
        state = {
            "version": CKPT_VERSION,
            "fingerprint": self.fingerprint,
            "last_block": i,
            "layers": [r.to_dict() for r in all_reports],
            **extra,
        }
        atomic_write_text(self.dir / PROGRESS_FILE, json.dumps(state, indent=1))
        if i > 0 and self._acts(i - 1).exists():
            self._acts(i - 1).unlink()  # only the last block's outputs are needed to continue

    def load_block(self, i: int) -> dict[str, Tensor]:
        return torch.load(self._block(i), map_location="cpu", weights_only=True)["weights"]

    def load_acts(self, i: int) -> list[Tensor]:
        p = self._acts(i)
        if not p.exists():
            raise InputError(f"checkpoint {self.dir} lacks {p.name} (the outputs of block {i}); cannot resume.")
        return torch.load(p, map_location="cpu", weights_only=True)["hidden"]
