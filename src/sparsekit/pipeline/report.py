"""What a run reports: :class:`LayerReport` per linear, :class:`ModelReport` per model, and the
:class:`Progress` events passed to a ``progress_fn`` while it runs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import Tensor

__all__ = ["REPORT_FILE", "LayerReport", "ModelReport", "Progress", "ProgressFn", "atomic_write_bytes", "atomic_write_text",
           "jsonable"]

#: The report's file name in a saved model's folder.
REPORT_FILE = "sparsekit_report.json"

def atomic_write_bytes(path: Path, data: "bytes | memoryview") -> None:
    """Write ``data`` to ``path`` atomically (a synced temporary file renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return jsonable(obj.item() if obj.numel() == 1 else obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN/Inf: a value that is not a number is reported as missing
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


@dataclass
class LayerReport:
    """One linear: what was done and how well. ``loss`` is the relative output error through its H."""

    name: str
    block: int
    shape: tuple[int, int]  # (M, K)
    pattern: str
    method: str
    status: str  # "pruned" | "skipped"
    loss: float | None = None
    time_s: float = 0.0
    damp: float | None = None
    tokens: int = 0
    sparsity: float | None = None
    note: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return jsonable(d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerReport":
        d = dict(d)
        d["shape"] = tuple(d["shape"])
        return cls(**d)


@dataclass
class ModelReport:
    """What :func:`prune_model_` did, layer by layer; serialises to JSON (``to_json``) and to a text table."""

    model: str
    blocks_path: str
    num_blocks: int
    config: dict[str, Any]
    calibration: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    time_s: float = 0.0
    resumed_blocks: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pruned(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status == "pruned"]

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("model", "blocks_path", "num_blocks", "config", "calibration")}
        d.update(time_s=self.time_s, resumed_blocks=self.resumed_blocks, extra=self.extra)
        d = jsonable(d)
        d["layers"] = [r.to_dict() for r in self.layers]
        return d

    def to_json(self, path: "str | os.PathLike[str] | None" = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False)
        if path is not None:
            atomic_write_text(Path(path), text)
        return text

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelReport":
        d = dict(d)
        d["layers"] = [LayerReport.from_dict(r) for r in d.get("layers", [])]
        return cls(**d)

    def format_table(self) -> str:
        """A fixed-width table: one line per linear, then totals."""
        w = max([len(r.name) for r in self.layers] + [5])
        lines = [f"{'layer':<{w}}  {'shape':>11}  {'pattern':<8} {'method':<12} {'loss':>8} {'damp':>8} {'time':>7}"]
        for r in self.layers:
            shape = f"{r.shape[0]}x{r.shape[1]}"
            loss = f"{r.loss:8.2%}" if r.loss is not None else f"{'-':>8}"
            damp = f"{r.damp:8.2g}" if r.damp is not None else f"{'-':>8}"
            line = f"{r.name:<{w}}  {shape:>11}  {r.pattern:<8} {r.method:<12} {loss} {damp} {r.time_s:6.2f}s"
            if r.status != "pruned" or r.note:
                line += f"  [{r.status}{': ' + r.note if r.note else ''}]"
            lines.append(line)
        pr = self.pruned
        if pr:
            lines.append(
                f"{len(pr)} linears pruned ({len(self.layers) - len(pr)} skipped) in {self.num_blocks} blocks, "
                f"mean loss {self.mean_loss:.1%}, pruning time {sum(r.time_s for r in pr):.1f}s, total {self.time_s:.1f}s"
            )
        return "\n".join(lines)

    @property
    def mean_loss(self) -> float | None:
        """Mean relative output error over the pruned linears (``None`` if none was pruned)."""
        pr = self.pruned
        return sum(r.loss or 0.0 for r in pr) / len(pr) if pr else None


@dataclass(frozen=True)
class Progress:
    """A progress event passed to ``progress_fn``.

    ``event`` is one of ``"start"`` (``block`` = first block to run), ``"block_start"``, ``"layer_start"``
    (``hessian`` holds the layer's H: read it, do not keep or modify it), ``"layer_done"`` (``report`` set),
    ``"block_done"`` (the block's checkpoint, if any, is already on disk), ``"message"`` (from a long-running
    method) and ``"done"``. An exception raised by ``progress_fn`` aborts the run; finished blocks stay
    checkpointed.
    """

    event: str
    block: int
    num_blocks: int
    layer: str | None = None
    layer_index: int = 0  # index of the layer among the block's planned linears
    num_layers: int = 0  # linears planned in this block (pruned + skipped)
    report: LayerReport | None = None
    hessian: Tensor | None = None
    message: str = ""


ProgressFn = Callable[[Progress], None]
