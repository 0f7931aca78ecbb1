"""Prefix KV cache: the cache changes no number.

Each case samples on the shared tiny engine (cache on) and on a second engine with the cache off
that loads the very same sampler weights, then checks: same tokens, logprobs equal to float
rounding (1e-5; K/V computed in a differently shaped forward round differently in the last bit),
and logprobs equal to the trainer's within the usual 1e-4.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from gemtinker.engine import AdamConfig, Engine, SamplingConfig, TrainDatum
from gemtinker.engine.models import TINY_MODEL_NAME
from gemtinker.engine.sampling.prefix_cache import PrefixCache

GREEDY = SamplingConfig(max_tokens=8, temperature=0.0, stop=())


@pytest.fixture(scope="module")
def nocache_engine():
    eng = Engine(TINY_MODEL_NAME, device="cpu", dtype="float32", prefix_cache=False)
    yield eng
    eng.close()


def _twin(eng, other, aid, tmp_path, name="w"):
    """Sampler ids for adapter `aid` on `eng` and for the same weights loaded into `other`."""
    eng.save_sampler_weights(aid, tmp_path / name)
    return eng.snapshot_sampler(aid), other.load_sampler(tmp_path / name)


def _trainer_lp(engine, aid, prompt, tokens):
    seq = prompt + tokens
    d = TrainDatum(np.array(seq[:-1]), {"target_tokens": np.array(seq[1:])})
    return engine.forward(aid, [d], "cross_entropy").outputs[0]["logprobs"][len(prompt) - 1:]


def _same(a, b):
    assert len(a.sequences) == len(b.sequences)
    for x, y in zip(a.sequences, b.sequences):
        assert x.tokens == y.tokens and x.stop_reason == y.stop_reason
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5, rtol=0)


def test_multi_turn_extension_reuses_cache_and_changes_nothing(tiny_engine, nocache_engine, new_adapter, tmp_path):
    eng = tiny_engine
    aid = new_adapter(seed=51)
    sid, sid_off = _twin(eng, nocache_engine, aid, tmp_path)
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, eng.vocab_size, 20).tolist()
    for turn, cfg in enumerate([GREEDY, SamplingConfig(max_tokens=8, seed=5, stop=())] * 2):
        before = dict(eng.sampler_stats())
        on = eng.sample(sid, prompt, 1, cfg)
        off = nocache_engine.sample(sid_off, prompt, 1, cfg)
        _same(on, off)
        assert off.prompt_cache_hit_tokens == 0
        seq = on.sequences[0]
        np.testing.assert_allclose(seq.logprobs, _trainer_lp(eng, aid, prompt, seq.tokens), atol=1e-4, rtol=0)
        if turn:
            # The previous prompt and all but the last sampled token were cached.
            assert on.prompt_cache_hit_tokens == len(prompt) - 4 - 1
            stats = eng.sampler_stats()
            # Only the last sampled token (never fed back) and the observation but its last token.
            assert stats["prefill_tokens"] - before["prefill_tokens"] == 4
        prompt = prompt + seq.tokens + rng.integers(0, eng.vocab_size, 4).tolist()  # + "observation"
    eng.release_sampler(sid)


def test_shared_prompt_is_prefilled_once(tiny_engine, nocache_engine, new_adapter, tmp_path):
    eng = tiny_engine
    aid = new_adapter(seed=52)
    sid, sid_off = _twin(eng, nocache_engine, aid, tmp_path)
    prompt = np.random.default_rng(2).integers(0, eng.vocab_size, 30).tolist()
    cfgs = [SamplingConfig(max_tokens=6, seed=s, stop=()) for s in range(4)]
    before = eng.sampler_stats()["prefill_tokens"]
    results: list = [None] * 4
    barrier = threading.Barrier(4)

    def run(i):
        barrier.wait()
        results[i] = eng.sample(sid, prompt, 3, cfgs[i])  # 4 concurrent requests x 3 samples

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 12 continuations, one prefill of the prompt (all but its last token, which each row feeds).
    assert eng.sampler_stats()["prefill_tokens"] - before == len(prompt) - 1
    # Requests admitted with the first count the whole prompt as a hit; one that arrives after
    # that admission (a busy CI machine can delay a thread past the gather window) finds the
    # cached prefill, all but the last token. Either way nothing was prefilled twice (above).
    assert all(h >= len(prompt) - 1 for h in sorted(r.prompt_cache_hit_tokens for r in results)[1:])
    for cfg, res in zip(cfgs, results):
        _same(res, nocache_engine.sample(sid_off, prompt, 3, cfg))
    again = eng.sample(sid, prompt, 2, GREEDY)  # later request: served by the cache
    assert again.prompt_cache_hit_tokens == len(prompt) - 1
    _same(again, nocache_engine.sample(sid_off, prompt, 2, GREEDY))
    eng.release_sampler(sid)


def test_common_start_of_different_prompts_is_prefilled_once(tiny_engine, nocache_engine, new_adapter, tmp_path):
    """Concurrent prompts that differ but share a long start (a system prompt, env instructions)."""
    eng = tiny_engine
    aid = new_adapter(seed=53)
    sid, sid_off = _twin(eng, nocache_engine, aid, tmp_path)
    rng = np.random.default_rng(3)
    start = rng.integers(0, eng.vocab_size, 24).tolist()
    prompts = [start + rng.integers(0, eng.vocab_size, n).tolist() for n in (3, 5, 8)]
    other = rng.integers(0, eng.vocab_size, 30).tolist()  # shares nothing: prefilled alone
    cfgs = [SamplingConfig(max_tokens=5, seed=s, stop=()) for s in range(4)]
    before = dict(eng.sampler_stats())
    results: list = [None] * 4
    barrier = threading.Barrier(4)

    def run(i):
        barrier.wait()
        results[i] = eng.sample(sid, (prompts + [other])[i], 2, cfgs[i])

    sched = eng._scheduler
    old_gather, sched.gather_seconds = sched.gather_seconds, 0.5  # all four in one admission round
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sched.gather_seconds = old_gather
    stats = eng.sampler_stats()
    assert stats["shared_start_tokens"] - before["shared_start_tokens"] == len(start)
    own = sum(len(p) - 1 - len(start) for p in prompts) + len(other) - 1
    assert stats["prefill_tokens"] - before["prefill_tokens"] == len(start) + own
    assert [r.prompt_cache_hit_tokens for r in results] == [len(start)] * 3 + [0]
    for p, cfg, res in zip(prompts + [other], cfgs, results):
        _same(res, nocache_engine.sample(sid_off, p, 2, cfg))
        for seq in res.sequences:
            np.testing.assert_allclose(seq.logprobs, _trainer_lp(eng, aid, p, seq.tokens), atol=1e-4, rtol=0)
    eng.release_sampler(sid)


def test_eviction_keeps_budget_and_results(nocache_engine, new_adapter, tiny_engine, tmp_path):
    small = Engine(TINY_MODEL_NAME, device="cpu", dtype="float32", prefix_cache_tokens=100)
    try:
        aid = new_adapter(seed=53)
        tiny_engine.save_sampler_weights(aid, tmp_path / "w")
        sid, sid_off = small.load_sampler(tmp_path / "w"), nocache_engine.load_sampler(tmp_path / "w")
        rng = np.random.default_rng(3)
        convs = [rng.integers(0, small.vocab_size, 15).tolist() for _ in range(4)]
        for _ in range(3):  # turns, conversations interleaved so older ones get evicted
            for i, p in enumerate(convs):
                on = small.sample(sid, p, 1, GREEDY)
                _same(on, nocache_engine.sample(sid_off, p, 1, GREEDY))
                assert small._scheduler.cache.tokens <= 100
                convs[i] = p + on.sequences[0].tokens + [7, 8]
        stats = small.sampler_stats()
        assert stats["cache_evictions"] > 0 and stats["cache_hit_tokens"] > 0
    finally:
        small.close()


def test_new_weights_never_reuse_stale_entries(tiny_engine, new_adapter):
    eng = tiny_engine
    aid = new_adapter(seed=54)
    old = eng.snapshot_sampler(aid)
    prompt = np.random.default_rng(4).integers(0, eng.vocab_size, 25).tolist()
    first = eng.sample(old, prompt, 1, GREEDY)
    assert eng.sample(old, prompt, 1, GREEDY).prompt_cache_hit_tokens == len(prompt) - 1
    d = TrainDatum(np.array(prompt[:-1]), {"target_tokens": np.array(prompt[1:])})
    for _ in range(2):
        eng.forward_backward(aid, [d], "cross_entropy")
        eng.optim_step(aid, AdamConfig(learning_rate=0.05))
    new = eng.snapshot_sampler(aid)
    res = eng.sample(new, prompt, 1, GREEDY)
    assert res.prompt_cache_hit_tokens == 0
    seq = res.sequences[0]
    np.testing.assert_allclose(seq.logprobs, _trainer_lp(eng, aid, prompt, seq.tokens), atol=1e-4, rtol=0)
    assert not np.allclose(seq.logprobs, first.sequences[0].logprobs[: len(seq.logprobs)], atol=1e-3)
    cache = eng._scheduler.cache
    assert old not in cache._by_key  # training freed the idle sampler's cache
    assert eng.sample(old, prompt, 1, GREEDY).sequences == first.sequences
    assert old in cache._by_key
    eng.release_sampler(old)
    assert old not in cache._by_key and new in cache._by_key
    eng.release_sampler(new)


def test_prefix_cache_unit():
    c = PrefixCache(max_tokens=10)
    kv = lambda n: torch.zeros(1, 2, 1, n, 1)  # noqa: E731
    c.insert("s", [1, 2, 3], kv(3))
    c.insert("s", [1, 2, 3, 4, 5], kv(5))  # subsumes [1, 2, 3]
    assert len(c) == 1 and c.tokens == 5
    c.insert("s", [1, 2], kv(2))  # already covered
    assert len(c) == 1
    e, n = c.lookup("s", [1, 2, 3, 9])
    assert n == 3 and list(e.tokens) == [1, 2, 3, 4, 5]
    assert c.lookup("t", [1, 2, 3])[1] == 0  # other weights: nothing
    c.insert("t", [7, 7, 7, 7], kv(4))
    c.lookup("s", [1])  # touch "s": "t" is now least recently used
    c.insert("s", [6, 6, 6], kv(3))  # 12 > 10 tokens: evict LRU
    assert c.tokens <= 10 and c.evictions == 1 and c.lookup("t", [7])[1] == 0
    c.drop_key("s")
    assert len(c) == 0 and c.tokens == 0
