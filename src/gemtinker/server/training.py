"""The ordered ops on a training model: forward(_backward), optim_step and the saves
(training checkpoint, sampler checkpoint or ephemeral sampler, external export).

Each is queued in the model's seq_id order (ops.py) and runs on the training pool. A request
refused before it reaches the engine still takes its seq_id slot (`Ops.refuse_op`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from . import codec, custom_losses, external
from .checkpoints import Checkpoints, dir_size
from .errors import UserError
from .futures import Result
from .limits import check_ttl
from .models import ModelRegistry
from .ops import Ops
from .paths import TinkerPath, check_component
from .requests import adam_config
from .sampling import MAX_EPHEMERAL_SAMPLERS, LiveSampler, Samplers
from .store import Store

def checkpoint_name(model_id: str, name: Any, kind: str) -> TinkerPath:
    if not isinstance(name, str):
        raise UserError("a checkpoint name (path) is required")
    return TinkerPath(check_component(model_id, "model id"), kind, check_component(name, "checkpoint name"))  # type: ignore[arg-type]


class TrainingOps:
    def __init__(self, models: ModelRegistry, ops: Ops, samplers: Samplers, store: Store, checkpoints: Checkpoints,
                 losses: custom_losses.CustomLosses, exports: external.ExternalWeights):
        self.models = models
        self.ops = ops
        self.samplers = samplers
        self.store = store
        self.checkpoints = checkpoints
        self.custom_losses = losses
        self.external = exports

    def forward_backward(self, req: codec.FwdBwdRequest, body_bytes: int) -> str:
        """Queue a parsed request (`codec.parse_forward_backward`, run off the loop). Its datums
        are decoded when the op runs, on the training pool; while queued it holds the body."""
        name = "forward" if req.forward_only else "forward_backward"
        label = f"{name}[{req.loss_fn},{len(req.msg.data) if req.msg is not None else 0}]"
        if req.problem is not None:
            return self.ops.refuse_op(req.model_id, req.seq_id, label, UserError(req.problem))

        def run() -> Result:
            live = self.models.get(req.model_id)
            data = req.datums()
            if req.loss_fn == "custom":  # a loss uploaded by create_custom_loss (custom_losses.py)
                if req.forward_only:
                    raise UserError("forward with loss_fn 'custom' is not supported: a custom loss runs in "
                                    "forward_backward (use forward with cross_entropy for logprobs)")
                loss = self.custom_losses.get(req.loss_fn_config, live.session_id)
                res = custom_losses.forward_backward(live.engine, req.model_id, data, loss)
                return Result.proto(codec.encode_forward_output(res))
            codec.validate_datums(data, req.loss_fn, live.engine.vocab_size)
            call = live.engine.forward if req.forward_only else live.engine.forward_backward
            res = call(req.model_id, data, req.loss_fn, req.loss_fn_config or None)
            return Result.proto(codec.encode_forward_output(res))

        # Counted at the size the op reaches when it runs (body + decoded tensors), so the cap
        # bounds what queued ops will allocate, not just what they hold while waiting.
        return self.ops.submit_model_op(req.model_id, req.seq_id, label, run, cost=body_bytes + req.dense_bytes)

    def optim_step(self, body: dict) -> str:
        model_id = body.get("model_id")
        params = body.get("adam_params") or body.get("optim_params")

        def run() -> Result:
            live = self.models.get(model_id)
            metrics = live.engine.optim_step(model_id, adam_config(params))
            return Result.json({"type": "optim_step", "metrics": {k: float(v) for k, v in (metrics or {}).items()}})

        return self.ops.submit_model_op(model_id, body.get("seq_id"), "optim_step", run)

    # ---------------------------------------------------------------- saves
    def _record_checkpoint(self, tp: TinkerPath, path: Path, body: dict) -> None:
        ttl = check_ttl(body.get("ttl_seconds"))
        expires = None if ttl is None else time.time() + ttl
        # Recorded only after the directory is complete: a listed checkpoint is always loadable.
        self.store.add_checkpoint(str(tp), tp.run_id, tp.kind, tp.name, str(path), dir_size(path),
                                  body.get("user_metadata"), expires)

    def save_weights(self, body: dict) -> str:
        model_id = body.get("model_id")
        try:
            check_ttl(body.get("ttl_seconds"))
        except UserError as e:
            return self.ops.refuse_op(model_id, body.get("seq_id"), "save_weights", e)

        def run() -> Result:
            live = self.models.get(model_id)
            tp = checkpoint_name(model_id, body.get("path"), "training")
            meta = {"base_model": live.base_model, "model_id": model_id, "user_metadata": body.get("user_metadata")}
            with self.checkpoints.writing(tp, bool(body.get("overwrite"))) as path:
                live.engine.save_state(model_id, str(path), include_optimizer=True, metadata=meta)
                self._record_checkpoint(tp, path, body)
            return Result.json({"type": "save_weights", "path": str(tp)})

        return self.ops.submit_model_op(model_id, body.get("seq_id"), "save_weights", run)

    def save_weights_for_sampler(self, body: dict) -> str:
        model_id = body.get("model_id")
        try:
            check_ttl(body.get("ttl_seconds"))
        except UserError as e:
            return self.ops.refuse_op(model_id, body.get("seq_id"), "save_weights_for_sampler", e)
        if body.get("path"):
            def run() -> Result:
                live = self.models.get(model_id)
                tp = checkpoint_name(model_id, body["path"], "sampler")
                meta = {"base_model": live.base_model, "model_id": model_id, "user_metadata": body.get("user_metadata")}
                with self.checkpoints.writing(tp, bool(body.get("overwrite"))) as path:
                    live.engine.save_sampler_weights(model_id, str(path), metadata=meta)
                    self._record_checkpoint(tp, path, body)
                return Result.json({"type": "save_weights_for_sampler", "path": str(tp)})

            return self.ops.submit_model_op(model_id, body.get("seq_id"), "save_weights_for_sampler", run)

        seq = body.get("sampling_session_seq_id")

        def run_ephemeral() -> Result:
            live = self.models.get(model_id)
            if not isinstance(seq, int):
                raise UserError("save_weights_for_sampler needs either a path or a sampling_session_seq_id")
            sid = f"{live.session_id}:sample:{seq}"
            # "inflight" samplers are served as snapshots: always correct, just never auto-updated.
            esid = live.engine.snapshot_sampler(model_id)
            self.samplers.add(LiveSampler(sid, live.base_model, live.engine, esid, None), live.session_id)
            live.ephemeral.append(sid)
            while len(live.ephemeral) > MAX_EPHEMERAL_SAMPLERS:
                self.samplers.release(live.ephemeral.popleft())
            return Result.json({"type": "save_weights_for_sampler", "sampling_session_id": sid})

        return self.ops.submit_model_op(model_id, body.get("seq_id"), "snapshot_sampler", run_ephemeral)

    def save_weights_external(self, body: dict) -> str:
        """The model's adapter in hosted Tinker's export layout (external.py)."""
        model_id = body.get("model_id")
        try:
            req = external.parse_request(body)
        except UserError as e:
            return self.ops.refuse_op(model_id, body.get("seq_id"), "save_weights_external", e)

        def run() -> Result:
            live = self.models.get(model_id)
            return Result.json(self.external.export(live.engine, model_id, live.base_model, req))

        return self.ops.submit_model_op(model_id, body.get("seq_id"), "save_weights_external", run)
