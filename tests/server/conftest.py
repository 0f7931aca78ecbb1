"""Fixtures shared by the server tests that start a server of their own (a module fixture
`srv`, with limits or an engine of its own): an SDK client of it and a LoRA training client."""

from __future__ import annotations

import pytest
import tinker

from support.server import API_KEY, MODEL


@pytest.fixture(scope="module")
def sc(srv):
    client = tinker.ServiceClient(base_url=srv.base_url, api_key=API_KEY)
    yield client
    client.close("success")


@pytest.fixture(scope="module")
def tc(sc):
    return sc.create_lora_training_client(base_model=MODEL, rank=4).result()
