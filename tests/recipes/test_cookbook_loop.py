"""tinker-cookbook's RL loop (unmodified) on GEM envs against the embedded server, tiny model.

What is checked comes from two taps that leave the cookbook's code alone:
  * `rl.train.assemble_training_data` is wrapped, to see the trajectory groups, the advantages
    and the Datums (with their loss masks) the cookbook built;
  * `tinker.TrainingClient.forward_backward` is wrapped, to see what the SDK sent the server.
A random tiny model rarely ends a reply cleanly, so every episode of a group would score the
same and every advantage would be 0; the test gives each trajectory a different group reward
through the cookbook's own `compute_group_rewards` hook so centring is actually exercised.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tinker

from gemtinker.cli import cookbook_train
from gemtinker.engine.models import TINY_MODEL_NAME
from gemtinker.recipes.cookbook.dataset import GemEnvGroupBuilder

pytestmark = pytest.mark.integration  # a whole training loop against a server: `make test` only

MULTI_TURN_TEST_ENV = "gemtinkertest:GuessAnyText-v0"


@dataclass
class Taps:
    assembled: list[tuple[list[Any], list[Any], list[tinker.Datum], list[dict]]] = field(default_factory=list)
    sent: list[tuple[str, list[tinker.Datum]]] = field(default_factory=list)


@pytest.fixture
def taps(monkeypatch):
    from tinker_cookbook.rl import train

    taps = Taps()
    real_assemble = train.assemble_training_data

    def assemble(groups, advantages, *args, **kwargs):
        data, meta = real_assemble(groups, advantages, *args, **kwargs)
        # The cookbook also assembles Datums just to print sample groups (print_group); keep
        # only the training batches (prepare_minibatch).
        if sys._getframe(1).f_code.co_name == "print_group":
            return data, meta
        taps.assembled.append((list(groups), [a.clone() for a in advantages], list(data), list(meta)))
        return data, meta

    real_fb = tinker.TrainingClient.forward_backward

    def forward_backward(self, data, loss_fn, *args, **kwargs):
        taps.sent.append((loss_fn, list(data)))
        return real_fb(self, data, loss_fn, *args, **kwargs)

    async def group_rewards(self, trajectory_group, env_group):
        return [(0.5 * i, {}) for i in range(len(trajectory_group))]

    monkeypatch.setattr(train, "assemble_training_data", assemble)
    monkeypatch.setattr(tinker.TrainingClient, "forward_backward", forward_backward)
    monkeypatch.setattr(GemEnvGroupBuilder, "compute_group_rewards", group_rewards)
    return taps


def train_run(server, log_path: Path, env_id: str, **keys: Any) -> Path:
    args = {
        "model_name": TINY_MODEL_NAME,
        "base_url": server.base_url,
        "env_id": env_id,
        "lora_rank": 4,
        "group_size": 3,
        "groups_per_batch": 2,
        "n_batches": 2,
        "max_tokens": 8,
        "learning_rate": 1e-3,
        "save_every": 1,
        "num_groups_to_log": 1,
        "log_path": str(log_path),
        "behavior_if_log_dir_exists": "delete",
    }
    args.update(keys)
    assert cookbook_train.main([f"{k}={v}" for k, v in args.items()]) == 0
    return log_path


def metrics_rows(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines() if line.strip()]


def check_datums(taps: Taps, loss_fn: str = "importance_sampling") -> int:
    """Advantages centred per group; loss mask exactly on sampled tokens; the server got the
    same Datums minus the mask. Returns the number of Datums checked."""
    assert taps.assembled, "the cookbook assembled no training data"
    n = 0
    for groups, advantages, data, meta in taps.assembled:
        for group, adv in zip(groups, advantages):
            totals = group.get_total_rewards()
            mean = sum(totals) / len(totals)
            assert adv.tolist() == pytest.approx([t - mean for t in totals], abs=1e-6)
            assert abs(float(adv.sum())) < 1e-5 and float(adv.abs().sum()) > 0
        per_traj: dict[tuple[int, int], list[tinker.Datum]] = {}
        for datum, m in zip(data, meta):
            per_traj.setdefault((m["group_idx"], m["traj_idx"]), []).append(datum)
        for (g, t), datums in per_traj.items():
            traj = groups[g].trajectories_G[t]
            adv = float(advantages[g][t])
            sampled = [tok for tr in traj.transitions for tok in tr.ac.tokens]
            sampled_lp = [lp for tr in traj.transitions for lp in tr.ac.logprobs]
            got_tokens, got_lp = [], []
            for d in datums:
                mask = d.loss_fn_inputs["mask"].to_torch().tolist()
                targets = d.loss_fn_inputs["target_tokens"].to_torch().tolist()
                lps = d.loss_fn_inputs["logprobs"].to_torch().tolist()
                advs = d.loss_fn_inputs["advantages"].to_torch().tolist()
                assert len(mask) == len(targets) == d.model_input.length
                for m, tok, lp, a in zip(mask, targets, lps, advs):
                    if m:
                        got_tokens.append(tok)
                        got_lp.append(lp)
                        assert a == pytest.approx(adv, abs=1e-6)
                    else:
                        assert a == 0.0 and lp == 0.0
                n += 1
            assert got_tokens == sampled  # mask covers the action tokens and nothing else
            assert got_lp == pytest.approx(sampled_lp, abs=1e-6)
    sent = [d for fn, data in taps.sent for d in data]
    assert {fn for fn, _ in taps.sent} == {loss_fn}
    assert len(sent) == n
    for d in sent:
        assert set(d.loss_fn_inputs) == {"target_tokens", "logprobs", "advantages"}
    return n


@pytest.mark.slow  # a whole run (or subprocesses) for several seconds: `make test` only
def test_single_turn_rg_two_batches_then_resume_and_load(server, taps, tmp_path):
    log = train_run(server, tmp_path / "rg", "rg:simple_equations")
    rows = metrics_rows(log)
    assert sorted(r["progress/batch"] for r in rows if "progress/batch" in r) == [0, 1]
    assert all("env/all/reward/total" in r for r in rows if "progress/batch" in r)
    assert (log / "iteration_000000" / "train.html").is_file()
    assert (log / "iteration_000001" / "train_rollout_summaries.jsonl").is_file()
    assert (log / "learning_curve.png").is_file()
    ckpts = [json.loads(line) for line in (log / "checkpoints.jsonl").read_text().splitlines()]
    assert ckpts[-1]["name"] == "final" and ckpts[-1]["batch"] == 2
    assert check_datums(taps) == 2 * 2 * 3  # batches x groups x group_size single-turn episodes

    # Resume: the same log dir with one more batch continues from the final checkpoint
    # (state + optimizer) and trains only batch 2.
    taps.assembled.clear()
    taps.sent.clear()
    train_run(server, log, "rg:simple_equations", n_batches=3, behavior_if_log_dir_exists="resume")
    batches = [r["progress/batch"] for r in metrics_rows(log) if "progress/batch" in r]
    assert sorted(batches) == [0, 1, 2]
    assert len(taps.sent) == 1 and check_datums(taps) == 2 * 3
    config = json.loads((log / "config.json").read_text())
    assert config["renderer_name"] == "qwen3_instruct"

    # load_checkpoint_path: fresh run starting from the saved weights.
    taps.assembled.clear()
    taps.sent.clear()
    log2 = train_run(server, tmp_path / "rg-load", "rg:simple_equations", n_batches=1,
                     load_checkpoint_path=ckpts[-1]["state_path"])
    assert [r["progress/batch"] for r in metrics_rows(log2) if "progress/batch" in r] == [0]
    assert check_datums(taps) == 2 * 3


@pytest.mark.slow  # a whole run (or subprocesses) for several seconds: `make test` only
def test_guess_the_number_two_batches(server, taps, tmp_path):
    log = train_run(server, tmp_path / "gtn", "game:GuessTheNumber-v0-easy", prompt_type="no", group_size=2)
    rows = [r for r in metrics_rows(log) if "progress/batch" in r]
    assert len(rows) == 2
    assert all("env/all/parse_error" in r and "env/all/reward/total" in r for r in rows)
    check_datums(taps)


@pytest.fixture(scope="module")
def multi_turn_env_id():
    """GuessTheNumber where a reply without a \\boxed{} guess counts as guessing the turn number,
    so random tiny-model replies still play several turns (real server, real multi-turn loop)."""
    import gem
    from gem.envs.game_env.guess_the_number import GuessTheNumberEnv
    from gem.envs.registration import ENV_REGISTRY

    class GuessAnyText(GuessTheNumberEnv):
        def step(self, action: str):
            if not re.search(r"\\boxed{\d+}", action):
                action = f"\\boxed{{{self.turn_count + 1}}}"
            return super().step(action)

    if MULTI_TURN_TEST_ENV not in ENV_REGISTRY:
        gem.register(MULTI_TURN_TEST_ENV, GuessAnyText, min_number=3, max_number=10, max_turns=3)
    return MULTI_TURN_TEST_ENV


def test_multi_turn_episodes_through_the_loop(server, taps, tmp_path, multi_turn_env_id):
    log = train_run(server, tmp_path / "multi", multi_turn_env_id, prompt_type="no", group_size=2,
                    groups_per_batch=1)
    rows = [r for r in metrics_rows(log) if "progress/batch" in r]
    assert len(rows) == 2
    assert max(r["env/all/turns_per_episode"] for r in rows) > 1
    groups = [g for groups, *_ in taps.assembled for g in groups]
    multi = [t for g in groups for t in g.trajectories_G if len(t.transitions) > 1]
    assert multi
    for traj in multi:
        # The conversation is carried forward: each later prompt contains the earlier prompt.
        first = traj.transitions[0].ob.to_ints()
        for tr in traj.transitions[1:]:
            assert tr.ob.to_ints()[: len(first)] == first
    check_datums(taps)


def test_async_off_policy_one_step(server, taps, tmp_path):
    log = train_run(server, tmp_path / "async", "rg:simple_equations", max_steps_off_policy=1, save_every=0)
    rows = [r for r in metrics_rows(log) if "progress/batch" in r or "async/staleness_max" in r]
    assert rows and any("async/staleness_max" in r for r in rows)
    check_datums(taps, loss_fn="importance_sampling")


@pytest.mark.slow
def test_bundled_model_short_cookbook_run(tmp_path):
    """The real SmolLM2-135M through the whole cookbook path (embedded server started by
    cookbook-train itself): a few small batches on the offline math set finish and log rewards."""
    from gemtinker import DEFAULT_MODEL
    from gemtinker.engine.models import resolve_model
    from gemtinker.server import start_local

    # Registered in the HF cache, as after any earlier use: the renderer is then recorded up front
    # (with a fresh cache it is decided later, from the tokenizer, and the config records None).
    resolve_model(DEFAULT_MODEL)
    with start_local(models=[DEFAULT_MODEL], root=tmp_path / "server") as srv:
        log = tmp_path / "real"
        rc = cookbook_train.main([
            f"base_url={srv.base_url}", "env_id=math:Math12K", 'env_kwargs_json={"use_mp": false}',
            "group_size=4", "groups_per_batch=2", "n_batches=2", "max_tokens=48", "learning_rate=1e-4",
            "save_every=0", "num_groups_to_log=1", f"log_path={log}", "behavior_if_log_dir_exists=delete",
        ])
    assert rc == 0
    rows = [r for r in metrics_rows(log) if "progress/batch" in r]
    assert len(rows) == 2
    assert all(0.0 <= r["env/all/reward/total"] <= 1.0 for r in rows)
    config = json.loads((log / "config.json").read_text())
    assert config["renderer_name"] == "qwen3_instruct"
