"""``python -m edgekit.cli`` (e.g. under ``torchrun``) runs the ``edgekit`` command."""

import sys

from edgekit.cli import main

sys.exit(main())
