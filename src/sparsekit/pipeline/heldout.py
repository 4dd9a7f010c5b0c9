"""A held-out slice of the calibration tokens and the regularisation chosen on it, per layer (issue 16).

With ``PruneConfig.reg_grid`` set, :func:`split_calibration` keeps the last ``heldout_fraction`` of the
calibration sequences out of every calibration Hessian. Those sequences go through the blocks like the others
(block 0's inputs captured once, then each block's outputs, with its linears pruned, feed the next), and
:class:`HeldOut` accumulates, for every stage of a block, a second Hessian ``H_heldout = X_hᵀX_h / N_h`` from
them with the same :class:`~sparsekit.pipeline.blocks.HessianHooks` on the same stage inputs (earlier stages
already pruned). Each linear is then pruned by :func:`sparsekit.regularize.choose_regularisation`: once per
``(damp, damp_mode)`` of the grid on ``H_calib``, each result optionally shrunk toward the kept weights, the
lowest held-out layer loss kept (its formula is in :mod:`sparsekit.regularize`).

``reg_scope="layer"`` chooses for every linear; ``"model"`` chooses for each linear of the first block that
prunes it and reuses the choice for the linears of the same name in later blocks (one pruning per layer after
the first block; the held-out loss of the reused point is still recorded). The choice goes to the layer report's
``stats["regularisation"]``; :meth:`HeldOut.summary` counts the choices for the model report.

``PruneConfig.heldout_calibrates`` (scope ``"model"`` only): once the choice is made, the held-out tokens need
not stay out of the calibration. A group of linears sharing one input whose linears all reuse a choice is then
pruned on the Hessian of every token, ``H_all = (N_c H_calib + N_h H_heldout) / (N_c + N_h)``
(:meth:`~sparsekit.hessian.HessianAccumulator.merge`: the sums ``X_cᵀX_c + X_hᵀX_h`` over ``N_c + N_h`` real
tokens, i.e. the Hessian accumulated over all of them; padded tokens count in neither), from the accumulators
already filled, so no forward pass is added. The choosing block itself stays on ``H_calib`` (its choice is judged
on the held-out tokens). The layer report's ``tokens`` is then ``N_c + N_h``, ``stats["regularisation"]`` says
``"hessian": "calibration+heldout"``, and its ``heldout_loss`` is no longer out of sample. Measured at the layer
level: benchmarks/GENERALISATION_issue16.md ("re-pruned at the chosen point on all calibration tokens").

Under ``torch.distributed`` (:mod:`sparsekit.pipeline.distributed`) each rank runs only its share of the held-out
batches (whole batches, split like the calibration batches; a rank may have none), and the held-out Hessians are
reduced by the same ordered chain as the calibration ones, so they are those of one process; a linear is then
pruned in row parts on several ranks, its choice made on the whole layer's held-out loss
(``choose_regularisation(gather=...)``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, ContextManager

import torch
from torch import Tensor, nn

from sparsekit.api import PruneResult, prune_weight
from sparsekit.coupling import SINGLE, Gather
from sparsekit.errors import InputError
from sparsekit.hessian import HessianAccumulator
from sparsekit.pipeline.blocks import BatchInputs, HessianHooks, LayerPlan, StopForward, capture_inputs, run_block
from sparsekit.pipeline.config import PruneConfig
from sparsekit.regularize import choose_regularisation, heldout_loss, shrink_result

if TYPE_CHECKING:
    from sparsekit.pipeline.distributed import Group

log = logging.getLogger(__name__)

__all__ = ["REG_SCOPES", "split_calibration", "HeldOut"]

#: ``"layer"``: choose for every linear; ``"model"``: choose in the first block, reuse by linear name.
REG_SCOPES = ("layer", "model")


def split_calibration(
    calibration: Tensor, attention_mask: Tensor | None, fraction: float
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """``(calib (n − h, T), its mask, heldout (h, T), its mask)`` with ``h = ceil(fraction · n)`` last sequences.

    Raises:
        InputError: fewer than two sequences, or a fraction that leaves no calibration sequence.
    """
    n = calibration.shape[0]
    h = math.ceil(fraction * n)
    if n < 2 or not 1 <= h < n:
        raise InputError(
            f"holding out {fraction:g} of {n} calibration sequences leaves {n - h} for calibration and {h} held out; "
            "give more sequences (more tokens or a shorter sequence length) or another heldout_fraction."
        )
    m = attention_mask
    return calibration[: n - h], None if m is None else m[: n - h], calibration[n - h :], None if m is None else m[n - h :]


class HeldOut:
    """The held-out sequences' block inputs, their Hessians per stage, and the regularisation choices.

    Built by :meth:`capture` (block 0's inputs); :meth:`hessians` before pruning a stage, :meth:`prune` per
    linear, :meth:`advance` after a block is pruned (its outputs become the next block's inputs).
    """

    def __init__(self, config: PruneConfig, blocks_path: str, hidden: list[Tensor], batches: list[BatchInputs],
                 num_tokens: int, group: "Group | None" = None):
        self.config = config
        self.prefix = f"{blocks_path}." if blocks_path else ""
        self.hidden = hidden  # per batch (b, T, d): this rank's batches under torch.distributed
        self.batches = batches
        self.num_tokens = num_tokens  # of every rank
        self.group = group
        self.choices: dict[str, dict[str, Any]] = {}  # linear name without its block index -> chosen point

    @classmethod
    def capture(cls, model: nn.Module, blocks: nn.ModuleList, blocks_path: str, config: PruneConfig, ids: Tensor,
                mask: Tensor | None, device: torch.device, act_device: torch.device,
                group: "Group | None" = None) -> "HeldOut":
        tokens = int(mask.sum()) if mask is not None else ids.numel()
        if group is not None:
            ids, mask = group.local_calibration(ids, mask, config.batch_size)
        hidden, batches = capture_inputs(model, blocks, ids, mask, config.batch_size, device, act_device)
        return cls(config, blocks_path, hidden, batches, tokens, group)

    def key(self, name: str) -> str:
        """``model.layers.3.mlp.up_proj`` → ``mlp.up_proj``: the linear's name inside its block."""
        return name[len(self.prefix):].partition(".")[2] if name.startswith(self.prefix) else name

    def resume(self, blocks: nn.ModuleList, start: int, layers: list[Any], device: torch.device,
               act_device: torch.device,
               open_block: Callable[[int], ContextManager[Any]] = lambda j: contextlib.nullcontext()) -> None:
        """After a resume: run the held-out inputs through the finished blocks ``< start`` (their pruned weights
        are loaded; ``open_block(j)`` materialises block ``j`` of a lazily loaded model) and reload the
        ``"model"``-scope choices from their layer reports."""
        for r in layers:
            self.learn(r.name, r.stats)
        for j in range(start):
            with open_block(j):
                home = next(blocks[j].parameters()).device
                blocks[j].to(device)
                try:
                    self.advance(blocks[j], j, device, act_device)
                finally:
                    blocks[j].to(home)

    def learn(self, name: str, stats: Any) -> None:
        """Remember the choice in a layer's ``stats`` (if it made one: not reused, held-out tokens seen) for
        ``reg_scope="model"``."""
        reg = stats.get("regularisation") if isinstance(stats, dict) else None
        if reg and not reg.get("reused") and reg.get("heldout_loss") is not None:
            self.choices.setdefault(self.key(name), reg)

    def calibrates(self, linears: list[LayerPlan]) -> bool:
        """Whether a group of linears sharing one input is pruned on every token (``heldout_calibrates``): each of
        them reuses a choice made in an earlier block."""
        return self.config.heldout_calibrates and all(self.key(p.name) in self.choices for p in linears)

    def hessians(self, block: nn.Module, stage: list[list[LayerPlan]], i: int, device: torch.device,
                 stop_after: int) -> list[HessianAccumulator]:
        """The held-out ``Σ x xᵀ`` and token count per group of the stage (``hessian``: ``H_heldout (K, K)``;
        ``num_tokens == 0``: the group saw no held-out token); under ``torch.distributed`` from every rank's
        batches, by the ordered reduction."""
        accs = [HessianAccumulator(g[0].module.in_features, torch.float32, device) for g in stage]
        sources = accs if self.group is None else [self.group.deferred() for _ in accs]
        with HessianHooks([(g[0].module, src) for g, src in zip(stage, sources)], stop_after) as hooks:
            for h, inp in zip(self.hidden, self.batches):
                hooks.batch(inp.token_mask)
                try:
                    run_block(block, h, inp.block(i), device)
                except StopForward:
                    pass
        if self.group is not None:
            self.group.reduce_hessians(accs, sources)
        return accs

    def advance(self, block: nn.Module, i: int, device: torch.device, act_device: torch.device) -> None:
        """Replace the held-out inputs by block ``i``'s outputs (its linears pruned)."""
        self.hidden = [run_block(block, h, inp.block(i), device).detach().to(act_device)
                       for h, inp in zip(self.hidden, self.batches)]

    def prune(self, p: LayerPlan, H: Tensor, H_held: Tensor | None,
              progress_fn: Callable[[str], None] | None = None, max_memory: int | None = None,
              rows: slice = slice(None), gather: Gather | None = None, all_tokens: bool = False) -> PruneResult:
        """Prune ``p``'s weight (its ``rows``, one part of the layer with ``gather``: :mod:`sparsekit.coupling`) in
        place at the chosen regularisation; ``stats["regularisation"]`` records it and which Hessian ``H`` is
        (``all_tokens``: the merge over calibration and held-out tokens, :meth:`calibrates`)."""
        cfg = self.config
        weight = p.module.weight.data[rows]  # (rows, K) a view
        opts = dict(p.options, progress_fn=progress_fn, devices=cfg.prune_devices, max_memory=max_memory,
                    gather=gather)
        part = SINGLE if gather is None else gather
        key = self.key(p.name)
        reused = self.choices.get(key) if cfg.reg_scope == "model" else None
        with part.unit():  # no part waits for one that failed between the reductions
            if H_held is None:
                log.warning("%s saw no held-out token; pruned at the config's damping", p.name)
                res = prune_weight(weight, H, p.pattern, p.method, damp=cfg.damp, damp_mode=cfg.damp_mode, **opts)
                record: dict[str, Any] = {"damp": cfg.damp, "damp_mode": cfg.damp_mode, "shrink": 0.0,
                                          "heldout_loss": None, "reused": False, "note": "no held-out tokens"}
            elif reused is not None:
                res = prune_weight(weight, H, p.pattern, p.method, damp=reused["damp"],
                                   damp_mode=reused["damp_mode"], **opts)
                res = shrink_result(weight, res, H, reused["shrink"], part)
                record = {k: reused[k] for k in ("damp", "damp_mode", "shrink")}
                record.update(heldout_loss=heldout_loss(weight, res.weight, H_held, part), reused=True)
            else:
                choice = choose_regularisation(weight, H, H_held, p.pattern, p.method, cfg.reg_grid,
                                               shrinks=cfg.reg_shrinks, **opts)
                res = choice.result
                default = [r["heldout_loss"] for r in choice.table
                           if (r["damp"], r["damp_mode"], r["shrink"]) == (cfg.damp, cfg.damp_mode, 0.0)]
                record = {"damp": choice.damp, "damp_mode": choice.damp_mode, "shrink": choice.shrink,
                          "heldout_loss": choice.heldout_loss, "reused": False,
                          "default_heldout_loss": default[0] if default else None}
        weight.copy_(res.weight)  # after the unit: only once every part has succeeded
        record["hessian"] = "calibration+heldout" if all_tokens else "calibration"
        res.stats = {**res.stats, "regularisation": record}
        self.learn(p.name, res.stats)
        return res

    def summary(self, layers: list[Any]) -> dict[str, Any]:
        """For the model report: the grid, the held-out tokens and how often each point was chosen."""
        points: Counter[str] = Counter()
        for r in layers:
            reg = r.stats.get("regularisation") if isinstance(r.stats, dict) else None
            if reg:
                points[f"damp={reg['damp']:g} {reg['damp_mode']} shrink={reg['shrink']:g}"] += 1
        cfg = self.config
        return {"grid": [list(g) for g in cfg.reg_grid], "shrinks": list(cfg.reg_shrinks), "scope": cfg.reg_scope,
                "heldout_fraction": cfg.heldout_fraction, "heldout_tokens": self.num_tokens,
                "heldout_calibrates": cfg.heldout_calibrates,
                "chosen": dict(points.most_common())}

