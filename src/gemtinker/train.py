"""`python -m gemtinker.train key=value ...`: a shim for `gemtinker.cli.train` (see gemtinker.cli)."""

import sys

from gemtinker.cli.train import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
