"""Hostile and careless clients (issue 14): one bad request harms only itself.

Each test sends a request that used to fail with a 500, a "server" error, or the failure of other
clients' requests; it checks the clear 4xx / `user` error, that good requests beside it succeed,
and that the server still serves afterwards.
"""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tinker
from tinker import types

from support.server import API_KEY, MODEL, SEQ_A, datum_ce  # noqa: F401

from gemtinker.server import start_local


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with start_local(models=[MODEL], root=tmp_path_factory.mktemp("hostile")) as s:
        yield s


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


# ------------------------------------------------------------------ protobuf tensors
def _fb_body(model_id: str, seq_id: int, tokens: bytes = b"\1\0\0\0\2\0\0\0", weights=None) -> bytes:
    """A cross_entropy ForwardBackwardRequest of one datum; `weights(t)` fills in a pb.Tensor."""
    from tinker.proto import tinker_public_pb2 as pb

    msg = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy")
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = tokens
    n = len(tokens) // 4
    tgt = d.loss_fn_inputs["target_tokens"]
    tgt.dtype, tgt.dense = pb.DTYPE_INT64, np.arange(1, n + 1, dtype=np.int64).tobytes()
    tgt.shape.extend([n])
    w = d.loss_fn_inputs["weights"]
    w.dtype = pb.DTYPE_FLOAT32
    if weights is None:
        w.dense = np.ones(n, np.float32).tobytes()
        w.shape.extend([n])
    else:
        weights(w)
    return msg.SerializeToString()


def _dense(data: bytes, shape: list[int]):
    def fill(t) -> None:
        t.dense = data
        t.shape.extend(shape)
    return fill


def _sparse(shape: list[int], crow: list[int], col: list[int], vals: bytes):
    def fill(t) -> None:
        t.shape.extend(shape)
        t.sparse_csr.crow_indices = np.asarray(crow, np.int64).tobytes()
        t.sparse_csr.col_indices = np.asarray(col, np.int64).tobytes()
        t.sparse_csr.values = vals
    return fill


def _fb(srv, body: bytes) -> tuple[int, dict]:
    return _post(srv, "/api/v1/forward_backward", body, ctype="application/x-protobuf")


