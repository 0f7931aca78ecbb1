"""Asynchronous sample/learn (`async_steps=k`): the loop never trains on data older than k updates.

Two layers. The pipeline alone, with fake collectors and random delays (fast, no server): every
batch handed to the trainer is at most k versions old, the producer really runs ahead, a stale
batch is refused and re-collected, a producer error reaches the trainer. The whole loop on the
tiny model and the embedded server, with staleness measured independently of the loop's own
bookkeeping: the SDK calls are instrumented to count the optimizer updates applied before each
sampler was saved and before each batch is trained.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from gemtinker.engine.models import TINY_MODEL_NAME
from gemtinker.recipes import rebn
from gemtinker.recipes.rebn import loop
from gemtinker.recipes.rebn.async_loop import AsyncBatchPipeline, StaleBatch, StampedBatch, check_staleness
from gemtinker.recipes.rollouts import BatchResult
from gemtinker.recipes.runs.files import read_jsonl
from support.rebn import interrupt_at_step

# ------------------------------------------------------------------------ pipeline alone


def test_check_staleness_bounds() -> None:
    assert check_staleness(5, 5, 1) == 0
    assert check_staleness(5, 4, 1) == 1
    assert check_staleness(5, 3, 2) == 2
    with pytest.raises(StaleBatch):
        check_staleness(5, 3, 1)
    with pytest.raises(StaleBatch):
        check_staleness(5, 6, 1)  # a policy the learner has not reached: a bookkeeping bug


async def _fake_training(k: int, steps: int, seed: int) -> list[tuple[int, int]]:
    """A trainer/producer pair with random sample and train times; returns (step, version)."""
    rng = random.Random(seed)

    async def collect(step: int, client: Any) -> BatchResult:
        await asyncio.sleep(rng.uniform(0, 0.004))
        return BatchResult()

    pipeline = AsyncBatchPipeline(collect, k, 0, steps)
    trained = []
    try:
        await pipeline.publish(0, "sampler-v0")
        for step in range(steps):
            batch, _ = await pipeline.get(step)
            trained.append((step, batch.version))
            await asyncio.sleep(rng.uniform(0, 0.004))  # training
            await pipeline.publish(step + 1, f"sampler-v{step + 1}")
    finally:
        await pipeline.close()
    assert pipeline.discarded == 0
    return trained


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pipeline_never_exceeds_k(k: int) -> None:
    for seed in range(10):
        trained = asyncio.run(_fake_training(k, 12, seed))
        staleness = [step - version for step, version in trained]
        assert [s for s, _ in trained] == list(range(12))
        assert all(0 <= s <= k for s in staleness), staleness
        assert max(staleness) >= 1  # it did sample ahead of the learner


def test_stale_batch_is_discarded_and_recollected() -> None:
    async def main() -> tuple[StampedBatch, int]:
        clients = []

        async def collect(step: int, client: Any) -> BatchResult:
            clients.append(client)
            return BatchResult()

        pipeline = AsyncBatchPipeline(collect, 1, 3, 3)  # empty range: the producer makes nothing
        await pipeline.publish(3, "sampler-v3")
        pipeline._ready.put_nowait(StampedBatch(3, 1, BatchResult(), 0.0))  # 2 versions old
        batch, _ = await pipeline.get(3)
        await pipeline.close()
        assert clients == ["sampler-v3"]
        return batch, pipeline.discarded

    batch, discarded = asyncio.run(main())
    assert (batch.step, batch.version, discarded) == (3, 3, 1)


def test_last_batch_is_served_after_the_producer_finished() -> None:
    async def main() -> int:
        async def collect(step: int, client: Any) -> BatchResult:
            return BatchResult()

        pipeline = AsyncBatchPipeline(collect, 1, 0, 1)
        await pipeline.publish(0, "sampler-v0")
        while not pipeline._task.done():  # the producer is finished before the trainer asks
            await asyncio.sleep(0)
        batch, _ = await pipeline.get(0)
        await pipeline.close()
        return batch.step

    assert asyncio.run(main()) == 0


def test_producer_error_reaches_the_trainer() -> None:
    async def main() -> None:
        async def collect(step: int, client: Any) -> BatchResult:
            raise RuntimeError("server gone")

        pipeline = AsyncBatchPipeline(collect, 1, 0, 4)
        await pipeline.publish(0, "sampler-v0")
        try:
            await pipeline.get(0)
        finally:
            await pipeline.close()

    with pytest.raises(RuntimeError, match="server gone"):
        asyncio.run(main())


# ------------------------------------------------------------------------ whole loop

TINY = [f"model_name={TINY_MODEL_NAME}", "num_env=2", "batch_size=4", "max_tokens=4", "lora_rank=4",
        "progress=false", "print_rollouts=0", "plot=false", "env_id=game:GuessTheNumber-v0-easy",
        "use_rebn=false"]  # raw returns: the tiny model's batches are not all zero-advantage


class UpdateLedger:
    """Counts optimizer updates through the SDK, tags each sampler with the count at its save,
    and records, for each batch the loop builds, how many updates its sampler is behind."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import tinker

        self.updates = 0
        self.sampler_updates: dict[int, int] = {}  # id(sampling client) -> updates before save
        self.seed_sampler: dict[int, int] = {}  # episode seed -> id(sampling client)
        self.trained: list[int] = []  # staleness (in updates) of each batch, in training order
        ledger = self
        real_optim = tinker.TrainingClient.optim_step
        real_save = tinker.TrainingClient.save_weights_and_get_sampling_client
        real_collect = loop.collect_training_batch
        real_build = loop.build_batch

        def optim_step(self: Any, *a: Any, **kw: Any) -> Any:
            ledger.updates += 1  # awaited before the loop saves the next sampler
            return real_optim(self, *a, **kw)

        async def save(self: Any, *a: Any, **kw: Any) -> Any:
            client = await real_save(self, *a, **kw)
            ledger.sampler_updates[id(client)] = ledger.updates
            return client

        async def collect(envs: Any, runner: Any, client: Any, *a: Any, **kw: Any) -> Any:
            result = await real_collect(envs, runner, client, *a, **kw)
            for ep in result.episodes:
                ledger.seed_sampler[ep.seed] = id(client)
            return result

        def build(episodes: Any, *a: Any, **kw: Any) -> Any:
            behind = {ledger.updates - ledger.sampler_updates[ledger.seed_sampler[ep.seed]] for ep in episodes}
            ledger.trained.append(max(behind))
            return real_build(episodes, *a, **kw)

        monkeypatch.setattr(tinker.TrainingClient, "optim_step", optim_step)
        monkeypatch.setattr(tinker.TrainingClient, "save_weights_and_get_sampling_client", save)
        monkeypatch.setattr(loop, "collect_training_batch", collect)
        monkeypatch.setattr(loop, "build_batch", build)


