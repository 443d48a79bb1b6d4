"""``python -m droptune.cli``: how the study runner and ``droptune stack`` start their
workers (with ``-P``: the working directory is not importable, as for the console script)."""

import sys

from droptune.cli import main


if __name__ == "__main__":
    sys.exit(main())
