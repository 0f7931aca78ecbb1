"""`python -m gemtinker serve` as a separate process, driven by the SDK."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import tinker

from test_server_support import API_KEY, MODEL
from gemtinker.server.cli import main


def test_serve_refuses_public_bind_without_key(capsys):
    assert main(["--host", "0.0.0.0", "--model", MODEL]) == 2
    assert "--api-key" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_python_m_gemtinker_serve(tmp_path):
    port = _free_port()
    env = {**os.environ, "TINKER_TELEMETRY": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "gemtinker", "serve", "--model", MODEL, "--port", str(port),
                             "--root", str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/api/v1/healthz", timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode() if proc.stdout else ""
                time.sleep(0.3)
        caps = tinker.RestClient(base_url=url, api_key=API_KEY).get_server_capabilities().result()
        assert [m.model_name for m in caps.supported_models] == [MODEL]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert b"serving gemtinker/tiny-llama" in out
    assert (tmp_path / "server.sqlite").exists()
