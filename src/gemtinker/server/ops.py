"""Op plumbing and backpressure: how a request becomes a future, where it runs, and what bounds it.

Training ops run through a per-model `ModelQueue` (seq_id order) on a small training thread pool;
sampling runs on a large pool because the engine batches concurrent `sample` calls. The event
loop itself never computes. Every op resolves its future with a `Result`: its value, a "user"
error (`UserError`, `EngineError`: the caller's input) or a "server" error (anything else).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from gemtinker.engine.types import EngineError

from .errors import Overloaded, UserError
from .futures import FutureTable, Result
from .ordering import ModelQueue
from .store import Store

log = logging.getLogger("gemtinker.server")

# A training op's seq_id may run ahead of the queue (chunks arrive out of order), but not by more.
MAX_SEQ_AHEAD = 100_000
# Bytes of forward_backward requests waiting in model queues, over all models.
MAX_QUEUED_TRAIN_BYTES = 512 << 20


class Ops:
    """`unknown_model(model_id)`: the message for a model id with no queue (models.py knows why)."""

    def __init__(self, futures: FutureTable, store: Store, unknown_model: Callable[[str], str],
                 train_workers: int = 4, sample_workers: int = 64,
                 max_queued_train_bytes: int = MAX_QUEUED_TRAIN_BYTES):
        self.futures = futures
        self.store = store
        self._unknown_model = unknown_model
        self.train_pool = ThreadPoolExecutor(train_workers, thread_name_prefix="gt-train")
        self.sample_pool = ThreadPoolExecutor(sample_workers, thread_name_prefix="gt-sample")
        self.queues: dict[str, ModelQueue] = {}
        self.queued_train_bytes = 0
        self.max_queued_train_bytes = max_queued_train_bytes

    def stop_queues(self, reason: str) -> None:
        """Fail every queued training op. Call on the event loop, before it stops."""
        for q in self.queues.values():
            q.close(reason)
        self.queues.clear()

    def shutdown(self) -> None:
        self.train_pool.shutdown(wait=False, cancel_futures=True)
        self.sample_pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, request_id: str, name: str, target: str, fn: Callable[[], Result], pool: Executor) -> None:
        t0 = time.perf_counter()
        try:
            result = await asyncio.get_running_loop().run_in_executor(pool, fn)
            status = "ok"
        except (UserError, EngineError) as e:
            result, status = Result.error(str(e), "user"), f"user error: {e}"
        except Exception as e:
            log.exception("%s on %s failed", name, target)
            result, status = Result.error(f"internal server error in {name}: {type(e).__name__}: {e}", "server"), "server error"
        self.futures.resolve(request_id, result)
        log.info("%-26s %-28s %7.0f ms  %s", name, target, (time.perf_counter() - t0) * 1e3, status[:200])

    def failed(self, message: str, name: str = "", target: str = "") -> str:
        if name:
            log.info("%-26s %-28s %7s     user error: %s", name, target, "-", message[:200])
        return self.futures.resolved(self.futures.new(), Result.error(message))

    def submit_model_op(self, model_id: Any, seq_id: Any, name: str, fn: Callable[[], Result], cost: int = 0) -> str:
        """Queue a training op in seq_id order. `cost`: request bytes it holds while queued."""
        if not isinstance(model_id, str):
            return self.failed("model_id is required", name)
        queue = self.queues.get(model_id)
        if queue is None:
            return self.failed(self._unknown_model(model_id), name, model_id)
        if not isinstance(seq_id, int) or isinstance(seq_id, bool):
            return self.failed(f"{name} needs an integer seq_id", name, model_id)
        existing = queue.known(seq_id)
        if existing is not None:
            return existing
        if seq_id > queue.next_seq + MAX_SEQ_AHEAD:
            # It would wait for a gap the client never fills, then drag the queue past every real op.
            return self.failed(f"{name}: seq_id {seq_id} is more than {MAX_SEQ_AHEAD} ahead of the model's next "
                               f"seq_id {queue.next_seq}", name, model_id)
        # The op the queue waits for is always admitted, so the cap can delay but never deadlock.
        if cost and self.queued_train_bytes + cost > self.max_queued_train_bytes and seq_id != queue.next_seq:
            raise Overloaded(f"training queues hold {self.queued_train_bytes >> 20} MiB of requests "
                             f"(limit {self.max_queued_train_bytes >> 20} MiB); retry shortly")
        rid = self.futures.new()
        self.store.touch_run(model_id)  # the run's last_request_time (REST training-run listings)
        self.queued_train_bytes += cost
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.queued_train_bytes -= cost

        async def run() -> None:
            try:
                await self.run(rid, name, f"{model_id}#{seq_id}", fn, self.train_pool)
            finally:
                release()

        def skip(msg: str) -> None:
            release()
            self.futures.resolve(rid, Result.error(msg))

        return queue.submit(seq_id, rid, run, skip)

    def refuse_op(self, model_id: Any, seq_id: Any, name: str, error: UserError) -> str:
        """Fail an ordered op that was refused before it reached the engine. It still takes its
        seq_id slot, so the model's later ops do not wait for a gap that never fills."""
        def fail() -> Result:
            raise error

        return self.submit_model_op(model_id, seq_id, name, fail)

    def new_model_queue(self, model_id: str, name: str, run: Callable[[], Result], created: Callable[[], bool]) -> str:
        """Queue the op that creates a model as its seq_id 0. `created()`, asked after it ran:
        did it register the model? If not, the queue is forgotten so a retry can work."""
        queue = self.queues.get(model_id)
        if queue is None:
            queue = self.queues[model_id] = ModelQueue(model_id, first_seq=0)
        existing = queue.known(0)
        if existing is not None:
            return existing
        rid = self.futures.new()

        async def run_and_cleanup() -> None:
            await self.run(rid, name, model_id, run, self.train_pool)
            if not created():
                q = self.queues.pop(model_id, None)
                if q is not None:
                    q.close(self._unknown_model(model_id))

        return queue.submit(0, rid, run_and_cleanup, lambda msg: self.futures.resolve(rid, Result.error(msg)))
