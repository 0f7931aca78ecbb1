"""Each loss against a direct reference computation, values and LoRA gradients.

The reference runs the plain HF forward per datum (no batching, no padding) and builds the
loss from hand-derived per-token derivatives dL/dlogprob, so neither the loss formulas nor the
batching code of the engine are reused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemtinker.engine import TrainDatum
from gemtinker.engine.lora import shared_active, use_lora

CLIP = {"ppo": (0.8, 1.2), "cispo": (0.0, 4.0)}


def _datums(rng: np.random.Generator, loss_fn: str, vocab: int, k: int = 0) -> list[TrainDatum]:
    out = []
    for n in (5, 9, 3):
        toks = rng.integers(0, vocab, n)
        shape = (n, k) if k else (n,)
        inputs = {"target_tokens": rng.integers(0, vocab, shape)}
        if loss_fn == "cross_entropy":
            inputs["weights"] = rng.normal(size=shape).astype(np.float32)  # negatives allowed
        else:
            inputs["logprobs"] = rng.uniform(-12, -2, n).astype(np.float32)
            inputs["advantages"] = rng.normal(size=n).astype(np.float32)
            if n == 9:
                inputs["weights"] = rng.uniform(0, 2, n).astype(np.float32)
        out.append(TrainDatum(toks, inputs))
    return out


def _reference_lp(engine, weights, d: TrainDatum) -> torch.Tensor:
    ids = torch.as_tensor(d.tokens).unsqueeze(0)
    with use_lora(shared_active(weights)):
        logits = engine.model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    tgt = torch.as_tensor(d.inputs["target_tokens"])
    if tgt.ndim == 1:
        return logp.gather(1, tgt.unsqueeze(1)).squeeze(1)
    return logp.gather(1, tgt)


def _reference(loss_fn: str, lp: torch.Tensor, d: TrainDatum, cfg: dict) -> tuple[float, torch.Tensor]:
    """Loss value and dL/dlp for one datum, written out by hand."""
    lpd = lp.detach()
    w = torch.as_tensor(d.inputs.get("weights", np.ones(lp.shape, np.float32))).double()
    if loss_fn == "cross_entropy":
        return float(-(lpd * w).sum()), -w
    q = torch.as_tensor(d.inputs["logprobs"]).double()
    a = torch.as_tensor(d.inputs["advantages"]).double()
    r = torch.exp(lpd - q)
    if loss_fn == "importance_sampling":
        return float(-(r * a * w).sum()), -r * a * w
    if loss_fn == "ppo":
        lo, hi = cfg.get("clip_low_threshold", 0.8), cfg.get("clip_high_threshold", 1.2)
        rc = r.clamp(lo, hi)
        use_unclipped = r * a <= rc * a
        val = torch.where(use_unclipped, r * a, rc * a)
        grad = torch.where(use_unclipped, r * a, torch.zeros_like(r))  # clipped branch is flat
        return float(-(val * w).sum()), -grad * w
    if loss_fn == "cispo":
        lo, hi = cfg.get("clip_low_threshold", 0.0), cfg.get("clip_high_threshold", 4.0)
        rc = r.clamp(lo, hi)
        return float(-(rc * lpd * a * w).sum()), -rc * a * w
    if loss_fn == "dro":
        beta = cfg.get("beta", 0.05)
        val = lpd * a - 0.5 * beta * (lpd - q) ** 2
        return float(-(val * w).sum()), -(a - beta * (lpd - q)) * w
    raise AssertionError(loss_fn)


CASES = [
    ("cross_entropy", {}, 0),
    ("cross_entropy", {}, 3),
    ("importance_sampling", {}, 0),
    ("ppo", {}, 0),
    ("ppo", {"clip_low_threshold": 0.5, "clip_high_threshold": 3.0}, 0),
    ("cispo", {}, 0),
    ("dro", {"beta": 0.3}, 0),
]


@pytest.mark.parametrize("loss_fn,cfg,k", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_loss_and_grads_match_reference(tiny_engine, new_adapter, loss_fn, cfg, k):
    eng = tiny_engine
    aid = new_adapter(rank=4, seed=3)
    weights = eng._get(aid).weights
    rng = np.random.default_rng(7)
    datums = _datums(rng, loss_fn, eng.vocab_size, k)
    # Make sampling logprobs close to the current ones so ratios straddle the clip range.
    if loss_fn != "cross_entropy":
        cur = eng.forward(aid, datums, loss_fn, cfg).outputs
        for d, o in zip(datums, cur):
            d.inputs["logprobs"] = (o["logprobs"] + rng.normal(0, 0.4, o["logprobs"].shape)).astype(np.float32)

    res = eng.forward_backward(aid, datums, loss_fn, cfg)
    got_grads = {n: p.grad.clone() for n, p in weights.named_tensors().items()}
    for p in weights.named_tensors().values():
        p.grad = None

    ref_total = 0.0
    surrogate = 0.0
    for d, out in zip(datums, res.outputs):
        lp = _reference_lp(eng, weights, d)
        np.testing.assert_allclose(out["logprobs"], lp.detach().numpy(), atol=1e-4, rtol=1e-5)
        assert out["logprobs"].shape == np.asarray(d.inputs["target_tokens"]).shape
        val, dl_dlp = _reference(loss_fn, lp, d, cfg)
        ref_total += val
        surrogate = surrogate + (lp * dl_dlp.detach()).sum()
    surrogate.backward()
    assert res.metrics["loss:sum"] == pytest.approx(ref_total, rel=1e-4, abs=1e-3)
    for name, p in weights.named_tensors().items():
        ref = p.grad
        p.grad = None
        torch.testing.assert_close(got_grads[name], ref.float(), atol=2e-4, rtol=2e-3, msg=lambda m, n=name: f"{n}: {m}")


def test_forward_has_no_grad_and_grads_accumulate(tiny_engine, new_adapter):
    eng = tiny_engine
    aid = new_adapter(seed=5)
    params = eng._get(aid).weights.named_tensors()
    rng = np.random.default_rng(1)
    d1, d2 = _datums(rng, "cross_entropy", eng.vocab_size)[:2]
    eng.forward(aid, [d1, d2], "cross_entropy")
    assert all(p.grad is None for p in params.values())
    eng.forward_backward(aid, [d1], "cross_entropy")
    eng.forward_backward(aid, [d2], "cross_entropy")
    split = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    eng.forward_backward(aid, [d1, d2], "cross_entropy")
    for n, p in params.items():
        torch.testing.assert_close(split[n], p.grad, atol=1e-4, rtol=1e-4)
