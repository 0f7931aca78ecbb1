"""Training semantics: AdamW, RL step direction, adapter isolation, validation, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gemtinker.engine import AdamConfig, EngineError, LoraSpec, TrainDatum
from gemtinker.engine.optim import AdamState, adamw_step


def _ce_datum(rng, vocab: int, n: int = 8) -> TrainDatum:
    toks = rng.integers(0, vocab, n + 1)
    return TrainDatum(toks[:-1], {"target_tokens": toks[1:], "weights": np.ones(n, np.float32)})


def _state(engine, aid):
    a = engine._get(aid)
    params = {k: v.detach().clone() for k, v in a.weights.named_tensors().items()}
    grads = {k: None if v.grad is None else v.grad.clone() for k, v in a.weights.named_tensors().items()}
    return params, grads, {k: v.clone() for k, v in a.opt.tensors().items()}, a.opt.step


def _assert_same_state(s1, s2):
    p1, g1, o1, st1 = s1
    p2, g2, o2, st2 = s2
    assert st1 == st2 and p1.keys() == p2.keys() and o1.keys() == o2.keys()
    for k in p1:
        assert torch.equal(p1[k], p2[k]), k
        assert (g1[k] is None) == (g2[k] is None) and (g1[k] is None or torch.equal(g1[k], g2[k])), k
    for k in o1:
        assert torch.equal(o1[k], o2[k]), k


def test_adamw_matches_torch():
    gen = torch.Generator().manual_seed(0)
    p_ref = torch.nn.Parameter(torch.randn(5, 3, generator=gen))
    p = {"w": torch.nn.Parameter(p_ref.detach().clone())}
    cfg = AdamConfig(learning_rate=0.01, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    opt = torch.optim.AdamW([p_ref], lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                            weight_decay=cfg.weight_decay, foreach=False)
    state = AdamState()
    for _ in range(4):
        g = torch.randn(5, 3, generator=gen)
        p_ref.grad = g.clone()
        p["w"].grad = g.clone()
        opt.step()
        adamw_step(p, state, cfg)
        assert p["w"].grad is None
    torch.testing.assert_close(p["w"].detach(), p_ref.detach(), atol=1e-6, rtol=1e-6)


def test_grad_clip_reports_norm(tiny_engine, new_adapter):
    aid = new_adapter(seed=1)
    rng = np.random.default_rng(0)
    tiny_engine.forward_backward(aid, [_ce_datum(rng, tiny_engine.vocab_size)], "cross_entropy")
    m = tiny_engine.optim_step(aid, AdamConfig(learning_rate=1e-3, grad_clip_norm=1e-3))
    assert m["grad_norm"] > 1e-3 and m["grad_clip_scale"] < 1
    assert all(p.grad is None for p in tiny_engine._get(aid).weights.parameters())


def test_importance_sampling_raises_logprobs_of_positive_advantages(tiny_engine, new_adapter):
    eng = tiny_engine
    aid = new_adapter(seed=2)
    rng = np.random.default_rng(3)
    toks = rng.integers(0, eng.vocab_size, 10)
    targets = rng.integers(0, eng.vocab_size, 10)
    probe = TrainDatum(toks, {"target_tokens": targets})
    before = eng.forward(aid, [probe], "cross_entropy").outputs[0]["logprobs"]
    adv = np.zeros(10, np.float32)
    adv[5:] = 1.0  # only the last five tokens are rewarded
    d = TrainDatum(toks, {"target_tokens": targets, "logprobs": before.astype(np.float32), "advantages": adv})
    res = eng.forward_backward(aid, [d], "importance_sampling")
    assert res.metrics["loss:sum"] == pytest.approx(-5.0, abs=1e-3)  # ratios start at 1
    eng.optim_step(aid, AdamConfig(learning_rate=1e-3))
    after = eng.forward(aid, [probe], "cross_entropy").outputs[0]["logprobs"]
    assert np.all(after[5:] > before[5:])


def test_two_adapters_do_not_disturb_each_other(tiny_engine, new_adapter):
    eng = tiny_engine
    a, b = new_adapter(seed=4), new_adapter(rank=8, seed=5, train_mlp=False)
    rng = np.random.default_rng(4)
    data = [_ce_datum(rng, eng.vocab_size) for _ in range(2)]
    b_before = _state(eng, b)
    b_out = eng.forward(b, data, "cross_entropy").outputs
    a_out = eng.forward(a, data, "cross_entropy").outputs
    eng.forward_backward(a, data, "cross_entropy")
    eng.optim_step(a, AdamConfig(learning_rate=1e-2))
    _assert_same_state(b_before, _state(eng, b))
    for o1, o2 in zip(b_out, eng.forward(b, data, "cross_entropy").outputs):
        np.testing.assert_array_equal(o1["logprobs"], o2["logprobs"])
    assert not np.allclose(a_out[0]["logprobs"], eng.forward(a, data, "cross_entropy").outputs[0]["logprobs"])
    assert eng.adapter_info(b).lora.rank == 8


def _bad_datums(vocab: int):
    ok = np.arange(4)
    return [
        ("target_tokens", TrainDatum(ok, {"target_tokens": np.arange(3)}), "cross_entropy"),
        ("vocabulary", TrainDatum(ok, {"target_tokens": np.array([0, 1, 2, vocab])}), "cross_entropy"),
        ("model_input", TrainDatum(np.array([0, -1, 2, 3]), {"target_tokens": ok}), "cross_entropy"),
        ("NaN", TrainDatum(ok, {"target_tokens": ok, "weights": np.array([1, np.nan, 1, 1])}), "cross_entropy"),
        ("advantages", TrainDatum(ok, {"target_tokens": ok, "logprobs": np.zeros(4)}), "importance_sampling"),
        ("unknown loss_fn", TrainDatum(ok, {"target_tokens": ok}), "nope"),
        ("'mask'", TrainDatum(ok, {"target_tokens": ok, "mask": np.ones(4)}), "cross_entropy"),
        ("shape", TrainDatum(ok, {"target_tokens": ok, "logprobs": np.zeros(3), "advantages": np.zeros(4)}), "ppo"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_bad_datums_rejected_state_unchanged(tiny_engine, new_adapter, case):
    eng = tiny_engine
    aid = new_adapter(seed=6)
    rng = np.random.default_rng(5)
    good = _ce_datum(rng, eng.vocab_size)
    eng.forward_backward(aid, [good], "cross_entropy")  # some accumulated grads to protect
    before = _state(eng, aid)
    word, bad, loss_fn = _bad_datums(eng.vocab_size)[case]
    if loss_fn in ("importance_sampling", "ppo"):  # a datum that is valid for this loss
        n = len(good.tokens)
        good = TrainDatum(good.tokens, {"target_tokens": good.inputs["target_tokens"],
                                        "logprobs": np.zeros(n), "advantages": np.ones(n)})
    batch = [good, bad]
    with pytest.raises(EngineError) as ei:
        eng.forward_backward(aid, batch, loss_fn)
    msg = str(ei.value)
    assert word in msg
    if loss_fn != "nope":
        assert "datum 1" in msg
    _assert_same_state(before, _state(eng, aid))


def test_config_and_adapter_errors(tiny_engine, new_adapter):
    eng = tiny_engine
    aid = new_adapter(seed=7)
    d = _ce_datum(np.random.default_rng(0), eng.vocab_size)
    with pytest.raises(EngineError, match="unknown adapter"):
        eng.forward_backward("no-such-adapter", [d], "cross_entropy")
    with pytest.raises(EngineError, match="clip_lo"):
        eng.forward(aid, [d], "cross_entropy", {"clip_lo": 1})
    with pytest.raises(EngineError, match="learning_rate"):
        eng.optim_step(aid, AdamConfig(learning_rate=float("nan")))
    with pytest.raises(EngineError, match="already exists"):
        eng.create_adapter(aid, LoraSpec(rank=2))


def test_checkpoint_round_trip_bit_for_bit(tiny_engine, new_adapter, tmp_path):
    eng = tiny_engine
    aid = new_adapter(seed=8)
    rng = np.random.default_rng(6)
    data = [_ce_datum(rng, eng.vocab_size) for _ in range(2)]
    adam = AdamConfig(learning_rate=1e-3, weight_decay=0.01)
    for _ in range(2):
        eng.forward_backward(aid, data, "cross_entropy")
        eng.optim_step(aid, adam)
    eng.save_state(aid, tmp_path / "ckpt", metadata={"renderer_name": "x"})
    meta = eng.read_checkpoint_metadata(tmp_path / "ckpt")
    assert meta["step"] == 2 and meta["lora"]["rank"] == 4 and meta["metadata"]["renderer_name"] == "x"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left

    clone = f"{aid}-clone"
    info = eng.load_state(clone, tmp_path / "ckpt", with_optimizer=True)
    try:
        assert info.lora == eng.adapter_info(aid).lora
        _assert_same_state(_state(eng, aid), _state(eng, clone))
        for x in (aid, clone):  # training continues identically
            eng.forward_backward(x, data, "cross_entropy")
            eng.optim_step(x, adam)
        _assert_same_state(_state(eng, aid), _state(eng, clone))
    finally:
        eng.remove_adapter(clone)

    fresh = f"{aid}-weights-only"
    eng.load_state(fresh, tmp_path / "ckpt", with_optimizer=False)
    try:
        assert eng._get(fresh).opt.step == 0 and not eng._get(fresh).opt.tensors()
    finally:
        eng.remove_adapter(fresh)


def test_checkpoint_corruption_and_overwrite(tiny_engine, new_adapter, tmp_path):
    eng = tiny_engine
    aid = new_adapter(seed=9)
    path = tmp_path / "c"
    eng.save_state(aid, path)
    eng.save_state(aid, path)  # overwriting an existing checkpoint works
    eng.save_sampler_weights(aid, tmp_path / "s")
    with pytest.raises(EngineError, match="no optimizer state"):
        eng.load_state("x-never", tmp_path / "s", with_optimizer=True)
    with pytest.raises(EngineError, match="no checkpoint"):
        eng.load_state("x-never", tmp_path / "missing", with_optimizer=False)
    blob = bytearray((path / "adapter.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (path / "adapter.safetensors").write_bytes(bytes(blob))
    with pytest.raises(EngineError, match="corrupted"):
        eng.load_state("x-never", path, with_optimizer=False)
    meta = json.loads((path / "metadata.json").read_text())
    meta["base_model"] = "other/model"
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(EngineError, match="base model"):
        eng.load_state("x-never", path, with_optimizer=False)
    with pytest.raises(EngineError):
        eng.adapter_info("x-never")
