"""`python -m gemtinker.cookbook_train key=value ...`: see `gemtinker.recipes.cookbook.train`."""

import sys

from gemtinker.recipes.cookbook.train import CLIConfig, build_config, main

__all__ = ["CLIConfig", "build_config", "main"]

if __name__ == "__main__":
    sys.exit(main())
