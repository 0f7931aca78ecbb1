"""AdamW with torch.optim.AdamW semantics, state kept in plain tensors.

Written out (rather than using torch.optim) so hyperparameters can change on every step, as
Tinker's optim_step allows, and so the state is a flat dict of tensors that checkpoints bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .types import AdamConfig, EngineError


@dataclass
class AdamState:
    step: int = 0
    exp_avg: dict[str, torch.Tensor] = field(default_factory=dict)
    exp_avg_sq: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"{k}.exp_avg": v for k, v in self.exp_avg.items()}
        out.update({f"{k}.exp_avg_sq": v for k, v in self.exp_avg_sq.items()})
        return out

    @classmethod
    def from_tensors(cls, step: int, tensors: dict[str, torch.Tensor]) -> AdamState:
        st = cls(step=step)
        for key, t in tensors.items():
            name, _, kind = key.rpartition(".")
            if kind == "exp_avg":
                st.exp_avg[name] = t
            elif kind == "exp_avg_sq":
                st.exp_avg_sq[name] = t
            else:
                raise EngineError(f"unexpected optimizer tensor {key!r} in checkpoint")
        return st


def validate_config(cfg: AdamConfig) -> None:
    checks = {
        "learning_rate": cfg.learning_rate >= 0,
        "beta1": 0 <= cfg.beta1 < 1,
        "beta2": 0 <= cfg.beta2 < 1,
        "eps": cfg.eps >= 0,
        "weight_decay": cfg.weight_decay >= 0,
        "grad_clip_norm": cfg.grad_clip_norm >= 0,
    }
    for name, ok in checks.items():
        value = getattr(cfg, name)
        if not ok or not math.isfinite(value):
            raise EngineError(f"adam_params.{name} = {value!r} is out of range")


@torch.no_grad()
def global_grad_norm(params: dict[str, torch.Tensor]) -> float:
    grads = [p.grad for p in params.values() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


@torch.no_grad()
def adamw_step(params: dict[str, torch.Tensor], state: AdamState, cfg: AdamConfig) -> dict[str, float]:
    """One AdamW update of every param that has a grad (missing grad = 0), then zero the grads."""
    grad_norm = global_grad_norm(params)
    clip = 1.0
    if cfg.grad_clip_norm > 0 and grad_norm > cfg.grad_clip_norm:
        clip = cfg.grad_clip_norm / (grad_norm + 1e-6)
    state.step += 1
    t = state.step
    bc1 = 1 - cfg.beta1**t
    bc2_sqrt = math.sqrt(1 - cfg.beta2**t)
    step_size = cfg.learning_rate / bc1
    for name, p in params.items():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if clip != 1.0:
            g = g * clip
        m = state.exp_avg.setdefault(name, torch.zeros_like(p))
        v = state.exp_avg_sq.setdefault(name, torch.zeros_like(p))
        p.mul_(1 - cfg.learning_rate * cfg.weight_decay)
        m.lerp_(g, 1 - cfg.beta1)
        v.mul_(cfg.beta2).addcmul_(g, g, value=1 - cfg.beta2)
        denom = (v.sqrt() / bc2_sqrt).add_(cfg.eps)
        p.addcdiv_(m, denom, value=-step_size)
        p.grad = None
    return {
        "grad_norm": grad_norm,
        "grad_clip_scale": clip,
        "learning_rate": cfg.learning_rate,
        "step": float(t),
    }
