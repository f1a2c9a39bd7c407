"""``python -m cachedload``: the ``cachedload`` command (see :mod:`cachedload.cli`)."""

import sys

from cachedload.cli import main

if __name__ == "__main__":
    sys.exit(main())
