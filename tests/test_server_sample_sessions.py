"""Sampling through the SDK's session poller (`retrieve_futures`) and clients that join a sampler
by its handle (`join_sampling_session`), against the flags' off state."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from test_server_support import API_KEY, MODEL, SEQ_A, server, service_client  # noqa: F401
import tinker
from gemtinker.server import start_local
from tinker import types

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
    with start_local(models=[MODEL], root=tmp_path_factory.mktemp("plain"), client_config=off) as srv:
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
