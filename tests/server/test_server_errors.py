"""Malformed input through the real SDK: a clear error naming the problem, and the server keeps
serving (the next good request on the same client works)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import tinker
from tinker import types

from support.server import (
    API_KEY, MODEL, SEQ_A, datum_ce, datum_rl, rest_client,
)


@pytest.fixture(scope="module")
def tc(service_client):
    return service_client.create_lora_training_client(base_model=MODEL, rank=4).result()


def _good_step_works(tc) -> None:
    out = tc.forward_backward([datum_ce(SEQ_A)], "cross_entropy").result()
    assert np.isfinite(out.metrics["loss:sum"])


def test_mismatched_lengths(tc):
    bad = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                      loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0]})
    with pytest.raises(tinker.RequestFailedError, match=r"datum 0: loss_fn_inputs\['weights'\] has length 2 but model_input has 3"):
        tc.forward_backward([bad], "cross_entropy").result()
    _good_step_works(tc)


def test_unknown_loss(tc):
    with pytest.raises(tinker.RequestFailedError, match=r"unknown loss_fn 'nope'; supported: cross_entropy"):
        tc.forward_backward([datum_ce(SEQ_A)], "nope").result()  # type: ignore[arg-type]
    _good_step_works(tc)


def test_nan_advantage(tc):
    d = datum_rl(SEQ_A, [-1.0] * 10, [1.0, float("nan")] + [0.0] * 8)
    with pytest.raises(tinker.RequestFailedError, match=r"loss_fn_inputs\['advantages'\] contains NaN or infinity \(position 1\)"):
        tc.forward_backward([d], "importance_sampling").result()
    _good_step_works(tc)


def test_out_of_vocab_token(tc, service_client):
    with pytest.raises(tinker.RequestFailedError, match=r"token id 10000000 is out of the vocabulary"):
        tc.forward_backward([datum_ce([1, 2, 10_000_000])], "cross_entropy").result()
    sc = service_client.create_sampling_client(base_model=MODEL).result()
    with pytest.raises(tinker.RequestFailedError, match=r"prompt: token id 10000000 is out of the vocabulary"):
        sc.sample(types.ModelInput.from_ints([1, 10_000_000]), 1, types.SamplingParams(max_tokens=2)).result()
    assert len(sc.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2)).result().sequences) == 1
    _good_step_works(tc)


def test_unknown_model(server, service_client, tc):
    with pytest.raises(tinker.RequestFailedError, match=rf"unknown base model 'no/such-model'; this server serves: {MODEL}"):
        service_client.create_lora_training_client(base_model="no/such-model", rank=4).result()
    with pytest.raises(tinker.BadRequestError, match=rf"unknown base model 'no/such-model'; this server serves: {MODEL}"):
        service_client.create_sampling_client(base_model="no/such-model").result()
    with pytest.raises(tinker.NotFoundError, match="unknown training run"):
        rest_client(server).get_training_run("nobody:train:0").result()
    _good_step_works(tc)


@pytest.mark.parametrize("path", ["tinker://../../etc", "tinker://../../etc/weights/passwd",
                                  "tinker://..%2F..%2Fetc/weights/x", "tinker://run/weights/..", "/etc/passwd"])
def test_path_escape_is_refused(service_client, tc, path):
    with pytest.raises(Exception, match=r"invalid (checkpoint path|checkpoint name|training run id)"):
        service_client.create_training_client_from_state(path).result()
    if path.startswith("tinker://"):
        with pytest.raises(Exception, match=r"invalid (checkpoint path|checkpoint name|training run id)"):
            service_client.create_sampling_client(model_path=path).result()
    _good_step_works(tc)


def test_bad_checkpoint_name_and_duplicate(tc):
    with pytest.raises(tinker.RequestFailedError, match="invalid checkpoint name"):
        tc.save_state("../escape").result()
    tc.save_state("dup").result()
    with pytest.raises(tinker.RequestFailedError, match="already exists"):
        tc.save_state("dup").result()
    assert tc.save_state("dup", overwrite=True).result().path.endswith("/weights/dup")
    _good_step_works(tc)


def test_sampler_checkpoint_is_not_a_training_state(service_client, tc):
    p = tc.save_weights_for_sampler("only-sampler").result().path
    with pytest.raises(tinker.RequestFailedError, match="is a sampler checkpoint"):
        service_client.create_training_client_from_state(p).result()


def test_api_key_is_checked_when_set(tmp_path):
    from gemtinker.server import start_local

    with start_local(models=[MODEL], root=tmp_path, api_key="tml-secret") as srv:
        with pytest.raises(urllib.error.HTTPError) as e:
            _post(srv, "/api/v1/client/config", b"{}", key="tml-wrong")
        assert e.value.code == 401 and b"X-API-Key" in e.value.read()
        caps = tinker.RestClient(base_url=srv.base_url, api_key="tml-secret").get_server_capabilities().result()
        assert caps.supported_models[0].model_name == MODEL


def _post(srv, path: str, body: bytes, ctype: str = "application/json", key: str = API_KEY) -> dict:
    req = urllib.request.Request(srv.base_url + path, data=body, method="POST",
                                 headers={"Content-Type": ctype, "X-API-Key": key})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_unload_model_then_requests_fail_cleanly(server, service_client):
    tc2 = service_client.create_lora_training_client(base_model=MODEL, rank=4).result()
    rid = _post(server, "/api/v1/unload_model", json.dumps({"model_id": tc2.model_id}).encode())["request_id"]
    out = _post(server, "/api/v1/retrieve_future", json.dumps({"request_id": rid}).encode())
    assert out == {"type": "unload_model", "model_id": tc2.model_id}
    with pytest.raises(tinker.RequestFailedError, match="is not loaded on this server"):
        tc2.forward_backward([datum_ce(SEQ_A)], "cross_entropy").result()


def test_ensure_backend_starts_one_local_server(monkeypatch, tmp_path):
    from gemtinker.server import ensure_backend

    monkeypatch.delenv("TINKER_BASE_URL", raising=False)
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    url = ensure_backend(models=[MODEL], root=tmp_path)
    import os

    assert os.environ["TINKER_BASE_URL"] == url and os.environ["TINKER_API_KEY"].startswith("tml-")
    assert ensure_backend() == url  # once per process
    caps = tinker.RestClient().get_server_capabilities().result()  # configured from the environment only
    assert caps.supported_models[0].model_name == MODEL
    monkeypatch.setenv("TINKER_BASE_URL", "http://example.invalid:1")
    assert ensure_backend() == "http://example.invalid:1"
