"""Blocks of a model: finding them (:func:`find_blocks`, the one rule, used by :mod:`sparsekit.data` too),
planning their linears (:func:`plan_layers`), capturing their inputs and running them."""

from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from sparsekit.errors import InputError, PatternError
from sparsekit.hessian import HessianAccumulator
from sparsekit.patterns import Pattern, get_pattern
from sparsekit.pipeline.config import SKIP, PruneConfig
from sparsekit.pruners import get_pruner
from sparsekit.pruners._common import PASSED_BY_CALLER, unknown_options

log = logging.getLogger(__name__)

__all__ = ["find_blocks", "block_linears", "LayerPlan", "plan_layers", "StopForward", "probe_inputs", "HessianHooks", "BatchInputs", "BlockInputs", "capture_inputs",
           "run_block", "module_device", "check_tiles"]

def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of blocks: the ``nn.ModuleList`` of identical block types holding the most parameters.

    Returns ``(dotted path, module list)``; raises :class:`InputError` if the model has none.
    """
    best: tuple[int, int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        size = sum(p.numel() for p in mod.parameters())
        if size == 0:
            continue
        key = (size, len(mod))
        if best is None or key > best[:2]:
            best = (size, len(mod), name, mod)
    if best is None:
        raise InputError(
            f"{type(model).__name__} has no list of blocks (an nn.ModuleList of identical layers with parameters); "
            "sparsekit prunes models whose linear layers sit in a list of transformer blocks."
        )
    return best[2], best[3]


def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """``(name, module)`` of every ``nn.Linear`` inside the blocks of :func:`find_blocks`, in module order."""
    path, _ = find_blocks(model)
    prefix = f"{path}." if path else ""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix)]


@dataclass
class LayerPlan:
    """A linear of a block and what will be done to it (``method == SKIP`` or ``skip_reason``: left dense)."""

    name: str
    block: int
    module: nn.Linear
    method: str
    pattern: "str | Pattern"
    options: dict[str, Any]
    skip_reason: str = ""

    @property
    def skipped(self) -> bool:
        return self.method == SKIP or bool(self.skip_reason)


def _check_method_options(method: str, options: Mapping[str, Any], where: str) -> None:
    unknown, accepted = unknown_options(get_pruner(method), options, PASSED_BY_CALLER)
    if unknown:
        raise InputError(
            f"{where}: method {method!r} does not take option(s) {', '.join(unknown)}; it takes: "
            f"{', '.join(accepted) or 'none'}."
        )


def check_tiles(pattern: Pattern, num_rows: int, num_cols: int) -> None:
    """Raise :class:`PatternError` unless ``pattern`` tiles an ``(M, K)`` weight (resolves one row chunk only)."""
    chunk = pattern.scope.block.chunk_rows
    if num_rows % chunk:
        raise PatternError(f"pattern {pattern.name!r} works on chunks of {chunk} rows but the weight has {num_rows} rows.")
    pattern.resolve(chunk, num_cols)


def plan_layers(model: nn.Module, config: PruneConfig) -> tuple[str, nn.ModuleList, list[list[LayerPlan]]]:
    """Resolve the config against the model: ``(blocks path, blocks, plans per block)``.

    Every ``nn.Linear`` inside the blocks is a candidate (embeddings and the LM head are outside the blocks and
    never pruned). Checks up front — before any calibration work — that every rule matches some linear, that
    methods and options exist, and that every pattern tiles its layer (or marks it skipped with
    ``skip_incompatible``).
    """
    path, blocks = find_blocks(model)
    prefix = f"{path}." if path else ""
    rules = list(config.rules)
    matched = [0] * len(rules)
    plans: list[list[LayerPlan]] = []
    checked: set[tuple[str, str]] = set()
    for i, block in enumerate(blocks):
        block_plans = []
        for sub, mod in block.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            name = f"{prefix}{i}.{sub}"
            method, pattern, options = config.method, config.pattern, dict(config.options)
            for j, rule in enumerate(rules):
                if re.search(rule.regex, name):
                    matched[j] += 1
                    if rule.method is not None and rule.method != config.method:
                        method, options = rule.method, {}
                    if rule.pattern is not None:
                        pattern = rule.pattern
                    options.update(rule.options or {})
                    break
            plan = LayerPlan(name, i, mod, method, pattern, options)
            if method != SKIP:
                key = (method, repr(sorted(options.items())))
                if key not in checked:
                    _check_method_options(method, options, f"layer {name}")
                    checked.add(key)
                pat = get_pattern(pattern)
                M, K = mod.weight.shape
                try:
                    check_tiles(pat, M, K)
                except PatternError as e:
                    if not config.skip_incompatible:
                        raise PatternError(
                            f"layer {name} ({M}x{K}): {e} Pass skip_incompatible (--skip-incompatible) to leave "
                            "such layers dense, or a rule giving this layer another pattern."
                        ) from None
                    plan.skip_reason = f"pattern {pat.name} does not tile {M}x{K}"
                    log.warning("skipping %s: %s", name, plan.skip_reason)
            block_plans.append(plan)
        plans.append(block_plans)
    if not any(plans):
        raise InputError(
            f"{type(model).__name__} has no nn.Linear inside its blocks ({path}); nothing to prune "
            "(GPT-2-style Conv1D layers are not supported)."
        )
    unmatched = [r.regex for r, n in zip(rules, matched) if n == 0]
    if unmatched:
        example = plans[0][0].name if plans and plans[0] else "?"
        raise InputError(
            f"rule(s) {', '.join(repr(u) for u in unmatched)} match no linear layer of the blocks (module names look "
            f"like {example!r}; embeddings and the LM head are never pruned), or an earlier rule matched first."
        )
    return path, blocks, plans




class StopForward(Exception):
    """Raised from a hook to end a forward pass early once the inputs it needed are captured."""


def probe_inputs(modules: Mapping[str, nn.Module], run: Callable[[], Any]) -> tuple[list[str], dict[str, list[Tensor]]]:
    """Run ``run()`` (one forward pass) with hooks recording the input tensor of every call of each module:
    ``(names in execution order, inputs[name])``. Modules fed the same tensor object share one ``H``."""
    order: list[str] = []
    seen: dict[str, list[Tensor]] = {}

    def recorder(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if name not in seen:
                order.append(name)
            seen.setdefault(name, []).append(args[0])

        return hook

    handles = [m.register_forward_hook(recorder(n)) for n, m in modules.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return order, seen


class HessianHooks:
    """The one Hessian capture (the pipeline and :mod:`sparsekit.data`): forward hooks adding the input of each
    ``(module, accumulator)`` source to its accumulator (``H = XᵀX / N``), padded tokens dropped.

    Use as a context (hooks removed on exit, sources released); call :meth:`batch` before each forward.
    ``stop_after > 0``: a batch's forward is ended (:class:`StopForward`) once that many hooks fired — the rest of
    the model is not needed.
    """

    def __init__(self, sources: Sequence[tuple[nn.Module, HessianAccumulator]], stop_after: int = 0):
        self.sources = list(sources)
        self.stop_after = stop_after
        self.calls = 0  # hooks fired in the current batch
        self.token_mask: Tensor | None = None  # (b, T) bool, True for real tokens
        self._handles: list[Any] = []

    def __enter__(self) -> "HessianHooks":
        self._handles = [m.register_forward_hook(self._hook(acc)) for m, acc in self.sources]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self.sources, self.token_mask = [], [], None

    def batch(self, token_mask: Tensor | None = None) -> None:
        self.token_mask = token_mask
        self.calls = 0

    def add(self, acc: HessianAccumulator, x: Tensor) -> None:
        """Add one input ``x (b, T, K)`` of the current batch to ``acc`` as a hook does (padded tokens dropped)."""
        x = x.detach()
        m = self.token_mask
        if m is not None and x.dim() == 3 and x.shape[:2] == m.shape:
            x = x[m]  # (n_real, K): padded tokens carry no signal
        acc.add(x)

    def _hook(self, acc: HessianAccumulator) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            self.add(acc, args[0])
            self.calls += 1
            if self.calls == self.stop_after:
                raise StopForward

        return hook


@dataclass
class BatchInputs:
    """What each block receives for one calibration batch, besides the hidden states.

    ``per_block[j] = (args, kwargs)`` of block j (positional arguments after the hidden states, and keyword
    arguments): masks and position embeddings may differ between blocks (sliding-window layers), and equal
    ones are shared by reference, so storing them per block costs nothing.
    """

    per_block: list[tuple[tuple[Any, ...], dict[str, Any]]]
    token_mask: Tensor | None  # (b, T) bool, True for real tokens; None: all real

    def block(self, j: int) -> "BlockInputs":
        args, kwargs = self.per_block[j]
        return BlockInputs(args, kwargs)


@dataclass
class BlockInputs:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer of ``model`` except those of ``blocks`` to ``device``."""

    def visit(mod: nn.Module) -> None:
        for coll in (mod._parameters, mod._buffers):
            for k, t in coll.items():
                if t is not None and t.device != device:
                    t.data = t.data.to(device)
        for child in mod.children():
            if child is blocks:
                continue
            if any(m is blocks for m in child.modules()):
                visit(child)
            else:
                child.to(device)

    visit(model)


