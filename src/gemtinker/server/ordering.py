"""Per-model execution in `seq_id` order.

The SDK numbers every training op of a TrainingClient (1, 2, 3, ...; create is 0) but may deliver
them out of order: the chunks of one forward_backward are sent concurrently with the first chunk
last, and optim_step is sent before forward_backward finishes. Ops therefore wait in a buffer
until every lower seq_id has run. Retried submissions reuse their seq_id and get the original
request_id back. A failed op still advances the queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("gemtinker.server")

# A client that gave up on a submit leaves a hole; skip it after this long so later ops run.
GAP_TIMEOUT_S = 300.0


@dataclass
class _Op:
    request_id: str
    run: Callable[[], Awaitable[None]]
    on_skip: Callable[[str], None]


class ModelQueue:
    def __init__(self, model_id: str, first_seq: int = 0, gap_timeout_s: float = GAP_TIMEOUT_S):
        self.model_id = model_id
        self._next = first_seq
        self._pending: dict[int, _Op] = {}
        self._seen: dict[int, str] = {}
        self._gap_timeout_s = gap_timeout_s
        self._wake = asyncio.Event()
        self._closed = False
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"queue:{model_id}")

    @property
    def next_seq(self) -> int:
        """The seq_id the queue waits for (the op after the one running, if any)."""
        return self._next

    def known(self, seq_id: int) -> str | None:
        """request_id of an already-submitted seq_id (a retried submit)."""
        return self._seen.get(seq_id)

    def submit(self, seq_id: int, request_id: str, run: Callable[[], Awaitable[None]],
               on_skip: Callable[[str], None]) -> str:
        if seq_id in self._seen:
            return self._seen[seq_id]
        self._seen[seq_id] = request_id
        if len(self._seen) > 20_000:  # retries only ever repeat recent seq_ids
            for old in sorted(self._seen)[:10_000]:
                del self._seen[old]
        if self._closed:
            on_skip(f"model {self.model_id} was unloaded")
        elif seq_id < self._next:
            on_skip(f"seq_id {seq_id} arrived after model {self.model_id} already moved past it (next is {self._next})")
        else:
            self._pending[seq_id] = _Op(request_id, run, on_skip)
            self._wake.set()
        return request_id

    def close(self, reason: str) -> None:
        """Fail queued ops and stop at once (the op now running, if any, is cancelled)."""
        self._fail_pending(reason)
        self._task.cancel()

    async def drain_and_close(self, reason: str) -> None:
        """Fail queued ops, let the op now running finish, then stop."""
        self._fail_pending(reason)
        self._wake.set()
        await asyncio.gather(self._task, return_exceptions=True)

    def _fail_pending(self, reason: str) -> None:
        self._closed = True
        for op in self._pending.values():
            op.on_skip(reason)
        self._pending.clear()

    async def _loop(self) -> None:
        while not self._closed:
            op = self._pending.pop(self._next, None)
            if op is not None:
                self._next += 1
                try:
                    await op.run()
                except asyncio.CancelledError:
                    raise
                except Exception:  # run() reports its own errors; never let the queue die
                    log.exception("op %s on %s crashed", op.request_id, self.model_id)
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self._gap_timeout_s if self._pending else None)
            except asyncio.TimeoutError:
                if self._pending:
                    skip_to = min(self._pending)
                    log.warning("%s: seq_id %d..%d never arrived; skipping", self.model_id, self._next, skip_to - 1)
                    self._next = skip_to
