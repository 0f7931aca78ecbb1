"""Held-out evaluation: N episodes on fixed seeds, summarised with confidence intervals.

Shared by the trainer (evaluations during and after training) and `gemtinker eval`; it depends
only on the rollout code, never on a trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from gemtinker.recipes.episodes import Episode
from gemtinker.recipes.progress import progress_bar
from gemtinker.recipes.rollouts import EVAL_SEED_OFFSET, EpisodeRunner, collect_fixed_seeds


@dataclass
class EvalSummary:
    episodes: int
    errors: int
    return_mean: float
    return_ci95: float
    success_rate: float
    success_ci95: tuple[float, float]

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        return {
            f"{prefix}episodes": float(self.episodes),
            f"{prefix}errors": float(self.errors),
            f"{prefix}return_mean": self.return_mean,
            f"{prefix}return_ci95": self.return_ci95,
            f"{prefix}success_rate": self.success_rate,
            f"{prefix}success_ci95_low": self.success_ci95[0],
            f"{prefix}success_ci95_high": self.success_ci95[1],
        }

    def line(self) -> str:
        lo, hi = self.success_ci95
        return (
            f"{self.episodes} episodes ({self.errors} errors): return {self.return_mean:.3f} ± {self.return_ci95:.3f}, "
            f"success {self.success_rate:.3f} [95% CI {lo:.3f}, {hi:.3f}]"
        )


def summarize_eval(episodes: Sequence[Episode], errors: int = 0) -> EvalSummary:
    """Mean return with a normal-approximation 95% CI; success with a Wilson 95% interval
    (well-behaved at 0 and 1, unlike p ± 1.96·se)."""
    n = len(episodes)
    if n == 0:
        return EvalSummary(0, errors, float("nan"), float("nan"), float("nan"), (float("nan"), float("nan")))
    returns = [ep.total_return for ep in episodes]
    mean = sum(returns) / n
    sd = math.sqrt(sum((r - mean) ** 2 for r in returns) / (n - 1)) if n > 1 else 0.0
    p = sum(ep.success for ep in episodes) / n
    z = 1.96
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return EvalSummary(n, errors, mean, z * sd / math.sqrt(n), p, (max(0.0, centre - half), min(1.0, centre + half)))


async def run_evaluation(
    envs: Sequence[Any], runner: EpisodeRunner, sampling_client: Any, num_episodes: int,
    seed_offset: int = EVAL_SEED_OFFSET, progress: bool = True,
) -> tuple[EvalSummary, list[Episode]]:
    seeds = [seed_offset + i for i in range(num_episodes)]
    bar = progress_bar(num_episodes, "eval", progress)
    try:
        result = await collect_fixed_seeds(envs, runner, sampling_client, seeds, on_episode=lambda _ep: bar.update(1))
    finally:
        bar.close()
    return summarize_eval(result.episodes, len(result.errors)), result.episodes
