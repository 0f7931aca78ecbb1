"""A gated MLP (SwiGLU: down(silu(gate(x)) * up(x))) that keeps less for its backward.

transformers' Llama/Qwen MLPs leave the product to autograd, which keeps gate(x), up(x) and
silu(gate(x)) for the backward: three (tokens x intermediate) fp32 tensors per layer.
`_SwiGLU` keeps the first two and recomputes the third in the backward (one elementwise op),
with the same numbers as autograd in both directions. For SmolLM2-135M that is 6 kB less per
token and layer, a ninth of what a learner pass keeps, which lets branch passes hold two rows
(learner.LearnerLimits.branch_tokens) within `make run`'s memory.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; under autograd, keeps only gate and up for the backward."""
    return _SwiGLU.apply(gate, up)


def _lean_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def use_lean_swiglu(model: nn.Module) -> int:
    """Give every SwiGLU MLP of `model` (gate_proj, up_proj, down_proj, a SiLU act_fn) the lean
    forward; returns how many were switched. Other MLPs are left as they are."""
    switched = 0
    for module in model.modules():
        if all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")) and _is_silu(module.act_fn):
            module.forward = types.MethodType(_lean_forward, module)
            switched += 1
    return switched
