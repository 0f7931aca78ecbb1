"""Embedded Tinker-compatible engine: LoRA training and sampling over one frozen base model."""

from .engine import Engine
from .types import (
    AdamConfig,
    AdapterInfo,
    EngineError,
    ForwardResult,
    LoraSpec,
    SampledSequence,
    SampleExtras,
    SampleResult,
    SamplingConfig,
    TrainDatum,
    UnknownModelError,
)

__all__ = [
    "AdamConfig",
    "AdapterInfo",
    "Engine",
    "EngineError",
    "ForwardResult",
    "LoraSpec",
    "SampledSequence",
    "SampleExtras",
    "SampleResult",
    "SamplingConfig",
    "TrainDatum",
    "UnknownModelError",
]
