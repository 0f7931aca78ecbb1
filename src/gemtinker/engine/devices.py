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

    Not bf16 on CPUs, even those with native bf16 (`cpu_has_fast_bf16`), where it trains 1.7-5x
    faster (bench/train.py). Its logprobs agree with the fp32 sampler's within the 2e-3 bound
    (learner.py keeps attention and the unembedding in fp32: mean kl_sample_train_v1 between
    -6.7e-4 and 8.0e-4 per `make run`), but over 8 bf16 and 11 fp32 `make run`s (seeds 0-4)
    it held out 0.325 on average against 0.387, and it peaks at 3.5 GB and more against fp32's
    2.9 GB (docs/learner-2026-12-03.md). `--train-dtype bfloat16` opts in. (An fp32 forward
    with a bf16 backward kept fp32's logprobs and learning but was barely faster on this CPU:
    docs/learner-2026-12-03.md.)
    """
    if train_dtype is None and dtype_given:
        return dtype
    if train_dtype is None or train_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else dtype
    return _parse_dtype(train_dtype)


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 dot products (AVX512-BF16 or AMX), where oneDNN runs bf16
    matmuls several times faster than fp32 (4x on the 2-core AMD EPYC this project is built on);
    elsewhere bf16 is emulated and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    except (AttributeError, RuntimeError):
        return False


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise EngineError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None
