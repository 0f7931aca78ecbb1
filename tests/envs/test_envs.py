"""GEM env glue: ids, wrappers, templates, offline math data, concurrent rollouts, env errors.

A character-level fake tokenizer and a scripted fake SamplingClient keep these tests free of
models and servers."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace
from typing import Any

import pytest

from gemtinker.envs import EnvFactory, apply_template, generate_arithmetic, parse_wrappers
from gemtinker.envs.math_data import MathDatasetError, read_question_answer_file, resolve_math_rows
from gemtinker.recipes.rollouts import (
    EVAL_SEED_OFFSET,
    EpisodeRunner,
    RolloutSettings,
    TooManyFailures,
    collect_fixed_seeds,
    collect_training_batch,
    error_metrics,
    make_executor,
    training_seed,
)


class CharTokenizer:
    """One token per character; id 0 is EOS."""

    eos_token_id = 0
    unk_token_id = None
    chat_template = "fake"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))

    def convert_tokens_to_ids(self, token: str) -> None:
        return None

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False, add_generation_prompt: bool = False) -> str:
        text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class ScriptedSampler:
    """Answers every prompt with `reply` (+EOS) after `delay` seconds; counts concurrency."""

    def __init__(self, reply: str, delay: float = 0.0, fail: bool = False, eos: bool = True) -> None:
        self.reply, self.delay, self.fail, self.eos = reply, delay, fail, eos
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls = 0
        self.seeds: list[int | None] = []
        self.stops: list[Any] = []

    async def sample(self, prompt: Any, num_samples: int, sampling_params: Any) -> Any:
        self.calls += 1
        self.seeds.append(sampling_params.seed)
        self.stops.append(sampling_params.stop)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            if self.fail:
                raise ConnectionError("server went away")
        finally:
            self.in_flight -= 1
        tokens = [ord(c) for c in self.reply] + ([0] if self.eos else [])
        seq = SimpleNamespace(tokens=tokens, logprobs=[-0.5] * len(tokens), stop_reason="stop")
        return SimpleNamespace(sequences=[seq])


def runner(template: str = "qwen3_game", num_env: int = 4) -> EpisodeRunner:
    return EpisodeRunner(CharTokenizer(), RolloutSettings(template=template, max_tokens=16), make_executor(num_env))


# --- ids, wrappers, templates -------------------------------------------------------------


def test_unknown_env_id_and_wrapper_give_clear_errors() -> None:
    with pytest.raises(ValueError, match="GuessTheNumber-v0-easy"):
        EnvFactory("game:GuessTheNumber-v0-eassy")
    with pytest.raises(ValueError, match="unknown env wrapper"):
        parse_wrappers("concat,bogus")
    with pytest.raises(ValueError, match="before the concat"):
        parse_wrappers("concat_chat,python_tool")
    assert parse_wrappers("python_tool_no_int_reward_last_line_error,concat_chat") == [
        "python_tool_no_int_reward_last_line_error",
        "concat_chat",
    ]
    assert parse_wrappers("") == [] and parse_wrappers(None) == []


def test_templates() -> None:
    tok = CharTokenizer()
    assert apply_template("no", "abc") == "abc"
    general = apply_template("qwen3_general", "1+1?")
    assert general.startswith("<|im_start|>user\nQuestion: 1+1?") and general.endswith("<|im_start|>assistant\n")
    assert "\\boxed{}" in general
    assert "language games" in apply_template("qwen3_game", "board")
    assert apply_template("chat", "hi", tok) == "<user>hi</><assistant>"
    assert apply_template("chat_boxed", "hi", tok) == "<user>hi</><assistant>\\boxed{"
    with pytest.raises(ValueError):
        apply_template("llama", "x")


def test_concat_wrapper_accumulates_history() -> None:
    env = EnvFactory("game:GuessTheNumber-v0-easy", "concat").make(0)
    first, _ = env.reset(seed=3)
    second, *_ = env.step("\\boxed{1}")
    assert second.startswith(first.split("Enter your next guess.")[0][:40])
    assert "At turn 1" in second


# --- offline math data --------------------------------------------------------------------


def test_generated_arithmetic_is_deterministic_and_gradable() -> None:
    rows = generate_arithmetic(50, seed=7)
    assert rows == generate_arithmetic(50, seed=7)
    assert all(r["answer"].lstrip("-").isdigit() for r in rows)
    env = EnvFactory("math:DeepScaleR40K", math_dataset="generated").make(0)
    env.reset(seed=11)
    answer = env.unwrapped.answer
    assert env.step(f"so \\boxed{{{answer}}}")[1] == 1.0
    env.reset(seed=12)
    assert env.step("\\boxed{-99999}")[1] == 0.0


def test_local_dataset_files(tmp_path) -> None:
    jl = tmp_path / "mine.jsonl"
    jl.write_text("\n".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) for i in range(5)))
    rows = read_question_answer_file(jl)
    assert rows[0] == {"problem": "0+1?", "answer": "1"}
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq_path = tmp_path / "Math12K.parquet"
    pq.write_table(pa.table({"problem": ["2+2?"], "answer": ["4"]}), pq_path)
    env = EnvFactory("math:Math12K", math_dataset=str(pq_path)).make(0)
    obs, _ = env.reset(seed=1)
    assert obs == "2+2?"


def test_missing_or_bad_dataset_messages(tmp_path, monkeypatch) -> None:
    with pytest.raises(MathDatasetError, match="does not exist"):
        resolve_math_rows("math:Math12K", "axon-rl/MATH-12k", str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"q": "x", "a": "y"}) + "\n")
    with pytest.raises(MathDatasetError, match="question column"):
        read_question_answer_file(bad)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MathDatasetError, match="math_dataset=/path/Math12K.jsonl"):
        resolve_math_rows("math:Math12K", "axon-rl/MATH-12k", "hub")
    # auto: a file under $GEMTINKER_MATH_DIR wins, else the generated fallback.
    (tmp_path / "Math12K.jsonl").write_text(json.dumps({"problem": "p", "answer": "a"}) + "\n")
    monkeypatch.setenv("GEMTINKER_MATH_DIR", str(tmp_path))
    assert resolve_math_rows("math:Math12K", "axon-rl/MATH-12k").rows == [{"problem": "p", "answer": "a"}]
    fallback = resolve_math_rows("math:GSM8K", "axon-rl/GSM-8k")
    assert "generated" in fallback.source and len(fallback.rows) > 100


# --- rollouts -----------------------------------------------------------------------------


def test_concurrent_rollouts_collect_a_batch() -> None:
    factory = EnvFactory("game:GuessTheNumber-v0-easy", "concat")
    envs = [factory.make(i) for i in range(8)]
    asyncio.run(collect_training_batch(envs, runner(num_env=8), ScriptedSampler("\\boxed{5}"), 1, 0, 0))  # warm-up
    sampler = ScriptedSampler("I guess \\boxed{5}", delay=0.05)
    t0 = time.perf_counter()
    result = asyncio.run(collect_training_batch(envs, runner(num_env=8), sampler, 16, base_seed=0, step=0))
    elapsed = time.perf_counter() - t0
    assert result.num_transitions >= 16 and not result.errors
    assert sampler.max_in_flight == 8  # every env's request is in flight at once
    assert elapsed < 0.05 * sampler.calls / 2  # far from serial
    ep = result.episodes[0]
    assert ep.transitions[0].action_text == "I guess \\boxed{5}"
    assert ep.transitions[0].act_tokens[-1] == 0  # EOS is part of the action (the policy learns to stop)
    assert ep.transitions[-1].done


def test_env_that_throws_is_dropped_and_counted() -> None:
    factory = EnvFactory("game:GuessTheNumber-v0-easy", "concat")

    class Flaky:
        def __init__(self) -> None:
            self.env = factory.make(0)

        def reset(self, seed: int | None = None) -> Any:
            return self.env.reset(seed=seed)

        def step(self, action: str) -> Any:
            raise RuntimeError("env exploded")

    envs = [factory.make(0), Flaky(), factory.make(1)]
    result = asyncio.run(collect_training_batch(envs, runner(num_env=3), ScriptedSampler("\\boxed{3}"), 12, 0, 0))
    assert result.num_transitions >= 12
    assert result.errors and all(e.env_index == 1 and e.phase == "step" for e in result.errors)
    assert "env exploded" in result.errors[0].message
    assert all(ep.env_index != 1 for ep in result.episodes)
    m = error_metrics(result.errors, len(result.episodes))
    assert m["env/errors"] == len(result.errors) and m["env/errors_step"] == len(result.errors)


def test_all_failing_stops_instead_of_looping() -> None:
    envs = [EnvFactory("game:GuessTheNumber-v0-easy").make(0)]
    with pytest.raises(TooManyFailures, match="server went away"):
        asyncio.run(collect_training_batch(envs, runner(num_env=1), ScriptedSampler("x", fail=True), 4, 0, 0))


def test_fixed_seeds_each_run_once_and_are_disjoint_from_training() -> None:
    factory = EnvFactory("game:GuessTheNumber-v0-easy", "concat")
    envs = [factory.make(i) for i in range(3)]
    seeds = [EVAL_SEED_OFFSET + i for i in range(10)]
    result = asyncio.run(collect_fixed_seeds(envs, runner(num_env=3), ScriptedSampler("\\boxed{4}"), seeds))
    assert sorted(ep.seed for ep in result.episodes) == seeds
    assert all(training_seed(s, st, e, k) < EVAL_SEED_OFFSET for s in range(3) for st in range(3) for e in range(3) for k in range(3))
    # Same seed, same game: the result is reproducible.
    again = asyncio.run(collect_fixed_seeds(envs, runner(num_env=3), ScriptedSampler("\\boxed{4}"), seeds))
    by_seed = {ep.seed: ep.total_return for ep in result.episodes}
    assert by_seed == {ep.seed: ep.total_return for ep in again.episodes}


def test_prefill_template_hands_the_env_the_whole_answer() -> None:
    envs = [EnvFactory("game:GuessTheNumber-v0-easy", "concat").make(0)]
    result = asyncio.run(
        collect_training_batch(envs, runner(template="chat_boxed", num_env=1), ScriptedSampler("5}"), 1, 0, 0)
    )
    first = result.episodes[0].transitions[0]
    assert first.action_text == "\\boxed{5}"
    assert first.prompt_text.endswith("\\boxed{")
    assert first.reward >= 0  # parsed as a guess, not a format error (-0.1)


def test_sampling_seed_reaches_every_request() -> None:
    """Every request carries the seed derived from (episode seed, turn); episodes come in
    (round, env) order whatever order they finished in."""
    from gemtinker.recipes.rollouts import sampling_seed, training_seed

    f = EnvFactory("game:GuessTheNumber-v0-easy", "concat")
    envs = [f.make(i) for i in range(3)]
    sampler = ScriptedSampler("\\boxed{11}")  # out of range: the game goes on until its turns run out
    result = asyncio.run(collect_training_batch(envs, runner(num_env=3), sampler, 20, base_seed=5, step=2))
    assert [ep.env_index for ep in result.episodes][:3] == [0, 1, 2]
    expected = sorted(sampling_seed(ep.seed, t) for ep in result.episodes for t in range(ep.num_turns))
    assert sorted(sampler.seeds) == expected and len(set(sampler.seeds)) == len(sampler.seeds)
    assert [ep.seed for ep in result.episodes] == [
        training_seed(5, 2, i, r) for r in range(len(result.episodes) // 3) for i in range(3)
    ]


def test_stop_strings_end_actions() -> None:
    from gemtinker.recipes.rollouts import action_stop, parse_stop

    assert parse_stop("") == () and parse_stop("}") == ("}",)
    assert parse_stop("},\\n") == ("}", "\n")
    with pytest.raises(ValueError, match="empty stop string"):
        parse_stop("},,x")
    tok = CharTokenizer()
    assert action_stop(tok) == [0]  # token ids when there is nothing extra
    assert action_stop(tok, ("}",)) == [chr(0), "}"]  # else every stop as text
    envs = [EnvFactory("game:GuessTheNumber-v0-easy", "concat").make(0)]
    sampler = ScriptedSampler("5}")
    settings = RolloutSettings(template="chat_boxed", max_tokens=16, stop=("}",))
    asyncio.run(collect_training_batch(envs, EpisodeRunner(tok, settings, make_executor(1)), sampler, 1, 0, 0))
    assert sampler.stops and all(stop == [chr(0), "}"] for stop in sampler.stops)


def test_multiturn_chat_turns_extend_each_other() -> None:
    """chat_multiturn_boxed: one growing chat per episode, each prompt = the previous prompt +
    its reply + the env's answer, token for token (what lets the learner share the history)."""
    envs = [EnvFactory("game:GuessTheNumber-v0-easy", "none").make(0)]
    # out of range: the game goes on until its 4 turns run out; ends at a "}" stop, not EOS
    sampler = ScriptedSampler("11}", eos=False)
    result = asyncio.run(
        collect_training_batch(envs, runner(template="chat_multiturn_boxed", num_env=1), sampler, 4, 0, 0)
    )
    turns = result.episodes[0].transitions
    assert len(turns) == 4
    assert turns[0].prompt_text.startswith("<user>You are playing Guess The Number")
    for before, after in zip(turns, turns[1:]):
        assert after.obs_tokens[: len(before.obs_tokens) + len(before.act_tokens)] == before.obs_tokens + before.act_tokens
        assert after.prompt_text.endswith("outside the range specified.</><assistant>\\boxed{")
    assert turns[-1].prompt_text.count("You are playing Guess The Number") == 1
    assert turns[-1].prompt_text.count("<assistant>\\boxed{11}") == 3


