"""Which device and dtypes an engine uses: the defaults, and the names `--dtype` /
`--train-dtype` accept."""

from __future__ import annotations

import torch

from .types import EngineError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp32 by default on CPU (correctness first); bf16 by default on CUDA."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _parse_dtype(dtype)


def resolve_train_dtype(
    train_dtype: str | torch.dtype | None, dtype_given: bool, dtype: torch.dtype, device: torch.device
) -> torch.dtype:
    """The learner's compute dtype. "auto" (or None with no engine dtype given): bf16 on CUDA,
    else the engine's dtype. None with an explicit engine `dtype` follows that dtype, so
    `Engine(dtype="float32")` is fp32 end to end.

    Not bf16 on CPUs, even those with native bf16 (AVX512-BF16/AMX), where it trains 1.7-1.8x
    faster (bench/train.py): beside the fp32 sampler, the bf16 learner's logprobs of sampled
    tokens were 2.8e-3 lower on average over a `make run` (kl_sample_train_v1; v2 9.6e-4), above
    the 2e-3 the project allows for a default. `--train-dtype bfloat16` opts in.
    """
    if train_dtype is None and dtype_given:
        return dtype
    if train_dtype is None or train_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else dtype
    return _parse_dtype(train_dtype)


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise EngineError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None
