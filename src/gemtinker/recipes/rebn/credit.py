"""Episodes -> returns -> ReBN advantages -> Tinker Datums: the low-level trainer's credit assignment.

Pure functions over plain data (no network, no model), so every number the trainer sends can be
checked by hand in tests.

Credit assignment follows GEM's multi-turn REINFORCE baseline: each turn is one transition
(observation tokens, action tokens, reward); its return is the discounted sum of the rewards
from that turn on; with Return Batch Normalisation the returns of all transitions in the batch
are standardised and used as the advantage of every action token of the turn.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from gemtinker.recipes.episodes import SUCCESS_REWARD, Episode, Transition
from gemtinker.recipes.rebn.config import Config

def discounted_returns(rewards: Sequence[float], gamma: float) -> list[float]:
    """G_t = r_t + gamma * G_{t+1}, computed backwards."""
    out = [0.0] * len(rewards)
    running = 0.0
    for i in range(len(rewards) - 1, -1, -1):
        running = float(rewards[i]) + gamma * running
        out[i] = running
    return out


def success_rewards(episode: Episode) -> list[float]:
    """The episode's rewards with only the win paid: SUCCESS_REWARD on the final turn of a solved
    episode, the env's penalties (negative rewards, e.g. GEM's format error) kept, every other
    credit dropped. GEM's games also pay partial credit (GuessTheNumber: closeness of the last
    guess), which lets a policy that always guesses the middle number earn most of a win."""
    rewards = [min(t.reward, 0.0) for t in episode.transitions]
    if episode.success:
        rewards[-1] = SUCCESS_REWARD
    return rewards


REWARDS = ("env", "success")


def assign_returns(episodes: Iterable[Episode], gamma: float, reward: str = "env") -> list[Transition]:
    """Set `ret` on every transition; return all transitions in episode order. reward="env"
    uses the env's rewards, "success" `success_rewards`."""
    if reward not in REWARDS:
        raise ValueError(f"reward must be one of {', '.join(REWARDS)}, got {reward!r}")
    flat: list[Transition] = []
    for episode in episodes:
        rewards = success_rewards(episode) if reward == "success" else [t.reward for t in episode.transitions]
        for t, g in zip(episode.transitions, discounted_returns(rewards, gamma)):
            t.ret = g
        flat.extend(episode.transitions)
    return flat


def batch_normalize(values: Sequence[float], eps: float = 1e-6) -> list[float]:
    """(x - mean) / std over the batch (population std).

    A batch with no spread carries no learning signal: every value becomes 0 (GEM divides by
    std + 1e-9 and gets the same zeros, but a one-element batch gives NaN there)."""
    n = len(values)
    if n == 0:
        return []
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / n
    std = math.sqrt(var)
    if std < eps:
        return [0.0] * n
    return [(v - mean) / std for v in values]


def assign_advantages(transitions: Sequence[Transition], use_rebn: bool) -> None:
    """Advantage = ReBN-normalised return (or the raw return without ReBN)."""
    returns = [t.ret for t in transitions]
    advantages = batch_normalize(returns) if use_rebn else returns
    for t, a in zip(transitions, advantages):
        t.advantage = float(a)


# How far the entropy floor may raise the bonus: enough to turn a collapse around, not so much
# that one low-entropy batch swamps its advantages.
MAX_FLOOR_BOOST = 10.0


def entropy_coefficient(coef: float, floor: float, mean_surprisal: float) -> float:
    """The bonus coefficient for a batch whose action tokens average `mean_surprisal` nats.

    Above `floor` (or with floor=0) it is `coef`. Below, it grows as (floor / surprisal)^2, at
    most MAX_FLOOR_BOOST times: a fixed bonus weakens exactly as the policy collapses (certain
    tokens have little surprisal to reward), so the floor pushes back harder the closer the
    batch comes to one deterministic answer. Stateless, so a resumed run behaves the same."""
    if coef == 0.0 or floor <= 0.0 or mean_surprisal >= floor:
        return coef
    boost = (floor / mean_surprisal) ** 2 if mean_surprisal > 0.0 else MAX_FLOOR_BOOST
    return coef * min(boost, MAX_FLOOR_BOOST)


def add_entropy_bonus(transitions: Sequence[Transition], coef: float, floor: float = 0.0) -> float:
    """Maximum-entropy REINFORCE: each action token's advantage gains c * (-log p), the
    sampled estimate of the policy's entropy, less its batch mean (a baseline: it leaves the
    expected gradient unchanged and cuts variance). Rare tokens are pushed up, certain ones
    barely move, which holds off the collapse onto one deterministic answer that a small batch's
    noisy advantages otherwise drive the policy into. c is `entropy_coefficient(coef, floor,
    batch mean surprisal)`; returns it (0 when nothing was added)."""
    surprisal = [-lp for t in transitions for lp in t.act_logprobs]
    if coef == 0.0 or not surprisal:
        return 0.0
    baseline = sum(surprisal) / len(surprisal)
    c = entropy_coefficient(coef, floor, baseline)
    for t in transitions:
        t.token_bonus = [c * (-lp - baseline) for lp in t.act_logprobs]
    return c


