"""Returns, ReBN and Datum construction on hand-made episodes (numbers checked by hand)."""

from __future__ import annotations

import json
import math
import random

import pytest

from gemtinker.recipes.episodes import Episode, Transition, episode_metrics
from gemtinker.recipes.rebn.credit import (
    add_entropy_bonus,
    entropy_coefficient,
    assign_advantages,
    assign_returns,
    batch_normalize,
    datum_arrays,
    discounted_returns,
    sample_train_gap,
    subsample,
    to_datum,
)


def tr(obs: list[int], act: list[int], reward: float, lps: list[float] | None = None, **kw) -> Transition:
    return Transition(obs, act, lps if lps is not None else [-0.5] * len(act), reward, False, **kw)


def test_discounted_returns_by_hand() -> None:
    assert discounted_returns([0.0, 0.0, 1.0], 0.9) == pytest.approx([0.81, 0.9, 1.0])
    assert discounted_returns([1.0, -0.1, 2.0], 0.5) == pytest.approx([1 + 0.5 * (-0.1 + 0.5 * 2), -0.1 + 1.0, 2.0])
    assert discounted_returns([0.0, 0.0, 1.0], 1.0) == [1.0, 1.0, 1.0]
    assert discounted_returns([], 0.9) == []


def test_rebn_normalises_over_the_whole_batch() -> None:
    # Episode A: 2 turns, rewards (0, 1); episode B: 1 turn, reward 0; gamma 0.5.
    a = Episode([tr([1, 2], [3], 0.0), tr([1, 2, 3, 4], [5, 6], 1.0)])
    b = Episode([tr([7], [8], 0.0)])
    flat = assign_returns([a, b], gamma=0.5)
    assert [t.ret for t in flat] == pytest.approx([0.5, 1.0, 0.0])
    assign_advantages(flat, use_rebn=True)
    mean, std = 0.5, math.sqrt(((0.5 - 0.5) ** 2 + (1 - 0.5) ** 2 + (0 - 0.5) ** 2) / 3)
    assert [t.advantage for t in flat] == pytest.approx([(0.5 - mean) / std, (1 - mean) / std, (0 - mean) / std])
    assert sum(t.advantage for t in flat) == pytest.approx(0.0)


def test_rebn_off_uses_raw_returns_and_constant_batch_gives_zero() -> None:
    flat = assign_returns([Episode([tr([1], [2], 0.3)]), Episode([tr([1], [2], 0.7)])], gamma=0.9)
    assign_advantages(flat, use_rebn=False)
    assert [t.advantage for t in flat] == pytest.approx([0.3, 0.7])
    assert batch_normalize([2.0, 2.0, 2.0]) == [0.0, 0.0, 0.0]
    assert batch_normalize([5.0]) == [0.0]  # GEM's unbiased std gives NaN here
    assert batch_normalize([]) == []


def test_datum_arrays_mask_prompt_positions() -> None:
    t = tr([10, 11, 12], [20, 21], 1.0, lps=[-0.1, -0.2])
    t.advantage = 1.5
    d = datum_arrays(t)
    assert d.input_tokens == [10, 11, 12, 20]
    assert d.target_tokens == [11, 12, 20, 21]
    assert d.logprobs == pytest.approx([0.0, 0.0, -0.1, -0.2])
    assert d.advantages == [0.0, 0.0, 1.5, 1.5]
    assert d.num_prompt_positions == 2
    assert d.target_tokens[d.action_positions] == [20, 21]


def test_success_reward_pays_only_the_win() -> None:
    won = Episode([tr([1], [2], 0.0), tr([1], [2], -0.1), tr([1], [2], 1.0)])
    lost_close = Episode([tr([1], [2], 0.0), tr([1], [2], 0.89)])  # GuessTheNumber's closeness credit
    assign_returns([won, lost_close], gamma=1.0, reward="success")
    assert [t.ret for t in won.transitions] == pytest.approx([0.9, 0.9, 1.0])
    assert [t.ret for t in lost_close.transitions] == [0.0, 0.0]
    assert [t.reward for t in lost_close.transitions] == [0.0, 0.89]  # the env's rewards stay logged
    assign_returns([lost_close], gamma=1.0)
    assert [t.ret for t in lost_close.transitions] == pytest.approx([0.89, 0.89])
    with pytest.raises(ValueError, match="reward must be one of"):
        assign_returns([won], gamma=1.0, reward="closeness")


