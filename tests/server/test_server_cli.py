"""`python -m gemtinker serve` as a separate process, driven by the SDK."""

from __future__ import annotations

import os

import pytest
import tinker

from support.server import API_KEY, MODEL, serve_process
from gemtinker.server.cli import main

pytestmark = pytest.mark.integration  # a real (tiny) torch engine behind HTTP, or a server subprocess: `make test` only


def test_serve_refuses_public_bind_without_key(capsys):
    assert main(["--host", "0.0.0.0", "--model", MODEL]) == 2
    assert "--api-key" in capsys.readouterr().err


def test_python_m_gemtinker_serve(tmp_path):
    env = {**os.environ, "TINKER_TELEMETRY": "0"}
    with serve_process(["--model", MODEL, "--root", str(tmp_path)], env) as (url, output):
        caps = tinker.RestClient(base_url=url, api_key=API_KEY).get_server_capabilities().result()
        assert [m.model_name for m in caps.supported_models] == [MODEL]
    assert b"serving gemtinker/tiny-llama" in output[0]
    assert (tmp_path / "server.sqlite").exists()