def test_multiturn_chat_with_the_real_chat_template() -> None:
    """SmolLM2's ChatML: a reply that ends at a stop string or at <|im_end|> is extended by the
    next turn's rendering, and the incremental tokens equal tokenising the whole text."""
    from transformers import AutoTokenizer

    from gemtinker import DEFAULT_MODEL
    from gemtinker.envs.templates import encode_prompt
    from gemtinker.recipes.rollouts import EpisodeChat

    from gemtinker.engine.models import resolve_model

    resolve_model(DEFAULT_MODEL)  # registers its id in the HF cache (a fresh cache has none)
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    chat = EpisodeChat("chat_multiturn_boxed", tok)
    text, first = chat.prompt("Guess a number from 1 to 10.")
    assert text.endswith("<|im_start|>assistant\n\\boxed{")
    for reply, feedback in (("5}", "Higher than 5."), ("8}<|im_end|>", "Lower than 8.")):
        ids = tok.encode(reply, add_special_tokens=False)
        chat.reply("\\boxed{" + reply.removesuffix("<|im_end|>"), ids)
        before = first + ids
        text, first = chat.prompt(feedback)
        assert first[: len(before)] == before
        assert first == encode_prompt(text, tok)
        assert text.count("<|im_start|>user\n") == (len(chat.messages) + 1) // 2


def test_multiturn_template_refuses_a_concat_wrapper() -> None:
    from gemtinker.recipes.rebn import Config, validate

    with pytest.raises(ValueError, match="env_wrappers=none"):
        validate(Config(template="chat_multiturn_boxed", env_wrappers="concat"))
    validate(Config(template="chat_multiturn_boxed", env_wrappers="none"))


def test_env_group_plays_one_task_without_the_cookbook() -> None:
    """envs.groups builds a GRPO-style group on its own: distinct env objects in one state."""
    from gemtinker.envs.groups import make_group_gem_envs

    envs, obs, _info = make_group_gem_envs("game:GuessTheNumber-v0-easy", None, seed=3, group_size=3)
    assert len({id(e) for e in envs}) == 3 and obs
    replies = [e.step("\\boxed{5}")[:3] for e in envs]
    assert all(r == replies[0] for r in replies), replies
    other, other_obs, _ = make_group_gem_envs("game:GuessTheNumber-v0-easy", None, seed=4, group_size=1)
    assert len(other) == 1 and isinstance(other_obs, str)
