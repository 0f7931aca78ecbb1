"""Wire <-> engine conversion: the protobuf forward_backward request and the protobuf
ForwardBackwardOutput / SampleResponse results, plus JSON ModelInput, and input validation
that gives messages naming the datum and field.

Encoding follows the SDK's `proto/request_conv.py` / `response_conv.py`: raw little-endian
numpy bytes, int32 tokens, int64 CSR indices and byte offsets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tinker.proto import tinker_public_pb2 as pb

from gemtinker.engine.types import ForwardResult, SampleResult, TrainDatum

from .errors import UserError
from .limits import check_token_ids
from .sample_options import ExtrasSpec, fill_response

RL_LOSSES = ("importance_sampling", "ppo", "cispo", "dro")
LOSS_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),
    **{name: ("target_tokens", "logprobs", "advantages") for name in RL_LOSSES},
}
_NP_BY_DTYPE = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}


# Bytes a decoded element takes: integer tensors (tokens, target_tokens) become int64.
_DECODED_ITEMSIZE = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_INT64: 8, pb.DTYPE_INT32: 8}


@dataclass
class FwdBwdRequest:
    """A parsed ForwardBackwardRequest whose tensors were checked but not yet decoded.

    `dense_bytes` is what decoding allocates (sparse tensors densified, ints widened to int64),
    computed from shapes and dtypes alone. `problem` names the first malformed tensor; the
    request still carries its model_id and seq_id so the refusal can take its queue slot.
    """

    model_id: str
    seq_id: int
    loss_fn: str
    forward_only: bool
    loss_fn_config: dict[str, Any]
    dense_bytes: int = 0
    problem: str | None = None
    msg: pb.ForwardBackwardRequest | None = field(default=None, repr=False)

    def datums(self) -> list[TrainDatum]:
        """Decode the datums (allocates `dense_bytes`); call off the event loop."""
        assert self.msg is not None and self.problem is None
        return [_decode_datum(i, d) for i, d in enumerate(self.msg.data)]


def parse_forward_backward(body: bytes, max_dense_bytes: int | None = None) -> FwdBwdRequest:
    """Parse and size-check a forward_backward body without decoding its tensors.

    UserError only when the body is not a protobuf at all; a malformed tensor, or datums that
    would decode to more than `max_dense_bytes`, set `problem` instead.
    """
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as e:  # protobuf raises DecodeError
        raise UserError(f"forward_backward body is not a valid ForwardBackwardRequest protobuf: {e}")
    # v2 carries numbers and strings; the old map only numbers. Prefer v2 when present.
    config: dict[str, Any] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for k, v in msg.loss_fn_config_v2.items():
        which = v.WhichOneof("value")
        if which:
            config[k] = getattr(v, which)
    req = FwdBwdRequest(msg.model_id, int(msg.seq_id), msg.loss_fn, bool(msg.forward_only), config, msg=msg)
    try:
        req.dense_bytes = _dense_bytes(msg, max_dense_bytes)
    except UserError as e:
        req.problem = str(e)
    return req


def decode_forward_backward(body: bytes, max_dense_bytes: int | None = None) -> FwdBwdRequest:
    """Parse, check and decode in one go (UserError on any problem)."""
    req = parse_forward_backward(body, max_dense_bytes)
    if req.problem is not None:
        raise UserError(req.problem)
    return req


def _dense_bytes(msg: pb.ForwardBackwardRequest, limit: int | None) -> int:
    total = 0
    for i, d in enumerate(msg.data):
        for c in d.model_input:
            which = c.WhichOneof("chunk")
            if which != "encoded_text":
                raise UserError(f"datum {i}: model_input chunk type {which!r} is not supported (text tokens only)")
            total += 8 * _count(f"datum {i}: model_input tokens", c.encoded_text.tokens, 4)  # int32 -> int64
        for k, t in d.loss_fn_inputs.items():
            total += _tensor_bytes(f"datum {i}: loss_fn_inputs[{k!r}]", t)
        if limit is not None and total > limit:
            raise UserError(f"forward_backward: datum {i} brings the request's decoded tensors to {total} bytes, "
                            f"more than this server's limit of {limit} bytes per request; send fewer or smaller "
                            "datums (or a sparse tensor with a smaller shape)")
    return total


def _count(where: str, raw: bytes, itemsize: int) -> int:
    if len(raw) % itemsize:
        raise UserError(f"{where}: {len(raw)} bytes is not a whole number of {itemsize}-byte elements")
    return len(raw) // itemsize


def _tensor_bytes(where: str, t: pb.Tensor) -> int:
    """Decoded size of a tensor, after checking its encoding (without allocating it)."""
    dt = _NP_BY_DTYPE.get(t.dtype)
    if dt is None:
        raise UserError(f"{where}: unsupported dtype {pb.DType.Name(t.dtype) if t.dtype in pb.DType.values() else t.dtype}")
    itemsize, shape = np.dtype(dt).itemsize, [int(s) for s in t.shape]
    if any(s < 0 for s in shape):
        raise UserError(f"{where}: negative dimension in shape {shape}")
    if t.WhichOneof("encoding") != "sparse_csr":
        n = _count(where, t.dense, itemsize)
        if shape and math.prod(shape) != n:
            raise UserError(f"{where}: {n} values do not fit shape {shape}")
        return n * _DECODED_ITEMSIZE[t.dtype]
    if len(shape) != 2:
        raise UserError(f"{where}: a sparse CSR tensor needs a 2-D shape, got {shape}")
    nnz = _count(f"{where}: sparse values", t.sparse_csr.values, itemsize)
    _count(f"{where}: sparse crow_indices", t.sparse_csr.crow_indices, 8)
    crow = np.frombuffer(t.sparse_csr.crow_indices, dtype=np.int64)
    ncol = _count(f"{where}: sparse col_indices", t.sparse_csr.col_indices, 8)
    if len(crow) != shape[0] + 1 or ncol != nnz or crow[0] != 0 or crow[-1] != nnz or (np.diff(crow) < 0).any():
        raise UserError(f"{where}: inconsistent sparse CSR indices for shape {shape} (crow_indices must rise "
                        f"from 0 to the number of values, {nnz}, in {shape[0] + 1} steps)")
    col = np.frombuffer(t.sparse_csr.col_indices, dtype=np.int64)
    if nnz and (col.min() < 0 or col.max() >= shape[1]):
        raise UserError(f"{where}: sparse CSR column index out of range for shape {shape}")
    return math.prod(shape) * _DECODED_ITEMSIZE[t.dtype]


def _decode_datum(i: int, d: pb.Datum) -> TrainDatum:
    tokens = [np.frombuffer(c.encoded_text.tokens, dtype=np.int32) for c in d.model_input]
    toks = np.concatenate(tokens).astype(np.int64) if tokens else np.zeros(0, np.int64)
    inputs = {k: _decode_tensor(t) for k, t in d.loss_fn_inputs.items()}
    return TrainDatum(tokens=toks, inputs=inputs)


def _decode_tensor(t: pb.Tensor) -> np.ndarray:
    """Decode a tensor that `_tensor_bytes` has checked."""
    dt = _NP_BY_DTYPE[t.dtype]
    shape = [int(s) for s in t.shape]
    if t.WhichOneof("encoding") == "sparse_csr":
        vals = np.frombuffer(t.sparse_csr.values, dtype=dt)
        crow = np.frombuffer(t.sparse_csr.crow_indices, dtype=np.int64)
        col = np.frombuffer(t.sparse_csr.col_indices, dtype=np.int64)
        arr = np.zeros(shape, dtype=dt)
        arr[np.repeat(np.arange(shape[0]), np.diff(crow)), col] = vals
    else:
        arr = np.frombuffer(t.dense, dtype=dt)
        if shape:
            arr = arr.reshape(shape)
    if arr.dtype == np.int32:
        arr = arr.astype(np.int64)
    return arr.copy()  # writable, detached from the request buffer


def validate_datums(data: list[TrainDatum], loss_fn: str, vocab_size: int | None) -> None:
    """Reject malformed training input before it reaches the engine."""
    if loss_fn not in LOSS_INPUTS:
        raise UserError(f"unknown loss_fn {loss_fn!r}; supported: {', '.join(LOSS_INPUTS)}")
    if not data:
        raise UserError("forward_backward needs at least one datum")
    for i, d in enumerate(data):
        n = len(d.tokens)
        if n == 0:
            raise UserError(f"datum {i}: model_input is empty")
        _check_tokens(f"datum {i}: model_input", d.tokens, vocab_size)
        for key in LOSS_INPUTS[loss_fn]:
            if key not in d.inputs:
                raise UserError(f"datum {i}: loss_fn {loss_fn!r} needs loss_fn_inputs[{key!r}], got {sorted(d.inputs)}")
        for key, arr in d.inputs.items():
            if arr.ndim == 0 or arr.shape[0] != n:
                raise UserError(
                    f"datum {i}: loss_fn_inputs[{key!r}] has length {arr.shape[0] if arr.ndim else 0} "
                    f"but model_input has {n} tokens (they must be equal)"
                )
            if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                bad = int(np.flatnonzero(~np.isfinite(arr.reshape(n, -1)).all(axis=1))[0])
                raise UserError(f"datum {i}: loss_fn_inputs[{key!r}] contains NaN or infinity (position {bad})")
        _check_tokens(f"datum {i}: loss_fn_inputs['target_tokens']", d.inputs["target_tokens"], vocab_size)
        w = d.inputs.get("weights")
        if w is not None and w.shape != d.inputs["target_tokens"].shape:
            raise UserError(
                f"datum {i}: loss_fn_inputs['weights'] has shape {list(w.shape)} but target_tokens has "
                f"{list(d.inputs['target_tokens'].shape)}"
            )


def _check_tokens(where: str, toks: np.ndarray, vocab_size: int | None) -> None:
    if not np.issubdtype(toks.dtype, np.integer):
        raise UserError(f"{where}: token ids must be integers, got {toks.dtype}")
    if toks.size and (toks.min() < 0 or (vocab_size is not None and toks.max() >= vocab_size)):
        bad = int(toks.min()) if toks.min() < 0 else int(toks.max())
        raise UserError(f"{where}: token id {bad} is out of the vocabulary (0..{vocab_size - 1 if vocab_size else '?'})")


def check_prompt(tokens: list[int], vocab_size: int | None) -> None:
    if not tokens:
        raise UserError("prompt is empty")
    check_token_ids("prompt", tokens, vocab_size)


def model_input_tokens(model_input: Any, what: str = "prompt") -> list[int]:
    """Tokens of a JSON ModelInput `{"chunks": [{"type": "encoded_text", "tokens": [...]}]}`."""
    if not isinstance(model_input, dict) or not isinstance(model_input.get("chunks"), list):
        raise UserError(f"{what} must be a ModelInput object with a 'chunks' list")
    out: list[int] = []
    for chunk in model_input["chunks"]:
        kind = chunk.get("type", "encoded_text") if isinstance(chunk, dict) else None
        if kind != "encoded_text":
            raise UserError(f"{what}: chunk type {kind!r} is not supported (text tokens only)")
        toks = chunk.get("tokens")
        if not isinstance(toks, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in toks):
            raise UserError(f"{what}: encoded_text tokens must be a list of integers")
        out.extend(toks)
    return out


def encode_forward_output(result: ForwardResult) -> bytes:
    proto = pb.ForwardBackwardOutput()
    proto.loss_fn_output_type = "ArrayRecord"
    for k, v in result.metrics.items():
        # The SDK merges chunk metrics by splitting on ':'; any other key breaks it.
        if k.count(":") == 1:
            proto.metrics[k] = float(v)
    outputs = [{k: np.asarray(v) for k, v in o.items()} for o in result.outputs]
    # One ArrayRecord per run of datums with the same field layout (ragged (N,K) stays exact).
    start = 0
    while start < len(outputs):
        sig = _layout(outputs[start])
        end = start + 1
        while end < len(outputs) and _layout(outputs[end]) == sig:
            end += 1
        _add_record(proto, outputs[start:end])
        start = end
    return proto.SerializeToString()


def _layout(o: dict[str, np.ndarray]) -> tuple:
    return tuple(sorted((k, v.shape[1:], np.issubdtype(v.dtype, np.integer)) for k, v in o.items()))


def _add_record(proto: pb.ForwardBackwardOutput, outs: list[dict[str, np.ndarray]]) -> None:
    rec = proto.loss_fn_outputs.add()
    rec.type_tag = "ArrayRecord"
    rec.num_datums = len(outs)
    for name in outs[0]:
        is_int = np.issubdtype(outs[0][name].dtype, np.integer)
        arrs = [np.ascontiguousarray(o[name], dtype=np.int64 if is_int else np.float32) for o in outs]
        offsets = np.zeros(len(arrs) + 1, dtype=np.int64)
        np.cumsum([a.nbytes for a in arrs], out=offsets[1:])
        bt = rec.fields[name]
        bt.data = b"".join(a.tobytes() for a in arrs)
        bt.offsets = offsets.tobytes()
        bt.dtype = pb.DTYPE_INT64 if is_int else pb.DTYPE_FLOAT32
        bt.trailing_shape.extend(int(s) for s in arrs[0].shape[1:])


def encode_sample_result(result: SampleResult, num_prompt_tokens: int, want_prompt_logprobs: bool, topk: int,
                         extras: ExtrasSpec | None = None) -> bytes:
    proto = pb.SampleResponse()
    for seq in result.sequences:
        s = proto.sequences.add()
        s.stop_reason = pb.STOP_REASON_STOP if seq.stop_reason == "stop" else pb.STOP_REASON_LENGTH
        s.tokens = np.asarray(seq.tokens, dtype=np.int32).tobytes()
        s.logprobs = np.asarray(seq.logprobs, dtype=np.float32).tobytes()
    if want_prompt_logprobs and result.prompt_logprobs is not None:
        vals = [math.nan if v is None else float(v) for v in result.prompt_logprobs]
        vals = (vals + [math.nan] * num_prompt_tokens)[:num_prompt_tokens]
        vals[0] = math.nan  # nothing predicts the first prompt token
        proto.prompt_logprobs = np.asarray(vals, dtype=np.float32).tobytes()
    if topk > 0 and result.topk_prompt_logprobs is not None:
        ids = np.zeros((num_prompt_tokens, topk), dtype=np.int32)
        lps = np.full((num_prompt_tokens, topk), -99999.0, dtype=np.float32)
        for i, row in enumerate(result.topk_prompt_logprobs[:num_prompt_tokens]):
            for j, (tok, lp) in enumerate((row or [])[:topk]):
                ids[i, j], lps[i, j] = tok, lp
        t = proto.topk_prompt_logprobs
        t.token_ids, t.logprobs, t.k, t.length = ids.tobytes(), lps.tobytes(), topk, num_prompt_tokens
    proto.prompt_cache_hit_tokens = int(result.prompt_cache_hit_tokens or 0)
    if extras is not None and extras.any:
        fill_response(proto, result, extras)
    return proto.SerializeToString()
