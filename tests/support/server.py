"""Shared helpers for the server tests (`support.server`; holds no tests). The shared server and
its clients are fixtures in tests/conftest.py.

Every server test drives an in-process server on the tiny random Llama with the real `tinker` SDK.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Iterator

import numpy as np

os.environ.setdefault("TINKER_TELEMETRY", "0")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

import tinker  # noqa: E402
from tinker import types  # noqa: E402

from gemtinker.engine.models import TINY_MODEL_NAME  # noqa: E402

API_KEY = "tml-local"
MODEL = TINY_MODEL_NAME


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(args: list[str], env: dict[str, str], ready_s: float = 60) -> Iterator[tuple[str, list[bytes]]]:
    """`python -m gemtinker serve ARGS --port P` as a child process: yields (base url, a list
    that holds the process's whole output once the block has ended), after /healthz answers;
    stopped with SIGINT on exit."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gemtinker", "serve", *args, "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    output: list[bytes] = []
    try:
        deadline = time.time() + ready_s
        while True:
            try:
                urllib.request.urlopen(url + "/api/v1/healthz", timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode() if proc.stdout else ""
                time.sleep(0.3)
        yield url, output
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        output.append(out or b"")


def rest_client(server) -> tinker.RestClient:
    return tinker.RestClient(base_url=server.base_url, api_key=API_KEY)


def datum_ce(tokens: list[int], weights: list[float] | None = None) -> types.Datum:
    n = len(tokens) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights or [1.0] * n},
    )


def datum_rl(tokens: list[int], logprobs: list[float], advantages: list[float]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "logprobs": logprobs, "advantages": advantages},
    )


def forward_logprobs(tc, tokens: list[int]) -> np.ndarray:
    """Logprob of tokens[1:] under the training client's current weights (no gradient)."""
    out = tc.forward([datum_ce(tokens, [0.0] * (len(tokens) - 1))], "cross_entropy").result()
    return np.asarray(out.loss_fn_outputs[0]["logprobs"].data, dtype=np.float64)


SEQ_A = [11, 42, 97, 305, 7, 1000, 64, 23, 512, 9, 77]
SEQ_B = [300, 12, 5, 88, 2048, 31, 4, 600, 15]
