"""Slow, half-open and idle connections (issue 14): deadlines for headers and bodies, and a cap
on open connections that closes half-open ones before it turns good clients away.

Raw sockets play the hostile clients; the real SDK plays the good one. The server here uses
short deadlines (1 s for headers, 1 s of grace for bodies) so the tests run quickly.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import socket
import time
import urllib.request

import numpy as np
import pytest
import tinker

from support import raw_http
from support.server import API_KEY, MODEL

from gemtinker.server import start_local
from gemtinker.server.cli import parse_args
from gemtinker.server.connections import ConnectionGuard

pytestmark = pytest.mark.integration  # a real (tiny) torch engine behind HTTP, or a server subprocess: `make test` only

HEADER_S, BODY_S, RATE = 1.0, 1.0, 64 * 1024


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    guard = ConnectionGuard(header_timeout_s=HEADER_S, body_timeout_s=BODY_S, min_body_rate=RATE, max_connections=512)
    with start_local(models=[MODEL], root=tmp_path_factory.mktemp("slow"), guard=guard) as s:
        yield s


@pytest.fixture(scope="module")
def sampler(srv):
    sc = tinker.ServiceClient(base_url=srv.base_url, api_key=API_KEY)
    yield sc.create_sampling_client(base_model=MODEL).result()
    sc.close("success")


# ------------------------------------------------------------------ header deadline
@pytest.mark.parametrize("sent", [b"", b"POST /api/v1/create_sess", b"GET /api/v1/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"])
def test_an_incomplete_request_head_is_cut_off_at_the_header_deadline(srv, sent, caplog):
    caplog.set_level(logging.INFO, logger="gemtinker.server")
    before = raw_http.stats(srv)["connections"]["header_timeouts"]
    s = raw_http.connect(srv)
    s.sendall(sent)
    raw, waited = raw_http.read_until_closed(s)
    cut = raw_http.cut_offs(caplog, s)
    s.close()
    assert HEADER_S - 0.1 <= waited < HEADER_S + 3, waited
    status, out = raw_http.answer(raw)
    assert status == 408 and "did not arrive within 1 s" in out["error"] and "--header-timeout" in out["error"]
    assert len(cut) == 1 and "did not arrive within 1 s" in cut[0], cut
    assert raw_http.stats(srv)["connections"]["header_timeouts"] >= before + 1


def test_a_trickled_request_head_is_cut_off_although_bytes_keep_coming(srv):
    """Slowloris: a byte every 0.1 s never extends the header deadline."""
    s = raw_http.connect(srv)
    t0 = time.monotonic()
    head = raw_http.head("/api/v1/create_session", 2)
    try:
        for b in head:
            s.send(bytes([b]))
            time.sleep(0.1)
        pytest.fail("the server read a whole trickled request head")
    except (BrokenPipeError, ConnectionResetError):
        pass
    except OSError:
        pass
    cut = time.monotonic() - t0
    s.close()
    assert cut < HEADER_S + 3 and len(head) * 0.1 > HEADER_S + 3


def test_a_kept_alive_connection_may_idle_past_the_header_deadline(srv):
    """The header clock starts at a request's first byte: an idle keep-alive connection is left to
    uvicorn's keep-alive timeout, and its next request is served."""
    s = raw_http.connect(srv)
    for _ in range(2):
        s.sendall(b"GET /api/v1/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: tml-local\r\n\r\n")
        raw = raw_http.read_response(s)
        assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b'{"status":"ok"}'), raw
        time.sleep(HEADER_S + 0.8)
    s.close()


def test_pipelined_requests_are_all_answered(srv):
    s = raw_http.connect(srv)
    get = b"GET /api/v1/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: tml-local\r\n\r\n"
    s.sendall(get * 3)
    raws = [raw_http.read_response(s) for _ in range(3)]
    assert all(r.startswith(b"HTTP/1.1 200") for r in raws), raws
    time.sleep(HEADER_S + 0.5)  # and the connection idles under keep-alive, not the header deadline
    s.sendall(get)
    assert raw_http.read_response(s).startswith(b"HTTP/1.1 200")
    s.close()


# ------------------------------------------------------------------ body deadline
def test_a_trickled_body_is_cut_off_and_the_server_counts_no_5xx(srv, sampler, caplog):
    caplog.set_level(logging.INFO, logger="gemtinker.server")
    before = raw_http.stats(srv)
    s = raw_http.connect(srv)
    s.sendall(raw_http.head("/api/v1/create_session", 100_000))
    t0 = time.monotonic()
    try:
        for _ in range(100):
            s.send(b"{" if _ == 0 else b" " * 10)
            time.sleep(0.1)
        pytest.fail("a body sent at 100 bytes/s was never cut off")
    except OSError:
        pass
    cut = time.monotonic() - t0
    logged = raw_http.cut_offs(caplog, s)
    s.close()
    assert BODY_S - 0.1 <= cut < BODY_S + 4, cut
    assert len(logged) == 1 and "POST /api/v1/create_session: request body arrived slower" in logged[0], logged
    raw_http.sample_ok(sampler)
    after = raw_http.stats(srv)
    assert after["connections"]["body_timeouts"] >= before["connections"]["body_timeouts"] + 1
    assert not [k for k in after["responses_by_status"] if k.startswith("5")], after


def test_a_body_cut_off_gets_a_408_answer(srv):
    s = raw_http.connect(srv)
    s.sendall(raw_http.head("/api/v1/create_session", 1000) + b'{"tags": [')
    raw, waited = raw_http.read_until_closed(s)
    s.close()
    status, out = raw_http.answer(raw)
    assert status == 408 and "slower than 64 KiB/s after a 1 s grace" in out["error"], out
    assert BODY_S - 0.1 <= waited < BODY_S + 3


