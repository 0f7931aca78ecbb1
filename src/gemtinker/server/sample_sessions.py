"""Per-sampling-session completion queues (`/api/v1/retrieve_futures`) and client ids
(`/api/v1/join_sampling_session`), the routes the SDK uses when the server advertises
`sample_use_retrieve_futures` and `sample_join_sampling_session`.

With the first flag, a SamplingClient runs one long poll per (sampling session, clone) instead of
one `retrieve_future` per sample: the server lists the sample requests that finished since the
client's cursor, and the client then fetches each payload with `retrieve_future` as before. A
clone is `seq_id // 1_000_000_000`: a client that joins a session gets a fresh clone id, so its
seq_ids (and completions) never mix with another client's. Lives on the event loop (no locks).
The queues are journaled (sample_journal.py): after a restart, samples the old run cut short are
listed as failed ("the server restarted"), so no client's poller waits for them forever.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .futures import FutureTable, Result
from .sample_journal import Key, SampleJournal

CLONE_BLOCK = 1_000_000_000
# Completions a log keeps when its client never acknowledges them (a dead poller).
MAX_EVENTS = 10_000
# Long-lived logs with nothing pending are dropped after this long without a poll.
IDLE_LOG_S = 3600.0
MAX_WATCHED = 100_000
SAMPLE_JOURNAL = "sample_queues.jsonl"  # under the server root (sample_journal.py)
# The journal is rewritten from memory once it holds this many lines and 4x what is live.
JOURNAL_COMPACT_LINES = 50_000
RESTART_ERROR = ("sample request {rid} was lost: the server restarted while it was running "
                 "(results of requests in flight at a restart are not kept); sample again")


@dataclass
class _Log:
    events: deque = field(default_factory=deque)  # (cursor, completion dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    touched: float = field(default_factory=time.time)
    pending: int = 0  # watched requests not yet finished

    def add(self, cursor: int, completion: dict) -> None:
        self.touched = time.time()
        self.events.append((cursor, completion))
        while len(self.events) > MAX_EVENTS:
            self.events.popleft()
        self.changed.set()
        self.changed = asyncio.Event()


def _completion(request_id: str, result: Result) -> dict:
    if result.kind == "json":
        try:
            failed = "error" in json.loads(result.payload)
        except ValueError:
            failed = False
        if failed:
            return {"state": "failed", "request_id": request_id}
    return {"state": "finished", "request_id": request_id, "response_payload_uncompressed_size": len(result.payload)}


class SampleSessions:
    def __init__(self, futures: FutureTable, long_poll_s: float, journal: Path | None = None) -> None:
        self._futures = futures
        self._long_poll_s = long_poll_s
        self._logs: dict[tuple[str, int], _Log] = {}
        self._new_log = asyncio.Event()  # set (and replaced) when a queue is made
        self._watched: OrderedDict[str, None] = OrderedDict()
        # Cursors grow over all queues and start from the clock (in microseconds), so neither a
        # queue dropped while idle and made again nor a restarted server ever issues a cursor at
        # or below one a client already passed (which would hide new completions from it).
        self._cursors = itertools.count(time.time_ns() // 1000 + 1)
        self._clients: dict[str, int] = {}
        # Client ids start at a random base per server run: a client that joined before a restart
        # keeps its id, and a new one must not get the same (their seq_ids would collide).
        self._client_base = secrets.randbelow(1_000_000) * 1000
        self.polls = 0  # retrieve_futures requests answered (server_stats)
        self.joins = 0
        self._running: dict[str, Key] = {}  # watched, not yet listed (for journal rewrites)
        self._journal = SampleJournal(journal) if journal is not None else None
        if self._journal is not None:
            self._restore(self._journal)

    def _restore(self, journal: SampleJournal) -> None:
        """Queues as the previous run left them, so its clients' pollers learn how every sample
        they wait for ended: listed completions keep their cursors (a client skips those it saw),
        samples the restart cut short are listed as failed with a fresh cursor."""
        running, done = journal.load()
        for key, cursor, completion in done:
            self._log(*key).events.append((cursor, completion))
        for rid, key in running.items():
            result = self._futures.settle_lost(rid, Result.error(RESTART_ERROR.format(rid=rid), "server"))
            self._log(*key).events.append((next(self._cursors), _completion(rid, result)))
        for log in self._logs.values():
            while len(log.events) > MAX_EVENTS:
                log.events.popleft()
        journal.rewrite({}, self._listed())

    def _listed(self) -> list[tuple[Key, int, dict]]:
        return sorted(((key, c, x) for key, log in self._logs.items() for c, x in log.events), key=lambda e: e[1])

    def _journal_compact(self) -> None:
        j = self._journal
        if j is not None and j.lines > JOURNAL_COMPACT_LINES:
            listed = self._listed()
            if j.lines > 4 * (len(listed) + len(self._running)):
                j.rewrite(dict(self._running), listed)

    def _log(self, sid: str, clone: int) -> _Log:
        log = self._logs.get((sid, clone))
        if log is None:
            log = self._logs[(sid, clone)] = _Log()
            self._new_log.set()
            self._new_log = asyncio.Event()
        return log

    async def _wait_log(self, key: tuple[str, int], wait_s: float) -> _Log | None:
        """The queue of `key`, waiting up to `wait_s` for its first sample. Polls never make a
        queue themselves, so a client polling made-up ids holds no memory."""
        deadline = time.monotonic() + wait_s
        while (log := self._logs.get(key)) is None and (left := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(self._new_log.wait(), left)
            except asyncio.TimeoutError:
                break
        return log

    def watch(self, sampling_session_id: Any, seq_id: Any, request_id: str) -> None:
        """Report `request_id` on its session's queue once it finishes (call after each asample)."""
        if not isinstance(sampling_session_id, str) or request_id in self._watched:
            return  # a retried asample answers with the request it already watches
        self._watched[request_id] = None
        while len(self._watched) > MAX_WATCHED:
            self._watched.popitem(last=False)
        clone = seq_id // CLONE_BLOCK if isinstance(seq_id, int) and not isinstance(seq_id, bool) and seq_id >= 0 else 0
        key = (sampling_session_id, clone)
        self._log(*key).pending += 1
        if self._journal is not None:
            self._running[request_id] = key
            self._journal.watched(request_id, key)
            self._journal_compact()

        async def report() -> None:
            try:
                result = None
                while result is None:
                    result = await self._futures.wait(request_id, 3600.0)
            except KeyError:
                result = Result.error(f"request {request_id} expired")
            log = self._log(*key)  # looked up now: never a queue purge() dropped meanwhile
            log.pending -= 1
            cursor, completion = next(self._cursors), _completion(request_id, result)
            log.add(cursor, completion)
            if self._journal is not None:
                self._running.pop(request_id, None)
                self._journal.listed(key, cursor, completion)

        asyncio.get_running_loop().create_task(report())

    async def retrieve(self, body: dict) -> dict:
        """A FuturesRetrieveRequest -> FuturesRetrieveResponse: completions after `prev_cursor`,
        long-polled for up to `timeout` seconds (the server's long-poll time when absent)."""
        target = body.get("target")
        if not isinstance(target, dict) or target.get("type", "sampling_session") != "sampling_session":
            raise UserError("retrieve_futures needs a target of type 'sampling_session'")
        sid, clone = target.get("sampling_session_id"), target.get("cloned_sampler_id", 0)
        prev, timeout = body.get("prev_cursor", 0), body.get("timeout")
        if not isinstance(sid, str) or not isinstance(clone, int) or not isinstance(prev, int):
            raise UserError("retrieve_futures: target.sampling_session_id must be a string, "
                            "target.cloned_sampler_id and prev_cursor integers")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout < 0):
            raise UserError(f"retrieve_futures: timeout must be a non-negative number of seconds, got {timeout!r}")
        self.polls += 1
        wait_s = self._long_poll_s if timeout is None else min(float(timeout), self._long_poll_s)
        t0 = time.monotonic()
        log = await self._wait_log((sid, clone), wait_s)
        if log is None:
            return {"completions": [], "cursor": max(prev, 0)}
        log.touched = time.time()
        seen = 0
        while log.events and log.events[0][0] <= prev:  # the client has seen these
            log.events.popleft()
            seen += 1
        if seen and self._journal is not None:
            self._journal.acked((sid, clone), prev)
        left = wait_s - (time.monotonic() - t0)
        if not log.events and left > 0:
            try:
                await asyncio.wait_for(log.changed.wait(), left)
            except asyncio.TimeoutError:
                pass
        completions = [c for _, c in log.events]
        return {"completions": completions, "cursor": log.events[-1][0] if log.events else max(prev, 0)}

    def join(self, sampling_session_id: str) -> dict:
        """A new client id for an existing sampling session (the session's creator is 0)."""
        self.joins += 1
        n = self._clients.get(sampling_session_id, self._client_base) + 1
        self._clients[sampling_session_id] = n
        return {"type": "join_sampling_session", "client_counter": n}

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()

    def purge(self) -> None:
        cutoff = time.time() - IDLE_LOG_S
        for key in [k for k, log in self._logs.items() if log.touched < cutoff and log.pending <= 0]:
            del self._logs[key]
