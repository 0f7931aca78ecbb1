"""The bf16 learner (the default on CUDA and on CPUs with native bf16) follows the fp32 one.

bf16 matmuls round each product's inputs, so results differ from fp32 by noise; what must not
happen is a bias. In particular a small LoRA update (far below a bf16 ulp of the activations)
must still move the bf16 learner's logprobs as it moves the fp32 sampler's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemtinker.engine import Engine, LoraSpec, TrainDatum
from gemtinker.engine import devices
from gemtinker.engine.models import TINY_MODEL_NAME


def test_train_dtype_resolution(monkeypatch):
    cpu = torch.device("cpu")
    # auto: bf16 where the hardware has it (CUDA, CPUs with native bf16), else the model's dtype
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: True)
    assert devices.resolve_train_dtype(None, False, torch.float32, cpu) == torch.bfloat16
    assert devices.resolve_train_dtype("auto", False, torch.float32, cpu) == torch.bfloat16
    assert devices.resolve_train_dtype("float32", False, torch.float32, cpu) == torch.float32
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: False)
    assert devices.resolve_train_dtype("auto", False, torch.float32, cpu) == torch.float32
    assert devices.resolve_train_dtype("auto", False, torch.float32, torch.device("cuda")) == torch.bfloat16
    # an explicit engine dtype is followed unless a train dtype is named
    assert devices.resolve_train_dtype(None, True, torch.float32, torch.device("cuda")) == torch.float32
    assert devices.resolve_train_dtype("bfloat16", True, torch.float32, cpu) == torch.bfloat16
    with pytest.raises(Exception, match="unknown dtype"):
        devices.resolve_train_dtype("int7", False, torch.float32, cpu)


@pytest.fixture(scope="module")
def engines():
    e32 = Engine(TINY_MODEL_NAME, device="cpu", dtype="float32")
    e16 = Engine(TINY_MODEL_NAME, device="cpu", dtype="float32", train_dtype="bfloat16")
    assert e16.train_dtype == torch.bfloat16 and e32.train_dtype == torch.float32
    yield e32, e16
    e32.close()
    e16.close()


def _datums(vocab: int) -> list[TrainDatum]:
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, vocab, 24)
    out = []
    for _ in range(6):
        toks = np.concatenate([prompt, rng.integers(0, vocab, 10)])
        n = len(toks) - 1
        adv = np.zeros(n, np.float32)
        adv[23:] = rng.normal()
        out.append(TrainDatum(toks[:-1], {"target_tokens": toks[1:], "logprobs": np.full(n, -5.0, np.float32),
                                          "advantages": adv}))
    return out


def _set_adapter(eng: Engine, aid: str, b_scale: float) -> None:
    if aid in eng._adapters:
        eng.remove_adapter(aid)
    eng.create_adapter(aid, LoraSpec(rank=4, seed=11))
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for _, b in eng._get(aid).weights.tensors.values():
            b.copy_(torch.randn(b.shape, generator=gen) * b_scale)


def _logprobs(eng: Engine, aid: str, datums) -> np.ndarray:
    return np.concatenate([o["logprobs"] for o in eng.forward(aid, datums, "importance_sampling").outputs])


def test_small_lora_update_is_not_rounded_away(engines):
    """A LoRA delta of ~1e-4 relative moves fp32 logprobs measurably; bf16 must move the same way."""
    e32, e16 = engines
    datums = _datums(e32.vocab_size)
    moves = {}
    for name, eng in (("fp32", e32), ("bf16", e16)):
        _set_adapter(eng, "zero", 0.0)
        _set_adapter(eng, "small", 3e-3)
        moves[name] = _logprobs(eng, "small", datums) - _logprobs(eng, "zero", datums)
    assert np.abs(moves["fp32"]).mean() > 1e-3  # the update is visible in fp32
    # The bf16 learner sees the same update (a rounded-away delta would give ~0 and fail this).
    corr = np.corrcoef(moves["fp32"], moves["bf16"])[0, 1]
    assert corr > 0.9, corr
    assert np.abs(moves["bf16"]).mean() == pytest.approx(np.abs(moves["fp32"]).mean(), rel=0.2)


def test_bf16_gradients_follow_fp32(engines):
    e32, e16 = engines
    datums = _datums(e32.vocab_size)
    grads = {}
    for name, eng in (("fp32", e32), ("bf16", e16)):
        _set_adapter(eng, "g", 0.05)
        eng.forward_backward("g", datums, "importance_sampling")
        params = eng._get("g").weights.named_tensors()
        grads[name] = torch.cat([params[k].grad.flatten() for k in sorted(params)])
        lp = _logprobs(eng, "g", datums)
        grads[name + "_lp"] = lp
    assert any(cat == "unembed" for _, cat in e16._modules.values()) and e16._get("g").weights.spec.train_unembed
    cos = torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0)
    assert cos > 0.99, float(cos)
    assert grads["bf16"].dtype == torch.float32  # masters and their gradients stay fp32
    assert np.abs(grads["fp32_lp"] - grads["bf16_lp"]).mean() < 0.05


def test_bf16_learner_keeps_the_unembedding_in_the_model_dtype(engines):
    """Its rounding would show directly in every logprob (learner.py: the measured gaps)."""
    _, e16 = engines
    _set_adapter(e16, "u", 0.0)
    _logprobs(e16, "u", _datums(e16.vocab_size))  # a training call makes the copies
    head = e16.model.get_output_embeddings()
    assert head.low_precision_weight is None
    # only its backward (the hidden-state gradient) reads a bf16 copy
    assert head.low_precision_grad_weight is not None and head.low_precision_grad_weight.dtype == torch.bfloat16
    decoder_linears = [m for m, cat in e16._modules.values() if cat != "unembed"]
    assert decoder_linears and all(m.low_precision_weight.dtype == torch.bfloat16 for m in decoder_linears)


def test_unembedding_backward_in_bf16_leaves_its_forward_exact():
    """The unembedding's forward is the fp32 linear (`linear_fp32`), bit for bit; its input
    gradient is `grad @ weight` against the bf16 copy, within bf16 rounding of the fp32 one."""
    from gemtinker.engine.lora import _LowPrecisionInputGrad
    from gemtinker.engine.packed_linear import linear_fp32

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 64, generator=gen, requires_grad=True)
    w = torch.randn(1000, 64, generator=gen) / 8
    g = torch.randn(37, 1000, generator=gen)
    y = _LowPrecisionInputGrad.apply(x, w, None, w.to(torch.bfloat16))
    assert y.dtype == torch.float32 and torch.equal(y, linear_fp32(x.detach(), w))
    torch.testing.assert_close(y.double(), x.detach().double() @ w.double().t(), atol=1e-5, rtol=1e-5)
    y.backward(g)
    assert x.grad.dtype == torch.float32
    assert torch.equal(x.grad, (g.to(torch.bfloat16) @ w.to(torch.bfloat16)).float())
    exact = g @ w
    rel = (x.grad - exact).norm() / exact.norm()
    assert 0 < rel < 1e-2, float(rel)


def test_bf16_weight_copies_live_only_between_training_and_sampling(engines):
    """The sampler's packed weights and the learner's bf16 copies are never both kept: building
    the one drops the other, and copies made again give the same logprobs."""
    from gemtinker.engine import SamplingConfig

    _, e16 = engines
    datums = _datums(e16.vocab_size)
    _set_adapter(e16, "c", 0.05)
    decoder_linears = [m for m, cat in e16._modules.values() if cat != "unembed"]
    before = _logprobs(e16, "c", datums)
    copies = [m.low_precision_weight for m in decoder_linears]
    assert all(c is not None for c in copies)
    _logprobs(e16, "c", datums)
    assert all(m.low_precision_weight is c for m, c in zip(decoder_linears, copies))  # kept across training calls
    sid = e16.snapshot_sampler("c")
    e16.sample(sid, [1, 2, 3], 1, SamplingConfig(max_tokens=2, temperature=1.0, seed=0))
    assert all(m.low_precision_weight is None for m in decoder_linears)
    assert np.array_equal(_logprobs(e16, "c", datums), before)
    assert all(m.low_precision_weight is not None and m.low_precision_weight is not c
               for m, c in zip(decoder_linears, copies))  # made again


def test_target_logprob_backward_matches_autograd_with_shared_nodes():
    """Several entries on one node (datums that share a prefix, or N x K targets), repeated targets."""
    from gemtinker.engine.learner import target_logprob

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 11, dtype=torch.float64, generator=gen)
    node = torch.tensor([0, 0, 1, 3, 3, 3, 4])
    target = torch.tensor([2, 2, 7, 0, 5, 0, 10])
    weights = torch.randn(len(node), dtype=torch.float64, generator=gen)

    ref_in = logits.clone().requires_grad_(True)
    ref = torch.log_softmax(ref_in, dim=-1)[node, target]
    (ref * weights).sum().backward()

    ours_in = logits.clone().requires_grad_(True)
    ours = target_logprob(ours_in.clone(), node, target)  # it overwrites its input
    (ours * weights).sum().backward()
    assert torch.allclose(ours, ref.detach(), atol=1e-12)
    assert torch.allclose(ours_in.grad, ref_in.grad, atol=1e-12)
