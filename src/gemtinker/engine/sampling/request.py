"""What the samplers (`scheduler`, `generic`) share: the request they queue and run, and
the part of the engine they use.

It lives below both samplers and below `engine`, so neither sampler imports the other's module
or the engine's for a type: `Engine` satisfies `SamplerHost` structurally.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..lora import LoraWeights
from ..types import SampleExtras, SampleResult, SamplingConfig


class SamplerHost(Protocol):
    """The engine as the samplers see it: the model to run and the lock that shares it with
    training (taken around every forward). A host may also offer `release_training_memory()`,
    which the fast path calls before it builds packed weights (engine.py: the learner's bf16
    weight copies), and `release_model_weights()`, called after (the model's own weights, which
    the packed ones replace until the next training call)."""

    model: Any  # a transformers causal LM
    tokenizer: Any  # None when the model came without one (stop strings then never match)
    device: torch.device
    dtype: torch.dtype
    max_len: int | None  # the model's context length, when its config states one
    compute_lock: AbstractContextManager[Any]


@dataclass
class SampleRequest:
    """One `sample` call: `n` continuations of `prompt`, and where its result goes."""

    key: str  # prefix-cache key: sampler id (base-model samplers share one key)
    weights: LoraWeights | None
    prompt: list[int]
    n: int
    cfg: SamplingConfig
    prompt_logprobs: bool
    topk: int
    extras: SampleExtras = field(default_factory=SampleExtras)
    done: threading.Event = field(default_factory=threading.Event)
    result: SampleResult | None = None
    error: BaseException | None = None
    gen: torch.Generator | None = None
    rows_left: int = 0
    seqs: list = field(default_factory=list)
    # Set after a batch it was part of failed: it is rerun alone, so only the culprit fails.
    solo: bool = False

    @property
    def wants_prompt_logits(self) -> bool:
        """Whether the prompt's logits at every position are needed (no prefix sharing then)."""
        return bool(self.prompt_logprobs or self.topk or self.extras.needs_prompt_logits)

    def restart_alone(self) -> None:
        """Forget partial results and run again, alone (a seeded request gives the same tokens)."""
        self.solo, self.result, self.gen, self.rows_left, self.seqs = True, None, None, 0, []
