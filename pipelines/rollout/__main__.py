"""``python -m pipelines.rollout``: see ``pipelines.rollout.cli``."""

import sys

from pipelines.rollout.cli import main

if __name__ == "__main__":
    sys.exit(main())
