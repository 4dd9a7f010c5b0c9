"""Whole-model pruning: ``prune_model_(model, config, calibration)`` (see :mod:`sparsekit.pipeline.run`)."""

from sparsekit.pipeline.run import *  # noqa: F401,F403
from sparsekit.pipeline.run import __all__  # noqa: F401
from sparsekit.pipeline.run import REPORT_FILE, load_model_checked  # noqa: F401
