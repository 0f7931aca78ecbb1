"""Hostile and careless clients (issue 14): one bad request harms only itself.

Each test sends a request that used to fail with a 500, a "server" error, or the failure of other
clients' requests; it checks the clear 4xx / `user` error, that good requests beside it succeed,
and that the server still serves afterwards.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
import urllib.error
import urllib.request

import pytest
import tinker
from tinker import types

from test_server_support import API_KEY, MODEL, SEQ_A, datum_ce  # noqa: F401

from gemtinker.server import start_local


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with start_local(models=[MODEL], root=tmp_path_factory.mktemp("hostile")) as s:
        yield s


@pytest.fixture(scope="module")
def sc(srv):
    c = tinker.ServiceClient(base_url=srv.base_url, api_key=API_KEY)
    yield c
    c.close("success")


@pytest.fixture(scope="module")
def tc(sc):
    return sc.create_lora_training_client(base_model=MODEL, rank=4).result()


@pytest.fixture(scope="module")
def raw_model(srv, tc):
    """A model driven by raw requests only, so they never take seq_ids of the SDK client `tc`."""
    session = tc.model_id.split(":")[0]
    body = {"session_id": session, "model_seq_id": 900, "base_model": MODEL, "lora_config": {"rank": 4}}
    return _future(srv, _post(srv, "/api/v1/create_model", body)[1])["model_id"]


@pytest.fixture(scope="module")
def sampler(sc):
    return sc.create_sampling_client(base_model=MODEL).result()


def _http(srv, method: str, path: str, body: bytes | None = None, ctype: str | None = "application/json",
          headers: dict | None = None) -> tuple[int, dict]:
    hdrs = {"X-API-Key": API_KEY, **({"Content-Type": ctype} if ctype else {}), **(headers or {})}
    req = urllib.request.Request(srv.base_url + path, data=body, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        assert raw, f"{path}: empty {e.code} body (the SDK would retry it as a network glitch)"
        return e.code, json.loads(raw)


def _post(srv, path: str, body: dict | bytes, **kw) -> tuple[int, dict]:
    return _http(srv, "POST", path, body if isinstance(body, bytes) else json.dumps(body).encode(), **kw)


def _future(srv, body_or_rid: dict | str) -> dict:
    rid = body_or_rid if isinstance(body_or_rid, str) else body_or_rid["request_id"]
    status, out = _post(srv, "/api/v1/retrieve_future", {"request_id": rid})
    assert status == 200, out
    return out


def _asample_body(sampler, seed: int | None = None, tokens: list[int] | None = None, seq_id: int = 0) -> dict:
    return {"sampling_session_id": sampler._sampling_session_id, "seq_id": seq_id, "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": tokens or [1, 2, 3]}]},
            "sampling_params": {"max_tokens": 4, "temperature": 1.0, "seed": seed}}


_seq = iter(range(10_000, 1_000_000))


def _samples_ok(sampler, n: int = 4) -> None:
    """n concurrent good SDK samples all succeed."""
    params = types.SamplingParams(max_tokens=4, temperature=1.0)
    with cf.ThreadPoolExecutor(n) as pool:
        futs = [pool.submit(lambda: sampler.sample(types.ModelInput.from_ints([5, 6, 7]), 1, params).result(timeout=120))
                for _ in range(n)]
        assert all(len(f.result().sequences) == 1 for f in futs)


# ------------------------------------------------------------------ numeric ranges
@pytest.mark.parametrize("seed", [2**64, -1, 10**30])
def test_sample_seed_outside_uint64_fails_only_its_own_request(srv, sampler, seed):
    params = types.SamplingParams(max_tokens=8, temperature=1.0)
    with cf.ThreadPoolExecutor(4) as pool:
        good = [pool.submit(lambda: sampler.sample(types.ModelInput.from_ints([5, 6, 7]), 2, params).result(timeout=120))
                for _ in range(4)]
        status, out = _post(srv, "/api/v1/asample", _asample_body(sampler, seed=seed, seq_id=next(_seq)))
        assert status == 200
        res = _future(srv, out)
        assert res["category"] == "user" and "sampling_params.seed must be an integer in 0..2**64-1" in res["error"]
        assert all(len(f.result().sequences) == 2 for f in good)
    # The largest uint64 seed is valid and reproducible.
    top = 2**64 - 1
    a = sampler.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=4, seed=top)).result()
    b = sampler.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=4, seed=top)).result()
    assert a.sequences[0].tokens == b.sequences[0].tokens


def test_prompt_token_beyond_any_integer_type_is_a_user_error(srv, sampler):
    for bad in (10**30, -1, 2**31):
        status, out = _post(srv, "/api/v1/asample", _asample_body(sampler, tokens=[1, bad, 3], seq_id=next(_seq)))
        assert status == 200
        res = _future(srv, out)
        assert res["category"] == "user" and f"token id {bad} is out of the vocabulary (0..49151; at position 1)" in res["error"], res
    _samples_ok(sampler)


def test_lora_seed_outside_uint64_is_a_user_error(srv, sc, tc):
    session = tc.model_id.split(":")[0]
    body = {"session_id": session, "model_seq_id": 500, "base_model": MODEL, "lora_config": {"rank": 4, "seed": 2**64}}
    status, out = _post(srv, "/api/v1/create_model", body)
    assert status == 200
    res = _future(srv, out)
    assert res["category"] == "user" and "lora_config.seed must be an integer in 0..2**64-1" in res["error"]
    body["lora_config"]["seed"] = 2**64 - 1
    assert _future(srv, _post(srv, "/api/v1/create_model", body)[1])["model_id"] == f"{session}:train:500"


@pytest.mark.parametrize("ttl", [1e12, -5, 0, "1d", float("inf")])
def test_checkpoint_ttl_outside_ten_years_is_refused_and_the_queue_moves_on(srv, raw_model, ttl):
    for route in ("save_weights", "save_weights_for_sampler"):
        seq = srv.service._queues[raw_model].next_seq
        status, out = _post(srv, f"/api/v1/{route}", json.dumps(
            {"model_id": raw_model, "seq_id": seq, "path": "ttl-bad", "ttl_seconds": ttl}).encode())
        assert status == 200
        res = _future(srv, out)
        assert res["category"] == "user" and "ttl_seconds must be a number of seconds in 1..315360000" in res["error"]
        # The refused op took its slot: the next one runs at once instead of waiting for a gap.
        good = {"model_id": raw_model, "seq_id": seq + 1, "path": "ttl-good", "ttl_seconds": 60, "overwrite": True}
        assert _future(srv, _post(srv, f"/api/v1/{route}", good)[1])["path"].endswith("/ttl-good")
    assert srv.service.store.get_checkpoint(f"tinker://{raw_model}/weights/ttl-bad") is None


def test_listings_survive_a_stored_absurd_ttl(srv, sc, tc):
    path = tc.save_state("ttl-ok", ttl_seconds=3600).result().path
    row = srv.service.store.get_checkpoint(path)
    assert row["expires_at"] == pytest.approx(time.time() + 3600, abs=120)
    # A row written before the TTL check existed: expires 1e12 s from now (year ~33700).
    srv.service.store.add_checkpoint(path + "x", tc.model_id, "training", "ttl-okx", row["dir"], 1, None, time.time() + 1e12)
    rest = tinker.RestClient(base_url=srv.base_url, api_key=API_KEY)
    for route in ("/api/v1/checkpoints", "/api/v1/training_runs", f"/api/v1/training_runs/{tc.model_id}/checkpoints"):
        status, out = _http(srv, "GET", route, ctype=None)
        assert status == 200, (route, out)
    listed = {c.tinker_path: c for c in rest.list_user_checkpoints().result().checkpoints}
    assert listed[path + "x"].expires_at.year == 9999
    assert rest.list_training_runs().result().training_runs


@pytest.mark.parametrize("query", ["limit=99999999999999999999999", "offset=99999999999999999999999", "limit=-1",
                                   "offset=-3", "limit=abc", "limit=100001"])
def test_listing_page_values_out_of_range_are_a_400(srv, query):
    for route in ("/api/v1/checkpoints", "/api/v1/training_runs", "/api/v1/sessions"):
        status, out = _http(srv, "GET", f"{route}?{query}", ctype=None)
        assert status == 400, (route, query, out)
        assert ("limit" in out["error"] or "offset" in out["error"]) and out["detail"] == out["error"]
        assert _http(srv, "GET", f"{route}?limit=5&offset=0", ctype=None)[0] == 200


@pytest.mark.parametrize("body", [b'{"tags": ["\\ud800"]}', b'{"tags": [], "user_metadata": {"\\uDFFF": "a"}}',
                                  b'{"tags": [], "user_metadata": {"k": "x\\udbff"}}'])
def test_lone_surrogate_in_a_json_string_is_a_400(srv, body):
    status, out = _post(srv, "/api/v1/create_session", body)
    assert status == 400 and "lone UTF-16 surrogate" in out["error"], out
    # A proper surrogate pair (an emoji) is fine, and the session lists.
    status, out = _post(srv, "/api/v1/create_session", b'{"tags": ["\\ud83d\\ude00"], "user_metadata": {}}')
    assert status == 200 and _http(srv, "GET", "/api/v1/sessions", ctype=None)[0] == 200


@pytest.mark.parametrize("name", ["x\n", "x\r", "\nx", "a\n\n"])
def test_checkpoint_name_with_a_trailing_newline_is_refused(tc, name):
    with pytest.raises(tinker.RequestFailedError, match="invalid checkpoint name"):
        tc.save_state(name).result()
    assert tc.forward_backward([datum_ce(SEQ_A)], "cross_entropy").result().metrics
