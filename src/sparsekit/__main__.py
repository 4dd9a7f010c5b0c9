"""``python -m sparsekit``: the ``sparsekit`` command."""

import sys

from sparsekit.cli import main

sys.exit(main())