def subsample(transitions: Sequence[Transition], batch_size: int, rng: random.Random) -> list[Transition]:
    """Keep a fixed number of transitions per step (uniformly, without replacement)."""
    if batch_size <= 0 or len(transitions) <= batch_size:
        return list(transitions)
    return rng.sample(list(transitions), batch_size)


def trainable(t: Transition) -> bool:
    """A transition can become a Datum when it has a prompt token to condition on and an action."""
    return len(t.obs_tokens) > 0 and len(t.act_tokens) > 0


@dataclass(frozen=True)
class DatumArrays:
    """The per-position arrays of one Datum, before they are wrapped into tinker types.

    Position i predicts token i+1 of obs+act. The first `num_prompt_positions` positions
    predict prompt tokens: they carry logprob 0 and advantage 0, which is how the
    importance_sampling loss ignores them (Tinker takes no separate mask)."""

    input_tokens: list[int]
    target_tokens: list[int]
    logprobs: list[float]
    advantages: list[float]
    num_prompt_positions: int

    @property
    def action_positions(self) -> slice:
        return slice(self.num_prompt_positions, len(self.input_tokens))


def datum_arrays(t: Transition) -> DatumArrays:
    if not trainable(t):
        raise ValueError("a transition needs at least one observation token and one action token")
    tokens = t.obs_tokens + t.act_tokens
    n_prompt = len(t.obs_tokens) - 1  # positions whose target is still a prompt token
    n_act = len(t.act_tokens)
    return DatumArrays(
        input_tokens=tokens[:-1],
        target_tokens=tokens[1:],
        logprobs=[0.0] * n_prompt + [float(x) for x in t.act_logprobs],
        advantages=[0.0] * n_prompt + [float(t.advantage) + b for b in (t.token_bonus or [0.0] * n_act)],
        num_prompt_positions=n_prompt,
    )


def to_datum(t: Transition) -> Any:
    """The tinker `Datum` for an importance_sampling update on transition `t`."""
    from tinker import types

    arrays = datum_arrays(t)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens=arrays.input_tokens),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=arrays.target_tokens, dtype="int64", shape=[len(arrays.target_tokens)]),
            "logprobs": types.TensorData(data=arrays.logprobs, dtype="float32", shape=[len(arrays.logprobs)]),
            "advantages": types.TensorData(data=arrays.advantages, dtype="float32", shape=[len(arrays.advantages)]),
        },
    )


def sample_train_gap(
    transitions: Sequence[Transition], learner_logprobs: Sequence[Sequence[float]]
) -> dict[str, float]:
    """Sampler-vs-learner logprob gap on the action tokens, as GEM/the cookbook report it:
    v1 = mean(lp_sample - lp_train), v2 = 0.5 * mean((lp_sample - lp_train)^2).

    `learner_logprobs[i]` is the forward_backward output for transition i over all input
    positions; its last len(act_tokens) entries belong to the action."""
    diffs: list[float] = []
    for t, lp in zip(transitions, learner_logprobs):
        n = len(t.act_tokens)
        if n == 0:
            continue
        tail = list(lp)[-n:]
        diffs.extend(s - l for s, l in zip(t.act_logprobs, tail))
    if not diffs:
        return {}
    v1 = sum(diffs) / len(diffs)
    v2 = 0.5 * sum(d * d for d in diffs) / len(diffs)
    return {"train/kl_sample_train_v1": v1, "train/kl_sample_train_v2": v2}


def build_batch(
    episodes: Sequence[Episode], cfg: Config, rng: random.Random
) -> tuple[list[Transition], dict[str, float]]:
    """Returns -> (ReBN) advantages -> sub-sample -> the turns worth a Datum."""
    all_turns = assign_returns(episodes, cfg.gamma, cfg.reward)
    assign_advantages(all_turns, cfg.use_rebn)
    picked = subsample(all_turns, cfg.batch_size, rng)
    kept = [t for t in picked if trainable(t) and t.advantage != 0.0]
    coef = add_entropy_bonus(kept, cfg.entropy_bonus, cfg.entropy_floor)
    stats = {
        "train/entropy_coef": coef,
        "train/num_transitions_collected": float(len(all_turns)),
        "train/num_datums": float(len(kept)),
        "train/num_zero_advantage_skipped": float(sum(1 for t in picked if trainable(t) and t.advantage == 0.0)),
        "train/return_mean": (sum(t.ret for t in all_turns) / len(all_turns)) if all_turns else 0.0,
        "train/datum_tokens": float(sum(len(t.obs_tokens) + len(t.act_tokens) - 1 for t in kept)),
    }
    return kept, stats
