"""Sibling linears (q/k/v, gate/up) computed together in the learner's low-precision path
(lora.SiblingGroup): the numbers of computing them one by one, one matmul for the group."""

from __future__ import annotations

import pytest
import torch

from gemtinker.engine import lora
from gemtinker.engine.lora import ActiveLora, SiblingGroup, inject_lora, low_precision_compute, use_lora
from gemtinker.engine.models import load_causal_lm


@pytest.fixture(scope="module")
def tiny():
    model, _, _ = load_causal_lm("gemtinker/tiny-llama")
    modules = inject_lora(model)
    return model, modules


def _factors(modules, names, rank=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        mod = modules[name][0]
        a = (torch.randn(rank, mod.in_features, generator=gen) * 0.1).requires_grad_(True)
        b = (torch.randn(mod.out_features, rank, generator=gen) * 0.1).requires_grad_(True)
        out[name] = (a, b, 2.0)
    return out


def test_every_layer_groups_qkv_and_gate_up_with_one_weight_view(tiny):
    model, modules = tiny
    groups = {id(m.siblings): m.siblings for m, _ in modules.values() if m.siblings is not None}
    assert len(groups) == 2 * model.config.num_hidden_layers
    assert sorted(m.key.rsplit(".", 1)[1] for g in groups.values() for m in g.members) == sorted(
        ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"] * model.config.num_hidden_layers)
    copies = lora.LowPrecisionCopies(modules, torch.bfloat16)
    copies.ensure()
    try:
        for group in groups.values():
            members = torch.cat([m.low_precision_weight for m in group.members])
            assert torch.equal(group.low_precision_weight, members)
            # a view into the buffer that holds the members' copies, not a copy of its own
            assert group.low_precision_weight.data_ptr() == group.members[0].low_precision_weight.data_ptr()
    finally:
        copies.release()
    assert all(g.low_precision_weight is None for g in groups.values())


def _run(model, modules, active, fused: bool, monkeypatch):
    """Logits and the gradients of the input embeddings and every factor, in the low-precision
    path with float64 as its 'low' dtype: the same arithmetic fused or not, so only the wiring
    can differ."""
    calls = []
    original = SiblingGroup._forward_all

    def spy(self, *args):
        calls.append(self)
        return original(self, *args)

    monkeypatch.setattr(SiblingGroup, "_forward_all", spy)
    if not fused:
        monkeypatch.setattr(SiblingGroup, "output_for", lambda self, *a: None)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    copies = lora.LowPrecisionCopies(modules, torch.float64)
    copies.ensure()
    try:
        with use_lora(active), low_precision_compute(torch.float64):
            logits = model(inputs_embeds=emb).logits
        factors = [t for f in (active.shared.values() if active else ()) for t in f[:2]]
        grads = torch.autograd.grad(logits.logsumexp(-1).sum(), [emb, *factors])
    finally:
        copies.release()
        monkeypatch.undo()
    return logits.detach(), grads, len(calls)


@pytest.mark.parametrize("targets", ["all", "mlp_only", "none"])
def test_fused_siblings_give_the_numbers_of_one_by_one(tiny, targets, monkeypatch):
    model, modules = tiny
    layers = model.config.num_hidden_layers
    names = [n for n, (_, cat) in modules.items()
             if (targets == "all" and cat in ("attn", "mlp")) or (targets == "mlp_only" and cat == "mlp")]
    active = ActiveLora(shared=_factors(modules, names)) if names else None
    ref_logits, ref_grads, ref_calls = _run(model, modules, active, fused=False, monkeypatch=monkeypatch)
    logits, grads, calls = _run(model, modules, active, fused=True, monkeypatch=monkeypatch)
    assert ref_calls == 0 and calls == 2 * layers  # every group fused: with or without factors
    torch.testing.assert_close(logits, ref_logits, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_siblings_with_factors_on_some_members_only_run_one_by_one(tiny, monkeypatch):
    model, modules = tiny
    q_only = [n for n in modules if n.endswith("q_proj")]
    active = ActiveLora(shared=_factors(modules, q_only))
    ref_logits, ref_grads, _ = _run(model, modules, active, fused=False, monkeypatch=monkeypatch)
    logits, grads, calls = _run(model, modules, active, fused=True, monkeypatch=monkeypatch)
    assert calls == model.config.num_hidden_layers  # gate/up fused (no factors), q/k/v one by one
    torch.testing.assert_close(logits, ref_logits, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
