"""Load benchmark: many concurrent `tinker` SDK clients against one gemtinker server.

The server runs as its own process (`python -m gemtinker serve`, 127.0.0.1) so its memory is
measured alone. N clients, each with its own `ServiceClient`, run for --duration seconds:
most sample (1..4 samples of 16 tokens from prompts of 8..64 tokens); --train-clients of them
train (forward_backward of 4 datums + optim_step, and every 5th step a fresh sampler snapshot).

Printed: requests served per kind, client-visible errors split into retryable (the SDK gave up
on a status it retries: connection, 408/409/429/5xx) and non-retryable (must be 0), the server's
responses by HTTP status (429s are capacity answers the SDK retried on its own), peak RSS of the
server process, and p50/p99 latency of each kind of SDK call.

With --hostile-clients N, N more clients (bench/hostile.py) send issue 14's malformed and hostile
requests over raw HTTP during the load (out-of-range seeds and token ids, malformed protobuf
tensors, absurd sparse shapes, int64-overflow paging, lone surrogates, huge TTLs, cross-site Host,
text/plain JSON, slowloris sockets, another key deleting a checkpoint); their answers are printed
by attack and status, and any 5xx, `server` error or unexpected success is a miss (exit 1).

    python bench/load.py [--clients 32] [--train-clients 4] [--duration 60] [--model tiny|default|NAME]
                         [--max-queued-sequences N]   # small N exercises the 429 path
                         [--hostile-clients 4]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TINKER_TELEMETRY", "0")

import numpy as np  # noqa: E402
import tinker  # noqa: E402
from tinker import types  # noqa: E402

from gemtinker import DEFAULT_MODEL  # noqa: E402
from gemtinker.engine.models import TINY_MODEL_NAME, load_tokenizer  # noqa: E402
from gemtinker.hub import use_offline_hub_if_unreachable  # noqa: E402
from gemtinker.server.connections import DEFAULT_HEADER_TIMEOUT_S  # noqa: E402
from hostile import HostileClient, Tally  # noqa: E402

API_KEY = "tml-local"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process, KiB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        fields[k] = v.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _retryable(e: BaseException) -> bool:
    """Would the SDK have retried this failure's cause (it only surfaces after giving up)?"""
    if isinstance(e, (tinker.APIConnectionError, tinker.APITimeoutError, TimeoutError)):
        return True
    status = getattr(e, "status_code", None)
    return status in (408, 409, 429) or (isinstance(status, int) and status >= 500)


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.retryable: dict[str, int] = defaultdict(int)
        self.fatal: list[str] = []

    def ok(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.latency[kind].append(seconds)

    def error(self, kind: str, e: BaseException) -> None:
        with self.lock:
            if _retryable(e):
                self.retryable[kind] += 1
            else:
                self.fatal.append(f"{kind}: {type(e).__name__}: {str(e)[:300]}")


def sampler_loop(url: str, model: str, vocab: int, stop_at: float, stats: Stats, seed: int) -> None:
    rng = random.Random(seed)
    sc = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    try:
        sampler = sc.create_sampling_client(base_model=model).result()
        while time.time() < stop_at:
            prompt = types.ModelInput.from_ints([rng.randrange(1, vocab) for _ in range(rng.randint(8, 64))])
            params = types.SamplingParams(max_tokens=16, temperature=1.0, seed=rng.randrange(1 << 30))
            t0 = time.perf_counter()
            try:
                res = sampler.sample(prompt, rng.randint(1, 4), params).result()
                assert res.sequences and all(len(s.tokens) == len(s.logprobs) for s in res.sequences)
                stats.ok("sample", time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - counted, and the client goes on
                stats.error("sample", e)
    finally:
        sc.close("success")


def trainer_loop(url: str, model: str, vocab: int, stop_at: float, stats: Stats, seed: int) -> None:
    rng = random.Random(seed)
    sc = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    try:
        tc = sc.create_lora_training_client(base_model=model, rank=8, seed=seed).result()
        adam = types.AdamParams(learning_rate=1e-4)
        step = 0
        while time.time() < stop_at:
            data = []
            for _ in range(4):
                toks = [rng.randrange(1, vocab) for _ in range(rng.randint(16, 48))]
                n = len(toks) - 1
                data.append(types.Datum(
                    model_input=types.ModelInput.from_ints(toks[:-1]),
                    loss_fn_inputs={"target_tokens": toks[1:], "logprobs": [-2.0] * n,
                                    "advantages": [rng.uniform(-1, 1)] * n}))
            t0 = time.perf_counter()
            try:
                fb = tc.forward_backward(data, "importance_sampling")
                opt = tc.optim_step(adam)
                assert np.isfinite(fb.result().metrics["loss:sum"])
                opt.result()
                stats.ok("train_step", time.perf_counter() - t0)
                step += 1
                if step % 5 == 0:
                    t0 = time.perf_counter()
                    tc.save_weights_and_get_sampling_client()
                    stats.ok("snapshot", time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001
                stats.error("train_step", e)
    finally:
        sc.close("success")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--train-clients", type=int, default=4)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default %(default)s)")
    p.add_argument("--model", default="tiny", help="tiny (default), default (the bundled real model), or a model name")
    p.add_argument("--max-queued-sequences", type=int, default=None, help="server sampling capacity (default: server's)")
    p.add_argument("--hostile-clients", type=int, default=0,
                   help="clients that send malformed and hostile requests during the load (default 0)")
    p.add_argument("--root", type=Path, default=None, help="server state dir (default: a temporary one)")
    args = p.parse_args()
    model = {"tiny": TINY_MODEL_NAME, "default": DEFAULT_MODEL}.get(args.model, args.model)
    use_offline_hub_if_unreachable()  # no hub here: the SDK's tokenizer lookups must not retry it

    tmp = tempfile.TemporaryDirectory(prefix="gemtinker-load-")
    root = args.root or Path(tmp.name) / "server"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "gemtinker", "serve", "--model", model, "--root", str(root), "--port", str(port),
           "--log-level", "warning"]
    if args.max_queued_sequences:
        cmd += ["--max-queued-sequences", str(args.max_queued_sequences)]
    server_log = open(Path(tmp.name) / "server.log", "w")
    server = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            try:
                _get(url + "/api/v1/healthz")
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    print(Path(server_log.name).read_text()[-3000:], file=sys.stderr)
                    raise SystemExit("server did not start")
                time.sleep(0.3)
        # Load the engine before the clock starts, and learn the vocabulary size.
        warm = tinker.ServiceClient(base_url=url, api_key=API_KEY)
        wsampler = warm.create_sampling_client(base_model=model).result()
        wsampler.sample(types.ModelInput.from_ints([1, 2, 3]), 1, types.SamplingParams(max_tokens=2)).result()
        vocab = len(load_tokenizer(model))
        warm.close("success")
        rss_idle = _rss_kib(server.pid)[0]

        stats = Stats()
        n_train = min(args.train_clients, args.clients)
        t_start = time.time()
        stop_at = t_start + args.duration
        threads = [threading.Thread(target=trainer_loop if i < n_train else sampler_loop,
                                    args=(url, model, vocab, stop_at, stats, 1000 + i), daemon=True)
                   for i in range(args.clients)]
        tally = Tally()
        threads += [threading.Thread(target=HostileClient(port, API_KEY, model, vocab, 7 + i, tally,
                                                          DEFAULT_HEADER_TIMEOUT_S).run,
                                     args=(stop_at,), daemon=True) for i in range(args.hostile_clients)]
        for t in threads:
            t.start()
        rss_samples = []
        while any(t.is_alive() for t in threads):
            rss_samples.append(_rss_kib(server.pid)[0])
            time.sleep(0.5)
            if time.time() > stop_at + 300:
                print("clients did not stop within 300 s of the end", file=sys.stderr)
                break
        elapsed = time.time() - t_start
        server_stats = _get(url + "/api/v1/server_stats")
        rss_now, rss_peak = _rss_kib(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        server_log.close()

    print(f"\n== gemtinker load: {args.clients} SDK clients ({n_train} training, {args.clients - n_train} sampling)"
          f"{f' + {args.hostile_clients} hostile' if args.hostile_clients else ''}, "
          f"model {model}, {args.duration:.0f} s of load ({elapsed:.0f} s until all clients stopped) ==")
    total = 0
    for kind, lat in sorted(stats.latency.items()):
        a = np.asarray(lat) * 1e3
        total += len(a)
        print(f"{kind:>11}: {len(a):6d} served  {len(a) / args.duration:7.1f}/s   p50 {np.percentile(a, 50):8.0f} ms   "
              f"p99 {np.percentile(a, 99):8.0f} ms   max {a.max():8.0f} ms")
    print(f"{'total':>11}: {total:6d} served  {total / args.duration:7.1f}/s")
    print(f"errors: retryable {sum(stats.retryable.values())} {dict(stats.retryable)}, non-retryable {len(stats.fatal)}")
    for line in stats.fatal[:10]:
        print("   ", line)
    print(f"server responses by HTTP status: {server_stats['responses_by_status']}")
    print(f"server RSS: idle (engine loaded) {rss_idle / 1024:.0f} MiB, peak {rss_peak / 1024:.0f} MiB, "
          f"median under load {np.median(rss_samples) / 1024:.0f} MiB, after {rss_now / 1024:.0f} MiB")
    print(f"server after the run: {json.dumps({k: v for k, v in server_stats.items() if k != 'responses_by_status'})}")
    warnings = [ln for ln in Path(server_log.name).read_text().splitlines()
                if any(w in ln for w in ("WARNING", "ERROR", "Traceback"))]
    print(f"server log: {len(warnings)} warnings/errors" + "".join(f"\n    {ln[:300]}" for ln in warnings[:20]))
    if args.hostile_clients:
        print("hostile requests by attack (answer: count; misses = 5xx, `server` errors, successes, timeouts):")
        for attack, answers in sorted(tally.answers.items()):
            print(f"  {attack:>32}: {dict(sorted(answers.items()))}")
        print(f"hostile answers by status: {dict(sorted(tally.by_status().items()))}; misses {tally.misses()}")
    return 1 if stats.fatal or (args.hostile_clients and tally.misses()) else 0


if __name__ == "__main__":
    sys.exit(main())
