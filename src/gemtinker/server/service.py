"""The server's state and operations, independent of HTTP.

One `Engine` per base model (created lazily on first use); training models are LoRA adapters
named by their Tinker model id (`<session>:train:<n>`); samplers are engine snapshots named by
their sampling session id. Training ops run through a per-model `ModelQueue` (seq_id order) on
a small training thread pool; sampling runs on a large pool because the engine batches
concurrent `sample` calls. The event loop itself never computes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import tempfile
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemtinker.engine.checkpoint import recover_checkpoint_tree
from gemtinker.engine.models import repair_hub_cache
from gemtinker.engine.types import AdamConfig, EngineError, LoraSpec, SamplingConfig

from . import codec, custom_losses, external, sample_options
from .checkpoints import CHECKPOINTS_DIR, STORE_FILE, Checkpoints, checkpoint_json, dir_size
from .errors import Forbidden, NotFoundError, Overloaded, UserError
from .futures import FutureTable, Result
from .limits import check_seed, check_ttl, iso, str_dict
from .ordering import ModelQueue
from .paths import TinkerPath, check_component
from .shared_map import SharedMap
from .store import ANYONE, Store

log = logging.getLogger("gemtinker.server")

EngineFactory = Callable[[str], Any]
# Ephemeral samplers (save_weights_and_get_sampling_client) kept per model; older ones are freed.
# Each holds a frozen copy of the adapter (23 MB for SmolLM2-135M at rank 16, plus its sampler
# deltas): 16 of them were half a gigabyte of a `make run`'s peak. A synchronous RL loop samples
# only the newest; async loops (async_steps, the cookbook's max_steps_off_policy) a few steps back.
MAX_EPHEMERAL_SAMPLERS = 4
# Cookbook group sizes are 2..64; a larger num_samples is almost surely a bug, and one request
# must always fit in the sampling queue below.
MAX_NUM_SAMPLES = 128
# Sequences admitted to sampling at once (queued + decoding). Beyond it /asample answers 429, which
# every SDK sampling path retries with backoff, so a burst of clients waits instead of growing
# the server's memory and latency without bound.
MAX_QUEUED_SEQUENCES = 2048
# A training op's seq_id may run ahead of the queue (chunks arrive out of order), but not by more.
MAX_SEQ_AHEAD = 100_000
# Bytes of forward_backward requests waiting in model queues, over all models.
MAX_QUEUED_TRAIN_BYTES = 512 << 20
# A session whose client sent no heartbeat for this long (the SDK sends one every 10 s) is
# treated as dead: its adapters and samplers are freed, so killed trainers do not leak memory.
SESSION_IDLE_TIMEOUT_S = 1800.0


# The learner's compute dtype when `Service(train_dtype=None)`: "auto" = bf16 on CUDA, else the
# model's dtype (engine.resolve_train_dtype says why not bf16 on CPUs). `gemtinker serve
# --train-dtype` sets it per server; the test suite pins float32 through this variable.
TRAIN_DTYPE_ENV = "GEMTINKER_TRAIN_DTYPE"


def default_engine_factory(train_dtype: str | None = None) -> EngineFactory:
    def make(base_model: str) -> Any:
        from gemtinker.engine.engine import Engine

        return Engine(base_model=base_model, train_dtype=train_dtype or os.environ.get(TRAIN_DTYPE_ENV, "auto"))

    return make


@dataclass
class LiveModel:
    model_id: str
    session_id: str
    base_model: str
    engine: Any
    ephemeral: deque = field(default_factory=deque)  # sampler ids, oldest first


@dataclass
class LiveSampler:
    sampler_id: str
    base_model: str
    engine: Any
    engine_sampler_id: Any
    model_path: str | None


# Typed field access for JSON bodies: a wrong type is the caller's error (category "user"), never
# a TypeError deep inside an op that would be reported as a server fault.
def _int_field(body: dict, key: str, default: Any = None) -> Any:
    v = body.get(key, default)
    if v is default and default is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool):
        raise UserError(f"{key} must be an integer, got {v!r}")
    return v


def _dict_field(body: dict, key: str) -> dict:
    v = body.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise UserError(f"{key} must be an object, got {v!r}")
    return v


def _number(owner: str, key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"{owner}.{key} must be a number, got {v!r}")
    try:
        return float(v)
    except OverflowError:
        raise UserError(f"{owner}.{key} is out of range: {v!r}") from None


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
        self.long_poll_s = long_poll_s
        self._engine_factory = engine_factory or default_engine_factory(train_dtype)
        self._engines: dict[str, Any] = {}
        self._engine_lock = threading.Lock()
        self._engine_name_locks: dict[str, threading.Lock] = {}
        self._train_pool = ThreadPoolExecutor(train_workers, thread_name_prefix="gt-train")
        self._sample_pool = ThreadPoolExecutor(sample_workers, thread_name_prefix="gt-sample")
        self._queues: dict[str, ModelQueue] = {}
        # Written from training threads, iterated on the event loop: a locked map, iterated by snapshot.
        self._live: SharedMap[str, LiveModel] = SharedMap()
        self._samplers: dict[str, LiveSampler] = {}
        self._sampler_lock = threading.Lock()
        self._sample_seen: OrderedDict[tuple[str, int], tuple[str, list[str]]] = OrderedDict()
        self.max_num_samples = max_num_samples
        self.queued_sequences = 0
        self._max_queued_sequences = max_queued_sequences
        self.queued_train_bytes = 0
        self._max_queued_train_bytes = max_queued_train_bytes
        self._session_idle_timeout_s = session_idle_timeout_s
        self.custom_losses = custom_losses.CustomLosses()

    def stop_queues(self, reason: str) -> None:
        """Fail every queued training op. Call on the event loop, before it stops."""
        for q in self._queues.values():
            q.close(reason)
        self._queues.clear()

    def close(self) -> None:
        for engine in self._engines.values():
            closer = getattr(engine, "close", None)  # stops the engine's sampling scheduler
            if callable(closer):
                try:
                    closer()
                except Exception as e:
                    log.warning("engine close: %s", e)
        self._train_pool.shutdown(wait=False, cancel_futures=True)
        self._sample_pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    # ---------------------------------------------------------------- engines
    def engine_for(self, base_model: str) -> Any:
        """The engine of a served base model, created on first use (blocking: call off-loop)."""
        if base_model not in self.models:
            raise UserError(
                f"unknown base model {base_model!r}; this server serves: {', '.join(self.models)} "
                "(start it with --model NAME to add one)"
            )
        with self._engine_lock:
            if base_model in self._engines:
                return self._engines[base_model]
            name_lock = self._engine_name_locks.setdefault(base_model, threading.Lock())
        with name_lock:
            if base_model not in self._engines:
                t0 = time.perf_counter()
                engine = self._engine_factory(base_model)
                log.info("loaded engine for %s in %.1f s", base_model, time.perf_counter() - t0)
                with self._engine_lock:
                    self._engines[base_model] = engine
            return self._engines[base_model]

    def capabilities(self) -> dict:
        out = []
        for name in self.models:
            entry: dict[str, Any] = {"model_name": name, "trainable": True, "sampleable": True}
            eng = self._engines.get(name)
            ctx = getattr(eng, "max_len", None) if eng is not None else None
            if isinstance(ctx, int):
                entry["max_context_length"] = ctx
            out.append(entry)
        return {"supported_models": out}

    # ---------------------------------------------------------------- op plumbing
    async def _run(self, request_id: str, name: str, target: str, fn: Callable[[], Result], pool: Executor) -> None:
        t0 = time.perf_counter()
        try:
            result = await asyncio.get_running_loop().run_in_executor(pool, fn)
            status = "ok"
        except (UserError, EngineError) as e:
            result, status = Result.error(str(e), "user"), f"user error: {e}"
        except Exception as e:
            log.exception("%s on %s failed", name, target)
            result, status = Result.error(f"internal server error in {name}: {type(e).__name__}: {e}", "server"), "server error"
        self.futures.resolve(request_id, result)
        log.info("%-26s %-28s %7.0f ms  %s", name, target, (time.perf_counter() - t0) * 1e3, status[:200])

    def failed(self, message: str, name: str = "", target: str = "") -> str:
        if name:
            log.info("%-26s %-28s %7s     user error: %s", name, target, "-", message[:200])
        return self.futures.resolved(self.futures.new(), Result.error(message))

    def _submit_model_op(self, model_id: Any, seq_id: Any, name: str, fn: Callable[[], Result], cost: int = 0) -> str:
        """Queue a training op in seq_id order. `cost`: request bytes it holds while queued."""
        if not isinstance(model_id, str):
            return self.failed("model_id is required", name)
        queue = self._queues.get(model_id)
        if queue is None:
            return self.failed(self._unknown_model_msg(model_id), name, model_id)
        if not isinstance(seq_id, int) or isinstance(seq_id, bool):
            return self.failed(f"{name} needs an integer seq_id", name, model_id)
        existing = queue.known(seq_id)
        if existing is not None:
            return existing
        if seq_id > queue.next_seq + MAX_SEQ_AHEAD:
            # It would wait for a gap the client never fills, then drag the queue past every real op.
            return self.failed(f"{name}: seq_id {seq_id} is more than {MAX_SEQ_AHEAD} ahead of the model's next "
                               f"seq_id {queue.next_seq}", name, model_id)
        # The op the queue waits for is always admitted, so the cap can delay but never deadlock.
        if cost and self.queued_train_bytes + cost > self._max_queued_train_bytes and seq_id != queue.next_seq:
            raise Overloaded(f"training queues hold {self.queued_train_bytes >> 20} MiB of requests "
                             f"(limit {self._max_queued_train_bytes >> 20} MiB); retry shortly")
        rid = self.futures.new()
        self.store.touch_run(model_id)  # the run's last_request_time (REST training-run listings)
        self.queued_train_bytes += cost
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.queued_train_bytes -= cost

        async def run() -> None:
            try:
                await self._run(rid, name, f"{model_id}#{seq_id}", fn, self._train_pool)
            finally:
                release()

        def skip(msg: str) -> None:
            release()
            self.futures.resolve(rid, Result.error(msg))

        return queue.submit(seq_id, rid, run, skip)

    def refuse(self, model_id: Any, seq_id: Any, name: str, message: str) -> str:
        """A failed future for an ordered op this server does not offer (it keeps its seq_id slot)."""
        return self._refuse_op(model_id, seq_id, name, UserError(message))

    def _refuse_op(self, model_id: Any, seq_id: Any, name: str, error: UserError) -> str:
        """Fail an ordered op that was refused before it reached the engine. It still takes its
        seq_id slot, so the model's later ops do not wait for a gap that never fills."""
        def fail() -> Result:
            raise error

        return self._submit_model_op(model_id, seq_id, name, fail)

    def _unknown_model_msg(self, model_id: str) -> str:
        run = self.store.get_run(model_id)
        if run is not None:
            return (f"model {model_id!r} is not loaded on this server (it was unloaded, its session ended, "
                    "or the server restarted); create a new training client from one of its checkpoints")
        return f"unknown model id {model_id!r}: no training client with this id was created on this server"

    def _model(self, model_id: str) -> LiveModel:
        live = self._live.get(model_id)
        if live is None:
            raise UserError(self._unknown_model_msg(model_id))
        return live

    # ---------------------------------------------------------------- sessions
    def create_session(self, body: dict, owner: str | None = None) -> dict:
        session_id = uuid.uuid4().hex[:16]
        tags = body.get("tags") or []
        if not isinstance(tags, list):
            raise UserError(f"tags must be a list, got {tags!r}")
        display_name = body.get("display_name")
        if display_name is not None and not isinstance(display_name, str):
            raise UserError(f"display_name must be a string, got {display_name!r}")
        self.store.add_session(session_id, tags, _dict_field(body, "user_metadata"), str(body.get("sdk_version", "")),
                               owner, display_name)
        log.info("%-26s %s tags=%s", "create_session", session_id, tags)
        return {"type": "create_session", "session_id": session_id}

    async def reap_idle_sessions(self) -> None:
        """Free the adapters and samplers of sessions whose client stopped heartbeating (killed)."""
        live_sessions = {m.session_id for m in self._live.values()}
        with self._sampler_lock:
            live_sessions |= {s.split(":", 1)[0] for s in self._samplers}
        cutoff = time.time() - self._session_idle_timeout_s
        for session_id in live_sessions:
            row = self.store.get_session(session_id)
            if row is not None and row["finished"] is None and (row["last_heartbeat"] or 0) < cutoff:
                await self.finish_session(session_id, f"expired: no heartbeat for {self._session_idle_timeout_s:.0f} s")

    async def finish_session(self, session_id: str, reason: str) -> None:
        self.store.finish_session(session_id, reason)
        self.custom_losses.forget_session(session_id)
        for model_id in [m for m, live in self._live.items() if live.session_id == session_id]:
            await self._unload(model_id, f"session {session_id} finished")
        with self._sampler_lock:
            mine = [s for s in self._samplers if s.startswith(f"{session_id}:")]
        for sid in mine:
            self._release_sampler(sid)
        log.info("%-26s %s reason=%s", "finish_session", session_id, reason)

    # ---------------------------------------------------------------- training models
    def create_model(self, body: dict, owner: str | None = None) -> str:
        """`owner`: who made the request (`owner_of` its API key); the run belongs to it."""
        name = "create_model"
        try:
            session_id = check_component(body.get("session_id"), "session_id")
            seq = _int_field(body, "model_seq_id", 0)
            self._check_new_model(session_id, f"{session_id}:train:{seq}", owner)
            base_model = body.get("base_model")
            lora = _dict_field(body, "lora_config")
            spec = LoraSpec(
                rank=_int_field(lora, "rank", 32), seed=check_seed("lora_config.seed", lora.get("seed")),
                train_attn=bool(lora.get("train_attn", True)), train_mlp=bool(lora.get("train_mlp", True)),
                train_unembed=bool(lora.get("train_unembed", True)),
            )
            if spec.rank > 4096:
                raise UserError(f"lora rank {spec.rank} is absurd (at most 4096)")
            if spec.rank <= 0:
                raise UserError(f"lora rank must be positive, got {spec.rank}")
            if not isinstance(base_model, str):
                raise UserError("base_model is required")
            if base_model not in self.models:
                self.engine_for(base_model)  # raises the message naming the served models
        except UserError as e:
            return self.failed(str(e), name)
        except (TypeError, ValueError) as e:
            return self.failed(f"bad create_model request: {e}", name)
        model_id = f"{session_id}:train:{seq}"
        user_metadata = body.get("user_metadata")
        if user_metadata is not None and not isinstance(user_metadata, dict):
            return self.failed(f"user_metadata must be an object, got {user_metadata!r}", name)

        def run() -> Result:
            engine = self.engine_for(base_model)
            info = engine.create_adapter(model_id, spec, metadata=user_metadata)
            self._register_model(model_id, session_id, base_model, engine, _lora_dict(info.lora), user_metadata, owner)
            return Result.json({"type": "create_model", "model_id": model_id})

        return self._new_model_queue(model_id, name, run)

    def _new_model_queue(self, model_id: str, name: str, run: Callable[[], Result]) -> str:
        queue = self._queues.get(model_id)
        if queue is None:
            queue = self._queues[model_id] = ModelQueue(model_id, first_seq=0)
        existing = queue.known(0)
        if existing is not None:
            return existing
        rid = self.futures.new()

        async def run_and_cleanup() -> None:
            await self._run(rid, name, model_id, run, self._train_pool)
            if model_id not in self._live:  # creation failed: forget the queue so a retry can work
                q = self._queues.pop(model_id, None)
                if q is not None:
                    q.close(self._unknown_model_msg(model_id))

        return queue.submit(0, rid, run_and_cleanup, lambda msg: self.futures.resolve(rid, Result.error(msg)))

    def _register_model(self, model_id: str, session_id: str, base_model: str, engine: Any,
                        lora: dict, user_metadata: dict | None, owner: str | None) -> None:
        self._live[model_id] = LiveModel(model_id, session_id, base_model, engine)
        self.store.add_run(model_id, session_id, base_model, lora, user_metadata, owner)

    def _check_new_model(self, session_id: str, model_id: str, owner: str | None) -> None:
        """Models need a live session (else nothing ever reaps them), and a model id another
        API key already used is not taken over (that would replace its run record)."""
        row = self.store.get_session(session_id)
        if row is None or row["finished"] is not None:
            raise UserError(f"session {session_id!r} is unknown or finished; create a session first "
                            "(ServiceClient does this)")
        run = self.store.get_run(model_id)
        if run is not None and run.get("owner") not in (None, owner):
            raise Forbidden(f"model id {model_id!r} belongs to another API key")

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

    def forward_backward(self, req: codec.FwdBwdRequest, body_bytes: int) -> str:
        """Queue a parsed request (`codec.parse_forward_backward`, run off the loop). Its datums
        are decoded when the op runs, on the training pool; while queued it holds the body."""
        name = "forward" if req.forward_only else "forward_backward"
        label = f"{name}[{req.loss_fn},{len(req.msg.data) if req.msg is not None else 0}]"
        if req.problem is not None:
            return self._refuse_op(req.model_id, req.seq_id, label, UserError(req.problem))

        def run() -> Result:
            live = self._model(req.model_id)
            data = req.datums()
            if req.loss_fn == "custom":  # a loss uploaded by create_custom_loss (custom_losses.py)
                if req.forward_only:
                    raise UserError("forward with loss_fn 'custom' is not supported: a custom loss runs in "
                                    "forward_backward (use forward with cross_entropy for logprobs)")
                loss = self.custom_losses.get(req.loss_fn_config, live.session_id)
                res = custom_losses.forward_backward(live.engine, req.model_id, data, loss)
                return Result.proto(codec.encode_forward_output(res))
            codec.validate_datums(data, req.loss_fn, getattr(live.engine, "vocab_size", None))
            call = live.engine.forward if req.forward_only else live.engine.forward_backward
            res = call(req.model_id, data, req.loss_fn, req.loss_fn_config or None)
            return Result.proto(codec.encode_forward_output(res))

        # Counted at the size the op reaches when it runs (body + decoded tensors), so the cap
        # bounds what queued ops will allocate, not just what they hold while waiting.
        return self._submit_model_op(req.model_id, req.seq_id, label, run, cost=body_bytes + req.dense_bytes)

    def optim_step(self, body: dict) -> str:
        model_id = body.get("model_id")
        params = body.get("adam_params") or body.get("optim_params")

        def run() -> Result:
            live = self._model(model_id)
            if params is None or (isinstance(params, dict) and params.get("type", "adam") not in ("adam", "adamw")):
                raise UserError("only Adam optimizer parameters (AdamParams) are supported by this server")
            if not isinstance(params, dict):
                raise UserError(f"adam_params must be an object, got {params!r}")
            fields = {k: _number("adam_params", k, v) for k, v in params.items() if k in AdamConfig.__dataclass_fields__}
            bad = [k for k, v in fields.items() if not math.isfinite(v) or v < 0]
            if bad:
                raise UserError(f"adam_params {bad} must be finite and non-negative, got {params}")
            metrics = live.engine.optim_step(model_id, AdamConfig(**fields))
            return Result.json({"type": "optim_step", "metrics": {k: float(v) for k, v in (metrics or {}).items()}})

        return self._submit_model_op(model_id, body.get("seq_id"), "optim_step", run)

    def save_weights(self, body: dict) -> str:
        model_id = body.get("model_id")
        try:
            check_ttl(body.get("ttl_seconds"))
        except UserError as e:
            return self._refuse_op(model_id, body.get("seq_id"), "save_weights", e)

        def run() -> Result:
            live = self._model(model_id)
            tp = self._checkpoint_name(model_id, body.get("path"), "training")
            meta = {"base_model": live.base_model, "model_id": model_id, "user_metadata": body.get("user_metadata")}
            with self.checkpoints.writing(tp, bool(body.get("overwrite"))) as path:
                live.engine.save_state(model_id, str(path), include_optimizer=True, metadata=meta)
                self._record_checkpoint(tp, path, body)
            return Result.json({"type": "save_weights", "path": str(tp)})

        return self._submit_model_op(model_id, body.get("seq_id"), "save_weights", run)

    def save_weights_for_sampler(self, body: dict) -> str:
        model_id = body.get("model_id")
        try:
            check_ttl(body.get("ttl_seconds"))
        except UserError as e:
            return self._refuse_op(model_id, body.get("seq_id"), "save_weights_for_sampler", e)
        if body.get("path"):
            def run() -> Result:
                live = self._model(model_id)
                tp = self._checkpoint_name(model_id, body["path"], "sampler")
                meta = {"base_model": live.base_model, "model_id": model_id, "user_metadata": body.get("user_metadata")}
                with self.checkpoints.writing(tp, bool(body.get("overwrite"))) as path:
                    live.engine.save_sampler_weights(model_id, str(path), metadata=meta)
                    self._record_checkpoint(tp, path, body)
                return Result.json({"type": "save_weights_for_sampler", "path": str(tp)})

            return self._submit_model_op(model_id, body.get("seq_id"), "save_weights_for_sampler", run)

        seq = body.get("sampling_session_seq_id")

        def run_ephemeral() -> Result:
            live = self._model(model_id)
            if not isinstance(seq, int):
                raise UserError("save_weights_for_sampler needs either a path or a sampling_session_seq_id")
            sid = f"{live.session_id}:sample:{seq}"
            # "inflight" samplers are served as snapshots: always correct, just never auto-updated.
            esid = live.engine.snapshot_sampler(model_id)
            self._add_sampler(LiveSampler(sid, live.base_model, live.engine, esid, None), live.session_id)
            live.ephemeral.append(sid)
            while len(live.ephemeral) > MAX_EPHEMERAL_SAMPLERS:
                self._release_sampler(live.ephemeral.popleft())
            return Result.json({"type": "save_weights_for_sampler", "sampling_session_id": sid})

        return self._submit_model_op(model_id, body.get("seq_id"), "snapshot_sampler", run_ephemeral)

    def save_weights_external(self, body: dict) -> str:
        """The model's adapter in hosted Tinker's export layout (external.py)."""
        model_id = body.get("model_id")
        try:
            req = external.parse_request(body)
        except UserError as e:
            return self._refuse_op(model_id, body.get("seq_id"), "save_weights_external", e)

        def run() -> Result:
            live = self._model(model_id)
            return Result.json(self.external.export(live.engine, model_id, live.base_model, req))

        return self._submit_model_op(model_id, body.get("seq_id"), "save_weights_external", run)

    @staticmethod
    def _checkpoint_name(model_id: str, name: Any, kind: str) -> TinkerPath:
        if not isinstance(name, str):
            raise UserError("a checkpoint name (path) is required")
        return TinkerPath(check_component(model_id, "model id"), kind, check_component(name, "checkpoint name"))  # type: ignore[arg-type]

    def _record_checkpoint(self, tp: TinkerPath, path: Path, body: dict) -> None:
        ttl = check_ttl(body.get("ttl_seconds"))
        expires = None if ttl is None else time.time() + ttl
        # Recorded only after the directory is complete: a listed checkpoint is always loadable.
        self.store.add_checkpoint(str(tp), tp.run_id, tp.kind, tp.name, str(path), dir_size(path),
                                  body.get("user_metadata"), expires)

    def resolve_checkpoint(self, path: Any, reader: Any = ANYONE) -> tuple[TinkerPath, Path, dict]:
        """(parsed path, directory, training run row) of an existing checkpoint `reader` may
        read (checkpoints.resolve_checkpoint), or UserError."""
        return self.checkpoints.resolve(path, reader)

    def load_weights(self, body: dict, owner: str | None = None) -> str:
        path, with_opt = body.get("path"), bool(body.get("optimizer"))
        if body.get("model_id"):  # legacy TrainingClient.load_state: replace this model's weights
            model_id = body["model_id"]

            def run() -> Result:
                live = self._model(model_id)
                tp, directory, run_row = self.resolve_checkpoint(path, owner)
                self._check_training_ckpt(tp, run_row, live.base_model)
                self._replace_adapter(live, directory, with_opt)
                return Result.json({"type": "load_weights", "path": str(tp), "model_id": model_id})

            return self._submit_model_op(model_id, body.get("seq_id"), "load_weights", run)

        # Create-via-load: a new model `<session>:train:<model_seq_id>` from a checkpoint.
        try:
            session_id = check_component(body.get("session_id"), "session_id")
            model_id = f"{session_id}:train:{_int_field(body, 'model_seq_id', 0)}"
            self._check_new_model(session_id, model_id, owner)
            tp, directory, run_row = self.resolve_checkpoint(path, owner)
            base = run_row["base_model"]
            self._check_training_ckpt(tp, run_row, body.get("base_model") or base)
        except UserError as e:
            return self.failed(str(e), "create_from_checkpoint")
        user_metadata = body.get("user_metadata") or run_row.get("user_metadata")
        if not isinstance(user_metadata, (dict, type(None))):
            return self.failed(f"user_metadata must be an object, got {user_metadata!r}", "create_from_checkpoint")

        def run_create() -> Result:
            engine = self.engine_for(base)
            info = engine.load_state(model_id, str(directory), with_opt)
            self._register_model(model_id, session_id, base, engine, _lora_dict(info.lora), user_metadata, owner)
            return Result.json({"type": "load_weights", "path": str(tp), "model_id": model_id})

        return self._new_model_queue(model_id, "create_from_checkpoint", run_create)

    @staticmethod
    def _check_training_ckpt(tp: TinkerPath, run_row: dict, base_model: str) -> None:
        if tp.kind != "training":
            what = "an external weights export" if tp.kind == "external" else "a sampler checkpoint"
            raise UserError(f"{tp} is {what}; load_state needs a training checkpoint "
                            "(tinker://<run>/weights/<name>, from save_state)")
        if run_row["base_model"] != base_model:
            raise UserError(f"{tp} was trained on {run_row['base_model']!r}, not {base_model!r}")

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

    def unload_model(self, model_id: Any) -> str:
        if not isinstance(model_id, str) or model_id not in self._live:
            return self.failed(self._unknown_model_msg(str(model_id)), "unload_model")
        rid = self.futures.new()

        async def go() -> None:
            await self._unload(model_id, f"model {model_id} was unloaded")
            self.futures.resolve(rid, Result.json({"type": "unload_model", "model_id": model_id}))

        asyncio.get_running_loop().create_task(go())
        return rid

    async def _unload(self, model_id: str, reason: str) -> None:
        """Stop the model's queue (after its running op) and free its adapter. On the loop."""
        queue = self._queues.pop(model_id, None)
        if queue is not None:
            await queue.drain_and_close(reason)
        live = self._live.pop(model_id, None)
        if live is not None:
            def remove() -> None:
                try:
                    live.engine.remove_adapter(model_id)
                except Exception as e:  # already gone is fine
                    log.warning("remove_adapter(%s): %s", model_id, e)

            await asyncio.get_running_loop().run_in_executor(self._train_pool, remove)
            self.store.set_run_unloaded(model_id)
            log.info("%-26s %s (%s)", "unload_model", model_id, reason)

    # ---------------------------------------------------------------- samplers
    def _add_sampler(self, s: LiveSampler, session_id: str | None) -> None:
        with self._sampler_lock:
            self._samplers[s.sampler_id] = s
        self.store.add_sampler(s.sampler_id, session_id, s.base_model, s.model_path)

    def _release_sampler(self, sampler_id: str) -> None:
        with self._sampler_lock:
            s = self._samplers.pop(sampler_id, None)
        if s is not None:
            try:
                s.engine.release_sampler(s.engine_sampler_id)
            except Exception as e:
                log.warning("release_sampler(%s): %s", sampler_id, e)

    def create_sampling_session(self, body: dict, owner: Any = ANYONE) -> dict:
        """Blocking (may load an engine or LoRA weights): call off the event loop."""
        session_id = check_component(body.get("session_id"), "session_id")
        seq = body.get("sampling_session_seq_id")
        if not isinstance(seq, int):
            raise UserError("sampling_session_seq_id must be an integer")
        sid = f"{session_id}:sample:{seq}"
        with self._sampler_lock:
            if sid in self._samplers:  # retried request
                return {"type": "create_sampling_session", "sampling_session_id": sid}
        model_path, base_model = body.get("model_path"), body.get("base_model")
        if model_path:
            self._add_sampler(self._load_path_sampler(sid, model_path, owner), session_id)
        elif base_model:
            engine = self.engine_for(base_model)
            self._add_sampler(LiveSampler(sid, base_model, engine, engine.base_sampler(), None), session_id)
        else:
            raise UserError("create_sampling_session needs model_path or base_model")
        log.info("%-26s %s <- %s", "create_sampling_session", sid, model_path or base_model)
        return {"type": "create_sampling_session", "sampling_session_id": sid}

    def _load_path_sampler(self, sid: str, model_path: str, reader: Any = ANYONE) -> LiveSampler:
        tp, directory, run = self.resolve_checkpoint(model_path, reader)
        if tp.kind == "external":
            raise UserError(f"{tp} holds exported files (save_weights_external), not weights to sample from; use a "
                            "sampler or training checkpoint (tinker://<run>/sampler_weights/<name>)")
        engine = self.engine_for(run["base_model"])
        return LiveSampler(sid, run["base_model"], engine, engine.load_sampler(str(directory)), str(tp))

    def get_sampler(self, sampler_id: str) -> dict:
        with self._sampler_lock:
            s = self._samplers.get(sampler_id)
        if s is not None:
            return {"sampler_id": sampler_id, "base_model": s.base_model, "model_path": s.model_path}
        row = self.store.get_sampler(sampler_id)
        if row is None:
            raise NotFoundError(f"unknown sampler {sampler_id!r}")
        return {"sampler_id": sampler_id, "base_model": row["base_model"], "model_path": row["model_path"]}

    def _sampler(self, sampler_id: str) -> LiveSampler:
        with self._sampler_lock:
            s = self._samplers.get(sampler_id)
        if s is not None:
            return s
        row = self.store.get_sampler(sampler_id)
        if row is not None and row["model_path"]:  # made before a restart: reload from its checkpoint
            s = self._load_path_sampler(sampler_id, row["model_path"])
            with self._sampler_lock:
                s = self._samplers.setdefault(sampler_id, s)
            return s
        if row is not None:
            raise UserError(f"sampler {sampler_id!r} is no longer available (an in-memory snapshot that was "
                            f"released, since only the {MAX_EPHEMERAL_SAMPLERS} newest per model are kept, or lost in "
                            "a restart); create a new sampling client, or save_weights_for_sampler(name) for one "
                            "that lasts")
        raise UserError(f"unknown sampling session {sampler_id!r}")

    def asample(self, body: dict) -> tuple[str, list[str]] | None:
        """(request_id, sample_sequence_ids), or None when overloaded (the caller answers 429)."""
        sid, seq = body.get("sampling_session_id"), body.get("seq_id")
        n = body.get("num_samples", 1)
        key = (str(sid), seq if isinstance(seq, int) else -1)
        if isinstance(seq, int) and key in self._sample_seen:
            return self._sample_seen[key]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1 or n > self.max_num_samples:
            rid = self.failed(f"num_samples must be an integer in 1..{self.max_num_samples} (this server's limit), "
                              f"got {n!r}", "sample")
            return rid, []
        try:  # engine-independent options: a bad one is refused before it is queued
            opts = _sample_options(body)
        except UserError as e:
            return self.failed(str(e), "sample"), []
        # An empty queue admits any request, so a cap below num_samples delays but never refuses for good.
        if self.queued_sequences and self.queued_sequences + n > self._max_queued_sequences:
            return None
        rid = self.futures.new()
        ids = [f"{rid}:{i}" for i in range(n)]
        if isinstance(seq, int):
            self._sample_seen[key] = (rid, ids)
            while len(self._sample_seen) > 100_000:
                self._sample_seen.popitem(last=False)

        def run() -> Result:
            if not isinstance(sid, str):
                raise UserError("sampling_session_id is required (this server samples through sampling sessions)")
            s = self._sampler(sid)
            # Parsed here, off the event loop: a prompt may hold a million tokens.
            tokens = codec.model_input_tokens(body.get("prompt"))
            codec.check_prompt(tokens, getattr(s.engine, "vocab_size", None))
            cfg, want_plp, topk, last_n = opts.cfg, opts.prompt_logprobs, opts.topk, opts.last_n
            context = getattr(s.engine, "max_len", None)
            if isinstance(context, int) and cfg.max_tokens is not None and cfg.max_tokens > context:
                # prompt + max_tokens beyond the context is fine (decoding stops there, "length");
                # a max_tokens no prompt could ever reach is a caller bug worth naming.
                raise UserError(f"sampling_params.max_tokens={cfg.max_tokens} exceeds the model's context "
                                f"length of {context} tokens")
            extras = opts.extras.engine_extras(len(tokens), getattr(s.engine, "vocab_size", None))
            res = s.engine.sample(s.engine_sampler_id, tokens, n, cfg, prompt_logprobs=want_plp or topk > 0,
                                  topk_prompt_logprobs=topk, **({"extras": extras} if extras else {}))
            if len(res.sequences) != n:
                raise RuntimeError(f"engine returned {len(res.sequences)} sequences for num_samples={n}")
            if last_n is not None and res.prompt_logprobs is not None:
                if not isinstance(last_n, int) or not 1 <= last_n <= len(tokens) - 1:
                    raise UserError(f"prompt_logprobs_last_n must be in 1..{len(tokens) - 1}, got {last_n!r}")
                res.prompt_logprobs = [None] * (len(tokens) - last_n) + list(res.prompt_logprobs[-last_n:])
                if res.topk_prompt_logprobs is not None:  # the SDK: it "also applies to topk_prompt_logprobs"
                    top = res.topk_prompt_logprobs
                    res.topk_prompt_logprobs = [None] * (len(tokens) - last_n) + list(top[-last_n:])
            return Result.proto(codec.encode_sample_result(res, len(tokens), want_plp, topk, opts.extras))

        # Counted now, not when the task starts, so a burst of submits sees the cap at once.
        self.queued_sequences += n

        async def go() -> None:
            try:
                await self._run(rid, f"sample[n={n}]", str(sid), run, self._sample_pool)
            finally:
                self.queued_sequences -= n

        asyncio.get_running_loop().create_task(go())
        return rid, ids

    # ---------------------------------------------------------------- REST listing
    def training_run_json(self, run: dict) -> dict:
        ckpts, _ = self.checkpoints.live_rows(run["model_id"])
        last = {k: next((checkpoint_json(c) for c in ckpts if c["kind"] == k), None) for k in ("training", "sampler")}
        return {
            "training_run_id": run["model_id"], "base_model": run["base_model"], "model_owner": "local",
            "is_lora": True, "corrupted": False, "lora_rank": (run["lora"] or {}).get("rank"),
            "last_request_time": iso(run["last_request"]), "last_checkpoint": last["training"],
            "last_sampler_checkpoint": last["sampler"], "user_metadata": str_dict(run["user_metadata"]),
        }

    def weights_info(self, tinker_path: Any, reader: Any = ANYONE) -> dict:
        tp, _, run = self.resolve_checkpoint(tinker_path, reader)
        lora = run["lora"] or {}
        return {"base_model": run["base_model"], "is_lora": True, "lora_rank": lora.get("rank"),
                "train_unembed": lora.get("train_unembed"), "train_mlp": lora.get("train_mlp"),
                "train_attn": lora.get("train_attn")}


