"""sparsekit: prune LLM weights to hardware sparsity patterns with Optimal Brain Surgeon mathematics.

Importing sparsekit never initialises CUDA.
"""

from sparsekit.api import PruneResult, prune_weight
from sparsekit.compact import Sparse24Linear, load_compact, save_compact
from sparsekit.errors import (
    CheckpointError,
    CompactFormatError,
    HessianError,
    InputError,
    PatternError,
    ResourceError,
    SparsekitError,
)
from sparsekit.hessian import HessianAccumulator
from sparsekit.metrics import relative_error
from sparsekit.patterns import PRESETS, BlockSpec, Pattern, ScopeSpec, check_mask, get_pattern
from sparsekit.pipeline import ModelReport, PruneConfig, Rule, prune_model_, save_pruned
from sparsekit.pruners import METHODS

__version__ = "0.1.0"

__all__ = [
    "prune_weight",
    "PruneResult",
    "prune_model_",
    "save_pruned",
    "PruneConfig",
    "Rule",
    "ModelReport",
    "Pattern",
    "BlockSpec",
    "ScopeSpec",
    "PRESETS",
    "get_pattern",
    "check_mask",
    "HessianAccumulator",
    "relative_error",
    "METHODS",
    "SparsekitError",
    "PatternError",
    "InputError",
    "HessianError",
    "ResourceError",
    "CompactFormatError",
    "CheckpointError",
    "save_compact",
    "load_compact",
    "Sparse24Linear",
]
