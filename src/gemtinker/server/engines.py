"""The engine registry: one engine per served base model, created lazily on first use.

Loading a model takes seconds, so two requests for the same new model must not load it twice,
while a request for an already loaded model must not wait behind another model's load: a global
lock guards the map, and a per-name lock serialises the loads.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from .engine_api import EngineAPI, EngineFactory
from .errors import UserError

log = logging.getLogger("gemtinker.server")

# The learner's compute dtype when `Service(train_dtype=None)`: "auto" = bf16 where the hardware
# has it (CUDA, CPUs with AVX512-BF16 or AMX), else the model's dtype (engine/devices.py:
# resolve_train_dtype). `gemtinker serve --train-dtype` sets it per server; the test suite pins
# float32 through this variable.
TRAIN_DTYPE_ENV = "GEMTINKER_TRAIN_DTYPE"


def default_engine_factory(train_dtype: str | None = None) -> EngineFactory:
    def make(base_model: str) -> EngineAPI:
        from gemtinker.engine.engine import Engine  # torch: imported only when a model is loaded

        return Engine(base_model=base_model, train_dtype=train_dtype or os.environ.get(TRAIN_DTYPE_ENV, "auto"))

    return make


class Engines:
    def __init__(self, models: list[str], factory: EngineFactory):
        self.models = models
        self._factory = factory
        self._engines: dict[str, EngineAPI] = {}
        self._lock = threading.Lock()
        self._name_locks: dict[str, threading.Lock] = {}

    def get(self, base_model: str) -> EngineAPI:
        """The engine of a served base model, created on first use (blocking: call off-loop)."""
        if base_model not in self.models:
            raise UserError(
                f"unknown base model {base_model!r}; this server serves: {', '.join(self.models)} "
                "(start it with --model NAME to add one)"
            )
        with self._lock:
            if base_model in self._engines:
                return self._engines[base_model]
            name_lock = self._name_locks.setdefault(base_model, threading.Lock())
        with name_lock:
            if base_model not in self._engines:
                t0 = time.perf_counter()
                engine = self._factory(base_model)
                log.info("loaded engine for %s in %.1f s", base_model, time.perf_counter() - t0)
                with self._lock:
                    self._engines[base_model] = engine
            return self._engines[base_model]

    def capabilities(self) -> dict:
        out = []
        for name in self.models:
            entry: dict[str, Any] = {"model_name": name, "trainable": True, "sampleable": True}
            eng = self._engines.get(name)
            ctx = eng.max_len if eng is not None else None
            if isinstance(ctx, int):
                entry["max_context_length"] = ctx
            out.append(entry)
        return {"supported_models": out}

    def close(self) -> None:
        for engine in list(self._engines.values()):
            try:
                engine.close()  # stops the engine's sampling scheduler
            except Exception as e:
                log.warning("engine close: %s", e)
