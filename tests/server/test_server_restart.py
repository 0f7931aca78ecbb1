"""Stop the server and start a new one on the same root: every checkpoint made before is listed
and loads, with the same numbers, and stays published; one whose TTL ran out while the server was
down is purged at start; finished futures can still be retrieved."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
from tinker import types
import tinker

from support.clock import server_clock  # noqa: F401  (fixture)
from support.server import API_KEY, MODEL, SEQ_A, SEQ_B, datum_ce, forward_logprobs
from gemtinker.server import start_local

pytestmark = pytest.mark.integration  # a real (tiny) torch engine behind HTTP, or a server subprocess: `make test` only


def test_checkpoints_survive_a_restart(tmp_path, server_clock):
    root = tmp_path / "root"
    srv = start_local(models=[MODEL], root=root)
    try:
        sc = tinker.ServiceClient(base_url=srv.base_url, api_key=API_KEY)
        tc = sc.create_lora_training_client(base_model=MODEL, rank=4, user_metadata={"renderer_name": "r"}).result()
        for _ in range(2):
            tc.forward_backward([datum_ce(SEQ_A)], "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=1e-2))
        state = tc.save_state("before-restart").result().path
        sampler_path = tc.save_weights_for_sampler("before-restart").result().path
        short = tc.save_state("short-lived", ttl_seconds=1).result().path
        tinker.RestClient(base_url=srv.base_url, api_key=API_KEY).publish_checkpoint_from_tinker_path(state).result()
        lp_before = forward_logprobs(tc, SEQ_B)
        samp_before = sc.create_sampling_client(model_path=sampler_path).result()
        plp_before = samp_before.compute_logprobs(types.ModelInput.from_ints(SEQ_B)).result()
        # White-box: a finished protobuf future from before the restart.
        old_request_id = next(rid for rid, item in srv.service.futures._items.items()
                              if item.result is not None and item.result.kind == "proto")
        old_sampler_id = samp_before._sampling_session_id
        model_id = tc.model_id
        sc.close("success")
    finally:
        srv.stop()
    server_clock.advance(1.1)  # `short` expires while the server is down
    assert (root / "checkpoints" / model_id / "weights" / "short-lived").is_dir()

    with start_local(models=[MODEL], root=root) as srv2:
        rc = tinker.RestClient(base_url=srv2.base_url, api_key=API_KEY)
        listed = {c.tinker_path: c for c in rc.list_checkpoints(model_id).result().checkpoints}
        assert {state, sampler_path} <= set(listed) and short not in listed
        assert listed[state].public is True and listed[sampler_path].public is False
        assert not (root / "checkpoints" / model_id / "weights" / "short-lived").exists()
        assert rc.get_training_run(model_id).result().user_metadata == {"renderer_name": "r"}

        sc2 = tinker.ServiceClient(base_url=srv2.base_url, api_key=API_KEY)
        resumed = sc2.create_training_client_from_state_with_optimizer(state).result()
        np.testing.assert_allclose(forward_logprobs(resumed, SEQ_B), lp_before, atol=1e-5)
        sampler = sc2.create_sampling_client(model_path=sampler_path).result()
        plp = sampler.compute_logprobs(types.ModelInput.from_ints(SEQ_B)).result()
        np.testing.assert_allclose(plp[1:], plp_before[1:], atol=1e-5)
        # The sampling session made before the restart is reloaded from its checkpoint.
        assert rc.get_sampler(old_sampler_id).result().model_path == sampler_path
        req = urllib.request.Request(srv2.base_url + "/api/v1/retrieve_future", method="POST",
                                     data=json.dumps({"request_id": old_request_id}).encode(),
                                     headers={"Content-Type": "application/json", "X-API-Key": API_KEY})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.headers["content-type"] == "application/x-protobuf" and len(r.read()) > 0
        sc2.close("success")
