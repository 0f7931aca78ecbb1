"""Waiting for a condition instead of sleeping a guessed time (holds no tests).

A test that needs a background thread or task to act polls for the outcome with a deadline: it
goes on as soon as the outcome is there (no wasted sleep on a fast machine) and still passes on a
slow, loaded one (no race with a fixed delay). The deadline only bounds a failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def wait_until(cond: Callable[[], object], what: str, timeout_s: float = 30.0, poll_s: float = 0.01) -> None:
    """Return once `cond()` is true; AssertionError naming `what` if it is not within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not so within {timeout_s} s"
        time.sleep(poll_s)


async def async_wait_until(cond: Callable[[], object], what: str, timeout_s: float = 30.0) -> None:
    """`wait_until` inside an event loop: yields to the loop's other tasks between checks."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not so within {timeout_s} s"
        await asyncio.sleep(0.001)


async def settle(rounds: int = 50) -> None:
    """Let every ready task of the loop run until it blocks (no clock involved: only yields), so a
    test can check that something did NOT happen without waiting a guessed time."""
    for _ in range(rounds):
        await asyncio.sleep(0)
