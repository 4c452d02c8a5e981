"""``python -m kongtask.testing.lifecycle``: see :func:`kongtask.testing.lifecycle.main`."""

import sys

from ._cli import main

sys.exit(main())