def _lora_dict(spec: LoraSpec) -> dict:
    return {"rank": spec.rank, "seed": spec.seed, "train_attn": spec.train_attn,
            "train_mlp": spec.train_mlp, "train_unembed": spec.train_unembed}


@dataclass(frozen=True)
class SampleOptions:
    cfg: SamplingConfig
    prompt_logprobs: bool
    topk: int
    last_n: Any  # checked against the prompt's length once the prompt is parsed
    extras: sample_options.ExtrasSpec  # topk_sample_logprobs, target_prompt_logprobs, prompt_alt_tokens_k


def _sample_options(body: dict) -> SampleOptions:
    cfg = _sampling_config(_dict_field(body, "sampling_params"))
    topk = body.get("topk_prompt_logprobs") or 0
    if not isinstance(topk, int) or isinstance(topk, bool) or not 0 <= topk <= 100:
        raise UserError(f"topk_prompt_logprobs must be an integer in 0..100, got {topk!r}")
    extras = sample_options.parse(body)
    return SampleOptions(cfg, bool(body.get("prompt_logprobs")), topk, body.get("prompt_logprobs_last_n"), extras)


def _sampling_config(p: dict) -> SamplingConfig:
    stop = p.get("stop")
    if stop is None:
        stop_t = None
    elif isinstance(stop, str):
        stop_t = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop_t = tuple(stop)
    elif isinstance(stop, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in stop):
        stop_t = tuple(stop)
    else:
        raise UserError(f"sampling_params.stop must be a string, a list of strings or a list of token ids, got {stop!r}")
    max_tokens = p.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 0):
        raise UserError(f"sampling_params.max_tokens must be a non-negative integer, got {max_tokens!r}")
    temperature = _number("sampling_params", "temperature", p.get("temperature", 1.0))
    top_p = _number("sampling_params", "top_p", p.get("top_p", 1.0))
    top_k = _int_field(p, "top_k", -1)
    seed = check_seed("sampling_params.seed", p.get("seed"))
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"sampling_params.temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"sampling_params.top_p must be in (0, 1], got {top_p}")
    return SamplingConfig(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                          top_k=top_k, seed=seed, stop=stop_t)
