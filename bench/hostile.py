"""Hostile clients for bench/load.py --hostile-clients (issue 14): while the good SDK clients run,
each hostile client sends, round-robin, the malformed and hostile requests of issue 14 over raw
HTTP and tallies the answers. Every answer must be a 4xx or a future that failed with category
`user` (or, for a slowloris socket, a 408 and a close); any 5xx, `server` error or success of a
request that should have failed is counted as a miss.

Imported by load.py (run as `python bench/load.py`, so this imports as `hostile`).
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
from collections import Counter, defaultdict

import numpy as np

OTHER_KEY = "tml-hostile-other-key"  # "another key" for the ownership attacks
SLOW_SOCKETS = 4  # slowloris sockets each hostile client keeps open at a time
GOOD_OUTCOMES = {"closed", "kept"}  # a slowloris socket closed by the server; the victim checkpoint kept


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.answers: dict[str, Counter[str]] = defaultdict(Counter)

    def add(self, attack: str, outcome: str) -> None:
        with self.lock:
            self.answers[attack][outcome] += 1

    @staticmethod
    def bad(outcome: str) -> bool:
        """5xx, a `server` error, a success, a timeout, a lost checkpoint, or a socket the server
        never closed."""
        return not (outcome.startswith("4") or outcome.endswith("user") or outcome in GOOD_OUTCOMES)

    def misses(self) -> int:
        return sum(n for c in self.answers.values() for o, n in c.items() if self.bad(o))

    def by_status(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for c in self.answers.values():
            total.update(c)
        return total


class HostileClient:
    ATTACKS = ("sample seed 2**64", "prompt token 10**30", "token id >= vocab", "lora seed 2**64",
               "protobuf dense of 7 bytes", "sparse [1, 250000000]", "limit beyond int64", "offset beyond int64",
               "lone surrogate", "ttl 1e12", "cross-site Host", "text/plain JSON", "checkpoint name x\\n",
               "other key deletes a checkpoint", "model for an unknown session", "other key takes a model id")
    def __init__(self, port: int, api_key: str, model: str, vocab: int, seed: int, tally: Tally,
                 header_timeout_s: float) -> None:
        self.port, self.key, self.model, self.vocab, self.tally = port, api_key, model, vocab, tally
        self.rng = random.Random(seed)
        self.header_timeout_s = header_timeout_s
        self.seq = 1_000_000 + seed * 100_000  # sample seq_ids of its own
        self.slow: list[tuple[socket.socket, float]] = []

    # ---------------------------------------------------------------- raw HTTP
    def _request(self, method: str, path: str, body: bytes | None = None, ctype: str | None = "application/json",
                 headers: dict | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            hdrs = {"X-API-Key": self.key, **({"Content-Type": ctype} if ctype else {}), **(headers or {})}
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            raw = resp.read()
            try:
                return resp.status, json.loads(raw)
            except ValueError:
                return resp.status, {"raw": raw[:200].decode(errors="replace")}
        finally:
            conn.close()

    def _post(self, path: str, body: dict | bytes, **kw) -> tuple[int, dict]:
        return self._request("POST", path, body if isinstance(body, bytes) else json.dumps(body).encode(), **kw)

    def _outcome(self, status: int, out: dict) -> str:
        return self.answer(status, out)[0]

    def answer(self, status: int, out: dict) -> tuple[str, str]:
        """(the HTTP status, or for a future "200+" the category its result failed with; the error
        message)."""
        if status != 200 or "request_id" not in out or "session_id" in out:
            return str(status), str(out.get("error", ""))
        deadline = time.time() + 120
        while time.time() < deadline:
            status, res = self._post("/api/v1/retrieve_future", {"request_id": out["request_id"]})
            if status != 200:
                return f"future {status}", str(res.get("error", ""))
            if res.get("type") != "try_again":
                return f"200+{res.get('category', 'ok')}", str(res.get("error", ""))
        return "future timeout", ""

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        status, out = self._post("/api/v1/create_session", {"tags": ["hostile"], "user_metadata": {}})
        assert status == 200, out
        self.session = out["session_id"]
        body = {"session_id": self.session, "sampling_session_seq_id": 0, "base_model": self.model}
        status, out = self._post("/api/v1/create_sampling_session", body)
        assert status == 200, out
        self.sampling = out["sampling_session_id"]
        body = {"session_id": self.session, "model_seq_id": 0, "base_model": self.model, "lora_config": {"rank": 4}}
        status, out = self._post("/api/v1/create_model", body)
        res = self._result(out)
        self.model_id, self.model_seq = res["model_id"], 1  # create_model took seq_id 0
        # A checkpoint of its own, which OTHER_KEY then tries to delete.
        res = self._result(self._post("/api/v1/save_weights", {"model_id": self.model_id, "seq_id": self._next(),
                                                               "path": "victim"})[1])
        self.victim = res["path"]

    def _result(self, out: dict) -> dict:
        while True:
            status, res = self._post("/api/v1/retrieve_future", {"request_id": out["request_id"]})
            assert status == 200, res
            if res.get("type") != "try_again":
                assert "error" not in res, res
                return res

    def _next(self) -> int:
        seq, self.model_seq = self.model_seq, self.model_seq + 1
        return seq

    # ---------------------------------------------------------------- attacks
    def _sample(self, tokens: list[int], seed: int | None = None) -> tuple[int, dict]:
        self.seq += 1
        return self._post("/api/v1/asample", {
            "sampling_session_id": self.sampling, "seq_id": self.seq, "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
            "sampling_params": {"max_tokens": 4, "temperature": 1.0, "seed": seed}})

    def _fb(self, weights) -> tuple[int, dict]:
        from tinker.proto import tinker_public_pb2 as pb

        msg = pb.ForwardBackwardRequest(model_id=self.model_id, seq_id=self._next(), loss_fn="cross_entropy")
        d = msg.data.add()
        d.model_input.add().encoded_text.tokens = np.asarray([1, 2], np.int32).tobytes()
        t = d.loss_fn_inputs["target_tokens"]
        t.dtype, t.dense = pb.DTYPE_INT64, np.asarray([2, 3], np.int64).tobytes()
        t.shape.extend([2])
        w = d.loss_fn_inputs["weights"]
        w.dtype = pb.DTYPE_FLOAT32
        weights(w)
        return self._post("/api/v1/forward_backward", msg.SerializeToString(), ctype="application/x-protobuf")

    @staticmethod
    def _dense7(w) -> None:
        w.dense = b"\0" * 7
        w.shape.extend([2])

    @staticmethod
    def _sparse_huge(w) -> None:
        w.shape.extend([1, 250_000_000])
        w.sparse_csr.crow_indices = np.asarray([0, 1], np.int64).tobytes()
        w.sparse_csr.col_indices = np.asarray([0], np.int64).tobytes()
        w.sparse_csr.values = np.asarray([1.0], np.float32).tobytes()

    def attacks(self) -> dict:
        """Name -> a call sending that request once and returning (HTTP status, JSON body)."""
        host = {"Host": "evil.example"}
        out = {
            "sample seed 2**64": lambda: self._sample([1, 2, 3], seed=2**64),
            "prompt token 10**30": lambda: self._sample([1, 10**30, 3]),
            "token id >= vocab": lambda: self._sample([1, self.vocab + 7]),
            "lora seed 2**64": lambda: self._post("/api/v1/create_model", {
                "session_id": self.session, "model_seq_id": self.rng.randrange(1000, 10**9), "base_model": self.model,
                "lora_config": {"rank": 4, "seed": 2**64}}),
            "protobuf dense of 7 bytes": lambda: self._fb(self._dense7),
            "sparse [1, 250000000]": lambda: self._fb(self._sparse_huge),
            "limit beyond int64": lambda: self._request("GET", "/api/v1/checkpoints?limit=99999999999999999999999",
                                                        ctype=None),
            "offset beyond int64": lambda: self._request("GET", "/api/v1/training_runs?offset=99999999999999999999999",
                                                         ctype=None),
            "lone surrogate": lambda: self._post("/api/v1/create_session", b'{"tags": ["\\ud800"]}'),
            "ttl 1e12": lambda: self._post("/api/v1/save_weights", {
                "model_id": self.model_id, "seq_id": self._next(), "path": "ttl", "ttl_seconds": 1e12}),
            "cross-site Host": lambda: self._post("/api/v1/create_session", {"tags": []}, headers=host),
            "text/plain JSON": lambda: self._post("/api/v1/create_session", {"tags": []}, ctype="text/plain"),
            "checkpoint name x\\n": lambda: self._post("/api/v1/save_weights", {
                "model_id": self.model_id, "seq_id": self._next(), "path": "x\n"}),
            "other key deletes a checkpoint": lambda: self._request(
                "DELETE", f"/api/v1/training_runs/{self.model_id}/checkpoints/weights/victim", ctype=None,
                headers={"X-API-Key": OTHER_KEY}),
            "model for an unknown session": lambda: self._post("/api/v1/create_model", {
                "session_id": f"nosuch{self.rng.randrange(10**9)}", "model_seq_id": 0, "base_model": self.model,
                "lora_config": {"rank": 4}}),
            "other key takes a model id": lambda: self._post("/api/v1/create_model", {
                "session_id": self.session, "model_seq_id": 0, "base_model": self.model, "lora_config": {"rank": 4}},
                headers={"X-API-Key": OTHER_KEY}),
        }
        assert tuple(out) == self.ATTACKS
        return out

    # ---------------------------------------------------------------- slowloris
    def _open_slow(self) -> None:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        s.sendall(self.rng.choice([b"", b"POST /api/v1/asam", b"GET /api/v1/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"]))
        s.setblocking(False)
        self.slow.append((s, time.time()))

    def _reap_slow(self, final: bool = False) -> None:
        """Record each slowloris socket the server has closed; one still open well past the
        header deadline is a miss."""
        keep = []
        for s, t0 in self.slow:
            try:
                data = s.recv(4096)
                closed = True
            except BlockingIOError:
                data, closed = b"", False
            except OSError:
                data, closed = b"", True
            if closed:
                self.tally.add("slowloris socket", data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "closed")
                s.close()
            elif time.time() - t0 > self.header_timeout_s + 15:
                self.tally.add("slowloris socket", "still open past the deadline")
                s.close()
            elif final:
                s.close()  # not yet due: not counted
            else:
                keep.append((s, t0))
        self.slow = keep

    def run(self, stop_at: float) -> None:
        try:
            self.setup()
        except Exception as e:  # noqa: BLE001
            self.tally.add("setup", f"client exception {type(e).__name__}: {e}"[:200])
            return
        attacks = self.attacks()
        names = list(attacks)
        self.rng.shuffle(names)
        i = 0
        while time.time() < stop_at:
            self._reap_slow()
            while len(self.slow) < SLOW_SOCKETS:
                self._open_slow()
            name = names[i % len(names)]
            i += 1
            seq0 = self.model_seq
            try:
                status, out = attacks[name]()
                if status != 200:  # refused before it was queued: its seq_id was not taken
                    self.model_seq = seq0
                self.tally.add(name, self._outcome(status, out))
            except Exception as e:  # noqa: BLE001 - a broken connection is a miss, counted
                self.tally.add(name, f"client exception {type(e).__name__}")
            time.sleep(0.05)
        deadline = time.time() + self.header_timeout_s + 5
        while self.slow and time.time() < deadline:  # let the last slowloris sockets reach their deadline
            self._reap_slow()
            time.sleep(0.5)
        self._reap_slow(final=True)
        # The victim checkpoint survived every delete by the other key.
        listed = json.dumps(self._request("GET", f"/api/v1/training_runs/{self.model_id}/checkpoints", ctype=None)[1])
        self.tally.add("victim checkpoint survives", "kept" if self.victim in listed else "checkpoint lost")
