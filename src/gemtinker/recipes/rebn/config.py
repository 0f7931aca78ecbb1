"""The low-level trainer's keys (`python -m gemtinker.train key=value ...`), their checks, and
the run directory they name."""

from __future__ import annotations

import json
import math
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Literal, Sequence

import chz

from gemtinker.envs.factory import parse_wrappers
from gemtinker.envs.templates import check_template, is_multiturn
from gemtinker.recipes.defaults import EPISODE_DEFAULTS
from gemtinker.recipes.rollouts import parse_stop


@chz.chz
class Config:
    # Defaults fit the bundled SmolLM2-135M on GuessTheNumber (1..10, 4 guesses) on a 2-core CPU;
    # `make run` adds the keys of its Makefile line (README: "What `make run` does"). Keys that
    # change what the env means (reward, stop) default to what GEM's own script does, so its
    # command lines mean the same here. GEM's own defaults for large models: lora_rank=32,
    # learning_rate=4e-5, batch_size=128, max_tokens=2048, template=qwen3_general. The episode
    # settings' defaults live in recipes/defaults.py, shared with `gemtinker eval`.
    # Model and optimiser
    model_name: str = EPISODE_DEFAULTS.model_name
    lora_rank: int = 16
    learning_rate: float = 5e-4
    # "constant", or decayed to 0 at max_steps: "linear" (1 - step/max_steps) or "cosine", as
    # tinker-cookbook's lr_schedule; a decaying step size keeps the last noisy batches from
    # undoing what the run learnt
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    # Updates over which the learning rate ramps up linearly first (0 = none). Adam's first
    # updates move every weight by about the full learning rate whatever its gradient's size.
    lr_warmup_steps: int = 0
    grad_clip_norm: float = 0.0  # 0 = no clipping (Tinker's default)
    # Batch: `batch_size` turns (transitions) per update, collected from `num_env` envs at once
    batch_size: int = 16
    num_env: int = 8
    max_steps: int = 12
    max_tokens: int = EPISODE_DEFAULTS.max_tokens  # 6 per action (turn); "7}" + end-of-turn after the chat_boxed prefill
    # Extra stop strings per action, comma-separated ("" = end-of-turn only). "}" ends a
    # chat_boxed guess where its box closes, so no trailing chatter is sampled or trained on.
    stop: str = EPISODE_DEFAULTS.stop  # ""
    temperature: float = 1.0
    # datums per forward_backward call; 0 = the whole batch in one call, so the learner can share
    # prefixes across all of it (it bounds its own memory by micro-batching)
    fwd_bwd_chunk: int = 0
    seed: int = 0
    # Environment
    env_id: str = EPISODE_DEFAULTS.env_id  # game:GuessTheNumber-v0-easy
    env_wrappers: str = EPISODE_DEFAULTS.env_wrappers  # concat
    template: Literal[
        "qwen3_general", "qwen3_game", "no", "chat", "chat_boxed", "chat_multiturn", "chat_multiturn_boxed"
    ] = EPISODE_DEFAULTS.template  # type: ignore[assignment]  # chat_boxed
    math_dataset: str = EPISODE_DEFAULTS.math_dataset  # auto; math:* envs: auto | generated | hub | /path/file.jsonl|parquet
    max_turns: int = EPISODE_DEFAULTS.max_turns  # 100; safety cap on turns per episode
    # Algorithm
    gamma: float = 0.9
    use_rebn: bool = True
    # What the returns are made of: "env" = the env's rewards; "success" = 1 for a won episode
    # (the env's penalties kept, partial credit such as GuessTheNumber's closeness dropped)
    reward: Literal["env", "success"] = "env"
    # Entropy bonus per action token (see credit.add_entropy_bonus); 0 = plain REINFORCE
    entropy_bonus: float = 0.0
    # Entropy floor, nats per action token (0 = off): while a batch's mean surprisal is below it,
    # the bonus grows as (floor / surprisal)^2, up to 10x (credit.entropy_coefficient)
    entropy_floor: float = 0.0
    # Checkpoints and resume
    save_every: int = 4  # steps; <= 0: only the final checkpoint
    resume: bool = False
    # Held-out evaluation (seeds disjoint from training); eval_every=0 turns it off. The policy
    # before the first update (the base model) and the final one get `heldout_episodes` episodes
    # each, the evaluations every `eval_every` steps in between `eval_episodes`.
    eval_every: int = 0
    eval_episodes: int = 64
    heldout_episodes: int = 200
    # keep_best: the checks after step 0 (and one on the final policy) play validation episodes
    # (seeds disjoint from training and held-out ones) and the final held-out evaluation scores
    # the best check's policy (rebn/best.py); needs eval_every > 0
    keep_best: bool = False
    # Logging
    log_dir: str | None = None  # default runs/<env>-<timestamp>
    wandb_project: str | None = None
    wandb_name: str | None = None
    rollouts_per_step: int = 8  # episodes written to rollouts.jsonl each step
    print_rollouts: int = 1  # episodes printed to the console each step
    plot: bool = True
    progress: bool = True
    # Asynchronous sample/learn: > 0 collects the next batches while a step trains, with samplers
    # at most `async_steps` updates old (see rebn/async_loop.py); 0 = synchronous, on-policy
    async_steps: int = 0
    base_url: str | None = None  # Tinker endpoint; default TINKER_BASE_URL


