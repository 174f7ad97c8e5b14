"""``python -m router``: see ``router.cli``."""

import sys

from router.cli import main

if __name__ == "__main__":
    sys.exit(main())
