"""Training models' lifecycle: create (fresh or from a checkpoint), look up, replace weights, unload.

A training model is a LoRA adapter named by its Tinker model id (`<session>:train:<n>`) on the
engine of its base model. It needs a live session (else nothing ever reaps it), and its run
record (store) outlives it: a model id whose run exists but which is not loaded gets a message
saying why and how to get it back.

`live` is written from training threads (a model is registered when its create op finishes) and
iterated on the event loop (reaping idle sessions): a `SharedMap`, iterated by snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoints import Checkpoints
from .engine_api import EngineAPI
from .engines import Engines
from .errors import Forbidden, NotFoundError, UserError
from .futures import Result
from .ops import Ops
from .paths import TinkerPath, check_component
from .requests import int_field, lora_dict, lora_spec
from .shared_map import SharedMap
from .store import Store

log = logging.getLogger("gemtinker.server")


@dataclass
class LiveModel:
    model_id: str
    session_id: str
    base_model: str
    engine: EngineAPI
    ephemeral: deque = field(default_factory=deque)  # sampler ids, oldest first


def unknown_model_msg(store: Store, model_id: str) -> str:
    run = store.get_run(model_id)
    if run is not None:
        return (f"model {model_id!r} is not loaded on this server (it was unloaded, its session ended, "
                "or the server restarted); create a new training client from one of its checkpoints")
    return f"unknown model id {model_id!r}: no training client with this id was created on this server"


def check_training_ckpt(tp: TinkerPath, run_row: dict, base_model: str) -> None:
    if tp.kind != "training":
        what = "an external weights export" if tp.kind == "external" else "a sampler checkpoint"
        raise UserError(f"{tp} is {what}; load_state needs a training checkpoint "
                        "(tinker://<run>/weights/<name>, from save_state)")
    if run_row["base_model"] != base_model:
        raise UserError(f"{tp} was trained on {run_row['base_model']!r}, not {base_model!r}")


class ModelRegistry:
    def __init__(self, store: Store, engines: Engines, ops: Ops, checkpoints: Checkpoints, root: Path):
        self.store = store
        self.engines = engines
        self.ops = ops
        self.checkpoints = checkpoints
        self.root = root  # scratch space for the backup that load_weights restores on failure
        # Written from training threads, iterated on the event loop: a locked map, iterated by snapshot.
        self.live: SharedMap[str, LiveModel] = SharedMap()

    def unknown_msg(self, model_id: str) -> str:
        return unknown_model_msg(self.store, model_id)

    def get(self, model_id: str) -> LiveModel:
        live = self.live.get(model_id)
        if live is None:
            raise UserError(self.unknown_msg(model_id))
        return live

    def register(self, model_id: str, session_id: str, base_model: str, engine: EngineAPI,
                 lora: dict, user_metadata: dict | None, owner: str | None) -> None:
        self.live[model_id] = LiveModel(model_id, session_id, base_model, engine)
        self.store.add_run(model_id, session_id, base_model, lora, user_metadata, owner)

    def check_new(self, session_id: str, model_id: str, owner: str | None) -> None:
        """Models need a live session (else nothing ever reaps them), and a model id another
        API key already used is not taken over (that would replace its run record)."""
        row = self.store.get_session(session_id)
        if row is None or row["finished"] is not None:
            raise UserError(f"session {session_id!r} is unknown or finished; create a session first "
                            "(ServiceClient does this)")
        run = self.store.get_run(model_id)
        if run is not None and run.get("owner") not in (None, owner):
            raise Forbidden(f"model id {model_id!r} belongs to another API key")

    def _new_queue(self, model_id: str, name: str, run: Callable[[], Result]) -> str:
        return self.ops.new_model_queue(model_id, name, run, lambda: model_id in self.live)

    # ---------------------------------------------------------------- create
    def create_model(self, body: dict, owner: str | None = None) -> str:
        """`owner`: who made the request (`owner_of` its API key); the run belongs to it."""
        name = "create_model"
        try:
            session_id = check_component(body.get("session_id"), "session_id")
            seq = int_field(body, "model_seq_id", 0)
            self.check_new(session_id, f"{session_id}:train:{seq}", owner)
            base_model = body.get("base_model")
            spec = lora_spec(body)
            if not isinstance(base_model, str):
                raise UserError("base_model is required")
            if base_model not in self.engines.models:
                self.engines.get(base_model)  # raises the message naming the served models
        except UserError as e:
            return self.ops.failed(str(e), name)
        except (TypeError, ValueError) as e:
            return self.ops.failed(f"bad create_model request: {e}", name)
        model_id = f"{session_id}:train:{seq}"
        user_metadata = body.get("user_metadata")
        if user_metadata is not None and not isinstance(user_metadata, dict):
            return self.ops.failed(f"user_metadata must be an object, got {user_metadata!r}", name)

        def run() -> Result:
            engine = self.engines.get(base_model)
            info = engine.create_adapter(model_id, spec, metadata=user_metadata)
            self.register(model_id, session_id, base_model, engine, lora_dict(info.lora), user_metadata, owner)
            return Result.json({"type": "create_model", "model_id": model_id})

        return self._new_queue(model_id, name, run)

    def get_info(self, model_id: str) -> dict:
        run = self.store.get_run(model_id)
        if run is None:
            raise NotFoundError(f"unknown model id {model_id!r}")
        base = run["base_model"]
        return {
            "type": "get_info", "model_id": model_id,
            "model_data": {"model_name": base, "tokenizer_id": base},
            "is_lora": True, "lora_rank": (run["lora"] or {}).get("rank"), "model_name": base,
        }

    # ---------------------------------------------------------------- load_weights
    def load_weights(self, body: dict, owner: str | None = None) -> str:
        path, with_opt = body.get("path"), bool(body.get("optimizer"))
        if body.get("model_id"):  # legacy TrainingClient.load_state: replace this model's weights
            model_id = body["model_id"]

            def run() -> Result:
                live = self.get(model_id)
                tp, directory, run_row = self.checkpoints.resolve(path, owner)
                check_training_ckpt(tp, run_row, live.base_model)
                self._replace_adapter(live, directory, with_opt)
                return Result.json({"type": "load_weights", "path": str(tp), "model_id": model_id})

            return self.ops.submit_model_op(model_id, body.get("seq_id"), "load_weights", run)

        # Create-via-load: a new model `<session>:train:<model_seq_id>` from a checkpoint.
        try:
            session_id = check_component(body.get("session_id"), "session_id")
            model_id = f"{session_id}:train:{int_field(body, 'model_seq_id', 0)}"
            self.check_new(session_id, model_id, owner)
            tp, directory, run_row = self.checkpoints.resolve(path, owner)
            base = run_row["base_model"]
            check_training_ckpt(tp, run_row, body.get("base_model") or base)
        except UserError as e:
            return self.ops.failed(str(e), "create_from_checkpoint")
        user_metadata = body.get("user_metadata") or run_row.get("user_metadata")
        if not isinstance(user_metadata, (dict, type(None))):
            return self.ops.failed(f"user_metadata must be an object, got {user_metadata!r}", "create_from_checkpoint")

        def run_create() -> Result:
            engine = self.engines.get(base)
            info = engine.load_state(model_id, str(directory), with_opt)
            self.register(model_id, session_id, base, engine, lora_dict(info.lora), user_metadata, owner)
            return Result.json({"type": "load_weights", "path": str(tp), "model_id": model_id})

        return self._new_queue(model_id, "create_from_checkpoint", run_create)

    def _replace_adapter(self, live: LiveModel, directory: Path, with_opt: bool) -> None:
        # The engine only loads into a fresh adapter, so keep a backup to restore on failure.
        with tempfile.TemporaryDirectory(dir=self.root) as tmp:
            backup = Path(tmp) / "backup"
            live.engine.save_state(live.model_id, str(backup), include_optimizer=True)
            live.engine.remove_adapter(live.model_id)
            try:
                live.engine.load_state(live.model_id, str(directory), with_opt)
            except Exception:
                live.engine.load_state(live.model_id, str(backup), True)
                raise

    # ---------------------------------------------------------------- unload
    def unload_model(self, model_id: Any) -> str:
        if not isinstance(model_id, str) or model_id not in self.live:
            return self.ops.failed(self.unknown_msg(str(model_id)), "unload_model")
        rid = self.ops.futures.new()

        async def go() -> None:
            await self.unload(model_id, f"model {model_id} was unloaded")
            self.ops.futures.resolve(rid, Result.json({"type": "unload_model", "model_id": model_id}))

        asyncio.get_running_loop().create_task(go())
        return rid

    async def unload(self, model_id: str, reason: str) -> None:
        """Stop the model's queue (after its running op) and free its adapter. On the loop."""
        queue = self.ops.queues.pop(model_id, None)
        if queue is not None:
            await queue.drain_and_close(reason)
        live = self.live.pop(model_id, None)
        if live is not None:
            def remove() -> None:
                try:
                    live.engine.remove_adapter(model_id)
                except Exception as e:  # already gone is fine
                    log.warning("remove_adapter(%s): %s", model_id, e)

            await asyncio.get_running_loop().run_in_executor(self.ops.train_pool, remove)
            self.store.set_run_unloaded(model_id)
            log.info("%-26s %s (%s)", "unload_model", model_id, reason)