BAD_TENSORS = {
    "tokens of 5 bytes": (dict(tokens=b"\1\0\0\0\2"), "model_input tokens: 5 bytes is not a whole number of 4-byte elements"),
    "dense of 7 bytes": (dict(weights=_dense(b"\0" * 7, [2])), "7 bytes is not a whole number of 4-byte elements"),
    "dense shape mismatch": (dict(weights=_dense(b"\0" * 8, [3])), "2 values do not fit shape [3]"),
    "negative shape": (dict(weights=_sparse([-1, 2], [0], [], b"")), "negative dimension in shape [-1, 2]"),
    "absurd sparse shape": (dict(weights=_sparse([1, 250_000_000], [0, 1], [0], b"\0\0\x80\x3f")),
                            "decoded tensors to 1000000032 bytes, more than this server's limit of 268435456"),
    "non-monotone crow": (dict(weights=_sparse([2, 2], [0, 2, 1], [0, 1], b"\0" * 8)), "inconsistent sparse CSR indices"),
    "crow not starting at 0": (dict(weights=_sparse([2, 2], [1, 1, 2], [0, 1], b"\0" * 8)), "inconsistent sparse CSR"),
    "crow of 9 bytes": (dict(weights=_sparse([1, 2], [0, 1], [0], b"\0" * 4)), None),
    "column out of range": (dict(weights=_sparse([1, 2], [0, 1], [5], b"\0" * 4)), "column index out of range"),
    "values of 3 bytes": (dict(weights=_sparse([1, 2], [0, 1], [0], b"\0" * 3)), "sparse values: 3 bytes"),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_malformed_protobuf_tensors_are_user_errors_that_take_their_slot(srv, raw_model, case):
    kw, msg = BAD_TENSORS[case]
    seq = srv.service._queues[raw_model].next_seq
    body = _fb_body(raw_model, seq, **kw)
    if case == "crow of 9 bytes":  # one stray byte after valid indices
        from tinker.proto import tinker_public_pb2 as pb

        m = pb.ForwardBackwardRequest.FromString(body)
        m.data[0].loss_fn_inputs["weights"].sparse_csr.crow_indices += b"\0"
        body, msg = m.SerializeToString(), "sparse crow_indices: 17 bytes is not a whole number of 8-byte elements"
    status, out = _fb(srv, body)
    assert status == 200, out
    res = _future(srv, out)
    assert res["category"] == "user" and msg in res["error"], res
    assert srv.service.queued_train_bytes == 0
    # The refusal took its seq_id: the next op runs at once.
    out = _fb(srv, _fb_body(raw_model, seq + 1))[1]
    status, raw = _post_raw_result(srv, out["request_id"])
    assert status == 200 and raw


def test_a_well_formed_sparse_tensor_decodes_to_its_dense_form():
    from gemtinker.server import codec

    vals = np.asarray([1.5, -2.0, 3.0], np.float32).tobytes()
    body = _fb_body("m:train:0", 1, weights=_sparse([3, 4], [0, 2, 2, 3], [1, 3, 0], vals))
    req = codec.parse_forward_backward(body, max_dense_bytes=1 << 20)
    assert req.problem is None and req.dense_bytes == 2 * 8 + 2 * 8 + 3 * 4 * 4  # tokens, targets, weights
    w = req.datums()[0].inputs["weights"]
    np.testing.assert_array_equal(w, [[0, 1.5, 0, -2.0], [0, 0, 0, 0], [3.0, 0, 0, 0]])
    assert codec.parse_forward_backward(body, max_dense_bytes=40).problem.startswith(
        "forward_backward: datum 0 brings the request's decoded tensors to 80 bytes")


def _post_raw_result(srv, rid: str) -> tuple[int, bytes]:
    req = urllib.request.Request(srv.base_url + "/api/v1/retrieve_future", data=json.dumps({"request_id": rid}).encode(),
                                 method="POST", headers={"Content-Type": "application/json", "X-API-Key": API_KEY})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert "protobuf" in r.headers.get("content-type", ""), r.read()[:300]
        return r.status, r.read()


def test_dense_size_of_queued_tensors_counts_toward_the_byte_cap(srv, tc):
    session = tc.model_id.split(":")[0]
    body = {"session_id": session, "model_seq_id": 901, "base_model": MODEL, "lora_config": {"rank": 4}}
    model = _future(srv, _post(srv, "/api/v1/create_model", body)[1])["model_id"]
    far = srv.service._queues[model].next_seq + 50  # waits for a gap: held in the queue
    dense_each = 50_000_000 * 4  # a 200 MB float32 tensor in a body of about 100 bytes
    statuses = []
    for k in range(3):
        b = _fb_body(model, far + k, weights=_sparse([1, 50_000_000], [0, 1], [0], b"\0\0\x80\x3f"))
        assert len(b) < 200
        status, out = _fb(srv, b)
        statuses.append(status)
        if status == 429:
            assert "training queues hold" in out["error"] and "retry shortly" in out["error"]
    assert statuses == [200, 200, 429]  # 2 x 200 MB fit under the 512 MiB cap, a third does not
    assert srv.service.queued_train_bytes >= 2 * dense_each
    assert _future(srv, _post(srv, "/api/v1/unload_model", {"model_id": model})[1])["type"] == "unload_model"
    assert srv.service.queued_train_bytes == 0
    assert tc.forward_backward([datum_ce(SEQ_A)], "cross_entropy").result().metrics


# ------------------------------------------------------------------ cross-site requests
def _with_headers(srv, method: str, path: str, headers: dict, body: bytes | None = None) -> tuple[int, dict]:
    """http.client, so the Host header is exactly what the test says."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for k, v in {"X-API-Key": API_KEY, **headers, "Content-Length": str(len(body or b""))}.items():
        conn.putheader(k, v)
    conn.endheaders(body)
    resp = conn.getresponse()
    out = json.loads(resp.read() or b"null")
    conn.close()
    return resp.status, out


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example:{port}",
                                  "localhost.evil.example", "[::2]:{port}", "10.0.0.1:{port}"])
def test_foreign_host_header_is_refused_on_a_loopback_bind(srv, host):
    host = host.format(port=srv.port)
    for method, path, body in (("GET", "/api/v1/healthz", None), ("GET", "/api/v1/training_runs", None),
                               ("POST", "/api/v1/create_session", b"{}")):
        status, out = _with_headers(srv, method, path, {"Host": host, "Content-Type": "application/json"}, body)
        assert status == 403 and "is not a loopback name" in out["error"] and "DNS-rebinding" in out["error"], out


@pytest.mark.parametrize("host", ["localhost", "localhost:{port}", "127.0.0.1", "127.0.0.1:{port}", "[::1]:{port}",
                                  "[::1]", "LOCALHOST:{port}"])
def test_loopback_host_headers_pass(srv, host):
    status, out = _with_headers(srv, "POST", "/api/v1/create_session",
                                {"Host": host.format(port=srv.port), "Content-Type": "application/json"}, b"{}")
    assert status == 200 and out["session_id"]


@pytest.mark.parametrize("origin,ok", [("http://evil.example", False), ("https://localhost.evil.example", False),
                                       ("null", False), ("http://[::1", False), ("file://", False),
                                       ("http://localhost:3000", True), ("http://127.0.0.1:{port}", True)])
def test_origin_of_another_site_is_refused(srv, origin, ok):
    headers = {"Host": f"127.0.0.1:{srv.port}", "Origin": origin.format(port=srv.port), "Content-Type": "application/json"}
    status, out = _with_headers(srv, "POST", "/api/v1/create_session", headers, b"{}")
    if ok:
        assert status == 200 and out["session_id"]
    else:
        assert status == 403 and "is not a loopback origin" in out["error"], out


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                   None, "application/jsonx"])
def test_json_routes_refuse_other_content_types(srv, sc, ctype):
    headers = {"Host": f"127.0.0.1:{srv.port}", **({"Content-Type": ctype} if ctype else {})}
    for path in ("/api/v1/create_session", "/api/v1/create_model", "/api/v1/asample", "/api/v1/retrieve_future"):
        status, out = _with_headers(srv, "POST", path, headers, b"{}")
        assert status == 415 and "takes a JSON body (Content-Type: application/json)" in out["error"], (path, out)
    for good in ("application/json", "application/json; charset=utf-8", "application/vnd.api+json"):
        headers["Content-Type"] = good
        assert _with_headers(srv, "POST", "/api/v1/create_session", headers, b"{}")[0] == 200
    # The SDK's own requests (Host 127.0.0.1:PORT, application/json) still work end to end.
    _samples_ok(sc.create_sampling_client(base_model=MODEL).result(), n=2)


def test_a_public_bind_does_not_check_host(srv):
    from starlette.testclient import TestClient

    from gemtinker.server.app import create_app

    # No `with`: the lifespan would stop the shared service's queues on exit.
    public = TestClient(create_app(srv.service, api_key="tml-k", loopback=False), base_url="http://gpu-box.lan:8000")
    assert public.get("/api/v1/healthz", headers={"X-API-Key": "tml-k"}).status_code == 200
    local = TestClient(create_app(srv.service, api_key="tml-k"), base_url="http://gpu-box.lan:8000")
    assert local.get("/api/v1/healthz", headers={"X-API-Key": "tml-k"}).status_code == 403


# ------------------------------------------------------------------ decoding off the event loop
@pytest.mark.parametrize("kind", ["json", "protobuf"])
def test_large_bodies_are_decoded_off_the_event_loop(srv, raw_model, monkeypatch, kind):
    """While a large body is being decoded, the server keeps answering other clients."""
    import asyncio
    import threading

    from gemtinker.server import bodies, codec

    entered, release, on_loop = threading.Event(), threading.Event(), []
    target = (bodies, "parse_json") if kind == "json" else (codec, "parse_forward_backward")
    real = getattr(*target)

    def held(*args):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no loop in this thread: a worker
            on_loop.append(False)
        if len(args[0]) > bodies.OFF_LOOP_BYTES:
            entered.set()
            assert release.wait(60)
        return real(*args)

    monkeypatch.setattr(*target, held)
    if kind == "json":
        big = json.dumps({"tags": ["t" * 100] * 5000, "user_metadata": {}}).encode()  # ~0.5 MB
        call = lambda: _post(srv, "/api/v1/create_session", big)  # noqa: E731
    else:
        seq = srv.service._queues[raw_model].next_seq
        big = _fb_body(raw_model, seq, tokens=b"\1\0\0\0" * 100_000)  # 0.4 MB: longer than the model's context
        call = lambda: _fb(srv, big)  # noqa: E731
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(call)
        assert entered.wait(60)
        # The loop is free: health checks and small requests are answered while the decode waits.
        assert _http(srv, "GET", "/api/v1/healthz", ctype=None) == (200, {"status": "ok"})
        assert _post(srv, "/api/v1/create_session", {"tags": []})[0] == 200
        assert not fut.done()
        release.set()
        status, out = fut.result(timeout=60)
    assert status == 200 and (out.get("session_id") or out.get("request_id"))
    assert on_loop[0] is False  # the large body went to a worker
    if kind == "json":
        assert on_loop[1] is True  # a small one parses inline
    else:
        res = _future(srv, out)  # decoded on the training pool, then refused by the datum checks
        assert res["category"] == "user" and res["error"].startswith("datum 0: "), res


# ------------------------------------------------------------------ ownership
OTHER = {"X-API-Key": "tml-someone-else"}


def test_models_need_a_live_session(srv, tc):
    body = {"session_id": "nosuchsession", "model_seq_id": 0, "base_model": MODEL, "lora_config": {"rank": 4}}
    res = _future(srv, _post(srv, "/api/v1/create_model", body)[1])
    assert res["category"] == "user" and "session 'nosuchsession' is unknown or finished" in res["error"]
    assert "nosuchsession:train:0" not in srv.service._live
    assert tc.forward_backward([datum_ce(SEQ_A)], "cross_entropy").result().metrics


def test_another_key_cannot_take_over_a_model_id(srv, raw_model):
    session, _, seq = raw_model.split(":")
    body = {"session_id": session, "model_seq_id": int(seq), "base_model": MODEL, "lora_config": {"rank": 4}}
    srv.service.store.set_run_unloaded(raw_model)  # even an unloaded run keeps its owner
    status, out = _post(srv, "/api/v1/create_model", body, headers=OTHER)
    res = _future(srv, out)
    assert res["category"] == "user" and f"model id {raw_model!r} belongs to another API key" in res["error"]
    assert srv.service.store.get_run(raw_model)["owner"] is not None


def test_only_the_owning_key_deletes_a_checkpoint(srv, tc):
    path = tc.save_state("owned").result().path
    route = f"/api/v1/training_runs/{tc.model_id}/checkpoints/weights/owned"
    status, out = _http(srv, "DELETE", route, ctype=None, headers=OTHER)
    assert status == 403 and "belongs to another API key" in out["error"]
    assert srv.service.resolve_checkpoint(path)  # still there
    rest = tinker.RestClient(base_url=srv.base_url, api_key=API_KEY)
    rest.delete_checkpoint_from_tinker_path(path).result()
    assert srv.service.store.get_checkpoint(path) is None


def test_a_database_from_before_owners_opens_and_gains_the_column(tmp_path):
    import sqlite3

    from gemtinker.server.store import Store

    db = sqlite3.connect(tmp_path / "old.sqlite")
    db.execute("CREATE TABLE runs (model_id TEXT PRIMARY KEY, session_id TEXT, base_model TEXT, lora TEXT, "
               "user_metadata TEXT, created REAL, last_request REAL, unloaded INTEGER DEFAULT 0)")
    db.execute("INSERT INTO runs VALUES ('s:train:0', 's', 'm', NULL, NULL, 1, 1, 0)")
    db.commit()
    db.close()
    store = Store(tmp_path / "old.sqlite")
    assert store.get_run("s:train:0")["owner"] is None  # old runs belong to anyone, as before
    store.add_run("s:train:1", "s", "m", {}, None, owner="abc")
    assert store.get_run("s:train:1")["owner"] == "abc"
    store.close()
