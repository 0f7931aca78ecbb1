"""The cap on open connections (issue 14): past `--max-connections`, half-open and idle
connections are closed to make room before a good client is turned away; when every connection
is busy a newcomer gets a 503 that the SDK retries; a flood past twice the cap is not held."""

from __future__ import annotations

import concurrent.futures as cf
import socket
import time

import pytest
import tinker

from support import raw_http
from support.server import API_KEY, MODEL

from gemtinker.server import start_local
from gemtinker.server.connections import ConnectionGuard

pytestmark = pytest.mark.integration  # a real (tiny) torch engine behind HTTP, or a server subprocess: `make test` only

RATE = 64 * 1024  # the minimum body rate; deadlines are long here, the cap is under test


def test_over_the_connection_cap_half_open_sockets_make_room_for_good_clients(tmp_path):
    """40 half-open sockets against a cap of 20: a good SDK client is still served, because the
    oldest half-open sockets are closed to make room."""
    guard = ConnectionGuard(header_timeout_s=60, body_timeout_s=60, min_body_rate=RATE, max_connections=20)
    with start_local(models=[MODEL], root=tmp_path, guard=guard) as srv:
        socks = [raw_http.connect(srv) for _ in range(40)]
        for s in socks:
            s.sendall(b"GET /api/v1/heal")
        try:
            sc = tinker.ServiceClient(base_url=srv.base_url, api_key=API_KEY)
            raw_http.sample_ok(sc.create_sampling_client(base_model=MODEL).result())
            sc.close("success")
            assert raw_http.healthz_ms(srv) < 2000
            counts = raw_http.stats(srv)["connections"]
            # Sockets that opened less than a second before a newcomer are spared (it may be a
            # client about to send): the newcomer gets a 503 then, which the SDK retries.
            assert counts["evicted_idle"] >= 1 and counts["header_timeouts"] == 0, counts
            # The oldest half-open sockets went first, with a 408 that says why.
            raw, _ = raw_http.read_until_closed(socks[0], limit_s=5)
            status, out = raw_http.answer(raw)
            assert status == 408 and "connection limit" in out["error"]
        finally:
            for s in socks:
                s.close()


def test_over_the_cap_with_every_connection_busy_a_newcomer_gets_a_503(tmp_path):
    """When no connection is idle, the newcomer gets a 503 (retried by the SDK) and the busy ones
    are left alone."""
    guard = ConnectionGuard(header_timeout_s=60, body_timeout_s=60, min_body_rate=RATE, max_connections=3)
    with start_local(models=[MODEL], root=tmp_path, guard=guard) as srv:
        busy = []
        for _ in range(3):  # three requests whose bodies are still arriving: busy, not idle
            s = raw_http.connect(srv)
            s.sendall(raw_http.head("/api/v1/create_session", 2) + b"{")
            busy.append(s)
        time.sleep(0.3)
        s = raw_http.connect(srv)
        s.sendall(b"GET /api/v1/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        raw, _ = raw_http.read_until_closed(s, limit_s=10)
        s.close()
        assert raw.startswith(b"HTTP/1.1 503"), raw
        for b in busy:  # each busy request completes normally
            b.sendall(b"}")
            assert raw_http.read_response(b).startswith(b"HTTP/1.1 200")
            b.close()
        assert srv.guard.counts["refused_over_cap"] == 1 and srv.guard.counts["evicted_idle"] == 0


def test_a_connection_flood_past_twice_the_cap_is_closed_at_once(tmp_path):
    guard = ConnectionGuard(header_timeout_s=60, body_timeout_s=60, min_body_rate=RATE, max_connections=5)
    with start_local(models=[MODEL], root=tmp_path, guard=guard) as srv:
        socks = [raw_http.connect(srv) for _ in range(20)]  # opened within a second: none may be evicted
        try:
            for s in socks[10:]:  # past 2 x 5 open: closed without being held
                assert raw_http.read_until_closed(s, limit_s=5) == (b"", pytest.approx(0, abs=5))
            for s in socks[:10]:  # up to 2 x 5: held (the last 5 would get a 503 for a request)
                s.settimeout(0.2)
                with pytest.raises(socket.timeout):
                    s.recv(1)
            assert srv.guard.counts["refused_over_cap"] == 15
        finally:
            for s in socks:
                s.close()


@pytest.mark.slow  # waits out the SDK's retry back-off: `make test` only
def test_the_sdk_retries_the_503_of_a_full_server_and_gets_through(tmp_path):
    guard = ConnectionGuard(header_timeout_s=60, body_timeout_s=60, min_body_rate=RATE, max_connections=3)
    with start_local(models=[MODEL], root=tmp_path, guard=guard) as srv:
        sc = tinker.ServiceClient(base_url=srv.base_url, api_key=API_KEY)
        sampler = sc.create_sampling_client(base_model=MODEL).result()
        busy = []
        for _ in range(3):  # every slot busy with a request whose body is still arriving
            b = raw_http.connect(srv)
            b.sendall(raw_http.head("/api/v1/create_session", 2) + b"{")
            busy.append(b)
        time.sleep(0.3)
        with cf.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(raw_http.sample_ok, sampler)
            deadline = time.time() + 60
            while srv.guard.counts["refused_over_cap"] == 0 and time.time() < deadline:
                time.sleep(0.05)
            assert srv.guard.counts["refused_over_cap"] >= 1  # the SDK was turned away at least once
            time.sleep(1.0)
            assert not fut.done()
            for b in busy:  # the busy requests finish and free their slots
                b.sendall(b"}")
                assert raw_http.read_response(b).startswith(b"HTTP/1.1 200")
                b.close()
            fut.result(timeout=120)  # ... and the SDK's retry got through
        sc.close("success")
