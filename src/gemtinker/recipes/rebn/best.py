"""`keep_best=true`: the run's policy is the best of its validation checks, not the last update's.

A small-batch REINFORCE run can learn the game and then lose it: a few noisy updates late in
the run collapse the policy onto one repeated guess. With keep_best, the checks every
`eval_every` steps (and one on the final policy) play *validation* episodes, whose seeds are
disjoint from both the training seeds and the held-out seeds, and the held-out evaluation at
the end scores the policy of the best check (`gemtinker eval log_dir=...` takes it too).
Choosing on validation episodes keeps the held-out number an unbiased estimate of the chosen
policy. The choice is kept in the run's `best_check.json` (`runs.files.BestCheck`).
"""

from __future__ import annotations

from gemtinker.recipes.rollouts import EVAL_SEED_OFFSET
from gemtinker.recipes.runs.files import BestCheck

# Held-out episodes use seeds EVAL_SEED_OFFSET + i (i < 2**30), training ones seeds < 2**31.
VALIDATION_SEED_OFFSET = EVAL_SEED_OFFSET + 2**30


def improves(success_rate: float, best: BestCheck | None) -> bool:
    """A tie goes to the newer policy: it has trained on more batches."""
    return best is None or success_rate >= best.success_rate
