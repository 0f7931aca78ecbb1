"""Sampling through the SDK's session poller (`retrieve_futures`) and clients that join a sampler
by its handle (`join_sampling_session`), against the flags' off state."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from support.server import API_KEY, MODEL, SEQ_A
import tinker
from gemtinker.server import start_local
from tinker import types

pytestmark = pytest.mark.integration  # a real (tiny) torch engine behind HTTP, or a server subprocess: `make test` only

PARAMS = types.SamplingParams(max_tokens=8, temperature=1.0, seed=7)
PROMPT = types.ModelInput.from_ints(SEQ_A[:5])


def _stats(server) -> dict:
    req = urllib.request.Request(f"{server.base_url}/api/v1/server_stats", headers={"X-API-Key": API_KEY})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _samples(sampler, n: int = 3) -> list[list[int]]:
    res = sampler.sample(PROMPT, num_samples=n, sampling_params=PARAMS).result()
    return [s.tokens for s in res.sequences]


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    """A server that advertises neither flag: the SDK polls retrieve_future per request."""
    off = {"sample_use_retrieve_futures": False, "sample_join_sampling_session": False}
    # A short long poll keeps the type-confusion test below quick.
    with start_local(models=[MODEL], root=tmp_path_factory.mktemp("plain"), client_config=off,
                     long_poll_s=1.0) as srv:
        yield srv


def test_sampling_uses_retrieve_futures_and_gives_the_same_samples(server, service_client, plain_server):
    assert service_client.holder.get_client_config().sample_use_retrieve_futures
    polls = _stats(server)["retrieve_futures_polls"]
    sampler = service_client.create_sampling_client(base_model=MODEL).result()
    got = [_samples(sampler) for _ in range(2)]
    assert _stats(server)["retrieve_futures_polls"] > polls
    # several at once, each woken by the one poll loop
    futs = [sampler.sample(PROMPT, num_samples=1, sampling_params=PARAMS) for _ in range(4)]
    assert all(f.result().sequences[0].tokens == got[0][0] for f in futs)

    plain = tinker.ServiceClient(base_url=plain_server.base_url, api_key=API_KEY)
    try:
        assert not plain.holder.get_client_config().sample_use_retrieve_futures
        want = _samples(plain.create_sampling_client(base_model=MODEL).result())
        assert _stats(plain_server)["retrieve_futures_polls"] == 0
    finally:
        plain.close("success")
    assert got == [want, want]


def test_a_failed_sample_is_reported_through_the_poller(service_client):
    sampler = service_client.create_sampling_client(base_model=MODEL).result()
    with pytest.raises(tinker.RequestFailedError, match="num_samples must be an integer"):
        sampler.sample(PROMPT, num_samples=10_000, sampling_params=PARAMS).result()
    assert len(_samples(sampler, 1)) == 1  # the poller keeps working


def test_from_sampler_handle_joins_the_session(server, service_client):
    tc = service_client.create_lora_training_client(base_model=MODEL, rank=4, seed=2).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    handle = sampler.get_sampler_handle()
    joins = _stats(server)["sampling_session_joins"]
    first = tinker.SamplingClient.from_sampler_handle(handle, api_key=API_KEY)
    second = tinker.SamplingClient.from_sampler_handle(handle, api_key=API_KEY)
    want = _samples(sampler)
    assert _samples(first) == want and _samples(second) == want
    assert _stats(server)["sampling_session_joins"] == joins + 2
    ids = {first._cloned_sampler_id, second._cloned_sampler_id}
    assert len(ids) == 2 and 0 not in ids  # each joined client has its own id, never the creator's


def test_join_an_unknown_sampler_is_a_404(server):
    req = urllib.request.Request(f"{server.base_url}/api/v1/join_sampling_session",
                                 data=json.dumps({"sampling_session_id": "nope:sample:0"}).encode(),
                                 headers={"Content-Type": "application/json", "X-API-Key": API_KEY})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 404 and "unknown sampler" in e.value.read().decode()


def test_retrieve_futures_refuses_a_bad_target(server):
    req = urllib.request.Request(f"{server.base_url}/api/v1/retrieve_futures",
                                 data=json.dumps({"target": {"type": "model"}, "prev_cursor": 0}).encode(),
                                 headers={"Content-Type": "application/json", "X-API-Key": API_KEY})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400 and "sampling_session" in e.value.read().decode()


WEIRD = [None, True, -1, 2**70, 1e308, "x", "../../etc", [], [1, "a"], {}, {"type": {"a": []}}]


def test_type_confused_fields_never_make_a_5xx(plain_server):
    sc = tinker.ServiceClient(base_url=plain_server.base_url, api_key=API_KEY)
    try:
        sid = sc.create_sampling_client(base_model=MODEL).result()._sampling_session_id
    finally:
        sc.close("success")
    good = {
        "retrieve_futures": {"target": {"type": "sampling_session", "sampling_session_id": sid, "cloned_sampler_id": 0},
                             "prev_cursor": 0, "timeout": 0, "retrieved_request_ids": []},
        "join_sampling_session": {"sampling_session_id": sid},
    }
    failures = []
    for endpoint, body in good.items():
        mutations = [{**body, key: weird} for key in body for weird in WEIRD]
        if endpoint == "retrieve_futures":
            mutations += [{**body, "target": {**body["target"], key: weird}} for key in body["target"] for weird in WEIRD]
        for mutated in mutations:
            req = urllib.request.Request(f"{plain_server.base_url}/api/v1/{endpoint}", data=json.dumps(mutated).encode(),
                                         headers={"Content-Type": "application/json", "X-API-Key": API_KEY})
            try:
                urllib.request.urlopen(req, timeout=30).read()
            except urllib.error.HTTPError as e:
                if e.code >= 500:
                    failures.append(f"{endpoint} {mutated}: HTTP {e.code} {e.read()[:200]!r}")
    assert not failures, "\n".join(failures)


def test_completion_queue_cursors(tmp_path, monkeypatch):
    """The queue semantics without a server: acknowledged completions go, cursors only grow."""
    import asyncio

    from support.waiting import async_wait_until, settle

    from gemtinker.server import sample_sessions
    from gemtinker.server.futures import FutureTable, Result
    from gemtinker.server.store import Store

    def reported(sessions) -> bool:  # every watched request is on its queue
        return all(log.pending == 0 for log in sessions._logs.values())

    async def go() -> None:
        futures = FutureTable(Store(tmp_path / "s.db"))
        q = sample_sessions.SampleSessions(futures, long_poll_s=30)
        target = {"sampling_session_id": "s:sample:0", "cloned_sampler_id": 0}
        a, b, c = futures.new(), futures.new(), futures.new()
        q.watch("s:sample:0", 5, a)
        q.watch("s:sample:0", 6, b)
        q.watch("s:sample:0", 1_000_000_007, c)  # clone 1: another queue
        futures.resolve(a, Result.proto(b"12345"))
        futures.resolve(b, Result.error("no"))
        futures.resolve(c, Result.proto(b"x"))
        await async_wait_until(lambda: reported(q), "the finished requests reached their queues")
        got = await q.retrieve({"target": target, "prev_cursor": 0})
        assert [(x["request_id"], x["state"]) for x in got["completions"]] == [(a, "finished"), (b, "failed")]
        assert got["completions"][0]["response_payload_uncompressed_size"] == 5
        again = await q.retrieve({"target": target, "prev_cursor": got["cursor"], "timeout": 0})
        assert again == {"completions": [], "cursor": got["cursor"]}
        clone = await q.retrieve({"target": {**target, "cloned_sampler_id": 1}, "prev_cursor": 0})
        assert [x["request_id"] for x in clone["completions"]] == [c]
        # a long poll wakes when a sample finishes
        d = futures.new()
        q.watch("s:sample:0", 8, d)
        polls = q.polls
        poll = asyncio.ensure_future(q.retrieve({"target": target, "prev_cursor": got["cursor"], "timeout": 5}))
        await async_wait_until(lambda: q.polls > polls, "the long poll started")
        await settle()
        assert not poll.done()  # it waits for a completion
        futures.resolve(d, Result.proto(b"y"))
        woke = await asyncio.wait_for(poll, 10)
        assert [x["request_id"] for x in woke["completions"]] == [d] and woke["cursor"] > got["cursor"]
        # a queue dropped while idle and made again never reuses a cursor its client passed
        monkeypatch.setattr(sample_sessions, "IDLE_LOG_S", -1.0)
        q.purge()
        e = futures.new()
        q.watch("s:sample:0", 9, e)
        futures.resolve(e, Result.proto(b"z"))
        await async_wait_until(lambda: reported(q), "the finished requests reached their queues")
        late = await q.retrieve({"target": target, "prev_cursor": woke["cursor"], "timeout": 0})
        assert [x["request_id"] for x in late["completions"]] == [e]
        # a queue with a request still running is kept, however long it was idle
        g = futures.new()
        q.watch("s:sample:0", 11, g)
        q.purge()
        assert ("s:sample:0", 0) in q._logs
        futures.resolve(g, Result.proto(b"v"))
        await async_wait_until(lambda: reported(q), "the finished requests reached their queues")
        kept = await q.retrieve({"target": target, "prev_cursor": late["cursor"], "timeout": 0})
        assert [x["request_id"] for x in kept["completions"]] == [g]
        # a restarted server's cursors are above every cursor of the run before
        again = sample_sessions.SampleSessions(futures, long_poll_s=0.2)
        f = futures.new()
        again.watch("s:sample:0", 10, f)
        futures.resolve(f, Result.proto(b"w"))
        await async_wait_until(lambda: reported(again), "the restarted queue reported")
        after = await again.retrieve({"target": target, "prev_cursor": late["cursor"], "timeout": 0})
        assert [x["request_id"] for x in after["completions"]] == [f]
        # polling an id nothing was sampled on makes no queue
        await q.retrieve({"target": {**target, "sampling_session_id": "made-up"}, "prev_cursor": 0, "timeout": 0})
        assert ("made-up", 0) not in q._logs
        assert q.join("s:sample:0")["client_counter"] + 1 == q.join("s:sample:0")["client_counter"]

    asyncio.run(go())
