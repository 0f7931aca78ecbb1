"""The lean SwiGLU (engine/mlp.py): transformers' numbers in both directions, less kept."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from gemtinker.engine.mlp import swiglu, use_lean_swiglu
from gemtinker.engine.models import load_causal_lm


def test_swiglu_equals_autograd_and_keeps_two_tensors():
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(7, 48, generator=g, requires_grad=True)
    up = torch.randn(7, 48, generator=g, requires_grad=True)
    grad = torch.randn(7, 48, generator=g)
    ref = F.silu(gate) * up
    ref_grads = torch.autograd.grad(ref, (gate, up), grad)
    kept: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = swiglu(gate, up)
    assert torch.equal(out, ref)
    assert len(kept) == 2  # gate and up; autograd's version keeps silu(gate) as well
    for got, want in zip(torch.autograd.grad(out, (gate, up), grad), ref_grads):
        assert torch.equal(got, want)


def test_model_with_lean_mlps_gives_the_same_logits_and_gradients():
    model, _, _ = load_causal_lm("gemtinker/tiny-llama")
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(True)

    def run():
        emb.grad = None
        logits = model(input_ids=ids).logits
        logits.logsumexp(-1).sum().backward()
        return logits.detach(), emb.grad.clone()

    try:
        before = run()
        assert use_lean_swiglu(model) == model.config.num_hidden_layers
        after = run()
    finally:
        emb.requires_grad_(False)
    assert torch.equal(after[0], before[0])
    torch.testing.assert_close(after[1], before[1], atol=1e-6, rtol=1e-6)
