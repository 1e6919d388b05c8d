"""``python -m recache`` is the ``recache`` command."""

import sys

from recache.cli import main

sys.exit(main())
