"""Asynchronous sample/learn for the rebn loop (`async_steps=k`): rollouts for the next steps are
collected while the current step trains, never with a policy more than k updates old.

Policy versions: version v is the policy after v updates, i.e. the weights at the start of step v.
The sync loop samples batch t with version t (staleness 0). Here a producer task collects batch s
as soon as some sampler of version >= s - k exists, with the newest one published at that moment,
so with k=1 batch t+1 is sampled with version t while step t trains. The trainer checks every batch
(`staleness = step - version <= k`) and refuses one that is too old: it is discarded, counted in
`async/discarded`, and the batch is collected again with the newest sampler. The producer's gate
makes that impossible by construction; the check is what the tests and the metrics rely on.

The off-policy gap is handled by the `importance_sampling` loss: each Datum carries the logprobs
of the sampler that produced it, so the update is weighted by p_learner / p_sampler. The gap is
reported as train/kl_sample_train_* (as in the sync loop, where it is numerical noise only).

Only the SDK is used here (sampling clients are opaque objects); nothing imports the engine.
On resume the pipeline simply starts again at the checkpoint's step with the checkpoint's weights:
batches in flight when a run stops are lost, never reused.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from gemtinker.recipes.rollouts import BatchResult

# collect(step, sampling_client) -> the episodes of training step `step` (its seeds)
Collect = Callable[[int, Any], Awaitable[BatchResult]]


@dataclass
class StampedBatch:
    step: int  # the training step it was collected for (decides its episode seeds)
    version: int  # policy version of the sampler that played every episode in it
    result: BatchResult
    sample_seconds: float  # wall time of the collection (overlapped with training)


class StaleBatch(AssertionError):
    pass


def check_staleness(step: int, version: int, max_staleness: int) -> int:
    """Staleness of data of policy `version` trained at `step`; raises StaleBatch when it is
    older than `max_staleness` updates, or comes from a policy the learner has not reached yet."""
    staleness = step - version
    if not 0 <= staleness <= max_staleness:
        raise StaleBatch(f"batch sampled with policy version {version} trained at step {step}: "
                         f"staleness {staleness} not in [0, {max_staleness}]")
    return staleness


class AsyncBatchPipeline:
    """A background producer of training batches, at most `max_staleness` policy versions behind.

    The trainer calls `publish(version, client)` after each update and `get(step)` for the batch
    of each step, in order. `close()` cancels the producer (batches in flight are dropped)."""

    def __init__(self, collect: Collect, max_staleness: int, start_step: int, end_step: int) -> None:
        if max_staleness < 1:
            raise ValueError("an asynchronous pipeline needs max_staleness >= 1")
        self.collect = collect
        self.max_staleness = max_staleness
        self.start_step = start_step
        self.end_step = end_step
        self.version = -1
        self.client: Any = None
        self.discarded = 0
        self._published = asyncio.Condition()
        self._ready: asyncio.Queue[StampedBatch] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def publish(self, version: int, client: Any) -> None:
        """Make the sampler of policy `version` available; starts the producer on first call."""
        if version < self.version:
            raise ValueError(f"policy version went back from {self.version} to {version}")
        async with self._published:
            self.version, self.client = version, client
            self._published.notify_all()
        if self._task is None:
            self._task = asyncio.create_task(self._produce(), name="gemtinker-async-rollouts")

    async def _produce(self) -> None:
        for step in range(self.start_step, self.end_step):
            async with self._published:
                # Data of version v is trained at `step`, so v must be >= step - k. This is also
                # what bounds how far ahead of the trainer the producer runs (k batches).
                await self._published.wait_for(lambda: self.version >= step - self.max_staleness)
                version, client = self.version, self.client
            t0 = time.perf_counter()
            result = await self.collect(step, client)
            self._ready.put_nowait(StampedBatch(step, version, result, time.perf_counter() - t0))

    async def get(self, step: int) -> tuple[StampedBatch, float]:
        """The batch for `step` and the seconds the trainer waited for it. A batch that is too
        stale (cannot happen with the producer's gate, but is checked, not assumed) is discarded
        and re-collected in the foreground with the newest sampler."""
        assert self._task is not None, "publish() the first sampler before get()"
        t0 = time.perf_counter()
        getter = asyncio.ensure_future(self._ready.get())
        try:
            # Wait for the batch or for the producer to end (a failure is raised here).
            await asyncio.wait({getter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()  # an item is only taken when the getter completes
        if getter.done() and not getter.cancelled():
            batch = getter.result()
        elif not self._ready.empty():  # the producer put its last batch and ended
            batch = self._ready.get_nowait()
        else:
            self._task.result()  # raises the producer's error
            raise RuntimeError(f"rollout producer ended before the batch of step {step}")
        if batch.step != step:
            raise RuntimeError(f"rollout producer out of order: got step {batch.step}, expected {step}")
        try:
            check_staleness(step, batch.version, self.max_staleness)
        except StaleBatch:
            self.discarded += 1
            t1 = time.perf_counter()
            result = await self.collect(step, self.client)
            batch = StampedBatch(step, self.version, result, time.perf_counter() - t1)
            check_staleness(step, batch.version, self.max_staleness)
        return batch, time.perf_counter() - t0

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down anyway
                pass

    def metrics(self, batch: StampedBatch, step: int, wait_seconds: float) -> dict[str, float]:
        staleness = float(step - batch.version)
        return {
            # One sampler plays a whole batch, so the batch's max and mean staleness coincide;
            # both are logged so runs stay comparable with per-episode versioning later.
            "async/staleness_max": staleness,
            "async/staleness_mean": staleness,
            "async/sampler_version": float(batch.version),
            "async/discarded": float(self.discarded),
            "async/wait": wait_seconds,
        }
