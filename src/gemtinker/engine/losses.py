"""Tinker's built-in loss functions (tinker_protocol.md §7).

Every loss is a SUM over token positions (and datums): no mean, no normalisation. Inputs arrive
flattened over the whole batch: `target_lp` holds log p_theta(target_tokens) at every position.
RL datums may also carry `weights` (missing -> 1), which multiply the per-token loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .types import EngineError

Tensor = torch.Tensor


@dataclass(frozen=True)
class LossDef:
    required: tuple[str, ...]
    optional: tuple[str, ...]
    config_defaults: Mapping[str, float]
    allows_2d_targets: bool
    fn: Callable[[Tensor, Mapping[str, Tensor], Mapping[str, float]], tuple[Tensor, dict]]
    # True when the per-token loss is identically 0 at advantage 0 (so is its gradient).
    zero_at_zero_advantage: bool = False

    def gradient_mask(self, inputs: Mapping[str, Tensor], n: int) -> Tensor:
        """Bool per target entry: False where the loss's gradient is exactly zero whatever the
        logprob (weight 0; advantage 0 for losses linear in it). The learner skips backward there."""
        mask = None
        w = inputs.get("weights")
        if w is not None:
            mask = w != 0
        if self.zero_at_zero_advantage:
            adv = inputs["advantages"] != 0
            mask = adv if mask is None else mask & adv
        return torch.ones(n, dtype=torch.bool) if mask is None else mask


def _weights(target_lp: Tensor, inputs: Mapping[str, Tensor]) -> Tensor:
    w = inputs.get("weights")
    return torch.ones_like(target_lp) if w is None else w


def _cross_entropy(lp: Tensor, inp: Mapping[str, Tensor], cfg: Mapping[str, float]):
    w = _weights(lp, inp)
    return -(lp * w).sum(), {}


def _ratio(lp: Tensor, inp: Mapping[str, Tensor]) -> Tensor:
    return torch.exp(lp - inp["logprobs"])


def _ratio_metrics(ratio: Tensor, clipped: Tensor | None = None) -> dict[str, float]:
    n = max(ratio.numel(), 1)
    m = {"ratio:mean": float(ratio.detach().sum()) / n}
    if clipped is not None:
        m["clip_fraction:mean"] = float(clipped.float().sum()) / n
    return m


def _importance_sampling(lp: Tensor, inp: Mapping[str, Tensor], cfg: Mapping[str, float]):
    r = _ratio(lp, inp)
    loss = -(r * inp["advantages"] * _weights(lp, inp)).sum()
    return loss, _ratio_metrics(r)


def _ppo(lp: Tensor, inp: Mapping[str, Tensor], cfg: Mapping[str, float]):
    lo, hi = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
    r = _ratio(lp, inp)
    adv = inp["advantages"]
    unclipped = r * adv
    clipped = torch.clamp(r, lo, hi) * adv
    loss = -(torch.minimum(unclipped, clipped) * _weights(lp, inp)).sum()
    return loss, _ratio_metrics(r, (r < lo) | (r > hi))


def _cispo(lp: Tensor, inp: Mapping[str, Tensor], cfg: Mapping[str, float]):
    lo, hi = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
    r = _ratio(lp, inp)
    coef = torch.clamp(r, lo, hi).detach()
    loss = -(coef * lp * inp["advantages"] * _weights(lp, inp)).sum()
    return loss, _ratio_metrics(r, (r < lo) | (r > hi))


def _dro(lp: Tensor, inp: Mapping[str, Tensor], cfg: Mapping[str, float]):
    beta = cfg["beta"]
    q = inp["logprobs"]
    per_tok = lp * inp["advantages"] - 0.5 * beta * (lp - q) ** 2
    loss = -(per_tok * _weights(lp, inp)).sum()
    return loss, _ratio_metrics(torch.exp(lp - q))


_RL_INPUTS = ("target_tokens", "logprobs", "advantages")

LOSSES: dict[str, LossDef] = {
    "cross_entropy": LossDef(("target_tokens",), ("weights",), {}, True, _cross_entropy),
    "importance_sampling": LossDef(_RL_INPUTS, ("weights",), {}, False, _importance_sampling, True),
    "ppo": LossDef(
        _RL_INPUTS,
        ("weights",),
        {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
        False,
        _ppo,
        True,
    ),
    "cispo": LossDef(
        _RL_INPUTS,
        ("weights",),
        {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
        False,
        _cispo,
        True,
    ),
    # beta has no documented default; 0.05 is the value Tinker's docs use as the example.
    "dro": LossDef(_RL_INPUTS, ("weights",), {"beta": 0.05}, False, _dro),
}


def get_loss(name: str) -> LossDef:
    try:
        return LOSSES[name]
    except KeyError:
        raise EngineError(
            f"unknown loss_fn {name!r}; supported: {', '.join(sorted(LOSSES))}"
        ) from None


def resolve_config(loss: LossDef, name: str, config: Mapping[str, object] | None) -> dict[str, float]:
    """Defaults overlaid with the caller's config; unknown keys and non-numbers are errors."""
    out = dict(loss.config_defaults)
    for key, value in (config or {}).items():
        if key not in loss.config_defaults:
            allowed = ", ".join(loss.config_defaults) or "none"
            raise EngineError(f"loss_fn_config key {key!r} is not used by {name} (allowed: {allowed})")
        try:
            f = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise EngineError(f"loss_fn_config[{key!r}] must be a number, got {value!r}") from None
        if f != f or f in (float("inf"), float("-inf")):
            raise EngineError(f"loss_fn_config[{key!r}] must be finite, got {value!r}")
        out[key] = f
    return out


class MetricTotals:
    """Adds up `compute_loss` metrics over parts of one call (micro-batches, logit chunks):
    `:sum` metrics are summed, `:mean` metrics averaged weighted by each part's entry count."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._weighted: dict[str, float] = {}
        self._count = 0

    def add(self, metrics: Mapping[str, float], count: int) -> None:
        self._count += count
        for k, v in metrics.items():
            if k.endswith(":mean"):
                self._weighted[k] = self._weighted.get(k, 0.0) + v * count
            else:
                self._sums[k] = self._sums.get(k, 0.0) + v

    def result(self, num_tokens: int) -> dict[str, float]:
        out = dict(self._sums)
        out.update({k: v / max(self._count, 1) for k, v in self._weighted.items()})
        out["num_tokens:sum"] = float(num_tokens)
        return out


def compute_loss(
    name: str, target_lp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]
) -> tuple[Tensor, dict[str, float]]:
    """Summed loss (a scalar tensor with grad) and metrics with `name:reduction` keys."""
    loss, metrics = LOSSES[name].fn(target_lp, inputs, config)
    metrics = {"loss:sum": float(loss.detach()), **metrics}
    return loss, metrics
