"""The server's state and operations, independent of HTTP: a thin facade over one module per concept.

- `engines.py`: one engine (`engine_api.EngineAPI`) per base model, created lazily on first use;
- `ops.py`: how requests become futures, the per-model seq_id queues, the pools, the caps;
- `models.py`: training models (LoRA adapters named by their Tinker model id
  `<session>:train:<n>`): create, load, unload;
- `training.py`: the ordered ops on a model (forward_backward, optim_step, the saves);
- `sampling.py`: samplers (engine snapshots named by their sampling session id) and `asample`;
- `sessions.py`, `checkpoints.py`, `external.py`, `custom_losses.py`: sessions, checkpoint
  management, exports, uploaded losses;
- `requests.py`: JSON fields parsed into the engine's types.

`Service` builds them, keeps the public method names the app (app.py) calls, and does what spans
concepts: finishing a session frees its models and samplers. The event loop itself never computes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from gemtinker.engine.checkpoint import recover_checkpoint_tree
from gemtinker.engine.models import repair_hub_cache

from . import codec, custom_losses, external, sessions
from .checkpoints import CHECKPOINTS_DIR, STORE_FILE, Checkpoints
from .engine_api import EngineAPI, EngineFactory
from .engines import Engines, default_engine_factory
from .futures import FutureTable
from .models import LiveModel, ModelRegistry, unknown_model_msg
from .ops import MAX_QUEUED_TRAIN_BYTES, Ops
from .ordering import ModelQueue
from .paths import TinkerPath
from .sampling import MAX_EPHEMERAL_SAMPLERS, MAX_NUM_SAMPLES, MAX_QUEUED_SEQUENCES, LiveSampler, Samplers
from .shared_map import SharedMap
from .store import ANYONE, Store
from .training import TrainingOps

log = logging.getLogger("gemtinker.server")

# Limits defined with their concept, importable from here as before.
__all__ = ["MAX_EPHEMERAL_SAMPLERS", "MAX_NUM_SAMPLES", "MAX_QUEUED_SEQUENCES", "MAX_QUEUED_TRAIN_BYTES",
           "SESSION_IDLE_TIMEOUT_S", "EngineFactory", "LiveModel", "Service"]

# A session whose client sent no heartbeat for this long (the SDK sends one every 10 s) is
# treated as dead: its adapters and samplers are freed, so killed trainers do not leak memory.
SESSION_IDLE_TIMEOUT_S = 1800.0


class Service:
    def __init__(self, models: list[str], root: Path, engine_factory: EngineFactory | None = None,
                 long_poll_s: float = 25.0, train_workers: int = 4, sample_workers: int = 64,
                 max_num_samples: int = MAX_NUM_SAMPLES, max_queued_sequences: int = MAX_QUEUED_SEQUENCES,
                 max_queued_train_bytes: int = MAX_QUEUED_TRAIN_BYTES,
                 session_idle_timeout_s: float = SESSION_IDLE_TIMEOUT_S, train_dtype: str | None = None):
        if not models:
            raise ValueError("at least one model must be served")
        self.models = list(dict.fromkeys(models))
        self.root = Path(root).expanduser().resolve()
        self.ckpt_root = self.root / CHECKPOINTS_DIR
        self.ckpt_root.mkdir(parents=True, exist_ok=True)
        recovered = recover_checkpoint_tree(self.ckpt_root)  # finish or undo writes a crash interrupted
        if recovered:
            log.warning("checkpoint recovery after an unclean stop: %s", "; ".join(recovered))
        repair_hub_cache()  # undo what versions up to 0.1.0 wrote over a real hub repo's cache entry
        self.store = Store(self.root / STORE_FILE)
        self.checkpoints = Checkpoints(self.store, self.ckpt_root)
        self.checkpoints.purge_expired()  # TTLs that ran out while the server was down
        self.external = external.ExternalWeights(self.store, self.checkpoints)
        self.futures = FutureTable(self.store)
        self.custom_losses = custom_losses.CustomLosses()
        self.long_poll_s = long_poll_s
        self._session_idle_timeout_s = session_idle_timeout_s
        store = self.store
        self.engines = Engines(self.models, engine_factory or default_engine_factory(train_dtype))
        self.ops = Ops(self.futures, store, lambda model_id: unknown_model_msg(store, model_id),
                       train_workers, sample_workers, max_queued_train_bytes)
        self.model_registry = ModelRegistry(store, self.engines, self.ops, self.checkpoints, self.root)
        self.samplers = Samplers(store, self.engines, self.ops, self.checkpoints, max_num_samples, max_queued_sequences)
        self.training = TrainingOps(self.model_registry, self.ops, self.samplers, store, self.checkpoints,
                                    self.custom_losses, self.external)

    def stop_queues(self, reason: str) -> None:
        """Fail every queued training op. Call on the event loop, before it stops."""
        self.ops.stop_queues(reason)

    def close(self) -> None:
        self.engines.close()
        self.ops.shutdown()
        self.store.close()

    # ---------------------------------------------------------------- state the app and tests read
    @property
    def max_num_samples(self) -> int:
        return self.samplers.max_num_samples

    @property
    def queued_sequences(self) -> int:
        return self.samplers.queued_sequences

    @property
    def queued_train_bytes(self) -> int:
        return self.ops.queued_train_bytes

    @property
    def _queues(self) -> dict[str, ModelQueue]:
        return self.ops.queues

    @property
    def _live(self) -> SharedMap[str, LiveModel]:
        return self.model_registry.live

    @property
    def _samplers(self) -> dict[str, LiveSampler]:
        return self.samplers.live

    # ---------------------------------------------------------------- engines and ops
    def engine_for(self, base_model: str) -> EngineAPI:
        """The engine of a served base model, created on first use (blocking: call off-loop)."""
        return self.engines.get(base_model)

    def capabilities(self) -> dict:
        return self.engines.capabilities()

    def failed(self, message: str, name: str = "", target: str = "") -> str:
        """A future that already failed with `message` (category "user")."""
        return self.ops.failed(message, name, target)

    # ---------------------------------------------------------------- sessions
    def create_session(self, body: dict, owner: str | None = None) -> dict:
        return sessions.create_session(self.store, body, owner)

    async def reap_idle_sessions(self) -> None:
        """Free the adapters and samplers of sessions whose client stopped heartbeating (killed)."""
        live_sessions = {m.session_id for m in self._live.values()}
        live_sessions |= {s.split(":", 1)[0] for s in self.samplers.ids()}
        cutoff = time.time() - self._session_idle_timeout_s
        for session_id in live_sessions:
            row = self.store.get_session(session_id)
            if row is not None and row["finished"] is None and (row["last_heartbeat"] or 0) < cutoff:
                await self.finish_session(session_id, f"expired: no heartbeat for {self._session_idle_timeout_s:.0f} s")

    async def finish_session(self, session_id: str, reason: str) -> None:
        self.store.finish_session(session_id, reason)
        self.custom_losses.forget_session(session_id)
        for model_id in [m for m, live in self._live.items() if live.session_id == session_id]:
            await self.model_registry.unload(model_id, f"session {session_id} finished")
        for sid in [s for s in self.samplers.ids() if s.startswith(f"{session_id}:")]:
            self.samplers.release(sid)
        log.info("%-26s %s reason=%s", "finish_session", session_id, reason)

    # ---------------------------------------------------------------- training models (models.py)
    def create_model(self, body: dict, owner: str | None = None) -> str:
        return self.model_registry.create_model(body, owner)

    def get_info(self, model_id: str) -> dict:
        return self.model_registry.get_info(model_id)

    def load_weights(self, body: dict, owner: str | None = None) -> str:
        return self.model_registry.load_weights(body, owner)

    def unload_model(self, model_id: Any) -> str:
        return self.model_registry.unload_model(model_id)

    # ---------------------------------------------------------------- ordered ops (training.py)
    def forward_backward(self, req: codec.FwdBwdRequest, body_bytes: int) -> str:
        return self.training.forward_backward(req, body_bytes)

    def optim_step(self, body: dict) -> str:
        return self.training.optim_step(body)

    def save_weights(self, body: dict) -> str:
        return self.training.save_weights(body)

    def save_weights_for_sampler(self, body: dict) -> str:
        return self.training.save_weights_for_sampler(body)

    def save_weights_external(self, body: dict) -> str:
        return self.training.save_weights_external(body)

    # ---------------------------------------------------------------- sampling (sampling.py)
    def create_sampling_session(self, body: dict, owner: Any = ANYONE) -> dict:
        """Blocking (may load an engine or LoRA weights): call off the event loop."""
        return self.samplers.create_session(body, owner)

    def get_sampler(self, sampler_id: str) -> dict:
        return self.samplers.info(sampler_id)

    def asample(self, body: dict) -> tuple[str, list[str]] | None:
        """(request_id, sample_sequence_ids), or None when overloaded (the caller answers 429)."""
        return self.samplers.asample(body)

    # ---------------------------------------------------------------- checkpoints (checkpoints.py)
    def resolve_checkpoint(self, path: Any, reader: Any = ANYONE) -> tuple[TinkerPath, Path, dict]:
        """(parsed path, directory, training run row) of an existing checkpoint `reader` may
        read (checkpoints.resolve_checkpoint), or UserError."""
        return self.checkpoints.resolve(path, reader)

    def training_run_json(self, run: dict) -> dict:
        return self.checkpoints.training_run_json(run)

    def weights_info(self, tinker_path: Any, reader: Any = ANYONE) -> dict:
        return self.checkpoints.weights_info(tinker_path, reader)
