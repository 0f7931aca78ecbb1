"""The GEM -> tinker-cookbook adapter without a server: envs, groups, datasets, Datum assembly,
and the cookbook-train key parsing. The loop itself runs in test_cookbook_loop.py."""

from __future__ import annotations

import asyncio
import json
import pickle

import pytest
import tinker

from gemtinker.engine.models import TINY_MODEL_NAME, resolve_model
from gemtinker.envs import groups
from gemtinker.recipes.cookbook.dataset import GemDatasetBuilder, GemEnvGroupBuilder, GemRLDataset
from gemtinker.recipes.cookbook.prompts import default_renderer_name, resolve_answer_prefix


@pytest.fixture(scope="module")
def tokenizer():
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    # A local folder: the cookbook loads it without any hub lookup.
    return get_tokenizer(str(resolve_model(TINY_MODEL_NAME).path))


@pytest.fixture(scope="module")
def renderer(tokenizer):
    from tinker_cookbook import renderers

    return renderers.get_renderer(default_renderer_name(TINY_MODEL_NAME, tokenizer), tokenizer)


def run(coro):
    return asyncio.run(coro)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_default_renderer_is_chatml_for_smollm2_tokenizer(tokenizer, renderer):
    assert default_renderer_name(TINY_MODEL_NAME, tokenizer) == "qwen3_instruct"
    prompt = renderer.build_generation_prompt([{"role": "user", "content": "hi"}])
    assert tokenizer.decode(prompt.to_ints()) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # The stop condition is the single <|im_end|> token of the SmolLM2 vocabulary.
    assert renderer.get_stop_sequences() == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert renderer.has_extension_property


def test_group_shares_one_task_and_groups_differ(renderer):
    for env_id in ("rg:simple_equations", "game:GuessTheNumber-v0-easy"):
        builder = GemEnvGroupBuilder(env_id, None, seed=11, group_size=3, renderer=renderer, prompt_type="no")
        envs = run(builder.make_envs())
        assert len(envs) == 3
        firsts = [run(e.initial_observation())[0].to_ints() for e in envs]
        assert firsts[0] == firsts[1] == firsts[2]
        # Same state, not just the same text: the same move gets the same GEM feedback.
        feedback = [e.gem_env.step("\\boxed{5}")[:3] for e in envs]
        assert feedback[0] == feedback[1] == feedback[2]
    # Different seeds give different tasks (GuessTheNumber's range is small, so use rg).
    firsts = {
        tuple(run(run(GemEnvGroupBuilder("rg:simple_equations", None, s, 1, renderer).make_envs())[0]
                  .initial_observation())[0].to_ints())
        for s in range(8)
    }
    assert len(firsts) >= 7


def test_game_state_is_in_the_first_prompt(renderer, tokenizer):
    # Sudoku's board is only in info["suffix"]; the prompt must include it, as GEM's wrapper does.
    builder = GemEnvGroupBuilder("game:Sudoku-v0-easy", None, seed=3, group_size=1, renderer=renderer, prompt_type="no")
    (env,) = run(builder.make_envs())
    text = tokenizer.decode(run(env.initial_observation())[0].to_ints())
    assert "current board layout" in text and "R1" in text


def test_builder_is_picklable_and_tagged(renderer):
    builder = GemEnvGroupBuilder("rg:simple_equations", '{"size": 50}', seed=1, group_size=2, renderer=renderer)
    clone = pickle.loads(pickle.dumps(builder))
    assert clone.seed == 1 and clone.env_kwargs_json == '{"size": 50}'
    assert builder.logging_tags() == ["rg", "simple_equations"]


def test_dataset_seeds_are_distinct_per_group_and_batch(renderer):
    ds = GemRLDataset(
        env_id="rg:simple_equations", env_kwargs_json=None, renderer=renderer,
        group_size=2, groups_per_batch=4, n_batches=3, seed=100,
    )
    seeds = [b.seed for i in range(len(ds)) for b in ds.get_batch(i)]
    assert len(seeds) == 12 and len(set(seeds)) == 12
    assert all(b.group_size == 2 for b in ds.get_batch(0))
    with pytest.raises(IndexError):
        ds.get_batch(3)


def test_dataset_builder_builds_test_set_and_rejects_bad_input():
    builder = GemDatasetBuilder(
        env_id="rg:simple_equations", model_name_for_tokenizer=str(resolve_model(TINY_MODEL_NAME).path),
        group_size=2, groups_per_batch=3, n_batches=2, n_test_groups=5,
    )
    train, test = run(builder())
    assert len(train) == 2 and test is not None and len(test.get_batch(0)) == 5
    train_seeds = {b.seed for i in range(2) for b in train.get_batch(i)}
    assert not train_seeds & {b.seed for b in test.get_batch(0)}
    with pytest.raises(ValueError, match="JSON"):
        groups.parse_env_kwargs("{not json")
    with pytest.raises(ValueError, match="unknown GEM env id"):
        run(GemDatasetBuilder(env_id="game:NoSuchGame-v0", model_name_for_tokenizer="x",
                                 group_size=1, groups_per_batch=1)())


