"""Playing episodes of GEM envs with a Tinker `SamplingClient`, many envs at once.

Each env gets its own asyncio worker. Sampling requests of all workers are in flight together
(the server batches them); env `reset`/`step` run on a thread pool so a slow env (a Python tool
call, answer grading) does not stall the others. An env or sampling call that raises loses only
its episode: the error is recorded and reported in the step's metrics.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import random
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from gemtinker.envs.templates import apply_template, encode_prompt, is_multiturn, render_chat, reply_prefix
from gemtinker.recipes.episodes import Episode, Transition

# GEM envs seed episodes through the global `random`/numpy generators (`Env.reset(seed)` calls
# random.seed); the draw that follows must not interleave with another env's reset.
_RESET_LOCK = threading.Lock()


@dataclass(frozen=True)
class RolloutSettings:
    template: str
    max_tokens: int
    temperature: float = 1.0
    max_turns: int = 100  # a guard against envs that never end; GEM envs end well before
    # Extra strings that end an action besides end-of-turn, e.g. ("}",): a chat_boxed reply then
    # ends where its box closes (right for games' numbers; not for math answers whose box nests
    # braces)
    stop: tuple[str, ...] = ()


def parse_stop(spec: str | None) -> tuple[str, ...]:
    """`stop="}"` or `stop="},\\n"`: comma-separated stop strings; `\\n` and `\\t` stand for a
    newline and a tab, so they can be given on a command line."""
    if not spec:
        return ()
    parts = [part.replace("\\n", "\n").replace("\\t", "\t") for part in spec.split(",")]
    if any(not part for part in parts):
        raise ValueError(f"stop={spec!r} has an empty stop string")
    return tuple(parts)


@dataclass(frozen=True)
class EnvError:
    env_index: int
    seed: int
    phase: str  # "reset" | "sample" | "step"
    message: str


@dataclass
class BatchResult:
    episodes: list[Episode] = field(default_factory=list)
    errors: list[EnvError] = field(default_factory=list)

    @property
    def num_transitions(self) -> int:
        return sum(ep.num_turns for ep in self.episodes)


class EpisodeFailed(Exception):
    def __init__(self, phase: str, cause: BaseException) -> None:
        super().__init__(f"{phase}: {type(cause).__name__}: {cause}")
        self.phase = phase
        self.cause = cause


class TooManyFailures(RuntimeError):
    pass


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an action: EOS, and the chat end-of-turn marker when it differs."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    for marker in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        unk = getattr(tokenizer, "unk_token_id", None)
        if isinstance(tid, int) and tid >= 0 and tid != unk and tid not in ids:
            ids.append(tid)
    return ids


def action_stop(tokenizer: Any, extra: Sequence[str] = ()) -> list[int] | list[str]:
    """`SamplingParams.stop` for one action. Tinker takes either token ids or strings, so with
    extra stop strings the end-of-turn tokens are given as their text."""
    ids = stop_token_ids(tokenizer)
    if not extra:
        return ids
    texts = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    return list(dict.fromkeys([*texts, *extra]))


def training_seed(base_seed: int, step: int, env_index: int, episode: int) -> int:
    """A deterministic episode seed in [0, 2**31); evaluation uses seeds >= 2**31, so held-out
    episodes never share a seed with training ones."""
    return random.Random(f"{base_seed}/{step}/{env_index}/{episode}").randrange(2**31)


EVAL_SEED_OFFSET = 2**31


def sampling_seed(episode_seed: int, turn: int) -> int:
    """The `SamplingParams.seed` of one turn's request, in [0, 2**63)."""
    return random.Random(f"{episode_seed}/turn/{turn}").randrange(2**63)


