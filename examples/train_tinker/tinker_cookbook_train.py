"""GEM's `examples/train_tinker/tinker_cookbook_train.py`, on gemtinker.

    python -m examples.train_tinker.tinker_cookbook_train env_id=rg:simple_equations \
        groups_per_batch=64 group_size=8 learning_rate=2e-5 max_tokens=2048

Same key=value arguments as GEM's script; the implementation is `gemtinker.cli.cookbook_train`
(tinker-cookbook's RL loop, unmodified, on the embedded server unless base_url/TINKER_BASE_URL
points elsewhere).
"""

import sys

from gemtinker.cli.cookbook_train import main
from gemtinker.recipes.cookbook.train import CLIConfig

__all__ = ["CLIConfig", "main"]

if __name__ == "__main__":
    sys.exit(main())
