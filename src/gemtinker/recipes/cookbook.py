"""GEM environments as tinker-cookbook RL environments.

`tinker_cookbook.rl.train.main` (cookbook 0.6.1, used unmodified) trains on an `RLDataset` of
`EnvGroupBuilder`s, each making a group of single-use `Env`s whose total rewards are centred
within the group (GRPO-style). This module maps GEM onto those types:

* `GemCookbookEnv` wraps one GEM env. Its observations are a chat conversation rendered by a
  cookbook renderer; each sampled reply is parsed with `renderer.parse_response`. A reply that
  does not parse cleanly (no stop token: truncated at `max_tokens`, or malformed) is sent to GEM
  as an empty action, so the env's own invalid-action / format-error path scores it (except with
  an `answer_prefix` prefill, where GEM always sees prefix + reply, as in the low-level trainer's
  `chat_boxed` template). Multi-turn games keep the conversation: the reply and GEM's next observation are appended, so with a
  renderer that has the extension property (e.g. `qwen3_instruct`) a whole episode packs into one
  training Datum.
* `GemEnvGroupBuilder` makes `group_size` GEM envs in one state with
  `gemtinker.envs.groups.make_group_gem_envs`, so the group plays one task.
* `GemRLDataset` / `GemDatasetBuilder` hand out `groups_per_batch` builders per batch with
  distinct seeds for every group of every batch.

Everything here talks to the model only through the cookbook (and so the `tinker` SDK): it runs
unchanged against gemtinker's embedded server or hosted Tinker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import chz
import tinker
from tinker_cookbook import renderers
from tinker_cookbook.completers import StopCondition
from tinker_cookbook.rl.types import (
    Action,
    ActionExtra,
    Env,
    EnvGroupBuilder,
    Metrics,
    Observation,
    RLDataset,
    RLDatasetBuilder,
    StepResult,
)
from tinker_cookbook.tokenizer_utils import get_tokenizer

import gem
from gemtinker.envs.groups import group_prototype, make_group_gem_envs

log = logging.getLogger(__name__)

# --- prompts -------------------------------------------------------------------------------------
# GEM's tinker examples offer two ways to present the first observation: as-is ("no"), or as a
# question with an instruction to reason and box the answer ("general"; GEM's rg/math rewards
# read the last \boxed{} of the reply).


def _general_prompt(observation: str) -> str:
    return (
        f"Question: {observation}\n"
        "Please reason step by step, and put your final answer within \\boxed{}."
    )


def _no_prompt(observation: str) -> str:
    return observation


PROMPT_TEMPLATES: dict[str, Callable[[str], str]] = {"general": _general_prompt, "no": _no_prompt}

# Answer prefill: text that starts every assistant reply as part of the prompt (the policy
# continues it; GEM sees prefix + reply). "boxed" is the low-level trainer's `chat_boxed`
# prefill, `\boxed{`, which lets a small model (SmolLM2-135M) answer in the only format GEM's
# games and math envs parse. Any other non-empty value is used literally.
def _boxed_prefix() -> str:
    from gemtinker.envs.templates import reply_prefix

    return reply_prefix("chat_boxed")


ANSWER_PREFIX_NAMES: dict[str, Callable[[], str]] = {"boxed": _boxed_prefix}


def resolve_answer_prefix(answer_prefix: str | None) -> str:
    """The literal prefill text for an `answer_prefix` setting ("" / None: no prefill)."""
    if not answer_prefix:
        return ""
    named = ANSWER_PREFIX_NAMES.get(answer_prefix)
    return named() if named else answer_prefix

# Renderers whose special tokens a tokenizer must have as single tokens, in order of preference.
# SmolLM2 (the default model) uses ChatML (<|im_start|>role\n...<|im_end|>), which is exactly what
# `qwen3_instruct` renders; it also has the extension property and no <think> block.
_CHATML_RENDERER = "qwen3_instruct"
_FALLBACK_RENDERER = "role_colon"


def default_renderer_name(model_name: str, tokenizer: Any | None = None) -> str:
    """Pick a renderer for `model_name`, including local and non-hub models.

    The cookbook's own table (`model_info`) knows hosted models only and raises for anything
    else; for those we look at the tokenizer: ChatML special tokens -> `qwen3_instruct`,
    otherwise the plain-text `role_colon` renderer (needs no special tokens).
    """
    from tinker_cookbook import model_info

    try:
        return model_info.get_recommended_renderer_name(model_name)
    except Exception:  # noqa: BLE001 - unknown model: decide from the tokenizer below
        pass
    if tokenizer is None:
        tokenizer = get_tokenizer(model_name)
    if _single_token(tokenizer, "<|im_start|>") and _single_token(tokenizer, "<|im_end|>"):
        return _CHATML_RENDERER
    return _FALLBACK_RENDERER


def _single_token(tokenizer: Any, text: str) -> bool:
    try:
        return len(tokenizer.encode(text, add_special_tokens=False)) == 1
    except Exception:  # noqa: BLE001
        return False


# --- the cookbook Env ----------------------------------------------------------------------------


def _numeric_metrics(info: dict[str, Any]) -> Metrics:
    metrics: Metrics = {}
    for key, value in info.items():
        if isinstance(value, bool):
            metrics[key] = float(value)
        elif isinstance(value, (int, float)):
            metrics[key] = value
    return metrics


def _with_suffix(observation: str, info: dict[str, Any]) -> str:
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
        self.convo.append({"role": "user", "content": _with_suffix(str(next_obs), info)})
        return StepResult(
            reward=float(reward),
            episode_done=False,
            next_observation=self._observation(),
            next_stop_condition=self.stop_condition,
            metrics=metrics,
            logs=logs,
        )


# --- groups, datasets ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GemEnvGroupBuilder(EnvGroupBuilder):
    """`group_size` copies of one GEM task. Holds only names and numbers (picklable, so the
    cookbook's rollout executors can ship it); the envs are built in `make_envs`."""

    env_id: str
    env_kwargs_json: str | None
    seed: int
    group_size: int
    renderer: renderers.Renderer
    prompt_type: str = "general"
    system_prompt: str | None = None
    math_dataset: str = "auto"
    answer_prefix: str = ""

    async def make_envs(self) -> Sequence[Env]:
        gem_envs, obs, info = make_group_gem_envs(
            self.env_id, self.env_kwargs_json, self.seed, self.group_size, self.math_dataset
        )
        obs = _with_suffix(obs, info)
        return [
            GemCookbookEnv(e, obs, self.renderer, self.prompt_type, self.system_prompt, self.answer_prefix)
            for e in gem_envs
        ]

    def logging_tags(self) -> list[str]:
        # "rg:simple_equations" -> metrics under env/rg/... and env/simple_equations/...
        return [t for t in self.env_id.split(":") if t]


class GemRLDataset(RLDataset):
    """`n_batches` batches of `groups_per_batch` groups; group g of batch b uses seed
    `seed + b * groups_per_batch + g`, so no two groups of a run share a seed."""

    def __init__(
        self,
        *,
        env_id: str,
        env_kwargs_json: str | None,
        renderer: renderers.Renderer,
        group_size: int,
        groups_per_batch: int,
        n_batches: int,
        seed: int,
        prompt_type: str = "general",
        system_prompt: str | None = None,
        math_dataset: str = "auto",
        answer_prefix: str = "",
    ) -> None:
        if group_size < 1 or groups_per_batch < 1 or n_batches < 0:
            raise ValueError(
                f"need group_size >= 1, groups_per_batch >= 1, n_batches >= 0; got "
                f"{group_size}, {groups_per_batch}, {n_batches}"
            )
        self.env_id = env_id
        self.env_kwargs_json = env_kwargs_json
        self.renderer = renderer
        self.group_size = group_size
        self.groups_per_batch = groups_per_batch
        self.n_batches = n_batches
        self.seed = seed
        self.prompt_type = prompt_type
        self.system_prompt = system_prompt
        self.math_dataset = math_dataset
        self.answer_prefix = answer_prefix

    def seed_for(self, batch: int, group: int) -> int:
        return self.seed + batch * self.groups_per_batch + group

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]:
        if not 0 <= index < self.n_batches:
            raise IndexError(f"batch {index} out of range (dataset has {self.n_batches} batches)")
        return [
            GemEnvGroupBuilder(
                env_id=self.env_id,
                env_kwargs_json=self.env_kwargs_json,
                seed=self.seed_for(index, g),
                group_size=self.group_size,
                renderer=self.renderer,
                prompt_type=self.prompt_type,
                system_prompt=self.system_prompt,
                math_dataset=self.math_dataset,
                answer_prefix=self.answer_prefix,
            )
            for g in range(self.groups_per_batch)
        ]

    def __len__(self) -> int:
        return self.n_batches


