"""Raw-socket HTTP helpers for the connection tests (test_server_slow_clients and
test_server_connection_cap; holds no tests): hostile clients are played byte by byte."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

from tinker import types

from support.server import API_KEY


def connect(srv) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_until_closed(s: socket.socket, limit_s: float = 30) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed it."""
    t0, out = time.monotonic(), b""
    s.settimeout(limit_s)
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return out, time.monotonic() - t0


_UNREAD: dict[socket.socket, bytes] = {}  # bytes past the last response read from a socket (pipelining)


def read_response(s: socket.socket, limit_s: float = 60) -> bytes:
    """One whole response (head and Content-Length body) from a kept-alive connection."""
    s.settimeout(limit_s)
    raw = _UNREAD.pop(s, b"")
    while True:
        head, sep, body = raw.partition(b"\r\n\r\n")
        if sep:
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            if len(body) >= length:
                _UNREAD[s] = body[length:]
                return head + sep + body[:length]
        chunk = s.recv(65536)
        assert chunk, f"connection closed mid-response: {raw!r}"
        raw += chunk


def answer(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def cut_offs(caplog, s: socket.socket) -> list[str]:
    """The server's "closing connection" log lines about this client socket. Counting these, not
    the server-wide counters, keeps a test about one hostile connection exact even when a good
    client on a loaded 2-core machine also stalls past the tests' 1 s deadlines (the SDK then
    retries its 408)."""
    me = str(s.getsockname())
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"closing connection from {me} ")]


def stats(srv) -> dict:
    with urllib.request.urlopen(srv.base_url + "/api/v1/server_stats", timeout=30) as r:
        return json.loads(r.read())


def healthz_ms(srv) -> float:
    t0 = time.perf_counter()
    with urllib.request.urlopen(srv.base_url + "/api/v1/healthz", timeout=30) as r:
        assert json.loads(r.read()) == {"status": "ok"}
    return (time.perf_counter() - t0) * 1e3


def head(path: str, length: int, ctype: str = "application/json") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {API_KEY}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def sample_ok(sampler) -> None:
    res = sampler.sample(types.ModelInput.from_ints([5, 6, 7]), 1, types.SamplingParams(max_tokens=4)).result(timeout=120)
    assert len(res.sequences[0].tokens) == 4
