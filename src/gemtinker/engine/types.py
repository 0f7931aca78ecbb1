"""Plain data types of the engine's API.

The server translates `tinker` wire types into these; the engine never imports `tinker`.
Arrays are numpy so they cross thread and process boundaries cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np


class EngineError(Exception):
    """A request the engine refuses because of its input (the caller's fault).

    The server reports it as a failed future with category "user"; engine state is unchanged.
    """


class UnknownModelError(EngineError):
    """A model name or path that cannot be resolved; the message names what was tried."""


@dataclass(frozen=True)
class LoraSpec:
    """Mirrors `tinker.types.LoraConfig`."""

    rank: int = 32
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    alpha: float | None = None  # None -> alpha = 32 (Tinker's fixed scaling); scale = alpha / rank


@dataclass
class TrainDatum:
    """One training sequence.

    `tokens` is the model input (N token ids). Every array in `inputs` is aligned with it:
    position i is about predicting `target_tokens[i]` after `tokens[:i+1]`.
    Known keys: target_tokens (N,) or (N, K) int64; weights (like target_tokens) float32;
    logprobs, advantages (N,) float32.
    """

    tokens: np.ndarray
    inputs: dict[str, np.ndarray]


@dataclass
class ForwardResult:
    """Result of forward / forward_backward: per-datum outputs and summed metrics.

    outputs[i] holds at least "logprobs" with the shape of datum i's target_tokens.
    metrics use Tinker's "name:reduction" keys, e.g. "loss:sum".
    """

    outputs: list[dict[str, np.ndarray]]
    metrics: dict[str, float]


@dataclass(frozen=True)
class AdamConfig:
    """Mirrors `tinker.types.AdamParams` (same defaults)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0  # 0 = no clipping


@dataclass(frozen=True)
class SamplingConfig:
    """Mirrors `tinker.types.SamplingParams`. `stop` is strings or token ids (None = EOS)."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] | tuple[int, ...] | None = None


@dataclass(frozen=True)
class SampleExtras:
    """The rarer SampleRequest outputs (tinker 0.38); the defaults ask for none of them.

    topk_sample: top-k (token, logprob) at every sampled position.
    target_ids: (len(prompt) - 1, K) int64 token ids whose prompt logprobs to return; row i is
        scored at prompt position i + 1, and -1 asks for nothing.
    alt_k: tokens drawn at every prompt position after the first (see `prompt_extras`).
    """

    topk_sample: int = 0
    target_ids: np.ndarray | None = None
    alt_k: int = 0

    @property
    def needs_prompt_logits(self) -> bool:
        return self.target_ids is not None or self.alt_k > 0


StopReason = Literal["stop", "length"]


@dataclass
class SampledSequence:
    tokens: list[int]  # generated tokens, the matched stop token included
    logprobs: list[float]  # logprob of each generated token under the sampler's weights
    stop_reason: StopReason
    # Per generated token, the top-k (token_id, logprob); filled when SampleExtras.topk_sample > 0.
    topk_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class SampleResult:
    sequences: list[SampledSequence]
    # prompt_logprobs[0] is None (nothing predicts the first token); filled when requested.
    prompt_logprobs: list[float | None] | None = None
    # For each prompt position: list of (token_id, logprob), top-k; filled when requested.
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
    prompt_cache_hit_tokens: int = 0
    # Logprobs of SampleExtras.target_ids: float32, same shape, 0.0 where the id is -1.
    target_prompt_logprobs: np.ndarray | None = None
    # SampleExtras.alt_k draws: (len(prompt) - 1, k) int64 ids and their float32 logprobs.
    prompt_alt_tokens: np.ndarray | None = None
    prompt_alt_logprobs: np.ndarray | None = None


@dataclass
class AdapterInfo:
    adapter_id: str
    base_model: str
    lora: LoraSpec
    num_trainable_params: int
    metadata: dict = field(default_factory=dict)