def module_device(mod: nn.Module) -> torch.device:
    for t in mod.parameters():
        return t.device
    return torch.device("cpu")


def capture_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    batch_size: int,
    device: torch.device,
    act_device: torch.device,
) -> tuple[list[Tensor], list[BatchInputs]]:
    """Block 0's hidden-state inputs and every block's other arguments, for each calibration batch.

    Every block's ``forward`` is replaced, for the duration, by a recorder that returns its hidden states
    unchanged (no block computation runs); the last block's recorder ends the forward pass. Only the modules
    outside the blocks (embeddings, rotary tables, mask builders) run, on ``device``.
    """
    home = module_device(model)
    if home != device:
        _move_outside_blocks(model, blocks, device)
    calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    n = len(blocks)

    def recorder(j: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if j not in calls:
                calls[j] = (args, dict(kwargs))
            if j == n - 1:
                raise StopForward
            return args[0] if args else kwargs["hidden_states"]

        return forward

    saved = [blk.__dict__.get("forward") for blk in blocks]
    for j, blk in enumerate(blocks):
        blk.forward = recorder(j)  # instance attribute: nn.Module.__call__ dispatches to it
    accepts = inspect.signature(model.forward).parameters
    hidden: list[Tensor] = []
    batches: list[BatchInputs] = []
    try:
        for s in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[s : s + batch_size].to(device)  # (b, T)
            call: dict[str, Any] = {"input_ids": ids}
            mask = None
            if attention_mask is not None:
                mask = attention_mask[s : s + batch_size].to(device)
                call["attention_mask"] = mask
            if "use_cache" in accepts:
                call["use_cache"] = False
            calls.clear()
            try:
                model(**call)
            except StopForward:
                pass
            missing = [j for j in range(n) if j not in calls]
            if missing:
                raise InputError(
                    f"the forward pass of {type(model).__name__} never ran block(s) {missing[:5]} of its block list; "
                    "sparsekit needs a model that runs every block in order."
                )
            per_block = []
            for j in range(n):
                args, kwargs = calls[j]
                if args:
                    h, rest = args[0], tuple(args[1:])
                else:
                    kwargs = dict(kwargs)
                    h, rest = kwargs.pop("hidden_states"), ()
                if j == 0:
                    hidden.append(h.detach().to(act_device))
                per_block.append((rest, kwargs))
            token_mask = None if mask is None or bool(mask.all()) else mask.bool()
            batches.append(BatchInputs(per_block, token_mask))
    finally:
        for blk, fwd in zip(blocks, saved):
            if fwd is None:
                del blk.forward
            else:
                blk.forward = fwd
        if home != device:
            _move_outside_blocks(model, blocks, home)
    return hidden, batches


def _block_output(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise InputError(f"cannot read the hidden states from a block output of type {type(out).__name__}.")


def run_block(block: nn.Module, hidden: Tensor, inp: BlockInputs, device: torch.device) -> Tensor:
    return _block_output(block(hidden.to(device), *inp.args, **inp.kwargs))