class EpisodeChat:
    """One episode as a growing chat (the chat_multiturn templates).

    Each prompt's tokens are the previous prompt's tokens + the sampled reply's tokens + the
    newly rendered text, so every turn's datum extends the previous one token for token and the
    learner shares the history. Where re-rendering does not extend the earlier text (a chat
    template that rewrites earlier messages), the prompt is tokenised afresh."""

    def __init__(self, template: str, tokenizer: Any) -> None:
        self.template = template
        self.tokenizer = tokenizer
        self.messages: list[dict[str, str]] = []
        self._text = ""  # prompt text so far + the sampled reply, special tokens spelled out
        self._tokens: list[int] = []

    def prompt(self, observation: str) -> tuple[str, list[int]]:
        self.messages.append({"role": "user", "content": observation})
        text = render_chat(self.template, self.messages, self.tokenizer)
        if self._tokens and text.startswith(self._text):
            tokens = self._tokens + encode_prompt(text[len(self._text):], self.tokenizer)
        else:
            tokens = encode_prompt(text, self.tokenizer)
        self._text, self._tokens = text, tokens
        return text, list(tokens)

    def reply(self, action_text: str, act_tokens: Sequence[int]) -> None:
        self.messages.append({"role": "assistant", "content": action_text})
        self._text += self.tokenizer.decode(list(act_tokens), skip_special_tokens=False)
        self._tokens = self._tokens + list(act_tokens)


class EpisodeRunner:
    """Runs single episodes: template -> tokens -> sample -> decode -> env.step, until done."""

    def __init__(
        self,
        tokenizer: Any,
        settings: RolloutSettings,
        executor: concurrent.futures.Executor,
    ) -> None:
        from tinker import types

        self.tokenizer = tokenizer
        self.settings = settings
        self.executor = executor
        self.prefix = reply_prefix(settings.template)
        self.sampling_params = types.SamplingParams(
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            stop=action_stop(tokenizer, settings.stop),
        )

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    @staticmethod
    def _reset(env: Any, seed: int) -> tuple[Any, dict[str, Any]]:
        with _RESET_LOCK:
            return env.reset(seed=seed)

    async def run(self, env: Any, sampling_client: Any, env_index: int, seed: int) -> Episode:
        from tinker import types

        try:
            obs, _info = await self._in_thread(self._reset, env, seed)
        except Exception as e:  # noqa: BLE001 - any env failure only loses this episode
            raise EpisodeFailed("reset", e) from e
        transitions: list[Transition] = []
        chat = EpisodeChat(self.settings.template, self.tokenizer) if is_multiturn(self.settings.template) else None
        for turn in range(self.settings.max_turns):
            if chat is not None:
                prompt_text, prompt_tokens = chat.prompt(str(obs))
            else:
                prompt_text = apply_template(self.settings.template, str(obs), self.tokenizer)
                prompt_tokens = encode_prompt(prompt_text, self.tokenizer)
            # Seeded per request from (episode seed, turn): the same run seed replays the same
            # sampled tokens on the same machine, whatever else the server batches alongside.
            params = self.sampling_params.model_copy(update={"seed": sampling_seed(seed, turn)})
            try:
                response = await sampling_client.sample(
                    prompt=types.ModelInput.from_ints(tokens=prompt_tokens),
                    num_samples=1,
                    sampling_params=params,
                )
                seq = response.sequences[0]
                act_tokens = list(seq.tokens)
                act_logprobs = list(seq.logprobs or [])
                if len(act_logprobs) != len(act_tokens):
                    raise ValueError(f"sampler returned {len(act_tokens)} tokens but {len(act_logprobs)} logprobs")
            except Exception as e:  # noqa: BLE001
                raise EpisodeFailed("sample", e) from e
            # A template that prefills the reply owns those characters of the action.
            action_text = self.prefix + self.tokenizer.decode(act_tokens, skip_special_tokens=True)
            if chat is not None:
                chat.reply(action_text, act_tokens)
            try:
                obs, reward, terminated, truncated, info = await self._in_thread(env.step, action_text)
            except Exception as e:  # noqa: BLE001
                raise EpisodeFailed("step", e) from e
            done = bool(terminated or truncated)
            transitions.append(
                Transition(
                    obs_tokens=prompt_tokens,
                    act_tokens=act_tokens,
                    act_logprobs=act_logprobs,
                    reward=float(reward),
                    done=done,
                    action_text=action_text,
                    prompt_text=prompt_text,
                    stop_reason=str(getattr(seq, "stop_reason", "")),
                    info={k: v for k, v in (info or {}).items() if isinstance(v, (bool, int, float, str))},
                )
            )
            if done:
                break
        else:
            transitions[-1].done = True  # cut off by max_turns
        return Episode(transitions=transitions, env_index=env_index, seed=seed)


