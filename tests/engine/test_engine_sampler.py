"""Sampler: logprobs agree with the trainer, batching, stops, seeds, frozen snapshots."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from gemtinker.engine import AdamConfig, Engine, EngineError, LoraSpec, SamplingConfig, TrainDatum
from gemtinker.engine.models import TINY_MODEL_NAME


def _trainer_lp(engine, aid: str, prompt: list[int], tokens: list[int]) -> np.ndarray:
    seq = prompt + tokens
    d = TrainDatum(np.array(seq[:-1]), {"target_tokens": np.array(seq[1:])})
    return engine.forward(aid, [d], "cross_entropy").outputs[0]["logprobs"]


def _sample_concurrently(engine, jobs):
    """jobs: list of (sampler_id, prompt, n, cfg); all submitted at once from threads."""
    results: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def run(i):
        sid, prompt, n, cfg = jobs[i]
        barrier.wait()
        results[i] = engine.sample(sid, prompt, n, cfg, prompt_logprobs=True, topk_prompt_logprobs=3)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_batched_sampler_logprobs_equal_trainer(tiny_engine, new_adapter):
    eng = tiny_engine
    a, b = new_adapter(seed=11), new_adapter(rank=8, seed=12, train_unembed=False)
    zero = new_adapter(seed=13, random_b=False)  # B = 0: same as the base model
    sa, sb, base = eng.snapshot_sampler(a), eng.snapshot_sampler(b), eng.base_sampler()
    rng = np.random.default_rng(0)
    jobs = []
    for i, (sid, n_tok) in enumerate([(sa, 3), (sa, 11), (sb, 7), (base, 5), (sa, 1), (sb, 9)]):
        prompt = rng.integers(0, eng.vocab_size, n_tok).tolist()
        jobs.append((sid, prompt, 2, SamplingConfig(max_tokens=6 + i, seed=i, stop=())))
    before = eng._scheduler.batches_run
    results = _sample_concurrently(eng, jobs)
    assert eng._scheduler.batches_run - before < len(jobs)  # requests were batched together
    owner = {sa: a, sb: b, base: zero}
    for (sid, prompt, n, c), res in zip(jobs, results):
        assert len(res.sequences) == n
        for seq in res.sequences:
            assert seq.stop_reason == "length" and len(seq.tokens) == c.max_tokens
            lp = _trainer_lp(eng, owner[sid], prompt, seq.tokens)
            np.testing.assert_allclose(seq.logprobs, lp[len(prompt) - 1:], atol=1e-4, rtol=0)
        assert res.prompt_logprobs[0] is None and res.topk_prompt_logprobs[0] is None
        if len(prompt) == 1:
            assert res.prompt_logprobs == [None]
            continue
        lp = _trainer_lp(eng, owner[sid], prompt, [])
        np.testing.assert_allclose(res.prompt_logprobs[1:], lp, atol=1e-4, rtol=0)
        for i, top in enumerate(res.topk_prompt_logprobs[1:]):
            assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1] >= lp[i] - 1e-4
    for s in (sa, sb, base):
        eng.release_sampler(s)


def test_stop_tokens_strings_and_seeds(tiny_engine, new_adapter):
    eng = tiny_engine
    sid = eng.snapshot_sampler(new_adapter(seed=21))
    prompt = [5, 17, 300, 42]
    free = eng.sample(sid, prompt, 1, SamplingConfig(max_tokens=12, seed=3, stop=())).sequences[0]
    again = eng.sample(sid, prompt, 1, SamplingConfig(max_tokens=12, seed=3, stop=())).sequences[0]
    assert free.tokens == again.tokens and free.logprobs == again.logprobs  # seeded
    stop_tok = free.tokens[4]
    cut = free.tokens.index(stop_tok) + 1
    s = eng.sample(sid, prompt, 1, SamplingConfig(max_tokens=12, seed=3, stop=(stop_tok,))).sequences[0]
    assert s.stop_reason == "stop" and s.tokens == free.tokens[:cut]  # stop token included

    text = eng.tokenizer.decode(free.tokens[5:7])
    stop_str = text.strip()[:3] or text[:3]
    s = eng.sample(sid, prompt, 1, SamplingConfig(max_tokens=12, seed=3, stop=(stop_str,))).sequences[0]
    assert s.stop_reason == "stop" and stop_str in eng.tokenizer.decode(s.tokens)
    assert stop_str not in eng.tokenizer.decode(s.tokens[:-1])

    greedy = eng.sample(sid, prompt, 2, SamplingConfig(max_tokens=5, temperature=0.0, stop=())).sequences
    assert greedy[0].tokens == greedy[1].tokens
    topk1 = eng.sample(sid, prompt, 1, SamplingConfig(max_tokens=5, top_k=1, seed=9, stop=())).sequences[0]
    assert topk1.tokens == greedy[0].tokens
    nucleus = eng.sample(sid, prompt, 1, SamplingConfig(max_tokens=5, top_p=1e-6, seed=9, stop=())).sequences[0]
    assert nucleus.tokens == greedy[0].tokens
    none = eng.sample(sid, prompt, 1, SamplingConfig(max_tokens=0), prompt_logprobs=True)
    assert none.sequences[0].tokens == [] and none.sequences[0].stop_reason == "length"
    assert len(none.prompt_logprobs) == len(prompt)


def test_default_stop_is_eos(tiny_engine, new_adapter):
    eng = tiny_engine
    aid = new_adapter(seed=31)
    eos = eng.tokenizer.eos_token_id
    # Make EOS overwhelmingly likely through the unembedding LoRA bias direction.
    import torch

    w = eng._get(aid).weights
    a, b = w.tensors["lm_head"]
    with torch.no_grad():
        b.zero_()
        b[eos] = 50.0 * a.sum(dim=1).sign() / w.scale
    sid = eng.snapshot_sampler(aid)
    res = eng.sample(sid, [3, 4, 5], 3, SamplingConfig(max_tokens=8, seed=0))
    assert any(s.stop_reason == "stop" and s.tokens[-1] == eos for s in res.sequences)
    for s in res.sequences:
        assert eos not in s.tokens[:-1]


def test_snapshot_is_frozen_and_checkpoint_loads(tiny_engine, new_adapter, tmp_path):
    eng = tiny_engine
    aid = new_adapter(seed=41)
    sid = eng.snapshot_sampler(aid)
    eng.save_sampler_weights(aid, tmp_path / "sw")
    loaded = eng.load_sampler(tmp_path / "sw")
    cfg = SamplingConfig(max_tokens=6, temperature=0.0, stop=())
    first = eng.sample(sid, [9, 8, 7], 1, cfg).sequences[0]
    assert eng.sample(loaded, [9, 8, 7], 1, cfg).sequences[0] == first
    seq = [9, 8, 7] + first.tokens
    d = TrainDatum(np.array(seq[:-1]), {"target_tokens": np.array(seq[1:])})
    for _ in range(3):
        eng.forward_backward(aid, [d], "cross_entropy")
        eng.optim_step(aid, AdamConfig(learning_rate=0.05))
    assert eng.sample(sid, [9, 8, 7], 1, cfg).sequences[0] == first  # old snapshot unchanged
    newer = eng.sample(eng.snapshot_sampler(aid), [9, 8, 7], 1, cfg).sequences[0]
    assert newer.logprobs != first.logprobs
    eng.release_sampler(sid)
    with pytest.raises(EngineError, match="unknown sampler"):
        eng.sample(sid, [1], 1, cfg)


def test_training_frees_idle_sampler_memory_and_sampling_is_unchanged(tiny_engine, new_adapter):
    eng = tiny_engine
    aid = new_adapter(seed=43)
    sid = eng.snapshot_sampler(aid)
    cfg = SamplingConfig(max_tokens=6, temperature=1.0, seed=5, stop=())
    prompt = list(range(3, 40))
    first = eng.sample(sid, prompt, 2, cfg).sequences
    sched = eng._scheduler
    assert sched._batch.kv.buf is not None and len(sched.cache) > 0 and sched._batch.decoder._merged
    d = TrainDatum(np.array(prompt[:-1]), {"target_tokens": np.array(prompt[1:])})
    eng.forward_backward(aid, [d], "cross_entropy")  # the sampler is idle: its memory goes
    assert sched._batch.kv.buf is None and len(sched.cache) == 0 and not sched._batch.decoder._merged
    assert eng.sample(sid, prompt, 2, cfg).sequences == first  # rebuilt from scratch, same result


@pytest.mark.parametrize(
    "kwargs,word",
    [
        ({"prompt_tokens": []}, "non-empty"),
        ({"prompt_tokens": [1, 10**9]}, "vocabulary"),
        ({"num_samples": 0}, "num_samples"),
        ({"config": SamplingConfig(top_p=0.0)}, "top_p"),
        ({"config": SamplingConfig(stop=(10**9,))}, "stop"),
    ],
)
def test_bad_sample_requests(tiny_engine, kwargs, word):
    sid = tiny_engine.base_sampler()
    args = {"prompt_tokens": [1, 2], "num_samples": 1, "config": SamplingConfig(max_tokens=2)} | kwargs
    with pytest.raises(EngineError, match=word):
        tiny_engine.sample(sid, **args)


def test_bf16_sampler_follows_its_adapter():
    """The bf16 path (CUDA's default dtype; LoRA applied unmerged beside the bf16 base) on the CPU:
    sampler logprobs match the bf16 trainer to bf16 precision, far closer than the adapter's effect."""
    eng = Engine(TINY_MODEL_NAME, device="cpu", dtype="bfloat16")
    try:
        for aid, scale in (("lora", 0.1), ("zero", 0.0)):
            eng.create_adapter(aid, LoraSpec(rank=4, seed=0))
            gen = torch.Generator().manual_seed(7)
            with torch.no_grad():
                for _, b in eng._get(aid).weights.tensors.values():
                    b.copy_(torch.randn(b.shape, generator=gen) * scale)
        sid = eng.snapshot_sampler("lora")
        rng = np.random.default_rng(0)
        for n in (3, 12):
            prompt = rng.integers(0, eng.vocab_size, n).tolist()
            res = eng.sample(sid, prompt, 2, SamplingConfig(max_tokens=6, seed=1, stop=()))
            for seq in res.sequences:
                lp = _trainer_lp(eng, "lora", prompt, seq.tokens)[len(prompt) - 1:]
                base = _trainer_lp(eng, "zero", prompt, seq.tokens)[len(prompt) - 1:]
                assert np.abs(np.asarray(seq.logprobs) - lp).max() < 0.1
                assert np.abs(base - lp).max() > 0.3  # the tolerance is tight enough to see the adapter
    finally:
        eng.close()
