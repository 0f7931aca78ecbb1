"""`Service._live` (the loaded training models) is written from training threads (a model is
registered when its create op finishes) and iterated on the event loop (idle-session reaping,
finishing a session). Hammered here: iterating must never see the dict change size."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import pytest

from gemtinker.server.models import LiveModel
from gemtinker.server.service import Service

pytestmark = pytest.mark.integration  # hammers the race for seconds: `make test` only

MODEL = "gemtinker/tiny-llama"  # never loaded: no engine is made here


def test_live_models_iterate_safely_while_training_threads_add_and_remove_them(tmp_path):
    service = Service([MODEL], tmp_path, engine_factory=lambda name: object())
    errors: list[BaseException] = []
    stop = threading.Event()
    # Many entries make each iteration long, so the writers hit it mid-way.
    for i in range(5000):
        service._live[f"pre:train:{i}"] = LiveModel(f"pre:train:{i}", "pre", MODEL, None)

    def writer(w: int) -> None:
        n = 0
        try:
            while not stop.is_set():
                model_id = f"w{w}:train:{n}"
                service.model_registry.register(model_id, f"w{w}", MODEL, None, {}, None, None)  # as a create op does
                if n % 2:
                    service._live.pop(f"w{w}:train:{n - 1}", None)
                n += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    async def iterate() -> int:
        rounds, deadline = 0, time.monotonic() + 3.0
        while time.monotonic() < deadline and not errors:
            await service.reap_idle_sessions()  # iterates _live.values()
            await service.finish_session("no-such-session", "test")  # iterates _live.items()
            rounds += 1
        return rounds

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race shows in milliseconds
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    try:
        for t in threads:
            t.start()
        rounds = asyncio.run(iterate())
    except RuntimeError as e:
        errors.append(e)
        rounds = 0
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(old_interval)
        service.close()
    assert not errors, f"iterating Service._live raced with its writers: {errors[0]!r}"
    assert rounds > 0