# Test-set seeds start far from training seeds so evaluation tasks are not trained on.
TEST_SEED_OFFSET = 1_000_000_000


@chz.chz
class GemDatasetBuilder(RLDatasetBuilder):
    env_id: str
    model_name_for_tokenizer: str
    renderer_name: str | None = None
    prompt_type: str = "general"
    group_size: int
    groups_per_batch: int
    n_batches: int = 100
    env_kwargs_json: str | None = None
    seed: int = 0
    system_prompt: str | None = None
    # Where `math:*` questions come from: auto | generated | hub | a local file (gemtinker.envs).
    math_dataset: str = "auto"
    # Groups in the test set the cookbook evaluates every `eval_every` steps (0: no test set).
    n_test_groups: int = 0
    test_group_size: int = 1
    # Prefill for every assistant reply: "" (none), "boxed" (`\boxed{`), or literal text.
    answer_prefix: str = ""

    async def __call__(self) -> tuple[RLDataset, RLDataset | None]:
        if self.prompt_type not in PROMPT_TEMPLATES:
            raise ValueError(f"prompt_type must be one of {sorted(PROMPT_TEMPLATES)}, got {self.prompt_type!r}")
        # Fail early (before any rollout) on a bad env id, kwargs or math dataset.
        group_prototype(self.env_id, self.env_kwargs_json, self.math_dataset)
        tokenizer = get_tokenizer(self.model_name_for_tokenizer)
        renderer_name = self.renderer_name or default_renderer_name(self.model_name_for_tokenizer, tokenizer)
        renderer = renderers.get_renderer(renderer_name, tokenizer, model_name=self.model_name_for_tokenizer)
        common = dict(
            env_id=self.env_id,
            env_kwargs_json=self.env_kwargs_json,
            renderer=renderer,
            prompt_type=self.prompt_type,
            system_prompt=self.system_prompt,
            math_dataset=self.math_dataset,
            answer_prefix=resolve_answer_prefix(self.answer_prefix),
        )
        train = GemRLDataset(
            group_size=self.group_size,
            groups_per_batch=self.groups_per_batch,
            n_batches=self.n_batches,
            seed=self.seed,
            **common,
        )
        test = None
        if self.n_test_groups > 0:
            test = GemRLDataset(
                group_size=self.test_group_size,
                groups_per_batch=self.n_test_groups,
                n_batches=1,
                seed=self.seed + TEST_SEED_OFFSET,
                **common,
            )
        return train, test
