"""Custom losses uploaded by `ServiceClient.create_custom_loss`, and the forward_backward that runs them.

A loss belongs to the session that created it and lives in memory (a restart forgets it; the SDK
then gets a clear error and can create it again). `forward_backward(loss_fn="custom",
loss_fn_config={"loss_id": ...})` runs, in one request, what the SDK's client-side path does in
two: a forward pass for the target logprobs, the loss graph on each datum, then a cross-entropy
backward with weights = -dLoss/dlogprobs, whose gradient with respect to the LoRA weights is the
custom loss's own.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gemtinker.engine.types import ForwardResult, TrainDatum

from . import codec
from .custom_loss import MAX_WORK, check_inputs, compile_graph, run_graph
from .errors import UserError

MAX_LOSSES_PER_SESSION = 256


@dataclass(frozen=True)
class CustomLoss:
    loss_id: str
    session_id: str
    name: str
    inputs: list[tuple[str, int]]
    nodes: list


class CustomLosses:
    """The uploaded losses, by loss_id. Thread-safe: created on the loop, read on training threads."""

    def __init__(self) -> None:
        self._losses: dict[str, CustomLoss] = {}
        self._lock = threading.Lock()

    def create(self, body: dict, session_live: bool) -> dict:
        """Check and store a CreateCustomLossRequest; the CreateCustomLossResponse (UserError on a bad graph)."""
        session_id, seq = body.get("session_id"), body.get("custom_loss_seq_id")
        name = body.get("name")
        if not isinstance(session_id, str) or not session_live:
            raise UserError(f"create_custom_loss: session {str(session_id)[:80]!r} is unknown or finished")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise UserError("create_custom_loss needs a non-negative integer custom_loss_seq_id")
        if not isinstance(name, str) or not 0 < len(name) <= 200:
            raise UserError("create_custom_loss needs a name of 1 to 200 characters")
        loss_id = f"{session_id}:loss:{seq}"
        with self._lock:
            if loss_id in self._losses:  # a retried request
                return {"type": "create_custom_loss", "loss_id": loss_id}
            if sum(1 for v in self._losses.values() if v.session_id == session_id) >= MAX_LOSSES_PER_SESSION:
                raise UserError(f"create_custom_loss: session {session_id!r} already has {MAX_LOSSES_PER_SESSION} "
                                "custom losses, this server's limit")
        graph = body.get("graph")
        if not isinstance(graph, dict) or graph.get("format", 1) != 1:
            raise UserError(f"create_custom_loss: loss {name!r} needs a graph object of format 1")
        inputs = check_inputs(name, body.get("inputs"))
        nodes = compile_graph(name, inputs, graph.get("nodes"))
        with self._lock:
            self._losses[loss_id] = CustomLoss(loss_id, session_id, name, inputs, nodes)
        return {"type": "create_custom_loss", "loss_id": loss_id}

    def forget_session(self, session_id: str) -> None:
        with self._lock:
            for k in [k for k, v in self._losses.items() if v.session_id == session_id]:
                del self._losses[k]

    def get(self, config: dict[str, Any] | None, session_id: str) -> CustomLoss:
        loss_id = (config or {}).get("loss_id")
        if not isinstance(loss_id, str):
            raise UserError("forward_backward with loss_fn 'custom' needs loss_fn_config['loss_id'] "
                            "(from ServiceClient.create_custom_loss)")
        with self._lock:
            loss = self._losses.get(loss_id)
        if loss is None:
            raise UserError(f"unknown custom loss {loss_id!r}: it was never created on this server, or the "
                            "server restarted or its session ended (custom losses live in memory); create it again")
        if loss.session_id != session_id:
            raise UserError(f"custom loss {loss_id!r} belongs to another session; only clients of the session "
                            "that created it can use it")
        return loss


def _loss_inputs(loss: CustomLoss, i: int, d: TrainDatum) -> list[torch.Tensor]:
    """The datum's tensors the loss reads, at their declared ranks (a rank-0 value arrives as [1])."""
    out = []
    for name, rank in loss.inputs[1:]:
        arr = d.inputs.get(name)
        if arr is None:
            raise UserError(f"datum {i} has no loss_fn_inputs[{name!r}], which custom loss {loss.name!r} takes")
        if rank == 0 and arr.size == 1:
            arr = arr.reshape(())
        if arr.ndim != rank:
            raise UserError(f"datum {i} loss_fn_inputs[{name!r}] has rank {arr.ndim}, but custom loss "
                            f"{loss.name!r} declared rank {rank}")
        out.append(torch.from_numpy(arr.copy()))  # the graph never touches the request's own arrays
    return out


def _scalar(loss: CustomLoss, what: str, v: Any) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise UserError(f"custom loss {loss.name!r}: {what} must be a scalar, got shape {list(v.shape)}")
        return float(v.detach())
    if isinstance(v, (int, float)):
        return float(v)
    raise UserError(f"custom loss {loss.name!r}: {what} must be a tensor, got {type(v).__name__}")


def forward_backward(engine: Any, model_id: str, data: list[TrainDatum], loss: CustomLoss) -> ForwardResult:
    """Run `loss` over `data` in one forward/backward; gradients accumulate in the model's LoRA weights."""
    vocab = getattr(engine, "vocab_size", None)
    for i, d in enumerate(data):
        if "target_tokens" not in d.inputs:
            raise UserError(f"datum {i} has no loss_fn_inputs['target_tokens'], which a custom loss needs")
    fwd = [TrainDatum(d.tokens, {"target_tokens": d.inputs["target_tokens"],
                                 "weights": np.zeros(d.inputs["target_tokens"].shape, np.float32)}) for d in data]
    codec.validate_datums(fwd, "cross_entropy", vocab)
    inputs = [_loss_inputs(loss, i, d) for i, d in enumerate(data)]  # refuse before computing anything
    scored = engine.forward(model_id, fwd, "cross_entropy")
    total, metric_sums, grads, budget = 0.0, {}, [], [MAX_WORK]
    for i, (out, extra) in enumerate(zip(scored.outputs, inputs)):
        lp = torch.from_numpy(np.asarray(out["logprobs"], dtype=np.float32)).requires_grad_(True)
        with torch.enable_grad():
            value, metrics = run_graph(loss.name, loss.nodes, [lp, *extra], budget)
            if not isinstance(value, torch.Tensor) or value.ndim != 0:
                shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise UserError(f"custom loss {loss.name!r} must return a scalar loss, got {shape} on datum {i}")
            grad = torch.autograd.grad(value, lp, allow_unused=True)[0] if value.requires_grad else None
        g = np.zeros(lp.shape, np.float32) if grad is None else grad.numpy()
        if not np.isfinite(g).all() or not torch.isfinite(value):
            raise UserError(f"custom loss {loss.name!r} gave a non-finite loss or gradient on datum {i}")
        grads.append(-g)  # cross entropy is sum(-logprobs * weights): weights = -dLoss/dlogprobs
        total += float(value.detach())
        for key, v in metrics.items():
            metric_sums[key] = metric_sums.get(key, 0.0) + _scalar(loss, f"metric {key!r}", v)
    bwd = [TrainDatum(d.tokens, {"target_tokens": d.inputs["target_tokens"], "weights": g}) for d, g in zip(data, grads)]
    res = engine.forward_backward(model_id, bwd, "cross_entropy")
    metrics = dict(res.metrics)
    metrics["surrogate_loss:sum"] = metrics.pop("loss:sum", 0.0)
    metrics.update({k: v / len(data) if k.endswith(":mean") else v for k, v in metric_sums.items()})
    metrics["loss:sum"] = total
    return ForwardResult(res.outputs, metrics)
