"""The engine's attention (engine/attention.py): grouped-query layers given a mask read their
grouped keys and values directly on the CPU, with transformers' SDPA numbers."""

from __future__ import annotations

import torch

from gemtinker.engine.attention import NAME, grouped_sdpa_forward, use_grouped_sdpa
from gemtinker.engine.models import load_causal_lm


def test_grouped_attention_gives_transformers_numbers():
    """A padded batch (a mask) and a plain one, through the tiny Llama (4 query heads on 2
    key/value heads), before and after the switch; the gradients too."""
    model, _, _ = load_causal_lm("gemtinker/tiny-llama")
    ids = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 13:] = 0
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(True)

    def run(attention_mask):
        emb.grad = None
        logits = model(input_ids=ids, attention_mask=attention_mask).logits
        logits.logsumexp(-1).sum().backward()
        return logits.detach(), emb.grad.clone()

    try:
        before = [run(mask), run(None)]
        assert use_grouped_sdpa(model) and model.config._attn_implementation == NAME
        after = [run(mask), run(None)]
    finally:
        emb.requires_grad_(False)
    for (l0, g0), (l1, g1) in zip(before, after):
        torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(g1, g0, atol=1e-5, rtol=1e-5)


def test_grouped_attention_reads_keys_without_copies(monkeypatch):
    """With a mask, no per-head copies (`repeat_kv`) are made; without one, or off the CPU
    path's conditions, transformers' own function runs."""
    import transformers.integrations.sdpa_attention as sdpa

    repeats = []
    monkeypatch.setattr(sdpa, "repeat_kv", lambda x, n: repeats.append(n) or x.repeat_interleave(n, dim=1))

    class Layer(torch.nn.Module):
        num_key_value_groups = 3
        is_causal = True

    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 6, 5, 8, generator=g)
    k, v = torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
    out, _ = grouped_sdpa_forward(Layer(), q, k, v, mask, scaling=0.3)
    assert repeats == []
    ref, _ = sdpa.sdpa_attention_forward(Layer(), q, k, v, mask, scaling=0.3)
    assert repeats == [3, 3]  # transformers' path copies keys and values per query head
    torch.testing.assert_close(out, ref)
