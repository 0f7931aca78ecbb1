"""`python -m gemtinker.cookbook_train key=value ...`: a shim for `gemtinker.cli.cookbook_train`
(see gemtinker.cli)."""

import sys

from gemtinker.cli.cookbook_train import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
