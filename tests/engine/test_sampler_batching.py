"""Continuous batching: requests join a running batch at the next token step."""

from __future__ import annotations

import threading

import numpy as np
import pytest

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


def _run_to_completion(sched, reqs) -> None:
    """Drive the scheduler's loop body in this thread (no timing: every request is queued first)."""
    sched._waiting.extend(reqs)
    for _ in range(10_000):
        if all(r.done.is_set() for r in reqs):
            return
        if sched.use_fast:
            with sched._busy:
                sched._step()
        else:
            sched._run_generic()
    raise AssertionError("scheduler did not finish")


@pytest.mark.parametrize("fast", [True, False])
def test_a_request_that_breaks_its_batch_fails_alone(tiny_engine, fast):
    """A request that gets past validation but fails inside a batch (here a seed torch refuses)
    fails by itself; its batch-mates are rerun alone and give their usual seeded results."""
    from gemtinker.engine.sampling.scheduler import SamplingScheduler, _Request

    sched = SamplingScheduler(tiny_engine)
    sched.use_fast = fast

    def req(seed: int, prompt: list[int]) -> _Request:
        return _Request("base", None, prompt, 2, SamplingConfig(max_tokens=6, seed=seed, stop=()), False, 0)

    good = [req(1, [5, 6, 7]), req(2, [5, 6, 7, 8]), req(3, [9, 10])]
    bad = req(2**64, [5, 6, 7])
    _run_to_completion(sched, [good[0], bad, good[1], good[2]])
    # They shared one batch; after it failed, each ran alone (the fast path counts admissions).
    assert sched.batches_run == 5 if fast else sched.max_requests_in_batch == 4
    assert bad.done.is_set() and "Overflow" in str(bad.error)
    assert all(r.error is None for r in good)
    alone = [req(r.cfg.seed, r.prompt) for r in good]
    for r in alone:
        _run_to_completion(sched, [r])
    for r, a in zip(good, alone):
        assert [s.tokens for s in r.result.sequences] == [s.tokens for s in a.result.sequences]
        assert len(r.result.sequences) == 2
