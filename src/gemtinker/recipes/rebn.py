"""Multi-turn REINFORCE with Return Batch Normalisation on GEM envs, over the Tinker API.

Written only against the `tinker` SDK, so the same loop trains on the embedded gemtinker server,
another gemtinker server, or hosted Tinker. One step:

  sampler <- save_weights_and_get_sampling_client()      (current policy)
  episodes <- num_env envs played concurrently until >= batch_size turns are collected
  returns (gamma) -> ReBN over all turns -> sub-sample batch_size turns -> one Datum per turn
  forward_backward(importance_sampling) + optim_step(Adam), both submitted before either is awaited

What it does beyond GEM's reference script (cheap, same algorithm):
  * an env or sampling error loses one episode, is counted (env/errors*), and training goes on;
    a run that only fails stops with the error instead of looping;
  * reproducible: episodes are collected in rounds (one per env) until the batch is full, and
    every sampling request carries a seed derived from (seed, step, env, round, turn), so the
    same seed replays a run's sampled tokens on the same machine;
  * turns whose advantage is exactly 0 (e.g. a batch with no return spread) are not sent, and a
    step with no signal skips the update (Adam would otherwise still move the weights);
  * ReBN with a one-turn or constant batch gives zeros, not NaN;
  * periodic checkpoints (state + sampler weights) and exact resume of the step counter and
    seeds; episodes are seeded deterministically from (seed, step, env, episode);
  * optional held-out evaluation on seeds disjoint from training;
  * optional asynchronous sample/learn (`async_steps=k`): the next batches are collected while a
    step trains, with samplers at most k updates old (recipes/async_loop.py); off by default.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Sequence

import chz

from gemtinker.envs.factory import EnvFactory, parse_wrappers
from gemtinker.envs.templates import check_template, is_multiturn
from gemtinker.recipes.async_loop import AsyncBatchPipeline
from gemtinker.recipes.defaults import EPISODE_DEFAULTS
from gemtinker.recipes.episodes import (
    Episode,
    Transition,
    add_entropy_bonus,
    assign_advantages,
    assign_returns,
    episode_metrics,
    sample_train_gap,
    subsample,
    to_datum,
    trainable,
)
from gemtinker.recipes.evaluation.summary import EvalSummary, run_evaluation
from gemtinker.recipes.rollouts import (
    EVAL_SEED_OFFSET,
    EpisodeRunner,
    RolloutSettings,
    collect_fixed_seeds,
    collect_training_batch,
    error_metrics,
    make_executor,
    parse_stop,
)
from gemtinker.recipes.progress import advance, progress_bar
from gemtinker.recipes.run_logging import RunLogger, last_checkpoint, print_rollout, summary_line
from gemtinker.recipes.tokenizer import load_tokenizer


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
    # Entropy bonus per action token (see episodes.add_entropy_bonus); 0 = plain REINFORCE
    entropy_bonus: float = 0.0
    # Checkpoints and resume
    save_every: int = 4  # steps; <= 0: only the final checkpoint
    resume: bool = False
    # Held-out evaluation (seeds disjoint from training); eval_every=0 turns it off. The policy
    # before the first update (the base model) and the final one get `heldout_episodes` episodes
    # each, the evaluations every `eval_every` steps in between `eval_episodes`.
    eval_every: int = 0
    eval_episodes: int = 64
    heldout_episodes: int = 200
    # Logging
    log_dir: str | None = None  # default runs/<env>-<timestamp>
    wandb_project: str | None = None
    wandb_name: str | None = None
    rollouts_per_step: int = 8  # episodes written to rollouts.jsonl each step
    print_rollouts: int = 1  # episodes printed to the console each step
    plot: bool = True
    progress: bool = True
    # Asynchronous sample/learn: > 0 collects the next batches while a step trains, with samplers
    # at most `async_steps` updates old (see recipes/async_loop.py); 0 = synchronous, on-policy
    async_steps: int = 0
    base_url: str | None = None  # Tinker endpoint; default TINKER_BASE_URL


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


def merge_fb_metrics(chunks: Sequence[dict[str, float]]) -> dict[str, float]:
    """Combine the metrics of several forward_backward calls: `name:sum` adds up, `name:max`
    and `name:min` take the extreme, anything else is averaged over the calls."""
    out: dict[str, float] = {}
    keys = {k for c in chunks for k in c}
    for k in keys:
        values = [float(c[k]) for c in chunks if k in c]
        if k.endswith(":sum"):
            out[k] = sum(values)
        elif k.endswith(":max"):
            out[k] = max(values)
        elif k.endswith(":min"):
            out[k] = min(values)
        else:
            out[k] = sum(values) / len(values)
    return out


def build_batch(
    episodes: Sequence[Episode], cfg: Config, rng: random.Random
) -> tuple[list[Transition], dict[str, float]]:
    """Returns -> (ReBN) advantages -> sub-sample -> the turns worth a Datum."""
    all_turns = assign_returns(episodes, cfg.gamma, cfg.reward)
    assign_advantages(all_turns, cfg.use_rebn)
    picked = subsample(all_turns, cfg.batch_size, rng)
    kept = [t for t in picked if trainable(t) and t.advantage != 0.0]
    add_entropy_bonus(kept, cfg.entropy_bonus)
    stats = {
        "train/num_transitions_collected": float(len(all_turns)),
        "train/num_datums": float(len(kept)),
        "train/num_zero_advantage_skipped": float(sum(1 for t in picked if trainable(t) and t.advantage == 0.0)),
        "train/return_mean": (sum(t.ret for t in all_turns) / len(all_turns)) if all_turns else 0.0,
        "train/datum_tokens": float(sum(len(t.obs_tokens) + len(t.act_tokens) - 1 for t in kept)),
    }
    return kept, stats


async def _save_checkpoint(training_client: Any, logger: RunLogger, name: str, next_step: int) -> dict[str, Any]:
    state_future = training_client.save_state(name)
    sampler_future = training_client.save_weights_for_sampler(name)
    state, sampler = await state_future, await sampler_future
    record = {"name": name, "step": next_step, "state_path": state.path, "sampler_path": sampler.path}
    logger.log_checkpoint(record)
    return record


async def train(cfg: Config) -> dict[str, Any]:
    """Run the loop; returns a small summary (log_dir, last metrics, checkpoints)."""
    import tinker
    from rich.console import Console
    from tinker import types

    validate(cfg)
    console = Console(stderr=True)
    log_dir = resolve_log_dir(cfg)
    checkpoint = last_checkpoint(log_dir) if cfg.resume else None
    if cfg.resume and checkpoint is None:
        console.print(f"[yellow]resume=true but {log_dir} has no checkpoint; starting from step 0[/]")
    start_step = int(checkpoint["step"]) if checkpoint else 0

    service_client = tinker.ServiceClient(
        display_name=f"gemtinker-rebn {log_dir.name}", **({"base_url": cfg.base_url} if cfg.base_url else {})
    )
    if checkpoint:
        training_client = await service_client.create_training_client_from_state_with_optimizer(checkpoint["state_path"])
        console.print(f"resuming {log_dir} at step {start_step} from {checkpoint['state_path']}")
    else:
        training_client = await service_client.create_lora_training_client(
            base_model=cfg.model_name, rank=cfg.lora_rank, seed=cfg.seed
        )
    tokenizer = load_tokenizer(cfg.model_name, training_client)
    factory = EnvFactory(cfg.env_id, cfg.env_wrappers, tokenizer, cfg.math_dataset, (str(log_dir.resolve()),))
    envs = [factory.make(cfg.seed * 100_003 + i) for i in range(cfg.num_env)]
    eval_envs = [factory.make(EVAL_SEED_OFFSET + i) for i in range(cfg.num_env)] if cfg.eval_every > 0 else []

    config_record = {**chz.asdict(cfg), "log_dir": str(log_dir), "math_dataset_source": factory.dataset_source}
    logger = RunLogger(log_dir, config_record, cfg.wandb_project, cfg.wandb_name, resume=checkpoint is not None, plot=cfg.plot)
    # Rows at or after the start step are about to be redone: drop them, also when a run killed
    # before its first checkpoint is resumed from step 0 (else steps would be logged twice).
    logger.truncate_after_resume(start_step)
    executor = make_executor(cfg.num_env)
    settings = RolloutSettings(cfg.template, cfg.max_tokens, cfg.temperature, cfg.max_turns, parse_stop(cfg.stop))
    runner = EpisodeRunner(tokenizer, settings, executor)
    adam = types.AdamParams(
        learning_rate=cfg.learning_rate, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip_norm=cfg.grad_clip_norm
    )
    console.print(f"[bold]gemtinker rebn[/] {cfg.env_id} · {cfg.model_name} · log_dir {log_dir}")

    last_metrics: dict[str, Any] = {}
    heldout_line: str | None = None
    last_saved_step = start_step
    final: dict[str, Any] | None = None
    finished = False
    pipeline: AsyncBatchPipeline | None = None
    if cfg.async_steps > 0:
        # Resume restarts the pipeline at the checkpoint's step with the checkpoint's weights.
        pipeline = AsyncBatchPipeline(
            lambda s, client: collect_training_batch(envs, runner, client, cfg.batch_size, cfg.seed, s),
            cfg.async_steps, start_step, cfg.max_steps,
        )
    try:
        if pipeline is not None:
            await pipeline.publish(start_step, await training_client.save_weights_and_get_sampling_client())
        for step in range(start_step, cfg.max_steps):
            rng = random.Random(f"{cfg.seed}/subsample/{step}")
            metrics: dict[str, Any] = {}
            t_step = time.perf_counter()

            if pipeline is None:
                t0 = time.perf_counter()
                sampling_client = await training_client.save_weights_and_get_sampling_client()
                metrics["time/save_weights"] = time.perf_counter() - t0
            else:
                sampling_client = pipeline.client  # the newest policy (version == step)

            if cfg.eval_every > 0 and step % cfg.eval_every == 0:
                t0 = time.perf_counter()
                n_eval = cfg.heldout_episodes if step == 0 else cfg.eval_episodes
                summary, _ = await run_evaluation(eval_envs, runner, sampling_client, n_eval, progress=cfg.progress)
                logger.log_eval(step, summary.metrics())
                metrics.update(summary.metrics())
                metrics["time/eval"] = time.perf_counter() - t0
                console.print(f"[cyan]eval @ step {step}: {summary.line()}[/]")

            if pipeline is None:
                t0 = time.perf_counter()
                bar = progress_bar(cfg.batch_size, f"step {step} sampling", cfg.progress)
                try:
                    batch = await collect_training_batch(
                        envs, runner, sampling_client, cfg.batch_size, cfg.seed, step,
                        on_episode=lambda ep: advance(bar, ep.num_turns),
                    )
                finally:
                    bar.close()
                metrics["time/sample"] = time.perf_counter() - t0
            else:
                # Collected in the background (no progress bar: it would fight the training one);
                # time/sample is the collection's own wall time, async/wait what this step waited.
                stamped, waited = await pipeline.get(step)
                batch = stamped.result
                metrics["time/sample"] = stamped.sample_seconds
                metrics.update(pipeline.metrics(stamped, step, waited))
            metrics.update(episode_metrics(batch.episodes))
            metrics.update(error_metrics(batch.errors, len(batch.episodes)))
            for err in batch.errors[:3]:
                console.print(f"[yellow]env {err.env_index} seed {err.seed} {err.phase} failed: {err.message}[/]")

            turns, batch_stats = build_batch(batch.episodes, cfg, rng)
            metrics.update(batch_stats)
            for episode in batch.episodes[: cfg.print_rollouts]:
                print_rollout(console, step, episode)
            logger.log_rollouts(step, batch.episodes, cfg.rollouts_per_step)

            t0 = time.perf_counter()
            if turns:
                bar = progress_bar(2, f"step {step} training", cfg.progress)
                try:
                    datums = [to_datum(t) for t in turns]
                    # Gradients add up over forward_backward calls until optim_step, and the
                    # loss is a sum over tokens, so chunks give the same update with a smaller
                    # peak memory on the learner. All calls are submitted before any is awaited.
                    size = cfg.fwd_bwd_chunk if cfg.fwd_bwd_chunk > 0 else len(datums)
                    fb_futures = [
                        training_client.forward_backward(datums[i : i + size], loss_fn="importance_sampling")
                        for i in range(0, len(datums), size)
                    ]
                    optim_future = training_client.optim_step(adam)
                    fbs = [await f for f in fb_futures]
                    bar.update(1)
                    optim = await optim_future
                    bar.update(1)
                finally:
                    bar.close()
                learner = [out["logprobs"].tolist() for fb in fbs for out in fb.loss_fn_outputs]
                metrics.update(sample_train_gap(turns, learner))
                metrics.update({f"train/{k}": v for k, v in merge_fb_metrics([fb.metrics or {} for fb in fbs]).items()})
                for k, v in ((optim.metrics if optim is not None else None) or {}).items():
                    metrics[f"optim/{k}"] = v
                    if "grad_norm" in k:
                        metrics["train/grad_norm"] = v
                metrics["train/skipped"] = 0.0
            else:
                metrics["train/skipped"] = 1.0
                console.print(f"[yellow]step {step}: no turn has a non-zero advantage; update skipped[/]")
            metrics["time/train"] = time.perf_counter() - t0
            if pipeline is not None and step + 1 < cfg.max_steps:
                # Publish policy step+1 at once, so the producer's next batch can start while
                # this step logs and checkpoints. A skipped update left the weights as they were.
                t0 = time.perf_counter()
                client = pipeline.client if metrics["train/skipped"] else await training_client.save_weights_and_get_sampling_client()
                await pipeline.publish(step + 1, client)
                metrics["time/save_weights"] = time.perf_counter() - t0
            metrics["time/step"] = time.perf_counter() - t_step
            metrics["progress/done_frac"] = (step + 1) / cfg.max_steps

            logger.log_metrics(step, metrics)
            console.print(summary_line(step, metrics))
            last_metrics = metrics

            if cfg.save_every > 0 and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.max_steps:
                record = await _save_checkpoint(training_client, logger, f"step{step + 1:06d}", step + 1)
                last_saved_step = step + 1
                console.print(f"checkpoint {record['name']}: {record['sampler_path']}")

        if cfg.max_steps > last_saved_step or last_checkpoint(log_dir) is None:
            final = await _save_checkpoint(training_client, logger, f"step{cfg.max_steps:06d}-final", cfg.max_steps)
            console.print(f"final checkpoint: {final['sampler_path']}")
        if cfg.eval_every > 0:
            sampling_client = await training_client.save_weights_and_get_sampling_client()
            summary, _ = await run_evaluation(eval_envs, runner, sampling_client, cfg.heldout_episodes, progress=cfg.progress)
            logger.log_eval(cfg.max_steps, summary.metrics())
            console.print(f"[cyan]eval @ end: {summary.line()}[/]")
            heldout_line = heldout_comparison(log_dir, summary)
            if cfg.plot:
                from gemtinker.recipes.plotting import plot_log_dir

                plot_log_dir(log_dir)
        finished = True
    finally:
        if pipeline is not None:
            await pipeline.close()
        logger.close()
        executor.shutdown(wait=False, cancel_futures=True)
        await _close_service(service_client, "success" if finished else "errored")
    return {"log_dir": str(log_dir), "last_metrics": last_metrics, "final_checkpoint": final,
            "heldout": heldout_line}


def heldout_comparison(log_dir: Path, final: EvalSummary) -> str | None:
    """`held-out success: base p [lo, hi] -> trained p [lo, hi]` from the step-0 evaluation in
    eval.jsonl (the policy before any update) and the final one; None without a step-0 row."""
    from gemtinker.recipes.run_logging import EVAL_FILE, read_jsonl

    base = next((r for r in read_jsonl(log_dir / EVAL_FILE) if r.get("step") == 0), None)
    if base is None:
        return None
    lo, hi = final.success_ci95
    return (f"held-out success: base {base['eval/success_rate']:.3f} [{base['eval/success_ci95_low']:.3f}, "
            f"{base['eval/success_ci95_high']:.3f}] -> trained {final.success_rate:.3f} [{lo:.3f}, {hi:.3f}]")


async def _close_service(service_client: Any, status: str) -> None:
    """End the Tinker session (best effort: the run's files are already written)."""
    try:
        await asyncio.to_thread(lambda: service_client.close(status).result())
    except Exception:  # noqa: BLE001
        pass


def run(cfg: Config) -> dict[str, Any]:
    return asyncio.run(train(cfg))


def config_from_argv(argv: Sequence[str]) -> Config:
    return chz.Blueprint(Config).make_from_argv(list(argv))


def dump_config(cfg: Config) -> str:
    return json.dumps(chz.asdict(cfg), indent=2)
