"""The engine contract: exactly what the server calls on an engine, as a typed `Protocol`.

The server never imports `gemtinker.engine.engine` (torch) outside the default factory
(`engines.default_engine_factory`); everything in `server/` holds an `EngineAPI`. The real
`gemtinker.engine.Engine` satisfies it structurally (tests/server/test_server_engine_api.py checks every
member and signature), and a fake engine behind the same Protocol lets the protocol and error
tests run without torch.

Adapters are training models (named by their Tinker model id); samplers are engine-side ids
(str) of frozen weights. Paths are checkpoint directories the engine reads or writes whole.
Refusals of the caller's input raise `EngineError` (reported as category "user").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from gemtinker.engine.types import (
    AdamConfig,
    AdapterInfo,
    ForwardResult,
    LoraSpec,
    SampleExtras,
    SampleResult,
    SamplingConfig,
    TrainDatum,
)

PathLike = str | os.PathLike


@runtime_checkable
class EngineAPI(Protocol):
    """One base model, its LoRA adapters and its samplers. Every method may block (call off the
    event loop); concurrent calls are the engine's to serialise."""

    # Token ids must be < vocab_size; prompt + generated tokens stop at max_len (None: unbounded).
    vocab_size: int
    max_len: int | None

    # ---- training adapters
    def create_adapter(self, adapter_id: str, spec: LoraSpec, metadata: dict | None = None) -> AdapterInfo: ...

    def remove_adapter(self, adapter_id: str) -> None: ...

    def forward(self, adapter_id: str, datums: list[TrainDatum], loss_fn: str = "cross_entropy",
                loss_fn_config: dict | None = None) -> ForwardResult: ...

    def forward_backward(self, adapter_id: str, datums: list[TrainDatum], loss_fn: str,
                         loss_fn_config: dict | None = None) -> ForwardResult: ...

    def optim_step(self, adapter_id: str, adam: AdamConfig) -> dict[str, float]: ...

    # ---- checkpoints: save_state with the optimizer (resumable), sampler weights without
    def save_state(self, adapter_id: str, path: PathLike, include_optimizer: bool = True,
                   metadata: dict | None = None) -> None: ...

    def save_sampler_weights(self, adapter_id: str, path: PathLike, metadata: dict | None = None) -> None: ...

    def load_state(self, adapter_id: str, path: PathLike, with_optimizer: bool) -> AdapterInfo: ...

    # ---- samplers
    def snapshot_sampler(self, adapter_id: str) -> str: ...

    def load_sampler(self, path: PathLike) -> str: ...

    def base_sampler(self) -> str: ...

    def release_sampler(self, sampler_id: str) -> None: ...

    def sample(self, sampler_id: str, prompt_tokens: list[int], num_samples: int, config: SamplingConfig,
               prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0,
               extras: SampleExtras | None = None) -> SampleResult: ...

    # ---- lifetime: stops the engine's sampling scheduler
    def close(self) -> None: ...


# Makes the engine of a base model name (blocking: it loads weights).
EngineFactory = Callable[[str], EngineAPI]
