"""The low-level trainer's loop: sample a batch, ReBN advantages, one update, log, checkpoint.

See the package docstring (`gemtinker.recipes.rebn`) for what one step does.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any, Sequence

import chz

from gemtinker.envs.factory import EnvFactory
from gemtinker.recipes.episodes import episode_metrics
from gemtinker.recipes.evaluation.summary import EvalSummary, run_evaluation
from gemtinker.recipes.progress import advance, progress_bar
from gemtinker.recipes.rebn.async_loop import AsyncBatchPipeline
from gemtinker.recipes.rebn.best import VALIDATION_SEED_OFFSET, improves
from gemtinker.recipes.rebn.config import Config, learning_rate_at, resolve_log_dir, validate
from gemtinker.recipes.rebn.credit import build_batch, sample_train_gap, to_datum
from gemtinker.recipes.rollouts import (
    EVAL_SEED_OFFSET,
    EpisodeRunner,
    RolloutSettings,
    collect_training_batch,
    error_metrics,
    make_executor,
    parse_stop,
)
from gemtinker.recipes.runs.files import BestCheck, load_best, save_best
from gemtinker.recipes.runs.logger import RunLogger, last_checkpoint, memory_metrics, print_rollout, summary_line
from gemtinker.recipes.tokenizer import load_tokenizer


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
    def adam(step: int) -> Any:
        return types.AdamParams(learning_rate=learning_rate_at(cfg, step), beta1=0.9, beta2=0.95, eps=1e-8,
                                grad_clip_norm=cfg.grad_clip_norm)

    console.print(f"[bold]gemtinker rebn[/] {cfg.env_id} · {cfg.model_name} · log_dir {log_dir}")

    best = load_best(log_dir) if checkpoint else None

    async def validation_check(
        step: int, sampling_client: Any, best: BestCheck | None, sampler_path: str | None = None
    ) -> tuple[EvalSummary, BestCheck | None]:
        """keep_best: play the validation episodes with the policy after `step` updates; if it is
        the best so far, keep its sampler weights (saved now unless `sampler_path` has them)."""
        summary, _ = await run_evaluation(eval_envs, runner, sampling_client, cfg.eval_episodes,
                                          seed_offset=VALIDATION_SEED_OFFSET, progress=cfg.progress)
        logger.log_eval(step, summary.metrics() | {"eval/validation": 1.0})
        console.print(f"[cyan]validation check @ step {step}: {summary.line()}[/]")
        if improves(summary.success_rate, best):
            if sampler_path is None:
                sampler_path = (await training_client.save_weights_for_sampler(f"check{step:06d}")).path
            best = BestCheck(step, summary.success_rate, sampler_path)
            save_best(log_dir, best)
        return summary, best

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
                if step == 0 or not cfg.keep_best:
                    n_eval = cfg.heldout_episodes if step == 0 else cfg.eval_episodes
                    summary, _ = await run_evaluation(eval_envs, runner, sampling_client, n_eval, progress=cfg.progress)
                    logger.log_eval(step, summary.metrics())
                    console.print(f"[cyan]eval @ step {step}: {summary.line()}[/]")
                else:
                    summary, best = await validation_check(step, sampling_client, best)
                metrics.update(summary.metrics())
                metrics["time/eval"] = time.perf_counter() - t0

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
                    optim_future = training_client.optim_step(adam(step))
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
            metrics.update(memory_metrics())

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
            chosen = ""
            if cfg.keep_best:
                final_path = (final or last_checkpoint(log_dir) or {}).get("sampler_path")
                _, best = await validation_check(cfg.max_steps, sampling_client, best, final_path)
                if best is not None and best.step != cfg.max_steps:
                    sampling_client = await service_client.create_sampling_client(model_path=best.sampler_path)
                chosen = f" (the policy of step {best.step}, best of the validation checks)" if best else ""
            summary, _ = await run_evaluation(eval_envs, runner, sampling_client, cfg.heldout_episodes, progress=cfg.progress)
            memory = memory_metrics()
            logger.log_eval(cfg.max_steps, summary.metrics() | memory | ({"eval/policy_step": float(best.step)} if best else {}))
            console.print(f"[cyan]eval @ end{chosen}: {summary.line()}[/]"
                          + (f" (peak RSS {memory['memory/peak_rss_gb']:.2f} GB)" if memory else ""))
            heldout_line = heldout_comparison(log_dir, summary)
            if cfg.plot:
                from gemtinker.recipes.runs.plotting import plot_log_dir

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
    from gemtinker.recipes.runs.files import EVAL_FILE, read_jsonl

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
