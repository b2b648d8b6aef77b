"""``python -m memzoo``: the ``memzoo`` command."""

import sys

from memzoo.cli import main

if __name__ == "__main__":
    sys.exit(main())
