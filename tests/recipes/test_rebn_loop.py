"""The rebn training loop end to end: tiny model, embedded server, real tinker SDK.

Each issue-4 example command runs 2 steps with tiny num_env/max_tokens overrides; resume after
an interruption continues the step counter from the last checkpoint; an env that raises loses
only its episodes. The tiny random model answers nonsense, so most runs train on constant
returns; `use_rebn=false` runs make sure Datums actually reach forward_backward.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gemtinker.engine.models import TINY_MODEL_NAME
from gemtinker.recipes import rebn
from gemtinker.recipes.rebn import loop
from gemtinker.recipes.runs.files import read_jsonl
from support.rebn import interrupt_at_step

pytestmark = pytest.mark.integration  # a whole training loop against a server: `make test` only

TINY = [f"model_name={TINY_MODEL_NAME}", "num_env=2", "batch_size=4", "max_tokens=6", "lora_rank=4",
        "progress=false", "print_rollouts=0"]


def train(base_url: str, log_dir: Path, *args: str) -> dict[str, Any]:
    cfg = rebn.config_from_argv([*TINY, f"base_url={base_url}", f"log_dir={log_dir}", *args])
    return rebn.run(cfg)


def steps(log_dir: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(log_dir / "metrics.jsonl")]


@pytest.mark.parametrize(
    "args",
    [  # math12k-python-tool (math data, tool wrapper) is the fast one; the others run in `make test`
        pytest.param(["env_id=math:DeepScaleR40K", "max_steps=2"], marks=pytest.mark.slow),
        ["env_id=math:Math12K", "template=no", "env_wrappers=python_tool_no_int_reward_last_line_error,concat_chat",
         "gamma=1", "max_steps=2"],
        pytest.param(["env_id=game:Sudoku-v0-easy", "template=qwen3_game", "env_wrappers=concat", "max_steps=2",
                      "use_rebn=false"], marks=pytest.mark.slow),
    ],
    ids=["deepscaler", "math12k-python-tool", "sudoku"],
)
def test_issue_example_commands_run_two_steps(base_url: str, tmp_path: Path, args: list[str]) -> None:
    result = train(base_url, tmp_path, *args)
    assert steps(tmp_path) == [0, 1]
    for name in ("config.json", "metrics.jsonl", "rollouts.jsonl", "checkpoints.jsonl", "learning_curve.png"):
        assert (tmp_path / name).is_file(), name
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["env_id"] == args[0].split("=", 1)[1]
    if "math" in args[0]:
        assert "generated" in config["math_dataset_source"]  # offline fallback data
    m = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    for key in ("sampler/episode_return", "sampler/success_rate", "sampler/num_turns_per_episode",
                "sampler/action_num_tokens", "time/sample", "time/train", "env/errors"):
        assert key in m, key
    assert result["final_checkpoint"]["sampler_path"].startswith("tinker://")


def test_datums_reach_the_learner_and_gap_is_small(base_url: str, tmp_path: Path) -> None:
    train(base_url, tmp_path, "env_id=game:GuessTheNumber-v0-easy", "max_steps=2", "use_rebn=false", "fwd_bwd_chunk=2")
    for m in read_jsonl(tmp_path / "metrics.jsonl"):
        assert m["train/skipped"] == 0.0 and m["train/num_datums"] > 0
        # Same weights sampled and scored (float32): the logprob gap is numerical noise.
        assert abs(m["train/kl_sample_train_v1"]) < 1e-3
        assert m["train/kl_sample_train_v2"] < 1e-3
        assert "sampler/token_entropy" in m


@pytest.mark.slow  # a whole run (or subprocesses) for several seconds: `make test` only
def test_resume_after_interruption(base_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["env_id=game:GuessTheNumber-v0-easy", "max_steps=4", "save_every=2", "use_rebn=false"]
    real_build = interrupt_at_step(monkeypatch, tmp_path, 3)
    with pytest.raises(KeyboardInterrupt):
        train(base_url, tmp_path, *args)
    assert steps(tmp_path) == [0, 1, 2]
    ckpts = read_jsonl(tmp_path / "checkpoints.jsonl")
    assert [c["step"] for c in ckpts] == [2]

    monkeypatch.setattr(loop, "build_batch", real_build)
    train(base_url, tmp_path, *args, "resume=true")
    assert steps(tmp_path) == [0, 1, 2, 3]  # step 2 was redone from the step-2 checkpoint, once
    assert [c["step"] for c in read_jsonl(tmp_path / "checkpoints.jsonl")] == [2, 4]
    # The resumed run continued the optimizer: its first update is Adam step 3.
    resumed = read_jsonl(tmp_path / "metrics.jsonl")[2]
    if "optim/step" in resumed:
        assert resumed["optim/step"] == 3


@pytest.mark.slow  # a whole run (or subprocesses) for several seconds: `make test` only
def test_resume_before_the_first_checkpoint_restarts_cleanly(
    base_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["env_id=game:GuessTheNumber-v0-easy", "max_steps=2", "save_every=5", "use_rebn=false"]
    real_build = interrupt_at_step(monkeypatch, tmp_path, 1)
    with pytest.raises(KeyboardInterrupt):
        train(base_url, tmp_path, *args)
    assert steps(tmp_path) == [0] and not read_jsonl(tmp_path / "checkpoints.jsonl")
    monkeypatch.setattr(loop, "build_batch", real_build)
    train(base_url, tmp_path, *args, "resume=true")
    assert steps(tmp_path) == [0, 1]  # step 0 redone from scratch, logged once


def _register_flaky_env() -> str:
    import random

    from gem.core import Env
    from gem.envs.registration import ENV_REGISTRY, register

    env_id = "test:Flaky-v0"
    if env_id in ENV_REGISTRY:
        return env_id

    class FlakyEnv(Env):
        """Two-turn env that raises on a third of the episodes (decided at reset)."""

        def __init__(self, **_: Any) -> None:
            super().__init__()
            self.turn = 0
            self.explode = False

        def reset(self, seed: int | None = None) -> Any:
            super().reset(seed)
            self.turn = 0
            self.explode = random.random() < 1 / 3
            return "Say something.", {}

        def step(self, action: str) -> Any:
            self.turn += 1
            if self.explode:
                raise RuntimeError("flaky env exploded")
            done = self.turn >= 2
            return "Again.", float(len(action) % 3), done, False, {}

    register(env_id, FlakyEnv)
    return env_id


def test_env_that_throws_does_not_stop_training(base_url: str, tmp_path: Path) -> None:
    env_id = _register_flaky_env()
    train(base_url, tmp_path, f"env_id={env_id}", "env_wrappers=", "max_steps=2", "batch_size=8", "num_env=3")
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert steps(tmp_path) == [0, 1]
    assert sum(r["env/errors"] for r in records) > 0
    assert all(r["env/errors"] == r["env/errors_step"] for r in records)
    assert all(r["sampler/num_episodes"] > 0 for r in records)


@pytest.mark.slow  # a whole run (or subprocesses) for several seconds: `make test` only
def test_eval_and_plot_commands(base_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from gemtinker.cli import evaluate, plot

    run_dir = tmp_path / "run"
    train(base_url, run_dir, "env_id=game:GuessTheNumber-v0-easy", "max_steps=1")
    out = tmp_path / "eval.json"
    rc = evaluate.main([f"log_dir={run_dir}", "num_episodes=6", "num_env=3", f"base_url={base_url}",
                        "progress=false", f"output={out}"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["episodes"] and len(report["episodes"]) == 6
    assert len({ep["seed"] for ep in report["episodes"]}) == 6
    assert report["checkpoint"].startswith("tinker://")
    assert "success" in capsys.readouterr().out
    rc = evaluate.main(["checkpoint=base", f"model_name={TINY_MODEL_NAME}", "env_id=game:GuessTheNumber-v0-easy",
                        "num_episodes=2", "num_env=2", "max_tokens=4", f"base_url={base_url}", "progress=false"])
    assert rc == 0
    (run_dir / "learning_curve.png").unlink()
    assert plot.main([str(run_dir)]) == 0
    assert (run_dir / "learning_curve.png").stat().st_size > 1000
    assert plot.main([str(tmp_path / "nothing")]) == 1


def _episodes(log_dir: Path) -> list[tuple[int, int, list[str]]]:
    return [(r["step"], r["seed"], [t["action"] for t in r["turns"]]) for r in read_jsonl(log_dir / "rollouts.jsonl")]


@pytest.mark.slow  # a whole run (or subprocesses) for several seconds: `make test` only
def test_same_seed_replays_the_run(base_url: str, tmp_path: Path) -> None:
    """Round-based collection + seeded requests: which episodes are played, in which order, and
    what was sampled depend on the run's seed only (the sampler's seeding itself is tested in
    test_sampling_seed_reaches_every_request)."""
    args = ["env_id=game:GuessTheNumber-v0-easy", "max_steps=2", "use_rebn=false", "rollouts_per_step=16"]
    train(base_url, tmp_path / "a", *args, "seed=3")
    train(base_url, tmp_path / "b", *args, "seed=3")
    train(base_url, tmp_path / "c", *args, "seed=4")
    a, b, c = _episodes(tmp_path / "a"), _episodes(tmp_path / "b"), _episodes(tmp_path / "c")
    assert a and a == b
    assert [e[1] for e in a] != [e[1] for e in c]
    ma, mb = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [m["sampler/episode_return"] for m in ma] == [m["sampler/episode_return"] for m in mb]


@pytest.mark.slow  # a whole run (or subprocesses) for several seconds: `make test` only
def test_heldout_evaluation_before_and_after(base_url: str, tmp_path: Path) -> None:
    result = train(base_url, tmp_path, "env_id=game:GuessTheNumber-v0-easy", "max_steps=2", "eval_every=1",
                   "eval_episodes=2", "heldout_episodes=5")
    evals = read_jsonl(tmp_path / "eval.jsonl")
    assert [(r["step"], r["eval/episodes"] + r["eval/errors"]) for r in evals] == [(0, 5), (1, 2), (2, 5)]
    line = result["heldout"]
    base, final = evals[0], evals[-1]
    assert line == (
        f"held-out success: base {base['eval/success_rate']:.3f} [{base['eval/success_ci95_low']:.3f}, "
        f"{base['eval/success_ci95_high']:.3f}] -> trained {final['eval/success_rate']:.3f} "
        f"[{final['eval/success_ci95_low']:.3f}, {final['eval/success_ci95_high']:.3f}]"
    )


@pytest.mark.slow  # a whole run (or subprocesses) for several seconds: `make test` only
@pytest.mark.parametrize("pick_first", [False, True], ids=["newest-of-ties", "earlier-check"])
def test_keep_best_scores_the_best_validation_check_on_held_out_episodes(
    base_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pick_first: bool
) -> None:
    if pick_first:  # the tiny model wins nothing, so every check ties: force the first one to stay best
        monkeypatch.setattr(loop, "improves", lambda rate, best: best is None)
    result = train(base_url, tmp_path, "env_id=game:GuessTheNumber-v0-easy", "max_steps=3", "eval_every=2",
                   "eval_episodes=2", "heldout_episodes=5", "keep_best=true")
    evals = read_jsonl(tmp_path / "eval.jsonl")
    # step 0: the base model on held-out episodes; steps 2 and 3: validation checks; then held out
    assert [(r["step"], r["eval/episodes"] + r["eval/errors"], r.get("eval/validation", 0.0)) for r in evals] == [
        (0, 5, 0.0), (2, 2, 1.0), (3, 2, 1.0), (3, 5, 0.0)]
    chosen = 2 if pick_first else 3
    assert evals[-1]["eval/policy_step"] == chosen
    best = json.loads((tmp_path / "best_check.json").read_text())
    assert best["step"] == chosen and best["sampler_path"].startswith("tinker://")
    final = evals[-1]
    assert result["heldout"].endswith(
        f"-> trained {final['eval/success_rate']:.3f} [{final['eval/success_ci95_low']:.3f}, {final['eval/success_ci95_high']:.3f}]")
