"""Episode settings that the trainer's `Config` and `gemtinker eval` share as defaults.

An evaluation without a run's config.json plays episodes the way a default training run does;
both read these values here, so evaluation does not depend on the trainer module.
"""

from __future__ import annotations

from dataclasses import dataclass

from gemtinker import DEFAULT_MODEL


@dataclass(frozen=True)
class EpisodeDefaults:
    model_name: str = DEFAULT_MODEL
    env_id: str = "game:GuessTheNumber-v0-easy"
    env_wrappers: str = "concat"
    template: str = "chat_boxed"
    math_dataset: str = "auto"
    max_tokens: int = 6
    max_turns: int = 100
    stop: str = ""


EPISODE_DEFAULTS = EpisodeDefaults()
