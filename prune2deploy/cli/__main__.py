"""``python -m prune2deploy.cli``: the ``prune2deploy`` command."""

import sys

from prune2deploy.cli import main

sys.exit(main())
