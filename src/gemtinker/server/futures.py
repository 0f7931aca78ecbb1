"""Request futures: created on submit, resolved when the op finishes, long-polled by clients.

Lives on the event loop (no locks). Finished results are also written to SQLite so a poll after
a reconnect, or after a server restart within the retention window, still gets the answer.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from .store import Store


@dataclass(frozen=True)
class Result:
    """A finished future: a JSON object or a serialized protobuf message."""

    kind: Literal["json", "proto"]
    payload: bytes

    @staticmethod
    def json(obj: dict) -> "Result":
        return Result("json", json.dumps(obj).encode())

    @staticmethod
    def proto(data: bytes) -> "Result":
        return Result("proto", data)

    @staticmethod
    def error(message: str, category: str = "user") -> "Result":
        return Result.json({"error": message, "category": category})


class _Pending:
    __slots__ = ("event", "result", "created", "resolved_at")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.result: Result | None = None
        self.created = time.time()
        self.resolved_at = 0.0


class FutureTable:
    """`retention_s`: how long a finished result can still be polled (from SQLite).
    `memory_s`: how long it also stays in memory. Clients poll within seconds of completion, so
    a short in-memory window keeps memory bounded under sustained load (thousands of sample
    results a minute) while a late poll is still answered from the database."""

    def __init__(self, store: Store, retention_s: float = 6 * 3600, memory_s: float = 120.0):
        self._store = store
        self._retention_s = retention_s
        self._memory_s = memory_s
        self._items: dict[str, _Pending] = {}

    def new(self) -> str:
        rid = f"req-{uuid.uuid4().hex}"
        self._items[rid] = _Pending()
        return rid

    def resolve(self, request_id: str, result: Result) -> None:
        item = self._items.get(request_id)
        if item is None or item.result is not None:
            return
        item.result = result
        item.resolved_at = time.time()
        item.event.set()
        self._store.put_future(request_id, result.kind, result.payload)

    def resolved(self, request_id: str, result: Result) -> str:
        """Register an already-finished future (e.g. an immediate validation failure)."""
        self.resolve(request_id, result)
        return request_id

    async def wait(self, request_id: str, timeout: float) -> Result | None:
        """The result, or None if still running after `timeout`; KeyError if unknown."""
        item = self._items.get(request_id)
        if item is None:
            row = self._store.get_future(request_id)
            if row is None:
                raise KeyError(request_id)
            return Result(row[0], row[1])  # type: ignore[arg-type]
        if item.result is None:
            try:
                await asyncio.wait_for(item.event.wait(), timeout)
            except asyncio.TimeoutError:
                return None
        return item.result

    def settle_lost(self, request_id: str, result: Result) -> Result:
        """A request an earlier server run accepted: its stored result if that run finished it,
        else `result` (stored now, so `retrieve_future` answers it too)."""
        row = self._store.get_future(request_id)
        if row is not None:
            return Result(row[0], row[1])  # type: ignore[arg-type]
        self._store.put_future(request_id, result.kind, result.payload)
        return result

    def __len__(self) -> int:
        return len(self._items)

    def purge(self) -> None:
        now = time.time()
        for rid in [r for r, it in self._items.items() if it.result is not None and it.resolved_at < now - self._memory_s]:
            del self._items[rid]
        self._store.purge_futures(now - self._retention_s)
