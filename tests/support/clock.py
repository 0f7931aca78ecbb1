"""A fake clock for the server's checkpoint expiry (holds no tests).

TTL tests used to sleep past a 1 s TTL; with `ServerClock` they move the server's clock forward
instead, so they neither wait nor race a loaded CPU. It stands in for the `time` module in the
server modules that set and check expiry times; everything but `time()` is the real module's.
"""

from __future__ import annotations

import time as _time
from typing import Any

import pytest

# The server modules that read the wall clock for checkpoint and URL expiry.
EXPIRY_MODULES = ("gemtinker.server.checkpoints", "gemtinker.server.training", "gemtinker.server.external")


class ServerClock:
    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return _time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def __getattr__(self, name: str) -> Any:  # monotonic, strftime, sleep, ...: the real ones
        return getattr(_time, name)


@pytest.fixture
def server_clock(monkeypatch) -> ServerClock:
    """The in-process server's expiry clock for one test (undone afterwards). Fails loudly if a
    module in EXPIRY_MODULES no longer imports `time` (then this list needs updating)."""
    clock = ServerClock()
    for module in EXPIRY_MODULES:
        monkeypatch.setattr(f"{module}.time", clock)
    return clock
