"""What to prune and how: :class:`PruneConfig` (default pattern/method/options) and per-layer :class:`Rule` s."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from sparsekit.hessian import DEFAULT_DAMP, as_device, check_damp
from sparsekit.errors import InputError
from sparsekit.memory import parse_bytes
from sparsekit.parallel import parse_devices
from sparsekit.patterns import Pattern
from sparsekit.pruners import METHODS
from sparsekit.regularize import _check_grid

__all__ = ["DEFAULT_METHOD", "DEFAULT_OPTIONS", "DEFAULT_PATTERN", "SKIP", "Rule", "PruneConfig", "pattern_name"]

#: The method `sparsekit prune` uses by default: the most accurate one that runs in reasonable time on a CPU
#: (True OBS, largest-first, 16 scopes per step: 25-31% below SparseGPT's loss on MiniLM layers; the built-in
#: MiniLM job takes a few minutes on 2 CPU cores). Its options apply when ``--method`` is left at the default.
DEFAULT_METHOD = "true-obs"
DEFAULT_OPTIONS: dict[str, Any] = dict(METHODS[DEFAULT_METHOD].options)
DEFAULT_PATTERN = "2:4"
#: A rule whose method is ``SKIP`` leaves the matching linears dense.
SKIP = "skip"




def pattern_name(pattern: "str | Pattern") -> str:
    return pattern if isinstance(pattern, str) else pattern.name


@dataclass(frozen=True)
class Rule:
    """Per-layer override: linears whose full module name matches ``regex`` (``re.search``) get these settings.

    ``None`` fields inherit the config's defaults. Method options inherit the default options only when the rule
    keeps the default method (options of one method rarely apply to another); ``options`` are merged on top.
    ``method=SKIP`` ("skip") leaves the matching linears dense. Example:
    ``Rule(r"mlp\\.down_proj", method="magnitude", pattern="4:8")``.
    """

    regex: str
    method: str | None = None
    pattern: "str | Pattern | None" = None
    options: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        try:
            re.compile(self.regex)
        except re.error as e:
            raise InputError(f"rule regex {self.regex!r} is not a valid regular expression: {e}.") from None

    @classmethod
    def parse(cls, spec: str) -> "Rule":
        """Parse the CLI form ``REGEX=method:pattern`` (``REGEX=method``, ``REGEX=:pattern``, ``REGEX=skip``).

        The pattern may itself contain ``:`` (``attn=sparsegpt:2:4`` is method ``sparsegpt``, pattern ``2:4``).
        """
        regex, sep, rhs = spec.rpartition("=")
        if not sep or not regex or not rhs:
            raise InputError(f"rule {spec!r} must look like REGEX=method:pattern (e.g. 'mlp=magnitude:2:4').")
        method, _, pattern = rhs.partition(":")
        return cls(regex, method or None, pattern or None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "regex": self.regex,
            "method": self.method,
            "pattern": None if self.pattern is None else pattern_name(self.pattern),
            "options": dict(self.options) if self.options is not None else None,
        }


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how.

    Attributes:
        pattern: default pattern for every linear in the blocks (``"2:4"``, any preset, or a :class:`Pattern`).
        method: default method (a name of ``sparsekit.pruners.METHODS``).
        options: default method options (keyword arguments of the pruner, e.g. ``{"blocksize": 128}``).
        rules: per-layer overrides by module-name regex; the first matching rule wins; a rule that matches no
            linear of the blocks is an error.
        skip_incompatible: leave dense (with a warning) the linears whose shape the pattern does not tile,
            instead of raising :class:`PatternError`.
        damp, damp_mode: damping passed to :func:`sparsekit.prune_weight` for every layer.
        sequential: ``"layer"`` (recompute each stage's inputs with earlier stages pruned) or ``"block"`` (all
            Hessians of a block from one dense pass, SparseGPT's default). See the module docstring.
        device: where each block runs and is pruned (``"cpu"``, ``"cuda"``, ...); ``None``: the model's device.
        batch_size: calibration sequences per forward pass.
        offload_activations: keep the calibration activations on the CPU between blocks (saves device memory).
        prune_devices: split every layer's rows across these devices for pruning, one thread each, in one process
            (``prune_weight(devices=...)``, e.g. ``("cuda:0", "cuda:1")``; :mod:`sparsekit.parallel`); every
            method. ``None``: prune on ``device``. Under ``torch.distributed`` each rank is one part instead.
        max_blocks: prune only the first ``max_blocks`` blocks (the rest stay dense); ``None``: every block.
        row_parts: under ``torch.distributed`` with two or more ranks, the row-separable linears are pruned in
            this many row parts spread over the ranks (:mod:`sparsekit.pipeline.distributed`); fixed here, not by
            the world size, so that every such world size cuts them alike. (Linears whose rows are coupled — ADMM,
            OBS-ord, a held-out choice — take one part per rank.) Unused in one process without a process group
            and in a group of one rank: every linear is then pruned whole, so that one rank issues the GPU work
            of one process (bit-identical results on GPUs too).
        max_memory: the memory budget of the whole run on ``device``, bytes or a string like ``"24GiB"``
            (:func:`sparsekit.memory.parse_bytes`; stored as bytes). On CUDA a cap on the process's allocated
            bytes; on the CPU on what the pipeline holds for a block plus what ``prune_weight`` allocates.
            ``None``: what the device can give. See :mod:`sparsekit.pipeline.budget`.
        reg_grid: ``(damp, damp_mode)`` candidates (e.g. :data:`sparsekit.regularize.DEFAULT_GRID`); when given,
            the last ``heldout_fraction`` of the calibration sequences are held out of every calibration Hessian
            and each layer's damping (and update shrink, ``reg_shrinks``) is the one with the lowest layer loss
            on them (:mod:`sparsekit.pipeline.heldout`); ``damp``/``damp_mode`` are then only the fallback.
            Empty (the default): off.
        heldout_fraction: the share of calibration sequences held out when ``reg_grid`` is given.
        reg_shrinks: update shrinks ``α`` tried with every grid point (``(0.0,)``: the method's update only).
        reg_scope: ``"layer"`` (choose for every linear) or ``"model"`` (choose in the first block, reuse by name).
        heldout_calibrates: with ``reg_scope="model"``, the linears that reuse a choice (those of the blocks after
            the choosing one) are pruned on the Hessian of every calibration token, held-out ones included
            (``H_all = (N_c H_calib + N_h H_heldout) / (N_c + N_h)``; :mod:`sparsekit.pipeline.heldout`); no
            extra forward pass. Needs ``reg_grid`` and ``reg_scope="model"`` (with ``"layer"`` every linear is
            pruned at its own choice on ``H_calib``). Default off.
    """

    pattern: "str | Pattern" = DEFAULT_PATTERN
    method: str = DEFAULT_METHOD
    options: Mapping[str, Any] = field(default_factory=dict)
    rules: Sequence[Rule] = ()
    skip_incompatible: bool = False
    damp: float = DEFAULT_DAMP
    damp_mode: str = "mean"
    sequential: str = "layer"
    device: str | None = None
    batch_size: int = 8
    offload_activations: bool = False
    prune_devices: Sequence[str] | None = None
    max_blocks: int | None = None
    row_parts: int = 8
    max_memory: "int | str | None" = None
    reg_grid: Sequence[tuple[float, str]] = ()
    heldout_fraction: float = 0.125
    reg_shrinks: Sequence[float] = (0.0,)
    reg_scope: str = "layer"
    heldout_calibrates: bool = False

    def __post_init__(self) -> None:
        if self.sequential not in ("layer", "block"):
            raise InputError(f"sequential must be 'layer' or 'block', got {self.sequential!r}.")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}.")
        if isinstance(self.row_parts, bool) or not isinstance(self.row_parts, int) or self.row_parts < 1:
            raise InputError(f"row_parts must be an int >= 1, got {self.row_parts!r}.")
        object.__setattr__(self, "rules", tuple(self.rules))
        if self.prune_devices is not None:
            object.__setattr__(self, "prune_devices", tuple(self.prune_devices))
            parse_devices(self.prune_devices)
        if self.max_blocks is not None and (isinstance(self.max_blocks, bool) or not isinstance(self.max_blocks, int)
                                            or self.max_blocks < 1):
            raise InputError(f"max_blocks must be an int >= 1 or None (every block), got {self.max_blocks!r}.")
        check_damp(self.damp, self.damp_mode)  # before any work, not at the first layer
        if self.device is not None:
            as_device(self.device, "device")
        if self.max_memory is not None:
            object.__setattr__(self, "max_memory", parse_bytes(self.max_memory))  # InputError naming the format
        object.__setattr__(self, "reg_grid", tuple(tuple(g) for g in self.reg_grid))
        object.__setattr__(self, "reg_shrinks", tuple(self.reg_shrinks))
        if self.reg_grid:
            _check_grid(self.reg_grid, self.reg_shrinks)
        if self.reg_scope not in ("layer", "model"):
            raise InputError(f"reg_scope must be 'layer' or 'model', got {self.reg_scope!r}.")
        if not 0 < self.heldout_fraction < 1:
            raise InputError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction!r} (e.g. 0.125).")
        if not isinstance(self.heldout_calibrates, bool):
            raise InputError(f"heldout_calibrates must be True or False, got {self.heldout_calibrates!r}.")
        if self.heldout_calibrates and not (self.reg_grid and self.reg_scope == "model"):
            raise InputError("heldout_calibrates needs a reg_grid and reg_scope='model' (it prunes the linears that "
                             "reuse a choice on every calibration token); set both, or heldout_calibrates=False.")

    def to_dict(self) -> dict[str, Any]:
        """JSON form; excludes where it runs (device, batch size, offload, max_memory), which does not change the
        result."""
        return {
            "pattern": pattern_name(self.pattern),
            "method": self.method,
            "options": dict(self.options),
            "rules": [r.to_dict() for r in self.rules],
            "skip_incompatible": self.skip_incompatible,
            "damp": self.damp,
            "damp_mode": self.damp_mode,
            "sequential": self.sequential,
            "max_blocks": self.max_blocks,
            "row_parts": self.row_parts,
            **({"reg_grid": [list(g) for g in self.reg_grid], "heldout_fraction": self.heldout_fraction,
                "reg_shrinks": list(self.reg_shrinks), "reg_scope": self.reg_scope} if self.reg_grid else {}),
            **({"heldout_calibrates": True} if self.heldout_calibrates else {}),
        }
