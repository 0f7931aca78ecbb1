"""The rarer SampleRequest fields (tinker 0.38): `topk_sample_logprobs`, `target_prompt_logprobs`
(dense or sparse CSR) and `prompt_alt_tokens_k`: request checks and response encoding.

Checks run in two steps, both per request so a bad value fails only its own future: `parse`
on the event loop (integers, caps, the tensor's header; no per-element work), and
`ExtrasSpec.engine_extras` off the loop once the prompt is parsed (every id, the CSR indices,
the row count against the prompt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from tinker.proto import tinker_public_pb2 as pb

from gemtinker.engine.types import SampleExtras, SampleResult

from .errors import UserError

# Caps, like topk_prompt_logprobs' 100. Top-k sampled logprobs cost a top-k per decode step and
# 8 bytes per (token, k) per sequence in the response: 20 (vLLM's default cap) keeps a
# 128-sample, 512-token response under 11 MB.
MAX_TOPK_SAMPLE_LOGPROBS = 20
# Draws and target ids cost len(prompt) * k cells on top of the prompt's full log-softmax,
# which prompt_logprobs already computes; the SDK says the server bounds them like a top-k width.
MAX_PROMPT_ALT_TOKENS_K = 100
MAX_TARGET_COLUMNS = 100


@dataclass(frozen=True)
class ExtrasSpec:
    topk_sample: int = 0
    alt_k: int = 0
    target: dict | None = None  # the JSON TensorData, header checked by `parse`
    sparse: bool = False

    @property
    def any(self) -> bool:
        return bool(self.topk_sample or self.alt_k or self.target is not None)

    def engine_extras(self, prompt_len: int, vocab_size: int | None) -> SampleExtras | None:
        """The engine's SampleExtras, after every element check (UserError naming the field)."""
        if not self.any:
            return None
        ids = None if self.target is None else _decode_targets(self.target, self.sparse, prompt_len, vocab_size)
        return SampleExtras(topk_sample=self.topk_sample, target_ids=ids, alt_k=self.alt_k)


def _count(body: dict, key: str, cap: int) -> int:
    v = body.get(key)
    if v is None:
        return 0
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= cap:
        raise UserError(f"{key} must be an integer in 0..{cap} (this server's limit), got {v!r}")
    return v


def parse(body: dict) -> ExtrasSpec:
    """Cheap checks of the three fields (no per-element work: this runs on the event loop)."""
    topk = _count(body, "topk_sample_logprobs", MAX_TOPK_SAMPLE_LOGPROBS)
    alt = _count(body, "prompt_alt_tokens_k", MAX_PROMPT_ALT_TOKENS_K)
    t = body.get("target_prompt_logprobs")
    if t is None:
        return ExtrasSpec(topk, alt)
    where = "target_prompt_logprobs"
    if not isinstance(t, dict):
        raise UserError(f"{where} must be a TensorData object, got {type(t).__name__}")
    if t.get("dtype") != "int64":
        raise UserError(f"{where} must be an int64 tensor of token ids, got dtype {t.get('dtype')!r}")
    shape = t.get("shape")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise UserError(f"{where} must have a 2-D shape [len(prompt) - 1, K], got {shape!r}")
    if not 1 <= shape[1] <= MAX_TARGET_COLUMNS:
        raise UserError(f"{where} has K={shape[1]} columns; K must be in 1..{MAX_TARGET_COLUMNS} "
                        "(this server's limit)")
    data = t.get("data")
    if not isinstance(data, list):
        raise UserError(f"{where}.data must be a list of token ids")
    crow, col = t.get("sparse_crow_indices"), t.get("sparse_col_indices")
    if (crow is None) != (col is None):
        raise UserError(f"{where}: sparse_crow_indices and sparse_col_indices must be given together")
    sparse = crow is not None
    if sparse:
        if not isinstance(crow, list) or not isinstance(col, list):
            raise UserError(f"{where}: sparse CSR indices must be lists of integers")
        if len(crow) != shape[0] + 1:
            raise UserError(f"{where}: sparse_crow_indices has length {len(crow)}; a CSR tensor of shape "
                            f"{shape} needs shape[0] + 1 = {shape[0] + 1}")
        if len(col) != len(data):
            raise UserError(f"{where}: sparse_col_indices has {len(col)} entries but data has {len(data)} "
                            "(one column per value)")
    elif len(data) != math.prod(shape):
        raise UserError(f"{where}: {len(data)} values do not fill shape {shape} (dense needs {math.prod(shape)})")
    return ExtrasSpec(topk, alt, t, sparse)


def _ints(where: str, values: list) -> np.ndarray:
    try:
        arr = np.asarray(values)
    except (ValueError, OverflowError) as e:
        raise UserError(f"{where} must hold integers: {e}") from None
    if arr.size and (arr.ndim != 1 or arr.dtype.kind not in "iu"):
        raise UserError(f"{where} must be a flat list of integers (got {arr.dtype} values)")
    return arr.astype(np.int64)