def learning_rate_at(cfg: Config, step: int) -> float:
    """The Adam learning rate for update `step` (0-based): `cfg.lr_warmup_steps` of linear
    ramp-up ((step + 1) / (warmup + 1) of the rate), times `cfg.lr_schedule`'s decay."""
    warmup = min(1.0, (step + 1) / (cfg.lr_warmup_steps + 1))
    frac = min(max(step / cfg.max_steps, 0.0), 1.0) if cfg.max_steps > 0 else 0.0
    if cfg.lr_schedule == "linear":
        return warmup * cfg.learning_rate * (1.0 - frac)
    if cfg.lr_schedule == "cosine":
        return warmup * cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * frac))
    return warmup * cfg.learning_rate


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def resolve_log_dir(cfg: Config) -> Path:
    """The run's directory. With resume=true and no log_dir, the newest run of this env that
    has a checkpoint, so a killed `make run` resumes with the same command plus resume=true."""
    if cfg.log_dir:
        return Path(cfg.log_dir)
    prefix = _slug(cfg.env_id)
    if cfg.resume:
        candidates = sorted(
            (p for p in Path("runs").glob(f"{prefix}-*") if (p / "checkpoints.jsonl").is_file()),
            key=lambda p: p.stat().st_mtime,
        )
        if candidates:
            return candidates[-1]
    return Path("runs") / f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def validate(cfg: Config) -> None:
    check_template(cfg.template)
    problems = []
    if cfg.async_steps < 0:
        problems.append("async_steps must be >= 0 (0 = synchronous)")
    if cfg.num_env < 1:
        problems.append("num_env must be >= 1")
    if cfg.batch_size < 1:
        problems.append("batch_size must be >= 1")
    if cfg.max_tokens < 1:
        problems.append("max_tokens must be >= 1")
    try:
        parse_stop(cfg.stop)
    except ValueError as e:
        problems.append(str(e))
    if cfg.entropy_bonus < 0:
        problems.append("entropy_bonus must be >= 0")
    if cfg.lr_schedule not in ("constant", "linear", "cosine"):
        problems.append(f"lr_schedule must be constant, linear or cosine, got {cfg.lr_schedule!r}")
    if cfg.keep_best and cfg.eval_every <= 0:
        problems.append("keep_best=true chooses among the evaluations during training: set eval_every > 0")
    if cfg.lr_warmup_steps < 0:
        problems.append("lr_warmup_steps must be >= 0")
    if cfg.entropy_floor < 0:
        problems.append("entropy_floor must be >= 0 (0 = off)")
    if not 0.0 <= cfg.gamma <= 1.0:
        problems.append("gamma must be in [0, 1]")
    if is_multiturn(cfg.template) and any(w.startswith("concat") for w in parse_wrappers(cfg.env_wrappers)):
        problems.append(
            f"template={cfg.template} keeps the conversation itself; a concat wrapper would repeat "
            f"the history inside every message: use env_wrappers=none (got {cfg.env_wrappers!r})"
        )
    if problems:
        raise ValueError("; ".join(problems))
    if "concat_chat" in cfg.env_wrappers and cfg.template != "no":
        print(
            f"[gemtinker] note: env_wrappers={cfg.env_wrappers} already renders the chat; "
            f"template={cfg.template} wraps it again (GEM uses template=no with it)",
            file=sys.stderr,
        )


def config_from_argv(argv: Sequence[str]) -> Config:
    return chz.Blueprint(Config).make_from_argv(list(argv))


def dump_config(cfg: Config) -> str:
    return json.dumps(chz.asdict(cfg), indent=2)
