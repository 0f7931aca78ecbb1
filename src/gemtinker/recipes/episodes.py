"""Episodes and their turns, as the rollout code records them, and the metrics read from them.

Plain data shared by the rollouts, the trainer, evaluation and the run files; the trainer's credit
assignment over them (returns, ReBN, Datums) is in `rebn/credit.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

# GEM games pay 1.0 for a solved task (gem.utils.constants.LanguageGameReward.success_reward);
# math and reasoning-gym envs pay 1.0 for a correct answer.
SUCCESS_REWARD = 1.0


@dataclass
class Transition:
    """One turn: the prompt the policy saw, what it sampled, and what the env paid."""

    obs_tokens: list[int]
    act_tokens: list[int]
    act_logprobs: list[float]
    reward: float
    done: bool
    action_text: str = ""
    prompt_text: str = ""
    stop_reason: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    ret: float = 0.0  # discounted return from this turn on
    advantage: float = 0.0
    # per action token, added to `advantage` (the entropy bonus); None = nothing added
    token_bonus: list[float] | None = None

    def __post_init__(self) -> None:
        if len(self.act_tokens) != len(self.act_logprobs):
            raise ValueError(
                f"{len(self.act_tokens)} action tokens but {len(self.act_logprobs)} logprobs"
            )


@dataclass
class Episode:
    transitions: list[Transition]
    env_index: int = 0
    seed: int = 0

    @property
    def total_return(self) -> float:
        return float(sum(t.reward for t in self.transitions))

    @property
    def num_turns(self) -> int:
        return len(self.transitions)

    @property
    def action_tokens(self) -> int:
        return sum(len(t.act_tokens) for t in self.transitions)

    @property
    def success(self) -> bool:
        """Solved: the env said so (`correct`/`success` in the last info), or the final turn paid
        the full success reward."""
        if not self.transitions:
            return False
        last = self.transitions[-1]
        for key in ("correct", "success", "is_correct"):
            if key in last.info:
                return bool(last.info[key])
        return last.reward >= SUCCESS_REWARD - 1e-9


def episode_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
    if not episodes:
        return {"sampler/num_episodes": 0.0}
    n = len(episodes)
    logprobs = [lp for ep in episodes for t in ep.transitions for lp in t.act_logprobs]
    truncated = [t.stop_reason == "length" for ep in episodes for t in ep.transitions]
    out = {
        "sampler/num_episodes": float(n),
        "sampler/episode_return": sum(ep.total_return for ep in episodes) / n,
        "sampler/success_rate": sum(ep.success for ep in episodes) / n,
        "sampler/num_turns_per_episode": sum(ep.num_turns for ep in episodes) / n,
        "sampler/action_num_tokens": sum(ep.action_tokens for ep in episodes) / n,
        "sampler/truncated_action_frac": (sum(truncated) / len(truncated)) if truncated else 0.0,
    }
    if logprobs:
        # -E[log p(sampled token)] is an unbiased estimate of the per-token entropy at T=1.
        out["sampler/token_entropy"] = -sum(logprobs) / len(logprobs)
    return out