def _decode_targets(t: dict, sparse: bool, prompt_len: int, vocab_size: int | None) -> np.ndarray:
    where = "target_prompt_logprobs"
    rows, k = t["shape"]
    if rows != prompt_len - 1:
        raise UserError(f"{where} has {rows} rows; a prompt of {prompt_len} tokens needs len(prompt) - 1 = "
                        f"{prompt_len - 1} (row i is scored at prompt position i + 1)")
    vals = _ints(f"{where}.data", t["data"])
    if sparse:
        crow = _ints(f"{where}.sparse_crow_indices", t["sparse_crow_indices"])
        col = _ints(f"{where}.sparse_col_indices", t["sparse_col_indices"])
        nnz = len(vals)
        if crow[0] != 0 or crow[-1] != nnz or (np.diff(crow) < 0).any():
            raise UserError(f"{where}: sparse_crow_indices must rise (never fall) from 0 to the number of "
                            f"values, {nnz}; got {crow.tolist()[:20]}")
        if nnz and (col.min() < 0 or col.max() >= k):
            raise UserError(f"{where}: sparse column index {int(col[(col < 0) | (col >= k)][0])} is out of "
                            f"range for K={k} columns")
        row_of = np.repeat(np.arange(rows), np.diff(crow))
        if nnz > 1 and ((np.diff(col) <= 0) & (row_of[1:] == row_of[:-1])).any():
            raise UserError(f"{where}: sparse column indices must strictly increase within each row "
                            "(a cell listed twice is ambiguous)")
        ids = np.full((rows, k), -1, dtype=np.int64)
        ids[row_of, col] = vals
    else:
        ids = vals.reshape(rows, k)
    bad = (ids < -1) | (ids >= vocab_size if vocab_size is not None else False)
    if bad.any():
        top = f"{vocab_size - 1}" if vocab_size is not None else "the vocabulary size - 1"
        raise UserError(f"{where}: token id {int(ids[bad][0])} is not -1 (nothing) or in 0..{top}")
    if not (ids >= 0).any():
        raise UserError(f"{where} names no token id (every cell is -1); omit the field instead")
    return ids


def fill_response(proto: pb.SampleResponse, result: SampleResult, spec: ExtrasSpec) -> None:
    """Add the requested extras to an encoded SampleResponse."""
    if spec.topk_sample:
        for s, seq in zip(proto.sequences, result.sequences):
            _topk(s.topk_sampled_logprobs, seq.topk_logprobs or [], spec.topk_sample)
    if spec.target is not None and result.target_prompt_logprobs is not None:
        _targets(proto.target_prompt_logprobs, result.target_prompt_logprobs, spec)
    if spec.alt_k and result.prompt_alt_tokens is not None:
        alt = proto.prompt_alt_tokens
        _dense(alt.tokens, result.prompt_alt_tokens.astype(np.int64), pb.DTYPE_INT64)
        _dense(alt.logprobs, result.prompt_alt_logprobs.astype(np.float32), pb.DTYPE_FLOAT32)


def _topk(t: pb.TopkLogprobs, rows: list[list[tuple[int, float]]], k: int) -> None:
    """Dense (length, k) pair; unfilled cells are the SDK's sentinel (0, -99999.0)."""
    ids = np.zeros((len(rows), k), dtype=np.int32)
    lps = np.full((len(rows), k), -99999.0, dtype=np.float32)
    for i, row in enumerate(rows):
        for j, (tok, lp) in enumerate(row[:k]):
            ids[i, j], lps[i, j] = tok, lp
    t.token_ids, t.logprobs, t.k, t.length = ids.tobytes(), lps.tobytes(), k, len(rows)


def _dense(t: pb.Tensor, arr: np.ndarray, dtype: int) -> None:
    t.dense = np.ascontiguousarray(arr).tobytes()
    t.dtype = dtype
    t.shape.extend(int(s) for s in arr.shape)


def _targets(t: pb.Tensor, lps: np.ndarray, spec: ExtrasSpec) -> None:
    """Same shape and layout as the request: a sparse request gets the same CSR indices back."""
    if not spec.sparse:
        _dense(t, lps.astype(np.float32), pb.DTYPE_FLOAT32)
        return
    target: dict[str, Any] = spec.target or {}
    crow = np.asarray(target["sparse_crow_indices"], dtype=np.int64)
    col = np.asarray(target["sparse_col_indices"], dtype=np.int64)
    row_of = np.repeat(np.arange(lps.shape[0]), np.diff(crow))
    t.sparse_csr.values = lps[row_of, col].astype(np.float32).tobytes()
    t.sparse_csr.crow_indices = crow.tobytes()
    t.sparse_csr.col_indices = col.tobytes()
    t.dtype = pb.DTYPE_FLOAT32
    t.shape.extend(int(s) for s in lps.shape)
