"""Input checks that run before any engine state is touched.

Every error names the datum index and the field, so the server can report a useful message.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .losses import LossDef
from .types import EngineError, SamplingConfig, TrainDatum

_FLOAT_KEYS = ("weights", "logprobs", "advantages")


@dataclass
class CheckedDatum:
    tokens: torch.Tensor  # (N,) int64
    inputs: dict[str, torch.Tensor]  # target_tokens int64; the others float32


def _int_array(value: object, where: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.integer)
        or (np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)))
    ):
        raise EngineError(f"{where} must hold integer token ids (got dtype {arr.dtype})")
    return arr.astype(np.int64)


def _check_ids(arr: np.ndarray, vocab_size: int, where: str) -> None:
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = int(arr[(arr < 0) | (arr >= vocab_size)].flat[0])
        raise EngineError(f"{where} has token id {bad} outside the vocabulary [0, {vocab_size})")


def validate_datums(
    datums: list[TrainDatum], loss: LossDef, loss_name: str, vocab_size: int, max_len: int | None
) -> list[CheckedDatum]:
    if not datums:
        raise EngineError("no datums given")
    allowed = set(loss.required) | set(loss.optional)
    out: list[CheckedDatum] = []
    for i, d in enumerate(datums):
        where = f"datum {i}"
        tokens = _int_array(d.tokens, f"{where}: model_input tokens")
        if tokens.ndim != 1 or tokens.size == 0:
            raise EngineError(f"{where}: model_input must be a non-empty 1-D token list, got shape {tokens.shape}")
        n = tokens.shape[0]
        if max_len is not None and n > max_len:
            raise EngineError(f"{where}: model_input has {n} tokens, more than the model's {max_len}")
        _check_ids(tokens, vocab_size, f"{where}: model_input")
        inputs = d.inputs or {}
        for key in loss.required:
            if key not in inputs:
                raise EngineError(f"{where}: loss_fn {loss_name!r} needs loss_fn_inputs[{key!r}], which is missing")
        for key in inputs:
            if key not in allowed:
                raise EngineError(
                    f"{where}: loss_fn_inputs[{key!r}] is not used by {loss_name!r} "
                    f"(allowed: {', '.join(sorted(allowed))})"
                )
        tgt = _int_array(inputs["target_tokens"], f"{where}: loss_fn_inputs['target_tokens']")
        if tgt.ndim not in (1, 2) or (tgt.ndim == 2 and not loss.allows_2d_targets) or tgt.shape[0] != n:
            want = "(N,) or (N, K)" if loss.allows_2d_targets else "(N,)"
            raise EngineError(
                f"{where}: loss_fn_inputs['target_tokens'] has shape {tgt.shape}; expected {want} with N = {n} "
                f"(the length of model_input)"
            )
        _check_ids(tgt, vocab_size, f"{where}: loss_fn_inputs['target_tokens']")
        checked = {"target_tokens": torch.from_numpy(tgt)}
        for key in _FLOAT_KEYS:
            if key not in inputs:
                continue
            field = f"{where}: loss_fn_inputs[{key!r}]"
            arr = np.asarray(inputs[key])
            if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
                raise EngineError(f"{field} must be numeric (got dtype {arr.dtype})")
            arr = arr.astype(np.float32)
            want_shape = tgt.shape if key == "weights" else (n,)
            if arr.shape != want_shape:
                raise EngineError(f"{field} has shape {arr.shape}; expected {want_shape}")
            if not np.all(np.isfinite(arr)):
                raise EngineError(f"{field} contains NaN or infinite values")
            checked[key] = torch.from_numpy(arr)
        out.append(CheckedDatum(torch.from_numpy(tokens), checked))
    return out


def validate_prompt(tokens: object, vocab_size: int, max_len: int | None) -> list[int]:
    arr = _int_array(tokens, "prompt tokens")
    if arr.ndim != 1 or arr.size == 0:
        raise EngineError(f"prompt must be a non-empty 1-D token list, got shape {arr.shape}")
    _check_ids(arr, vocab_size, "prompt")
    if max_len is not None and arr.size >= max_len:
        raise EngineError(f"prompt has {arr.size} tokens; the model's context is {max_len}")
    return [int(t) for t in arr]


def validate_sampling(cfg: SamplingConfig, num_samples: int, vocab_size: int) -> None:
    if not isinstance(num_samples, int) or num_samples < 1:
        raise EngineError(f"num_samples must be a positive integer, got {num_samples!r}")
    if cfg.max_tokens is not None and cfg.max_tokens < 0:
        raise EngineError(f"sampling_params.max_tokens must be >= 0, got {cfg.max_tokens}")
    if not (cfg.temperature >= 0 and np.isfinite(cfg.temperature)):
        raise EngineError(f"sampling_params.temperature must be >= 0, got {cfg.temperature}")
    if not (0 < cfg.top_p <= 1):
        raise EngineError(f"sampling_params.top_p must be in (0, 1], got {cfg.top_p}")
    # torch.Generator takes uint64 seeds; anything else would fail inside a batch of requests.
    if cfg.seed is not None and (not isinstance(cfg.seed, (int, np.integer)) or not 0 <= int(cfg.seed) < 2**64):
        raise EngineError(f"sampling_params.seed must be an integer in 0..2**64-1, got {cfg.seed!r}")
    if cfg.top_k == 0 or cfg.top_k < -1:
        raise EngineError(f"sampling_params.top_k must be -1 (off) or >= 1, got {cfg.top_k}")
    for s in cfg.stop or ():
        if isinstance(s, str):
            if not s:
                raise EngineError("sampling_params.stop contains an empty string")
        elif isinstance(s, (int, np.integer)) and not isinstance(s, bool):
            if not 0 <= int(s) < vocab_size:
                raise EngineError(f"sampling_params.stop token id {s} is outside [0, {vocab_size})")
        else:
            raise EngineError(f"sampling_params.stop entries must be strings or token ids, got {s!r}")
