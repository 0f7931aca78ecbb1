"""Continuous batching: requests join a running batch at the next token step."""

from __future__ import annotations

import threading

import numpy as np

from gemtinker.engine import Engine, SamplingConfig, TrainDatum
from gemtinker.engine.models import TINY_MODEL_NAME


def _trainer_lp(engine, aid, prompt, tokens):
    seq = prompt + tokens
    d = TrainDatum(np.array(seq[:-1]), {"target_tokens": np.array(seq[1:])})
    return engine.forward(aid, [d], "cross_entropy").outputs[0]["logprobs"][len(prompt) - 1:]


def test_request_joins_running_batch(tiny_engine, new_adapter):
    """A short request submitted mid-decode finishes while a long one is still decoding.

    The newcomer uses other weights, so the merged batch runs per-row LoRA."""
    eng = tiny_engine
    aid, other = new_adapter(seed=55), new_adapter(seed=57, rank=8)
    sid, sid_other = eng.snapshot_sampler(aid), eng.snapshot_sampler(other)
    sched = eng._scheduler
    long_done = threading.Event()
    long_res: list = []

    def long_run():
        long_res.append(eng.sample(sid, [1, 2, 3], 1, SamplingConfig(max_tokens=800, seed=0, stop=())))
        long_done.set()

    start_steps = sched.stats["decode_steps"]
    th = threading.Thread(target=long_run)
    th.start()
    while sched.stats["decode_steps"] < start_steps + 20:  # the long request is decoding
        threading.Event().wait(0.005)
    prompt = [40, 41, 42, 43, 44]
    short = eng.sample(sid_other, prompt, 2, SamplingConfig(max_tokens=5, seed=1, stop=()))
    assert not long_done.is_set(), "the short request waited for the long batch"
    th.join()
    long_seq = long_res[0].sequences[0]
    assert len(long_seq.tokens) == 800
    np.testing.assert_allclose(long_seq.logprobs, _trainer_lp(eng, aid, [1, 2, 3], long_seq.tokens), atol=1e-4, rtol=0)
    for seq in short.sequences:
        np.testing.assert_allclose(seq.logprobs, _trainer_lp(eng, other, prompt, seq.tokens), atol=1e-4, rtol=0)
    eng.release_sampler(sid)
    eng.release_sampler(sid_other)


def test_generic_path_still_matches_trainer(new_adapter, tiny_engine, tmp_path):
    eng = Engine(TINY_MODEL_NAME, device="cpu", dtype="float32")
    eng._scheduler.use_fast = False  # the HF-decoder fallback for unknown architectures
    try:
        aid = new_adapter(seed=56)
        tiny_engine.save_sampler_weights(aid, tmp_path / "w")
        sid = eng.load_sampler(tmp_path / "w")
        prompt = [3, 9, 27, 81]
        res = eng.sample(sid, prompt, 2, SamplingConfig(max_tokens=6, seed=0, stop=()))
        for seq in res.sequences:
            np.testing.assert_allclose(seq.logprobs, _trainer_lp(tiny_engine, aid, prompt, seq.tokens), atol=1e-4)
    finally:
        eng.close()
