"""Typed errors. Every message says what was wrong and how to fix it.

All derive from :class:`SparsekitError` (itself a ``ValueError``), so callers can catch one type.
"""

from __future__ import annotations


class SparsekitError(ValueError):
    """Base class of every error sparsekit raises on bad input or numerical failure."""


class PatternError(SparsekitError):
    """The sparsity pattern is malformed, unknown, or does not tile the weight."""


class InputError(SparsekitError):
    """A weight, Hessian or option is invalid (shape, dtype, device, NaN/Inf, range)."""


class HessianError(SparsekitError):
    """The Hessian is not usable: not symmetric, not PSD, or singular past the damping bound."""


class ResourceError(SparsekitError):
    """A step does not fit the memory budget even at its smallest chunk.

    ``needed`` is the smallest ``max_memory`` (bytes) with which that step would run; ``budget`` the one it had.
    """

    def __init__(self, message: str, *, needed: int | None = None, budget: int | None = None) -> None:
        super().__init__(message)
        self.needed = needed
        self.budget = budget


class DistributedError(SparsekitError):
    """A collective of a ``torch.distributed`` run failed: another rank died or did not answer in time."""


class CoupledPartError(SparsekitError):
    """Another row part of the same layer failed (:mod:`sparsekit.coupling`): that part raised its own error, which
    says what went wrong; this one only ends the waiting parts."""


class MissingTextError(InputError):
    """A named text source is not on this machine; the message names the Debian package that provides it."""


class CompactFormatError(SparsekitError):
    """A compact 2:4 checkpoint is malformed: wrong format or version, shapes, dtypes, positions, or file hash."""


class CheckpointError(InputError):
    """A checkpoint file is missing, truncated, corrupted or out of place, or was made by another job; the
    message names the file and the fix (delete it and resume from the block before, or restart)."""


class ShardError(InputError):
    """A safetensors file of a model folder is missing, truncated or corrupt, or the model needs a tensor that no
    file holds; the message names the file (low-memory loading, :mod:`sparsekit.pipeline.lazy`)."""
