"""tinker-cookbook's RL loop on a GEM env: what `python -m gemtinker.cookbook_train key=value ...`
(gemtinker.cli.cookbook_train) runs.

The keys are those of GEM's `examples/train_tinker/tinker_cookbook_train.py`, so its command
lines run here unchanged (with a local model name), e.g.

    python -m gemtinker.cookbook_train env_id=rg:simple_equations groups_per_batch=64 \
        group_size=8 learning_rate=2e-5 max_tokens=2048

Training is `tinker_cookbook.rl.train.main`, unmodified; this module only builds its `Config`
around `gemtinker.recipes.cookbook.dataset.GemDatasetBuilder` and picks the backend:
  * `base_url=...` or $TINKER_BASE_URL: that Tinker-compatible server (hosted Tinker included);
  * otherwise an embedded gemtinker server is started in this process, serving `model_name`.
Logs are the cookbook's own (metrics.jsonl, checkpoints.jsonl, iteration_*/train.html, ...)
under `log_path`, plus a reward-curve PNG.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import chz

from gemtinker import DEFAULT_MODEL

log = logging.getLogger("gemtinker.cookbook_train")

RECIPE_NAME = "gemtinker_cookbook_gem"
LOCAL_API_KEY = "tml-local"


@chz.chz
class CLIConfig:
    # Model
    model_name: str = DEFAULT_MODEL
    lora_rank: int = 32
    # None: the cookbook's recommendation for hosted models; for local models chosen from the
    # tokenizer (ChatML tokens, as in SmolLM2 -> qwen3_instruct; otherwise role_colon).
    renderer_name: str | None = None
    load_checkpoint_path: str | None = None

    # GEM env
    env_id: str = "game:GuessTheNumber-v0-easy"
    env_kwargs_json: str | None = None  # GEM constructor kwargs, e.g. '{"max_turns": 4}'
    math_dataset: str = "auto"  # math:* questions: auto | generated | hub | /path/file.jsonl

    # Training
    prompt_type: str = "general"  # general | no
    group_size: int = 4
    groups_per_batch: int = 16
    n_batches: int = 50
    learning_rate: float = 1e-5
    max_tokens: int = 256
    kl_penalty_coef: float = 0.0
    num_substeps: int = 1
    # Loss for sync and async runs. The cookbook's async default, stable_reinforce, needs
    # per-sequence stability records that gemtinker's server does not produce, so async runs use
    # this loss too (importance_sampling already reweights 1-step-stale samples by
    # exp(logp_new - logp_sampler); `ppo` adds clipping for longer staleness).
    loss_fn: str = "importance_sampling"
    seed: int = 0  # group g of batch b plays the task of seed `seed + b * groups_per_batch + g`
    n_test_groups: int = 0  # >0: a held-out test set, evaluated every `eval_every` steps
    system_prompt: str | None = None
    # Prefill for every assistant reply (part of the prompt; GEM sees prefix + reply): "" none,
    # "boxed" = `\boxed{` (the low-level trainer's chat_boxed template), or literal text.
    answer_prefix: str = ""

    # Logging
    log_path: str | None = None
    wandb_project: str | None = None
    wandb_name: str | None = None
    compute_post_kl: bool = False
    eval_every: int = 0
    save_every: int = 25
    num_groups_to_log: int = 4
    plot: bool = True  # write the reward-curve PNG next to metrics.jsonl

    # Service
    base_url: str | None = None

    # "ask" needs a terminal; without one it behaves as "raise".
    behavior_if_log_dir_exists: Literal["delete", "resume", "ask", "raise"] = "ask"
    max_steps_off_policy: int | None = None  # set: the cookbook's async off-policy mode


def default_log_path(cfg: CLIConfig) -> str:
    model = cfg.model_name.strip("/").replace("/", "-")
    run = (
        f"gem-{cfg.env_id.replace(':', '_')}-{model}-r{cfg.lora_rank}-lr{cfg.learning_rate}"
        f"-g{cfg.group_size}-b{cfg.groups_per_batch}-{datetime.now().strftime('%Y-%m-%d-%H-%M-%S')}"
    )
    return str(Path("outputs-tinker") / "gem" / run)


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    return host in ("127.0.0.1", "localhost", "::1")


def choose_backend(cfg: CLIConfig) -> str:
    """The base URL the SDK will talk to; starts the embedded server when none is configured."""
    url = cfg.base_url or os.environ.get("TINKER_BASE_URL")
    if url:
        if _is_loopback(url):
            # A local gemtinker server accepts any key; the SDK refuses to start without one.
            os.environ.setdefault("TINKER_API_KEY", LOCAL_API_KEY)
        return url
    from gemtinker.server import ensure_backend

    return ensure_backend(models=[cfg.model_name])


def prefer_cached_tokenizer(model_name: str) -> None:
    """Make the cookbook's `get_tokenizer(model_name)` use the local HF cache first.

    The cookbook calls `AutoTokenizer.from_pretrained(name)`, which on a machine without the hub
    spends minutes in retries even when the files are cached (gemtinker registers its built-in
    models there). Registered lazily: the embedded server caches built-in models on first use.
    """
    from tinker_cookbook import tokenizer_utils

    if os.path.isdir(model_name) or tokenizer_utils.is_tokenizer_registered(model_name):
        return

    @functools.lru_cache(maxsize=1)
    def load() -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(model_name, local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached: the cookbook's own lookup (hub, remaps)
            return tokenizer_utils._get_hf_tokenizer(model_name)

    tokenizer_utils.register_tokenizer(model_name, load)


def resolve_renderer_name(cfg: CLIConfig) -> str | None:
    """The renderer to record in the run's config and checkpoint metadata (the cookbook checks it
    on resume). None when it can only be decided once the tokenizer is reachable; the dataset
    builder then picks the same default from the tokenizer."""
    if cfg.renderer_name:
        return cfg.renderer_name
    from tinker_cookbook import model_info

    from gemtinker.recipes.cookbook.prompts import default_renderer_name

    try:
        return model_info.get_recommended_renderer_name(cfg.model_name)
    except Exception:  # noqa: BLE001 - not a model the cookbook knows
        pass
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.model_name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached yet (e.g. first use of a built-in model)
        return None
    return default_renderer_name(cfg.model_name, tokenizer)


def build_config(cfg: CLIConfig, log_path: str) -> Any:
    """The cookbook `rl.train.Config` for these keys."""
    from tinker_cookbook.rl import train

    from gemtinker.recipes.cookbook.dataset import GemDatasetBuilder

    renderer_name = resolve_renderer_name(cfg)
    dataset_builder = GemDatasetBuilder(
        env_id=cfg.env_id,
        model_name_for_tokenizer=cfg.model_name,
        renderer_name=renderer_name,
        prompt_type=cfg.prompt_type,
        group_size=cfg.group_size,
        groups_per_batch=cfg.groups_per_batch,
        n_batches=cfg.n_batches,
        env_kwargs_json=cfg.env_kwargs_json,
        seed=cfg.seed,
        system_prompt=cfg.system_prompt,
        math_dataset=cfg.math_dataset,
        n_test_groups=cfg.n_test_groups,
        answer_prefix=cfg.answer_prefix,
    )
    async_config = None
    if cfg.max_steps_off_policy is not None:
        async_config = train.AsyncConfig(
            max_steps_off_policy=cfg.max_steps_off_policy,
            groups_per_batch=cfg.groups_per_batch,
            loss_fn=cfg.loss_fn,
        )
    kl_reference = train.KLReferenceConfig(base_model=cfg.model_name) if cfg.kl_penalty_coef > 0 else None
    return train.Config(
        learning_rate=cfg.learning_rate,
        dataset_builder=dataset_builder,
        model_name=cfg.model_name,
        recipe_name=RECIPE_NAME,
        max_tokens=cfg.max_tokens,
        log_path=log_path,
        eval_every=cfg.eval_every,
        save_every=cfg.save_every,
        load_checkpoint_path=cfg.load_checkpoint_path,
        renderer_name=renderer_name,
        wandb_project=cfg.wandb_project,
        wandb_name=cfg.wandb_name or Path(log_path).name,
        kl_penalty_coef=cfg.kl_penalty_coef,
        kl_reference_config=kl_reference,
        loss_fn=cfg.loss_fn,
        num_substeps=cfg.num_substeps,
        lora_rank=cfg.lora_rank,
        compute_post_kl=cfg.compute_post_kl,
        num_groups_to_log=cfg.num_groups_to_log,
        async_config=async_config,
        base_url=cfg.base_url,
    )


def write_plot(log_path: str) -> Path | None:
    """Draw the reward curve with the project's plotting module (shared with the low-level
    trainer). Returns the PNG path, or None when nothing could be drawn."""
    try:
        from gemtinker.recipes.runs import plotting
    except ImportError:
        log.warning("gemtinker.recipes.runs.plotting is not available; no PNG curve written")
        return None
    try:
        return plotting.plot_log_dir(log_path)
    except Exception as exc:  # noqa: BLE001 - a plot must never fail a finished training run
        log.warning("could not draw the learning curve for %s: %s", log_path, exc)
        return None


async def cli_main(cfg: CLIConfig) -> str:
    from tinker_cookbook import cli_utils
    from tinker_cookbook.rl import train

    if cfg.prompt_type not in ("general", "no"):
        raise ValueError(f"prompt_type must be 'general' or 'no', got {cfg.prompt_type!r}")
    log_path = cfg.log_path or default_log_path(cfg)
    behavior = cfg.behavior_if_log_dir_exists
    if behavior == "ask" and not sys.stdin.isatty():
        behavior = "raise"
    cli_utils.check_log_dir(log_path, behavior_if_exists=behavior)
    base_url = choose_backend(cfg)
    log.info("training %s on %s through %s; logs in %s", cfg.model_name, cfg.env_id, base_url, log_path)
    prefer_cached_tokenizer(cfg.model_name)
    await train.main(build_config(cfg, log_path))
    return log_path
