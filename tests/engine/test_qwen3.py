"""A tiny random Qwen3 (q/k norms; tied and untied embeddings) through the fast sampler, the
learner and export, each checked against transformers' own forward (fp32, 1e-4)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from gemtinker.engine import Engine, LoraSpec, SamplingConfig, TrainDatum
from gemtinker.engine.sampling.fast_decoder import FastDecoder
from gemtinker.engine.models import TINY_MODEL_NAME, TINY_QWEN3_NAME, make_tiny_qwen3, resolve_model
from gemtinker.engine.weights_io import read_checkpoint, write_merged, write_peft

TOL = 1e-4
# The last shares the first's start: the learner packs them as one tree (prefix-shared forward).
SEQUENCES = [[5, 17, 300, 42, 9, 1000, 7, 7, 3, 11, 12], [200, 11, 12], [4000, 3, 3, 98, 12, 6, 1, 77],
             [5, 17, 300, 42, 9, 1000, 8, 9]]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def qwen3(request, tmp_path_factory):
    """(model folder, fp32 engine); untied is the built-in `gemtinker/tiny-qwen3`."""
    if request.param:
        folder = tmp_path_factory.mktemp("qwen3") / "tied"
        make_tiny_qwen3(resolve_model(TINY_MODEL_NAME).path, folder, tie_embeddings=True)
        name = str(folder)
    else:
        name = TINY_QWEN3_NAME
        folder = resolve_model(name).path
    engine = Engine(name, device="cpu", dtype="float32")
    yield folder, engine
    engine.close()


def _hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def _hf_logprobs(model) -> list[np.ndarray]:
    out = []
    for s in SEQUENCES:
        ids = torch.tensor([s])
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        out.append(lp.gather(-1, ids[0, 1:, None])[:, 0].numpy())
    return out


def _datum(seq: list[int]) -> TrainDatum:
    toks = np.array(seq)
    return TrainDatum(toks[:-1], {"target_tokens": toks[1:], "weights": np.ones(len(seq) - 1, np.float32)})


def _close(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=TOL, rtol=0)


def test_fast_decoder_logits_match_transformers(qwen3):
    folder, engine = qwen3
    assert engine._scheduler.use_fast, engine._scheduler.fast_reason
    fd = FastDecoder(engine.model, engine.device, engine.dtype)
    hf = _hf_model(folder)
    for s in SEQUENCES:
        ids = torch.tensor([s])
        buf = fd.new_buffer(1, len(s))
        plan = fd.plan(["base"], [None])
        with torch.no_grad():
            got = fd.logits(plan, fd.forward(plan, buf, 0, ids, torch.arange(len(s))[None], len(s)))
            want = hf(input_ids=ids).logits.float()
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_sampler_learner_peft_and_merged_agree(qwen3, tmp_path):
    folder, engine = qwen3
    aid = f"qwen3-{tmp_path.name}"
    engine.create_adapter(aid, LoraSpec(rank=4, seed=0))
    try:
        base_sid = engine.base_sampler()
        base_hf = _hf_logprobs(_hf_model(folder))
        _close(_sampler_prompt_logprobs(engine, base_sid), base_hf)
        _close([o["logprobs"] for o in engine.forward(aid, [_datum(s) for s in SEQUENCES]).outputs], base_hf)

        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, b in engine._get(aid).weights.tensors.values():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
        want = [o["logprobs"] for o in engine.forward(aid, [_datum(s) for s in SEQUENCES]).outputs]
        assert max(np.abs(w - b).max() for w, b in zip(want, base_hf)) > 1e-2
        _close(_sampler_prompt_logprobs(engine, engine.snapshot_sampler(aid)), want)

        engine.save_sampler_weights(aid, tmp_path / "ckpt")
        adapter = read_checkpoint(tmp_path / "ckpt")
        write_peft(adapter, tmp_path / "peft")
        write_merged(adapter, folder, tmp_path / "merged")
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tied lm_head warning (tied case), see weights_io
            peft_model = PeftModel.from_pretrained(_hf_model(folder), str(tmp_path / "peft")).eval()
        _close(_hf_logprobs(peft_model), want)
        _close(_hf_logprobs(_hf_model(tmp_path / "merged")), want)
    finally:
        engine.remove_adapter(aid)


def _sampler_prompt_logprobs(engine, sampler_id: str) -> list[np.ndarray]:
    res = [engine.sample(sampler_id, s, 1, SamplingConfig(max_tokens=0), prompt_logprobs=True) for s in SEQUENCES]
    return [np.array(r.prompt_logprobs[1:]) for r in res]


def test_decoding_continues_a_prompt_as_transformers_greedy(qwen3):
    """Greedy tokens and their logprobs from the fast sampler (prefill + decode over the KV
    buffer) equal transformers' step by step."""
    folder, engine = qwen3
    hf = _hf_model(folder)
    prompt = SEQUENCES[0]
    res = engine.sample(engine.base_sampler(), prompt, 1, SamplingConfig(max_tokens=6, temperature=0.0))
    seq = res.sequences[0]
    ids = list(prompt)
    for tok, lp in zip(seq.tokens, seq.logprobs):
        with torch.no_grad():
            logp = torch.log_softmax(hf(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        assert tok == int(logp.argmax()) and abs(lp - float(logp[tok])) < TOL
        ids.append(tok)
