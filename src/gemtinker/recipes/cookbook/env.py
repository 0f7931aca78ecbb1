"""`GemCookbookEnv`: one GEM episode as a tinker-cookbook `Env` (see the package docstring)."""

from __future__ import annotations

from typing import Any

import tinker
from tinker_cookbook import renderers
from tinker_cookbook.completers import StopCondition
from tinker_cookbook.rl.types import Action, ActionExtra, Env, Metrics, Observation, StepResult

import gem
from gemtinker.recipes.cookbook.prompts import PROMPT_TEMPLATES



def _numeric_metrics(info: dict[str, Any]) -> Metrics:
    metrics: Metrics = {}
    for key, value in info.items():
        if isinstance(value, bool):
            metrics[key] = float(value)
        elif isinstance(value, (int, float)):
            metrics[key] = value
    return metrics


def with_suffix(observation: str, info: dict[str, Any]) -> str:
    # GEM games put the current state and the standing instruction in info["suffix"] (Sudoku's
    # board, "Enter your next guess."), on reset and on every step; GEM's own observation wrapper
    # appends it, and so do we. The chat itself carries the history of earlier turns.
    suffix = info.get("suffix")
    if isinstance(suffix, str) and suffix and suffix not in observation:
        return f"{observation}\n{suffix}"
    return observation


class GemCookbookEnv(Env):
    """One GEM episode as a cookbook `Env` (single use, like every cookbook env)."""

    def __init__(
        self,
        gem_env: gem.Env,
        first_observation: str,
        renderer: renderers.Renderer,
        prompt_type: str = "general",
        system_prompt: str | None = None,
        answer_prefix: str = "",
    ) -> None:
        if prompt_type not in PROMPT_TEMPLATES:
            raise ValueError(f"prompt_type must be one of {sorted(PROMPT_TEMPLATES)}, got {prompt_type!r}")
        self.gem_env = gem_env
        self.renderer = renderer
        self.convo: list[renderers.Message] = []
        if system_prompt:
            self.convo.append({"role": "system", "content": system_prompt})
        self.convo.append({"role": "user", "content": PROMPT_TEMPLATES[prompt_type](first_observation)})
        self.done = False
        self.turns = 0
        # Literal prefill text (already resolved) and its tokens, appended after the renderer's
        # generation prompt. Tokenised on its own: the generation prompt ends with a special
        # token or newline, so this matches tokenising prompt + prefix as one string.
        self.answer_prefix = answer_prefix
        self._prefix_tokens: list[int] = (
            list(renderer.tokenizer.encode(answer_prefix, add_special_tokens=False)) if answer_prefix else []
        )

    @property
    def stop_condition(self) -> StopCondition:
        return self.renderer.get_stop_sequences()

    def _observation(self) -> Observation:
        prompt = self.renderer.build_generation_prompt(self.convo)
        for token in self._prefix_tokens:
            prompt = prompt.append_int(token)
        return prompt

    async def initial_observation(self) -> tuple[Observation, StopCondition]:
        return self._observation(), self.stop_condition

    async def step(self, action: Action, *, extra: ActionExtra | None = None) -> StepResult:
        if self.done:
            raise RuntimeError("GemCookbookEnv.step called after the episode ended (envs are single-use)")
        self.turns += 1
        message, termination = self.renderer.parse_response(action)
        text = renderers.get_text_content(message)
        # `termination` is a StrEnum: always truthy, so test `.is_clean`, never the value itself.
        parsed = termination.is_clean
        truncated_by_length = (extra or {}).get("stop_reason") == "length"
        if self.answer_prefix:
            # With a prefill the reply is the prefix's continuation, and GEM reads its answer
            # from prefix + reply even when no stop token followed (e.g. `7} is my guess` cut at
            # max_tokens): as in the low-level trainer, the env always sees prefix + reply.
            text = self.answer_prefix + text
            gem_action = text
        else:
            gem_action = text if parsed else ""
        next_obs, reward, terminated, truncated, info = self.gem_env.step(gem_action)
        info = dict(info or {})
        metrics = _numeric_metrics(info)
        metrics["parse_error"] = float(not parsed)
        metrics["sampled_to_length"] = float(truncated_by_length)
        done = bool(terminated or truncated)
        logs: dict[str, str | int | float] = {"gem_observation": str(next_obs)[:500]}
        if done:
            self.done = True
            metrics["turns"] = self.turns
            # GEM's success reward is 1 (games' win, rg's exact score, math's correct answer);
            # one value per episode, so env/all/success is the batch's success rate.
            metrics["success"] = float(float(reward) >= 1.0)
            if truncated_by_length:
                metrics["stop/max_tokens"] = 1.0
            elif not parsed:
                metrics["stop/parse_error"] = 1.0
            elif truncated and not terminated:
                metrics["stop/max_turns"] = 1.0
            else:
                metrics["stop/completed"] = 1.0
            return StepResult(
                reward=float(reward),
                episode_done=True,
                next_observation=tinker.ModelInput.empty(),
                next_stop_condition=self.stop_condition,
                metrics=metrics,
                logs=logs,
            )
        # Carry the conversation forward with what the model actually said (the parsed reply,
        # including the prefill, if any).
        self.convo.append({"role": "assistant", "content": text})
        self.convo.append({"role": "user", "content": with_suffix(str(next_obs), info)})
        return StepResult(
            reward=float(reward),
            episode_done=False,
            next_observation=self._observation(),
            next_stop_condition=self.stop_condition,
            metrics=metrics,
            logs=logs,
        )