def train(base_url: str, log_dir: Path, *args: str) -> dict[str, Any]:
    return rebn.run(rebn.config_from_argv([*TINY, f"base_url={base_url}", f"log_dir={log_dir}", *args]))


# The whole loop on the embedded server: `make test` only (k=2 among the `slow` ones)
@pytest.mark.integration
@pytest.mark.parametrize("k", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_async_never_trains_on_data_older_than_k(base_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    ledger = UpdateLedger(monkeypatch)
    train(base_url, tmp_path, "max_steps=4", f"async_steps={k}")
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert len(ledger.trained) == 4 and all(0 <= s <= k for s in ledger.trained), ledger.trained
    assert max(ledger.trained) >= 1  # really off-policy: sampled while the previous step trained
    for r in records:
        assert 0 <= r["async/staleness_max"] <= k and r["async/discarded"] == 0
        assert r["step"] - r["async/sampler_version"] == r["async/staleness_max"]
        for key in ("time/sample", "time/train", "time/step", "async/wait", "train/kl_sample_train_v1"):
            assert key in r, key
    if k == 1:
        # Batch t+1 is started with policy t as soon as batch t is done: staleness 1 from step 1 on.
        assert [r["async/staleness_max"] for r in records] == [0, 1, 1, 1]


@pytest.mark.integration  # the whole loop on the embedded server: `make test` only
def test_sync_mode_is_on_policy(base_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = UpdateLedger(monkeypatch)
    train(base_url, tmp_path, "max_steps=3")
    assert ledger.trained == [0, 0, 0]
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert not any(k.startswith("async/") for r in records for k in r)
    with pytest.raises(ValueError, match="async_steps"):
        rebn.validate(rebn.config_from_argv([*TINY, "async_steps=-1"]))


@pytest.mark.slow  # a whole run (or subprocesses) for several seconds: `make test` only
def test_async_resume_restarts_the_pipeline(base_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["max_steps=4", "save_every=2", "async_steps=1"]
    real_build = interrupt_at_step(monkeypatch, tmp_path, 3)
    with pytest.raises(KeyboardInterrupt):
        train(base_url, tmp_path, *args)
    monkeypatch.setattr(loop, "build_batch", real_build)
    ledger = UpdateLedger(monkeypatch)
    train(base_url, tmp_path, *args, "resume=true")
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert [c["step"] for c in read_jsonl(tmp_path / "checkpoints.jsonl")] == [2, 4]
    # The first batch after resume comes from the checkpoint's own weights, the next one is 1 behind.
    assert ledger.trained == [0, 1]
    assert [r["async/staleness_max"] for r in records[2:]] == [0, 1]
