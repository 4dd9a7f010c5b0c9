"""Whole-model pruning with sequential calibration: ``prune_model_(model, config, calibration)``.

- :mod:`~sparsekit.pipeline.config`: :class:`PruneConfig`, :class:`Rule` (what to prune and how);
- :mod:`~sparsekit.pipeline.report`: :class:`LayerReport`, :class:`ModelReport`, :class:`Progress` events;
- :mod:`~sparsekit.pipeline.blocks`: finding the blocks, planning their linears, capturing inputs, running them,
  the Hessian hooks (also used by :mod:`sparsekit.data`);
- :mod:`~sparsekit.pipeline.checkpoint`: per-block checkpoints and resume;
- :mod:`~sparsekit.pipeline.run`: :func:`prune_model_`, :func:`save_pruned`.

A library: no printing, no argparse (``sparsekit prune`` is :mod:`sparsekit.cli.prune`).
"""

from sparsekit.pipeline.blocks import LayerPlan, find_blocks, plan_layers
from sparsekit.pipeline.checkpoint import CHECKPOINT_SUBDIR, PROGRESS_FILE
from sparsekit.pipeline.config import DEFAULT_METHOD, DEFAULT_OPTIONS, DEFAULT_PATTERN, SKIP, PruneConfig, Rule, pattern_name
from sparsekit.pipeline.report import REPORT_FILE, LayerReport, ModelReport, Progress, ProgressFn
from sparsekit.pipeline.run import prune_model_, save_pruned

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_OPTIONS",
    "DEFAULT_PATTERN",
    "SKIP",
    "PROGRESS_FILE",
    "REPORT_FILE",
    "CHECKPOINT_SUBDIR",
    "Rule",
    "PruneConfig",
    "LayerPlan",
    "LayerReport",
    "ModelReport",
    "Progress",
    "ProgressFn",
    "find_blocks",
    "plan_layers",
    "pattern_name",
    "prune_model_",
    "save_pruned",
]
