"""``python -m pi0remote``: the ``pi0remote`` command (see :mod:`pi0remote.cli`)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
