"""Input hardening and capacity limits of the server (issue 7). The ones that need no model
(type-confused fields, num_samples and queue-byte caps, garbage protobuf) run over a fake engine
in test_server_fake_engine.py.

Every bad request ends as a clear error with a JSON body (an empty 400 makes the SDK retry), a
failed future with category "user", or a retryable 429 beyond capacity; never a 5xx, never a
"server" category, and the server keeps serving.
"""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tinker
from tinker import types

from support.server import API_KEY, MODEL, SEQ_A, datum_ce  # noqa: F401

from gemtinker.engine.checkpoint import recover_checkpoint_tree
from gemtinker.server import start_local

pytestmark = pytest.mark.integration  # a real (tiny) torch engine behind HTTP, or a server subprocess: `make test` only

BODY_LIMIT = 256 << 10


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    # Small limits so the tests can reach them cheaply.
    with start_local(models=[MODEL], root=tmp_path_factory.mktemp("hard"), max_body_bytes=BODY_LIMIT,
                     max_num_samples=16, max_queued_sequences=16, max_queued_train_bytes=64 << 10) as s:
        yield s


def _raw(srv, path: str, body: bytes, ctype: str = "application/json", headers: dict | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(srv.base_url + path, data=body, method="POST",
                                 headers={"Content-Type": ctype, "X-API-Key": API_KEY, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
            if "protobuf" in r.headers.get("content-type", ""):
                return r.status, dict(r.headers), {"proto_bytes": len(raw)}
            return r.status, dict(r.headers), json.loads(raw)
    except urllib.error.HTTPError as e:
        raw = e.read()
        assert raw, f"{path}: empty {e.code} body (the SDK would retry it as a network glitch)"
        return e.code, dict(e.headers), json.loads(raw)


def test_body_size_limit_declared_and_chunked(srv, tc):
    big = b'{"x": "' + b"a" * BODY_LIMIT + b'"}'
    status, _, out = _raw(srv, "/api/v1/create_session", big)
    assert status == 413 and f"limit of {BODY_LIMIT} bytes" in out["error"]
    # No Content-Length (chunked transfer): refused while streaming, not after buffering it all.
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.putrequest("POST", "/api/v1/forward_backward")
    for k, v in {"Content-Type": "application/x-protobuf", "Transfer-Encoding": "chunked", "X-API-Key": API_KEY}.items():
        conn.putheader(k, v)
    conn.endheaders()
    chunk = b"\0" * (64 << 10)
    try:
        for _ in range(8):
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may answer and close before the whole body is sent
    resp = conn.getresponse()
    assert resp.status == 413 and b"limit of" in resp.read()
    conn.close()
    assert tc.forward_backward([datum_ce(SEQ_A)], "cross_entropy").result().metrics


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe\xfa", b"[" * 100_000 + b"]" * 100_000, b"[1, 2]", b'"s"'])
def test_undecodable_json_is_a_400_with_a_body(srv, body):
    status, _, out = _raw(srv, "/api/v1/create_session", body)
    assert status == 400 and ("not valid JSON" in out["error"] or "must be a JSON object" in out["error"])


def test_sampling_beyond_capacity_gets_429_and_the_sdk_waits(srv, sc):
    sampler = sc.create_sampling_client(base_model=MODEL).result()
    sid = sampler._sampling_session_id
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]}
    # Fill the queue (16 sequences) with raw submissions, then one more must be a retryable 429.
    statuses = []
    for i in range(3):
        body = {"sampling_session_id": sid, "seq_id": 5000 + i, "num_samples": 8, "prompt": prompt,
                "sampling_params": {"max_tokens": 64, "temperature": 1.0}}
        status, headers, out = _raw(srv, "/api/v1/asample", json.dumps(body).encode())
        statuses.append(status)
        if status == 429:
            assert "retry-after" in {k.lower() for k in headers} and "sampling queue is full" in out["error"]
    assert statuses[:2] == [200, 200] and statuses[2] == 429
    # The SDK retries 429 on its own: 12 concurrent 4-sample requests all finish.
    params = types.SamplingParams(max_tokens=4, temperature=1.0)
    with cf.ThreadPoolExecutor(12) as pool:
        futs = [pool.submit(lambda: sampler.sample(types.ModelInput.from_ints([1, 2, 3]), 4, params).result(timeout=120))
                for _ in range(12)]
        assert all(len(f.result().sequences) == 4 for f in futs)
    assert srv.service.queued_sequences == 0


def test_corrupted_checkpoint_is_refused_with_a_clear_error(srv, sc, tc):
    path = tc.save_state("to-corrupt").result().path
    directory = srv.service.resolve_checkpoint(path)[1]
    adapter = directory / "adapter.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0xFF
    adapter.write_bytes(bytes(data))
    with pytest.raises(tinker.RequestFailedError, match=r"adapter.safetensors' is corrupted: sha256"):
        sc.create_training_client_from_state(path).result()
    sampler_path = tc.save_weights_for_sampler("to-corrupt-s").result().path
    sdir = srv.service.resolve_checkpoint(sampler_path)[1]
    (sdir / "metadata.json").write_text("{trunc")
    with pytest.raises(Exception, match=r"unreadable metadata.json"):
        sc.create_sampling_client(model_path=sampler_path).sample(
            types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=1)).result()
    assert tc.forward_backward([datum_ce(SEQ_A)], "cross_entropy").result().metrics


def test_recover_checkpoint_tree(tmp_path: Path):
    run = tmp_path / "run"
    (run / ".a.tmp-1234").mkdir(parents=True)  # unfinished write: removed
    (run / ".b.old-1").mkdir()  # crash between the two renames of an overwrite: restored
    (run / ".b.old-1" / "metadata.json").write_text("{}")
    (run / "c").mkdir()
    (run / ".c.old-2").mkdir()  # swap completed, cleanup did not: removed
    done = recover_checkpoint_tree(tmp_path)
    assert sorted(p.name for p in run.iterdir()) == ["b", "c"] and (run / "b" / "metadata.json").is_file()
    assert len(done) == 3