def _guess_env(renderer, seed=5):
    builder = GemEnvGroupBuilder("game:GuessTheNumber-v0-easy", None, seed=seed, group_size=1,
                                    renderer=renderer, prompt_type="no")
    (env,) = run(builder.make_envs())
    return env


def test_multi_turn_conversation_is_carried_forward(renderer, tokenizer):
    env = _guess_env(renderer)
    target = env.gem_env.game_number
    ob0, stop = run(env.initial_observation())
    wrong = 1 if target != 1 else 2
    ac0 = encode(tokenizer, f"I guess \\boxed{{{wrong}}}<|im_end|>")
    res0 = run(env.step(ac0, extra={"stop_reason": "stop"}))
    assert not res0.episode_done and res0.metrics["parse_error"] == 0.0
    # Extension property: the next prompt is the previous prompt + the sampled reply + more.
    ob1 = res0.next_observation.to_ints()
    assert ob1[: ob0.length + len(ac0)] == ob0.to_ints() + ac0
    assert "Enter your next guess." in tokenizer.decode(ob1[ob0.length + len(ac0):])
    res1 = run(env.step(encode(tokenizer, f"\\boxed{{{target}}}<|im_end|>"), extra={"stop_reason": "stop"}))
    assert res1.episode_done and res1.reward == 1.0
    assert res1.metrics["stop/completed"] == 1.0 and res1.metrics["turns"] == 2
    assert res1.metrics["success"] == 1.0 and "success" not in res0.metrics
    assert res1.next_observation.length == 0
    with pytest.raises(RuntimeError):
        run(env.step(ac0))


def test_malformed_reply_is_gems_invalid_action(renderer, tokenizer):
    from gem.utils.constants import LanguageGameReward

    env = _guess_env(renderer)
    run(env.initial_observation())
    # The right answer, but cut off before <|im_end|>: it must not count as a guess.
    res = run(env.step(encode(tokenizer, f"\\boxed{{{env.gem_env.game_number}}}"), extra={"stop_reason": "length"}))
    assert res.episode_done
    assert res.reward == LanguageGameReward.format_error_reward
    assert res.metrics["parse_error"] == 1.0 and res.metrics["stop/max_tokens"] == 1.0
    assert res.metrics["success"] == 0.0


def test_multi_turn_episode_packs_into_one_datum_with_action_mask(renderer, tokenizer):
    """The cookbook's own Datum assembly over an episode of this env: one Datum for the whole
    game (extension property), loss mask exactly on the sampled tokens."""
    from tinker_cookbook.completers import TokensWithLogprobs
    from tinker_cookbook.rl.data_processing import assemble_training_data, compute_advantages
    from tinker_cookbook.rl.types import Trajectory, TrajectoryGroup, Transition

    trajectories = []
    for reward_guesses in ([1, 2], [3]):
        env = _guess_env(renderer, seed=21)
        env.gem_env.game_number = 10  # known target: every guess above is wrong
        ob, _ = run(env.initial_observation())
        transitions = []
        for k, g in enumerate(reward_guesses):
            text = f"\\boxed{{{g}}}<|im_end|>" if k < len(reward_guesses) - 1 else "no answer"
            ac = encode(tokenizer, text)
            res = run(env.step(ac, extra={"stop_reason": "stop"}))
            lps = [-0.5 - 0.01 * i for i in range(len(ac))]
            transitions.append(Transition(ob=ob, ac=TokensWithLogprobs(ac, lps), reward=res.reward,
                                          episode_done=res.episode_done, metrics=res.metrics))
            ob = res.next_observation
        assert transitions[-1].episode_done
        trajectories.append(Trajectory(transitions=transitions, final_ob=ob))
    group = TrajectoryGroup(trajectories, [0.0, 0.0], [{}, {}])
    advantages = compute_advantages([group])
    totals = group.get_total_rewards()
    mean = sum(totals) / len(totals)
    assert [float(a) for a in advantages[0]] == pytest.approx([t - mean for t in totals])
    data, meta = assemble_training_data([group], advantages)
    assert [m["traj_idx"] for m in meta] == [0, 1]  # one Datum per episode, 2-turn one included
    for datum, traj, adv in zip(data, trajectories, advantages[0]):
        mask = datum.loss_fn_inputs["mask"].to_torch()
        targets = datum.loss_fn_inputs["target_tokens"].to_torch().tolist()
        advs = datum.loss_fn_inputs["advantages"].to_torch()
        sampled = [t for tr in traj.transitions for t in tr.ac.tokens]
        assert int(mask.sum()) == len(sampled)
        assert [t for t, m in zip(targets, mask.tolist()) if m] == sampled
        assert all(a == pytest.approx(float(adv)) if m else a == 0.0 for a, m in zip(advs.tolist(), mask.tolist()))