def test_entropy_bonus_adds_centred_surprisal_per_token() -> None:
    a = tr([1, 2], [3, 4], 0.0, lps=[-2.0, -0.0])
    b = tr([1, 2], [5], 0.0, lps=[-1.0])
    a.advantage, b.advantage = 1.0, -1.0
    add_entropy_bonus([a, b], 0.5)
    # surprisal 2, 0, 1: mean 1, so bonuses 0.5*(+1, -1, 0)
    assert a.token_bonus == pytest.approx([0.5, -0.5]) and b.token_bonus == pytest.approx([0.0])
    assert datum_arrays(a).advantages == pytest.approx([0.0, 1.5, 0.5])
    assert datum_arrays(b).advantages == pytest.approx([0.0, -1.0])
    c = tr([1, 2], [3], 0.0, lps=[-3.0])
    add_entropy_bonus([c], 0.0)
    assert c.token_bonus is None


def test_entropy_floor_raises_the_bonus_as_the_batch_collapses() -> None:
    assert entropy_coefficient(0.02, 0.0, 0.1) == 0.02  # floor off
    assert entropy_coefficient(0.02, 0.8, 1.2) == 0.02  # above the floor
    assert entropy_coefficient(0.02, 0.8, 0.4) == pytest.approx(0.08)  # (0.8 / 0.4)^2 = 4x
    assert entropy_coefficient(0.02, 0.8, 0.1) == pytest.approx(0.2)  # 64x, capped at 10x
    assert entropy_coefficient(0.02, 0.8, 0.0) == pytest.approx(0.2)
    assert entropy_coefficient(0.0, 0.8, 0.1) == 0.0  # no bonus, nothing to raise
    a = tr([1, 2], [3, 4], 0.0, lps=[-0.5, -0.1])
    b = tr([1, 2], [5], 0.0, lps=[-0.3])
    # mean surprisal 0.3 under a floor of 0.6: the coefficient is 4 x 0.1
    assert add_entropy_bonus([a, b], 0.1, floor=0.6) == pytest.approx(0.4)
    assert a.token_bonus == pytest.approx([0.4 * 0.2, 0.4 * -0.2]) and b.token_bonus == pytest.approx([0.0])


def test_datum_single_token_prompt_and_tinker_types() -> None:
    t = tr([5], [6, 7, 8], 0.0, lps=[-1.0, -2.0, -3.0])
    t.advantage = -0.25
    d = datum_arrays(t)
    assert d.input_tokens == [5, 6, 7] and d.target_tokens == [6, 7, 8]
    assert d.advantages == [-0.25] * 3 and d.num_prompt_positions == 0
    datum = to_datum(t)
    assert datum.model_input.to_ints() == [5, 6, 7]
    assert set(datum.loss_fn_inputs) == {"target_tokens", "logprobs", "advantages"}
    assert datum.loss_fn_inputs["target_tokens"].tolist() == [6, 7, 8]
    assert datum.loss_fn_inputs["target_tokens"].dtype == "int64"
    assert datum.loss_fn_inputs["logprobs"].tolist() == pytest.approx([-1.0, -2.0, -3.0])
    assert datum.loss_fn_inputs["advantages"].tolist() == pytest.approx([-0.25] * 3)


def test_untrainable_transitions_rejected() -> None:
    with pytest.raises(ValueError):
        datum_arrays(tr([], [1], 0.0))
    with pytest.raises(ValueError):
        datum_arrays(tr([1], [], 0.0))
    with pytest.raises(ValueError):
        Transition([1], [2, 3], [-1.0], 0.0, True)


def test_subsample_keeps_batch_size_without_replacement() -> None:
    ts = [tr([i], [i], float(i)) for i in range(10)]
    picked = subsample(ts, 4, random.Random(0))
    assert len(picked) == 4 and len({id(t) for t in picked}) == 4
    assert subsample(ts, 20, random.Random(0)) == ts


def test_sample_train_gap_uses_action_tail() -> None:
    t1 = tr([1, 2, 3], [4, 5], 0.0, lps=[-1.0, -2.0])
    t2 = tr([1], [9], 0.0, lps=[-0.5])
    learner = [[0.0, -7.0, -1.5, -1.5], [-0.25]]  # prompt positions are ignored
    gap = sample_train_gap([t1, t2], learner)
    diffs = [-1.0 + 1.5, -2.0 + 1.5, -0.5 + 0.25]
    assert gap["train/kl_sample_train_v1"] == pytest.approx(sum(diffs) / 3)
    assert gap["train/kl_sample_train_v2"] == pytest.approx(0.5 * sum(d * d for d in diffs) / 3)


def test_episode_metrics_and_success() -> None:
    win = Episode([tr([1], [2, 3], 0.0), tr([1], [2], 1.0)])
    lose = Episode([tr([1], [2], -0.1)])
    graded = Episode([tr([1], [2], 0.0, info={"correct": True})])
    m = episode_metrics([win, lose, graded])
    assert m["sampler/num_episodes"] == 3
    assert m["sampler/episode_return"] == pytest.approx((1.0 - 0.1 + 0.0) / 3)
    assert m["sampler/success_rate"] == pytest.approx(2 / 3)
    assert m["sampler/num_turns_per_episode"] == pytest.approx(4 / 3)
    assert m["sampler/action_num_tokens"] == pytest.approx(5 / 3)
    assert m["sampler/token_entropy"] == pytest.approx(0.5)


