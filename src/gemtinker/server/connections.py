"""Connection deadlines for slow, half-open and idle clients (issue 14).

uvicorn times out idle keep-alive connections, but nothing else: a client that opens a socket
and sends nothing, half a request line, or a body at a byte a minute holds its connection (and
the request's task) forever. `ConnectionGuard` adds, on top of uvicorn's h11 protocol:

- a header deadline: a request's line and headers must be complete within `header_timeout_s`
  of its first byte (or of the connection opening, for one that sends nothing);
- a body deadline: after its headers, a body gets `body_timeout_s` plus one second per
  `min_body_rate` bytes received, so it must keep up that average rate (a 20 MB upload over a
  slow link passes; a trickle does not);
- a cap on open connections: past `max_connections` the oldest connections that are not in
  the middle of a request (half-open for over a second, or idle between requests) are closed
  first; only when every connection is busy does a newcomer get a 503, which the SDK retries,
  and past twice the cap a newcomer is closed at once.

A client cut off before its request was read gets `408 Request Timeout` (JSON, like every other
error answer) and the connection is closed. Counters go to /api/v1/server_stats.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("gemtinker.server")

DEFAULT_HEADER_TIMEOUT_S = 20.0
DEFAULT_BODY_TIMEOUT_S = 60.0
DEFAULT_MIN_BODY_RATE = 16 << 10  # bytes/s (128 kbit/s): a trickle fails, any real link passes
DEFAULT_MAX_CONNECTIONS = 512
EVICT_MIN_AGE_S = 1.0  # a connection waiting for its request head this long may be closed to make room
PAUSE_GRACE_S = 5.0  # after uvicorn stops reading a connection (the app is behind), the client's clock waits


@dataclass
class ConnectionGuard:
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    min_body_rate: float = DEFAULT_MIN_BODY_RATE
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    counts: dict[str, int] = field(default_factory=lambda: {"header_timeouts": 0, "body_timeouts": 0,
                                                             "evicted_idle": 0, "refused_over_cap": 0})

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s", "min_body_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")

    def protocol(self) -> type[asyncio.Protocol]:
        """The uvicorn `http=` protocol class bound to these limits."""
        guard = self

        class Guarded(GuardedH11Protocol):
            pass

        Guarded.guard = guard
        return Guarded


def _timeout_response(message: str) -> bytes:
    body = json.dumps({"detail": message, "error": message}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with read deadlines. `phase` is what the connection waits for:
    "headers" (a request has begun, or the connection just opened), "body", or None (a request
    is being answered, or the connection idles between requests under uvicorn's keep-alive)."""

    guard: ConnectionGuard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit_concurrency = None  # the cap is enforced here instead (uvicorn's also counts tasks)
        self.phase: str | None = None
        self.phase_start = 0.0
        self.body_bytes = 0
        self._deadline_timer: asyncio.TimerHandle | None = None

    # ---------------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._enter("headers")
        if len(self.connections) > self.guard.max_connections:
            self._make_room()

    def data_received(self, data: bytes) -> None:
        if self.phase is None and self.conn.their_state is h11.IDLE:
            self._enter("headers")  # a new request on a kept-alive connection
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self.phase != "body":
                self._enter("body")
            else:
                self.body_bytes += len(data)
        elif state is not h11.IDLE:
            self._enter(None)  # the whole request is in (or the connection is closing)

    def connection_lost(self, exc: Exception | None) -> None:
        self._enter(None)
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # A pipelined request may already be buffered: uvicorn's keep-alive timer covers the rest.
        if self.phase == "headers" and self.conn.their_state is h11.IDLE:
            self._enter(None)

    # ---------------------------------------------------------------- deadlines
    def _enter(self, phase: str | None) -> None:
        self.phase, self.phase_start, self.body_bytes = phase, time.monotonic(), 0
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        if phase is not None and self.transport is not None and not self.transport.is_closing():
            self._deadline_timer = self.loop.call_at(self.loop.time() + self._allowed() + 0.01, self._check)

    def _allowed(self) -> float:
        g = self.guard
        if self.phase == "headers":
            return g.header_timeout_s
        return g.body_timeout_s + self.body_bytes / g.min_body_rate

    def _check(self) -> None:
        self._deadline_timer = None
        if self.phase is None or self.transport.is_closing():
            return
        now, allowed = time.monotonic(), self._allowed()
        if self.flow.read_paused:  # the app is not reading yet: not the client's fault; grant 5 s more
            self.phase_start = max(self.phase_start, now + PAUSE_GRACE_S - allowed)
        left = self.phase_start + allowed - now
        if left > 0:
            self._deadline_timer = self.loop.call_at(self.loop.time() + left + 0.01, self._check)
            return
        if self.phase == "headers":
            self.guard.counts["header_timeouts"] += 1
            why = (f"request line and headers did not arrive within {self.guard.header_timeout_s:g} s "
                   "(`gemtinker serve --header-timeout`)")
        else:
            self.guard.counts["body_timeouts"] += 1
            why = (f"request body arrived slower than {self.guard.min_body_rate / 1024:g} KiB/s after a "
                   f"{self.guard.body_timeout_s:g} s grace ({self.body_bytes} bytes in "
                   f"{time.monotonic() - self.phase_start:.0f} s; `gemtinker serve --body-timeout`, `--min-body-rate`)")
        # A body cut off is rare (a slow link or a hostile client): worth a warning with its route.
        route = f"{self.scope['method']} {self.scope['path']}" if self.phase == "body" and self.scope else ""
        log.log(logging.WARNING if route else logging.INFO, "closing connection from %s %s: %s", self.client, route, why)
        self._close(_timeout_response(why))

    def _close(self, answer: bytes | None) -> None:
        """Close this connection, first answering `answer` if no response has started."""
        if answer is not None and (self.cycle is None or not self.cycle.response_started):
            if self.cycle is not None:
                self.cycle.response_started = True  # the app's own answer, if any, is dropped
            self.transport.write(answer)
        self._enter(None)
        self.transport.close()

    # ---------------------------------------------------------------- connection cap
    def _make_room(self) -> None:
        """Over the cap: close the oldest connection that has waited over a second for its request
        head (half-open or slow), else the one idle longest between requests; with neither,
        refuse this one (503)."""
        others = [c for c in self.connections if isinstance(c, GuardedH11Protocol) and c is not self
                  and not c.transport.is_closing()]
        # One that opened a moment ago is a client about to send, not a slowloris: spare it.
        now, min_age = time.monotonic(), min(EVICT_MIN_AGE_S, self.guard.header_timeout_s / 2)
        waiting = [c for c in others if c.phase == "headers" and now - c.phase_start >= min_age]
        idle = [c for c in others if c.phase is None and c.conn.their_state is h11.IDLE
                and (c.cycle is None or c.cycle.response_complete)]
        victim = min(waiting or idle, key=lambda c: c.phase_start, default=None)
        if victim is not None:
            self.guard.counts["evicted_idle"] += 1
            victim._close(_timeout_response("the server is at its connection limit and this connection "
                                            "had not sent a request (`gemtinker serve --max-connections`)")
                          if victim.phase == "headers" else None)
            return
        self.guard.counts["refused_over_cap"] += 1
        if len(self.connections) > 2 * self.guard.max_connections:  # a flood: do not even hold it
            self._close(None)
            return
        self.limit_concurrency = 0  # uvicorn answers this connection's request with a 503
