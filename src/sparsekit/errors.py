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


class CompactFormatError(SparsekitError):
    """A compact 2:4 checkpoint is malformed: wrong format or version, shapes, dtypes, positions, or file hash."""