async def drive_envs(
    envs: Sequence[Any],
    runner: EpisodeRunner,
    sampling_client: Any,
    next_seed: Callable[[int, int], int | None],
    on_episode: Callable[[Episode], None] | None = None,
    max_consecutive_failures: int | None = None,
) -> BatchResult:
    """Run episodes on every env concurrently until `next_seed(env_index, k)` returns None.

    Fails with TooManyFailures when many episodes in a row fail and none succeeds (the server
    is gone, or the env is broken for every seed) instead of looping forever."""
    result = BatchResult()
    limit = max_consecutive_failures or max(16, 2 * len(envs))
    consecutive = 0

    async def worker(i: int) -> None:
        nonlocal consecutive
        k = 0
        while True:
            seed = next_seed(i, k)
            if seed is None:
                return
            k += 1
            try:
                episode = await runner.run(envs[i], sampling_client, i, seed)
            except EpisodeFailed as f:
                detail = "".join(traceback.format_exception_only(type(f.cause), f.cause)).strip()
                result.errors.append(EnvError(i, seed, f.phase, detail[:500]))
                consecutive += 1
                if consecutive >= limit:
                    raise TooManyFailures(
                        f"{consecutive} episodes in a row failed; last: env {i} seed {seed} "
                        f"{f.phase}: {detail[:300]}"
                    ) from f.cause
                continue
            consecutive = 0
            result.episodes.append(episode)
            if on_episode is not None:
                on_episode(episode)

    await asyncio.gather(*(worker(i) for i in range(len(envs))))
    return result


async def collect_training_batch(
    envs: Sequence[Any],
    runner: EpisodeRunner,
    sampling_client: Any,
    min_transitions: int,
    base_seed: int,
    step: int,
    on_episode: Callable[[Episode], None] | None = None,
) -> BatchResult:
    """Episodes until at least `min_transitions` turns are collected, in rounds: every env plays
    one episode per round (seed from (base_seed, step, env, round)), and another round starts
    only while the batch is short. Which episodes form the batch, and their order (round, env),
    so depend on the seeds alone, never on which env finished first: with seeded sampling a run
    replays exactly."""
    result = BatchResult()
    collected = failed_in_a_row = 0
    for round_index in itertools.count():
        def next_seed(i: int, k: int, r: int = round_index) -> int | None:
            return training_seed(base_seed, step, i, r) if k == 0 else None

        part = await drive_envs(envs, runner, sampling_client, next_seed, on_episode)
        part.episodes.sort(key=lambda ep: ep.env_index)
        result.episodes.extend(part.episodes)
        result.errors.extend(part.errors)
        collected += part.num_transitions
        if collected >= min_transitions:
            return result
        failed_in_a_row = failed_in_a_row + len(part.errors) if not part.episodes else 0
        if failed_in_a_row >= max(16, 2 * len(envs)):
            last = part.errors[-1]
            raise TooManyFailures(
                f"{failed_in_a_row} episodes in a row failed; last: env {last.env_index} seed {last.seed} "
                f"{last.phase}: {last.message[:300]}"
            )
    raise AssertionError("unreachable")


async def collect_fixed_seeds(
    envs: Sequence[Any],
    runner: EpisodeRunner,
    sampling_client: Any,
    seeds: Sequence[int],
    on_episode: Callable[[Episode], None] | None = None,
) -> BatchResult:
    """One episode per seed, spread over the envs (evaluation)."""
    queue = list(reversed(seeds))
    lock = threading.Lock()

    def next_seed(_i: int, _k: int) -> int | None:
        with lock:
            return queue.pop() if queue else None

    return await drive_envs(envs, runner, sampling_client, next_seed, on_episode)


def make_executor(num_env: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(32, num_env)), thread_name_prefix="gem-env")


def error_metrics(errors: Sequence[EnvError], num_episodes: int) -> dict[str, float]:
    out = {"env/errors": float(len(errors))}
    for phase in ("reset", "sample", "step"):
        out[f"env/errors_{phase}"] = float(sum(e.phase == phase for e in errors))
    attempts = len(errors) + num_episodes
    out["env/error_rate"] = len(errors) / attempts if attempts else 0.0
    return out


def now() -> float:
    return time.perf_counter()