def test_forward_backward_metrics_merge_across_chunks() -> None:
    from gemtinker.recipes.rebn import merge_fb_metrics

    merged = merge_fb_metrics([{"loss:sum": 1.5, "ratio:mean": 1.0, "x:max": 2.0}, {"loss:sum": -0.5, "ratio:mean": 0.5, "x:max": 3.0}])
    assert merged == {"loss:sum": 1.0, "ratio:mean": 0.75, "x:max": 3.0}


def test_learning_rate_schedules_decay_to_zero_at_max_steps() -> None:
    from gemtinker.recipes import rebn
    from gemtinker.recipes.rebn import config_from_argv, learning_rate_at, validate

    def rates(schedule: str) -> list[float]:
        cfg = config_from_argv([f"lr_schedule={schedule}", "learning_rate=1e-3", "max_steps=4"])
        return [learning_rate_at(cfg, s) for s in range(4)]

    assert rates("constant") == pytest.approx([1e-3] * 4)
    assert rates("linear") == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3])
    assert rates("cosine") == pytest.approx([1e-3, 0.5e-3 * (1 + math.cos(math.pi / 4)), 0.5e-3, 0.5e-3 * (1 + math.cos(3 * math.pi / 4))])
    warm = config_from_argv(["lr_warmup_steps=3", "learning_rate=1e-3", "max_steps=8"])
    assert [learning_rate_at(warm, s) for s in range(5)] == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3, 1e-3])
    with pytest.raises(ValueError, match="lr_schedule must be constant, linear or cosine"):
        validate(rebn.Config(lr_schedule="step"))  # type: ignore[arg-type]  # the command line's parser refuses it too


def test_make_run_arguments_are_a_valid_config() -> None:
    """`make run`'s recipe (the Makefile's RUN_ARGS) parses and validates: a renamed key fails here,
    not after a fresh machine's set-up."""
    from pathlib import Path

    from gemtinker.recipes.rebn import config_from_argv, validate

    makefile = Path(__file__).resolve().parents[2] / "Makefile"
    line = next(x for x in makefile.read_text().splitlines() if x.startswith("RUN_ARGS :="))
    cfg = config_from_argv(line.split(":=", 1)[1].split())
    validate(cfg)
    assert cfg.stop == "}" and cfg.reward == "success" and cfg.entropy_bonus > 0
    assert cfg.keep_best and cfg.eval_every > 0 and cfg.lr_warmup_steps > 0


def test_eval_falls_back_to_the_trainers_episode_defaults() -> None:
    """`gemtinker eval` without a run's config plays episodes as a default training run does,
    although it reads the defaults from recipes/defaults.py rather than the trainer's Config."""
    from gemtinker.recipes.evaluation.run import EvalConfig, resolve_settings
    from gemtinker.recipes.rebn import Config

    settings = resolve_settings(EvalConfig())
    assert settings, "eval resolved no settings"
    trainer = Config()
    assert settings == {key: getattr(trainer, key) for key in settings}


def test_best_check_survives_a_resume_and_ties_go_to_the_newer_policy(tmp_path) -> None:
    from gemtinker.recipes.rebn.best import VALIDATION_SEED_OFFSET, improves
    from gemtinker.recipes.runs.files import BestCheck, load_best, save_best
    from gemtinker.recipes.rollouts import EVAL_SEED_OFFSET

    assert VALIDATION_SEED_OFFSET - EVAL_SEED_OFFSET >= 2**30  # room for any held-out set
    assert load_best(tmp_path) is None
    best = BestCheck(8, 0.25, "tinker://run/sampler_weights/check000008")
    save_best(tmp_path, best)
    assert load_best(tmp_path) == best
    assert improves(0.25, best) and improves(0.3, best) and not improves(0.2, best) and improves(0.0, None)


def test_eval_of_a_run_takes_its_best_check_when_it_kept_one(tmp_path) -> None:
    from gemtinker.recipes.evaluation.run import EvalConfig, resolve_checkpoint

    (tmp_path / "checkpoints.jsonl").write_text(json.dumps({"step": 32, "sampler_path": "tinker://r/sampler_weights/last"}) + "\n")
    cfg = EvalConfig(log_dir=str(tmp_path))
    assert resolve_checkpoint(cfg) == "tinker://r/sampler_weights/last"
    (tmp_path / "best_check.json").write_text(json.dumps({"step": 16, "success_rate": 0.4, "sampler_path": "tinker://r/sampler_weights/check000016"}))
    assert resolve_checkpoint(cfg) == "tinker://r/sampler_weights/check000016"
    assert resolve_checkpoint(EvalConfig(log_dir=str(tmp_path), checkpoint="tinker://x")) == "tinker://x"