def test_cli_keys_of_the_issue_commands_parse():
    import chz

    from gemtinker import DEFAULT_MODEL
    from gemtinker.recipes.cookbook.train import CLIConfig, build_config

    cfg = chz.entrypoint(CLIConfig, argv=[
        "env_id=math:Math12K", "groups_per_batch=64", "group_size=16", "learning_rate=2e-5",
        "max_tokens=2048", 'env_kwargs_json={"use_mp": false}', "renderer_name=qwen3_instruct",
    ])
    assert cfg.model_name == DEFAULT_MODEL and json.loads(cfg.env_kwargs_json) == {"use_mp": False}
    config = build_config(cfg, "/tmp/unused")
    assert config.dataset_builder.groups_per_batch == 64 and config.dataset_builder.group_size == 16
    assert config.learning_rate == 2e-5 and config.max_tokens == 2048 and config.async_config is None
    cfg = chz.entrypoint(CLIConfig, argv=[
        "env_id=rg:simple_equations", "max_steps_off_policy=1", "kl_penalty_coef=0.01", "renderer_name=role_colon",
    ])
    config = build_config(cfg, "/tmp/unused")
    assert config.async_config.max_steps_off_policy == 1
    assert config.async_config.loss_fn == "importance_sampling"  # server has no stable_reinforce
    assert config.kl_reference_config.base_model == cfg.model_name
    assert config.dataset_builder.answer_prefix == ""  # default: no prefill
    cfg = chz.entrypoint(CLIConfig, argv=["prompt_type=no", "answer_prefix=boxed", "renderer_name=qwen3_instruct"])
    assert build_config(cfg, "/tmp/unused").dataset_builder.answer_prefix == "boxed"
    assert isinstance(tinker.ModelInput.empty(), tinker.ModelInput)


def test_cli_help_and_bad_key_exit_codes(capsys):
    from gemtinker.cli import main as gemtinker_main

    assert gemtinker_main(["cookbook-train", "--help"]) == 0
    assert "max_steps_off_policy" in capsys.readouterr().out
    assert gemtinker_main(["cookbook-train", "no_such_key=1"]) == 2


def test_answer_prefix_boxed_prefills_prompt_and_env_sees_prefix_plus_reply(renderer, tokenizer):
    from gemtinker.envs.templates import reply_prefix

    prefix = reply_prefix("chat_boxed")
    assert resolve_answer_prefix("boxed") == prefix == "\\boxed{"
    assert resolve_answer_prefix("") == "" and resolve_answer_prefix("Answer: ") == "Answer: "
    builder = GemEnvGroupBuilder("game:GuessTheNumber-v0-easy", None, seed=5, group_size=1,
                                    renderer=renderer, prompt_type="no", answer_prefix=prefix)
    (env,) = run(builder.make_envs())
    (plain,) = run(GemEnvGroupBuilder("game:GuessTheNumber-v0-easy", None, seed=5, group_size=1,
                                         renderer=renderer, prompt_type="no").make_envs())
    target = env.gem_env.game_number
    wrong = 1 if target != 1 else 2
    ob0, _ = run(env.initial_observation())
    base0, _ = run(plain.initial_observation())
    # The prompt is the renderer's generation prompt followed by the prefix tokens.
    assert ob0.to_ints() == base0.to_ints() + encode(tokenizer, prefix)
    # The reply continues the prefix; GEM sees prefix + reply, so `3}` is the guess 3.
    res0 = run(env.step(encode(tokenizer, f"{wrong}}}<|im_end|>"), extra={"stop_reason": "stop"}))
    assert not res0.episode_done and res0.metrics["parse_error"] == 0.0
    assert f"you guessed {wrong}" in res0.logs["gem_observation"]
    # The conversation carries the full reply, and the next prompt ends with the prefix again.
    assert env.convo[-2] == {"role": "assistant", "content": f"{prefix}{wrong}}}"}
    ob1 = res0.next_observation.to_ints()
    assert ob1[-len(encode(tokenizer, prefix)):] == encode(tokenizer, prefix)
    assert f"{prefix}{wrong}}}<|im_end|>" in tokenizer.decode(ob1)
    # As in the low-level trainer, a reply cut at max_tokens still reaches GEM as prefix + text.
    res1 = run(env.step(encode(tokenizer, f"{target}}} is"), extra={"stop_reason": "length"}))
    assert res1.episode_done and res1.reward == 1.0 and res1.metrics["success"] == 1.0
    assert res1.metrics["parse_error"] == 1.0 and res1.metrics["stop/max_tokens"] == 1.0