def test_a_steady_upload_slower_than_loopback_but_above_the_rate_passes(srv):
    """600 KB at about 300 KiB/s takes ~2 s, longer than the 1 s grace: it passes because it keeps
    the minimum average rate."""
    body = json.dumps({"tags": ["t" * 100] * 5500, "user_metadata": {}}).encode()
    s = raw_http.connect(srv)
    s.sendall(raw_http.head("/api/v1/create_session", len(body)))
    t0 = time.monotonic()
    for i in range(0, len(body), 30_000):
        s.sendall(body[i:i + 30_000])
        time.sleep(0.1)
    assert time.monotonic() - t0 > BODY_S + 0.5
    raw = raw_http.read_response(s)
    s.close()
    status, out = raw_http.answer(raw)
    assert status == 200 and out["session_id"], out


def test_a_20_mb_forward_backward_body_arrives_whole(srv, sampler):
    """A large upload over loopback is read in full under the deadlines (it is then refused for
    its length, which shows the server decoded all of it)."""
    from tinker.proto import tinker_public_pb2 as pb

    n = 5_000_000  # 20 MB of int32 tokens
    msg = pb.ForwardBackwardRequest(model_id="nosuch:train:0", seq_id=1, loss_fn="cross_entropy")
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = np.ones(n, np.int32).tobytes()
    t = d.loss_fn_inputs["target_tokens"]
    t.dtype, t.dense = pb.DTYPE_INT64, np.ones(n, np.int64).tobytes()[:8]
    t.shape.extend([1])
    body = msg.SerializeToString()
    assert len(body) > 20_000_000
    req = urllib.request.Request(srv.base_url + "/api/v1/forward_backward", data=body, method="POST",
                                 headers={"X-API-Key": API_KEY, "Content-Type": "application/x-protobuf"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, out = r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        status, out = e.code, json.loads(e.read())
    assert status in (200, 400, 404), (status, out)
    assert status != 408 and "timeout" not in json.dumps(out).lower()
    raw_http.sample_ok(sampler)


@pytest.mark.slow  # its app sleeps 4 s on purpose (the deadline is the subject): `make test` only
def test_a_body_the_app_is_slow_to_read_is_not_blamed_on_the_client():
    """While the app has not read the body, uvicorn stops reading the socket: that time does not
    count against the client's body deadline."""
    import asyncio
    import threading

    import uvicorn

    async def slow_reader(scope, receive, send):
        if scope["type"] != "http":
            return
        await asyncio.sleep(4)  # busy elsewhere: the body (1 MB) waits in buffers meanwhile
        size, more = 0, True
        while more:
            msg = await receive()
            size, more = size + len(msg.get("body", b"")), msg.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(str(size)))]})
        await send({"type": "http.response.body", "body": str(size).encode()})

    guard = ConnectionGuard(header_timeout_s=1, body_timeout_s=1, min_body_rate=RATE)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(slow_reader, http=guard.protocol(), lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        s = socket.create_connection(sock.getsockname(), timeout=30)
        body = b"x" * (1 << 20)
        s.sendall(f"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        t0 = time.monotonic()
        s.sendall(body)  # blocks until the app starts reading, ~4 s from now
        raw = raw_http.read_response(s)
        s.close()
        assert time.monotonic() - t0 > 3
        assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(str(len(body)).encode()), raw[:200]
        assert guard.counts["body_timeouts"] == 0
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


# ------------------------------------------------------------------ many half-open sockets
def test_a_hundred_half_open_sockets_do_not_slow_good_clients(srv, sampler):
    socks = []
    for i in range(100):
        s = raw_http.connect(srv)
        s.sendall(b"" if i % 2 else b"POST /api/v1/asa")
        socks.append(s)
    try:
        t0 = time.monotonic()
        ms = [raw_http.healthz_ms(srv) for _ in range(10)]
        assert np.median(ms) < 200, ms
        with cf.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: raw_http.sample_ok(sampler), range(4)))
        assert time.monotonic() - t0 < 60
        # Every half-open socket is closed by the server within the header deadline.
        deadline = time.monotonic() + HEADER_S + 10
        for s in socks:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            assert raw_http.read_until_closed(s, limit_s=max(0.1, deadline - time.monotonic()))[1] < HEADER_S + 10
    finally:
        for s in socks:
            s.close()


# ------------------------------------------------------------------ configuration
def test_serve_flags_set_the_deadlines():
    args = parse_args(["--header-timeout", "5", "--body-timeout", "7", "--min-body-rate", "16", "--max-connections", "64"])
    assert (args.header_timeout, args.body_timeout, args.min_body_rate, args.max_connections) == (5, 7, 16, 64)
    defaults = parse_args([])
    assert (defaults.header_timeout, defaults.body_timeout, defaults.min_body_rate, defaults.max_connections) == (20, 60, 16, 512)


@pytest.mark.parametrize("flag", ["--header-timeout", "--body-timeout", "--min-body-rate", "--max-connections"])
def test_serve_refuses_a_nonsense_deadline_flag(capsys, flag):
    from gemtinker.server.cli import main

    assert main([flag, "0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gemtinker serve: {flag}") and "must be" in err, err


@pytest.mark.parametrize("kw", [dict(header_timeout_s=0), dict(body_timeout_s=-1), dict(min_body_rate=0),
                                dict(max_connections=0)])
def test_nonsense_limits_are_refused(kw):
    with pytest.raises(ValueError, match="must be"):
        ConnectionGuard(**kw)
