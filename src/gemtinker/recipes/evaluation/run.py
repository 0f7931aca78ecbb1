"""`gemtinker eval`'s work: a checkpoint (or the base model) on N held-out episodes.

Each episode gets its own seed (seed_offset + i; the default offset is disjoint from every
training seed), so N episodes are N different games/questions where the env allows. The
command line is `gemtinker.cli.evaluate`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import chz

from gemtinker.envs.factory import EnvFactory
from gemtinker.recipes.defaults import EPISODE_DEFAULTS
from gemtinker.recipes.evaluation.summary import EvalSummary, run_evaluation
from gemtinker.recipes.rollouts import EVAL_SEED_OFFSET, EpisodeRunner, RolloutSettings, make_executor, parse_stop
from gemtinker.recipes.runs.files import CONFIG_FILE, load_best
from gemtinker.recipes.runs.logger import episode_record, last_sampler_checkpoint
from gemtinker.recipes.tokenizer import load_tokenizer


@chz.chz
class EvalConfig:
    checkpoint: str | None = None  # tinker:// sampler weights path; "base" = the base model
    log_dir: str | None = None  # a training run: its last checkpoint and its env settings
    # Unset values come from the run's config.json (with log_dir), else the training defaults
    # (recipes/defaults.py).
    model_name: str | None = None
    env_id: str | None = None
    env_wrappers: str | None = None
    template: str | None = None
    math_dataset: str | None = None
    max_tokens: int | None = None
    max_turns: int | None = None
    stop: str | None = None
    temperature: float = 1.0
    num_episodes: int = 200
    num_env: int = 16
    seed_offset: int = EVAL_SEED_OFFSET
    output: str | None = None  # write the summary (+ episodes) as JSON here
    base_url: str | None = None
    progress: bool = True


def resolve_settings(cfg: EvalConfig) -> dict[str, Any]:
    run_config: dict[str, Any] = {}
    if cfg.log_dir:
        path = Path(cfg.log_dir) / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {cfg.log_dir} a gemtinker training run?")
        run_config = json.loads(path.read_text())
    out = {}
    for key in ("model_name", "env_id", "env_wrappers", "template", "math_dataset", "max_tokens", "max_turns", "stop"):
        explicit = getattr(cfg, key)
        out[key] = explicit if explicit is not None else run_config.get(key, getattr(EPISODE_DEFAULTS, key))
    return out


def resolve_checkpoint(cfg: EvalConfig) -> str | None:
    """None means the base model."""
    if cfg.checkpoint and cfg.checkpoint != "base":
        return cfg.checkpoint
    if cfg.checkpoint == "base" or not cfg.log_dir:
        return None
    best = load_best(Path(cfg.log_dir))
    if best is not None:  # a keep_best run's policy is its best validation check, not its last update
        return best.sampler_path
    record = last_sampler_checkpoint(Path(cfg.log_dir))
    if record is None:
        raise FileNotFoundError(f"{cfg.log_dir} has no sampler checkpoint in checkpoints.jsonl")
    return str(record["sampler_path"])


async def evaluate(cfg: EvalConfig) -> tuple[EvalSummary, dict[str, Any]]:
    import tinker

    settings = resolve_settings(cfg)
    checkpoint = resolve_checkpoint(cfg)
    service_client = tinker.ServiceClient(**({"base_url": cfg.base_url} if cfg.base_url else {}))
    if checkpoint:
        sampling_client = await service_client.create_sampling_client(model_path=checkpoint)
    else:
        sampling_client = await service_client.create_sampling_client(base_model=settings["model_name"])
    tokenizer = load_tokenizer(settings["model_name"], sampling_client)
    factory = EnvFactory(settings["env_id"], settings["env_wrappers"], tokenizer, settings["math_dataset"])
    envs = [factory.make(cfg.seed_offset + i) for i in range(max(1, min(cfg.num_env, cfg.num_episodes)))]
    executor = make_executor(len(envs))
    try:
        runner = EpisodeRunner(
            tokenizer,
            RolloutSettings(
                settings["template"], settings["max_tokens"], cfg.temperature, settings["max_turns"],
                parse_stop(settings["stop"]),
            ),
            executor,
        )
        summary, episodes = await run_evaluation(
            envs, runner, sampling_client, cfg.num_episodes, cfg.seed_offset, progress=cfg.progress
        )
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    report = {
        "checkpoint": checkpoint or f"base:{settings['model_name']}",
        **settings,
        "temperature": cfg.temperature,
        "seed_offset": cfg.seed_offset,
        **summary.metrics(prefix=""),
    }
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(
            json.dumps({**report, "episodes": [episode_record(-1, ep) for ep in episodes]}, indent=1) + "\n"
        )
    return summary, report
