"""`python -m asyncbatch`: the same command line as the `asyncbatch` script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
