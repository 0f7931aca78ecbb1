"""The SDK methods that no other test drives (issue 16): the deprecated `*_async` aliases of
ServiceClient, TrainingClient, SamplingClient, RestClient and AdminClient, plus
`ServiceClient.create_rest_client` and the two `get_tokenizer`s, each called through the real
`tinker` SDK against the server.

Each alias is compared with what its sync spelling returns, or checked for its documented
effect (a TTL set, a checkpoint deleted, published, ...). The aliases come in two shapes (see
the SDK source): most are coroutines whose value is the result, but
`TrainingClient.forward_backward_custom_async`, `load_state*_async`, `save_weights_*_async`
return an APIFuture that must be awaited in turn.

`tc` is trained once and never trained again, so every test may compare with `saved.logprobs`;
tests that train use a client of their own.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pytest
import tinker
import torch
from tinker import types

from support.server import (
    API_KEY, MODEL, SEQ_A, SEQ_B, datum_ce, forward_logprobs, rest_client,
)

# Every alias is deprecated with a FutureWarning; calling them is the point here.
# integration: a real (tiny) torch engine behind HTTP: `make test` only
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.integration]

T = TypeVar("T")
STORAGE_KEY = "tml-alias-storage"  # its own owner, so its storage usage is exactly known
TEXTS = ["Hello world", "def f(x):\n    return x * 2  # ünïcödé, 123"]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@dataclass
class Saved:
    state: str  # tinker:// path of tc's save_state (weights + Adam)
    sampler: str  # tinker:// path of tc's save_weights_for_sampler
    external: str  # tinker:// path of tc's save_weights_external
    logprobs: np.ndarray  # tc's logprobs of SEQ_A[1:] (tc is never trained after saving)


@pytest.fixture(scope="module")
def tc(service_client) -> tinker.TrainingClient:
    c = service_client.create_lora_training_client(base_model=MODEL, rank=4, seed=7).result()
    c.forward_backward([datum_ce(SEQ_A), datum_ce(SEQ_B)], "cross_entropy")
    c.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return c


@pytest.fixture(scope="module")
def saved(tc) -> Saved:
    return Saved(state=tc.save_state("alias-state").result().path,
                 sampler=tc.save_weights_for_sampler("alias-sampler").result().path,
                 external=tc.save_weights_external("alias-ext").result().path,
                 logprobs=forward_logprobs(tc, SEQ_A))


@pytest.fixture(scope="module")
def rc(server) -> tinker.RestClient:
    return rest_client(server)


@pytest.fixture(scope="module")
def storage_clients(server):
    """(RestClient, AdminClient) of STORAGE_KEY, which owns exactly two checkpoints."""
    sc = tinker.ServiceClient(base_url=server.base_url, api_key=STORAGE_KEY)
    mine = sc.create_lora_training_client(base_model=MODEL, rank=4).result()
    mine.save_state("u1").result()
    mine.save_weights_for_sampler("u2").result()
    rc = tinker.RestClient(base_url=server.base_url, api_key=STORAGE_KEY)
    sizes = [c.size_bytes for c in rc.list_checkpoints(mine.model_id).result().checkpoints]
    assert len(sizes) == 2 and all(s > 0 for s in sizes)
    yield rc, tinker.AdminClient(base_url=server.base_url, api_key=STORAGE_KEY), sum(sizes)
    sc.close("success")


def _sampler_logprobs(sampler: tinker.SamplingClient) -> np.ndarray:
    lps = sampler.compute_logprobs(types.ModelInput.from_ints(SEQ_A)).result()
    return np.asarray(lps[1:], dtype=np.float64)


def _listed(rc: tinker.RestClient, run_id: str) -> dict[str, types.Checkpoint]:
    return {c.tinker_path: c for c in rc.list_checkpoints(run_id).result().checkpoints}


def _opt_state(server, model_id: str) -> tuple[int, dict[str, torch.Tensor]]:
    opt = server.service.engine_for(MODEL)._get(model_id).opt  # white-box: the engine's Adam
    return opt.step, {k: v.clone() for k, v in opt.tensors().items()}


def _assert_encodes_like_the_engine(server, tokenizer) -> None:
    engine_tok = server.service.engine_for(MODEL).tokenizer
    assert len(tokenizer) == len(engine_tok)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == engine_tok.encode(text) and len(ids) >= 2
        assert tokenizer.decode(ids, skip_special_tokens=True) == engine_tok.decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------ ServiceClient
def test_service_create_rest_client(server, service_client, tc, saved):
    made = service_client.create_rest_client()
    assert isinstance(made, tinker.RestClient)
    assert made.get_training_run(tc.model_id).result() == rest_client(server).get_training_run(tc.model_id).result()
    assert saved.state in _listed(made, tc.model_id)


def test_service_create_sampling_client_async(service_client, saved):
    from_path = run(service_client.create_sampling_client_async(model_path=saved.sampler))
    from_base = run(service_client.create_sampling_client_async(base_model=MODEL))
    want = _sampler_logprobs(service_client.create_sampling_client(model_path=saved.sampler).result())
    np.testing.assert_array_equal(_sampler_logprobs(from_path), want)
    np.testing.assert_allclose(want, saved.logprobs, atol=1e-4)
    base_want = _sampler_logprobs(service_client.create_sampling_client(base_model=MODEL).result())
    np.testing.assert_array_equal(_sampler_logprobs(from_base), base_want)
    assert np.abs(base_want - want).max() > 1e-3  # the checkpoint's adapter really is applied


def test_service_create_training_client_from_state_async(service_client, saved):
    resumed = run(service_client.create_training_client_from_state_async(saved.state))
    assert isinstance(resumed, tinker.TrainingClient) and resumed.get_info().model_data.model_name == MODEL
    np.testing.assert_allclose(forward_logprobs(resumed, SEQ_A), saved.logprobs, atol=1e-5)


def test_service_get_server_capabilities_async(service_client):
    got = run(service_client.get_server_capabilities_async())
    assert got == service_client.get_server_capabilities()
    assert MODEL in [m.model_name for m in got.supported_models]


# ------------------------------------------------------------------ TrainingClient
def test_training_create_sampling_client_async(tc, saved):
    sampler = run(tc.create_sampling_client_async(saved.sampler))
    np.testing.assert_allclose(_sampler_logprobs(sampler), saved.logprobs, atol=1e-4)


def test_training_forward_backward_custom_async(service_client):
    sync_tc, alias_tc = (service_client.create_lora_training_client(base_model=MODEL, rank=4, seed=3).result()
                         for _ in range(2))
    data = [types.Datum(model_input=types.ModelInput.from_ints(SEQ_A[:-1]),
                        loss_fn_inputs={"target_tokens": SEQ_A[1:]})]

    def mean_nll(data, logprobs_list):
        loss = -torch.stack([lp.mean() for lp in logprobs_list]).sum()
        return loss, {"nll": float(loss.detach())}

    before = forward_logprobs(alias_tc, SEQ_A)
    want = sync_tc.forward_backward_custom(data, mean_nll).result()

    async def alias() -> types.ForwardBackwardOutput:
        return await (await alias_tc.forward_backward_custom_async(data, mean_nll))

    got = run(alias())
    assert got.metrics["loss:sum"] == pytest.approx(-before.mean(), abs=1e-4)
    assert got.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], abs=1e-6)
    for c in (sync_tc, alias_tc):  # the same gradient: the same step
        c.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    after = forward_logprobs(alias_tc, SEQ_A)
    assert after.mean() > before.mean()
    np.testing.assert_allclose(after, forward_logprobs(sync_tc, SEQ_A), atol=1e-6)


def test_training_get_info_async(tc):
    info = run(tc.get_info_async())
    assert info == tc.get_info()
    assert info.model_id == tc.model_id and info.model_data.model_name == MODEL and info.lora_rank == 4


def test_training_get_tokenizer(server, tc):
    _assert_encodes_like_the_engine(server, tc.get_tokenizer())


def test_training_load_state_async(service_client, saved):
    fresh = service_client.create_lora_training_client(base_model=MODEL, rank=4, seed=11).result()
    assert np.abs(forward_logprobs(fresh, SEQ_A) - saved.logprobs).max() > 1e-4

    async def alias() -> types.LoadWeightsResponse:
        return await (await fresh.load_state_async(saved.state))

    assert run(alias()).path == saved.state
    np.testing.assert_allclose(forward_logprobs(fresh, SEQ_A), saved.logprobs, atol=1e-5)


def test_training_load_state_with_optimizer_async(server, service_client, tc, saved):
    fresh = service_client.create_lora_training_client(base_model=MODEL, rank=4, seed=12).result()
    assert _opt_state(server, fresh.model_id)[0] == 0

    async def alias() -> types.LoadWeightsResponse:
        return await (await fresh.load_state_with_optimizer_async(saved.state))

    assert run(alias()).path == saved.state
    step, moments = _opt_state(server, fresh.model_id)
    want_step, want_moments = _opt_state(server, tc.model_id)
    assert step == want_step == 1 and moments.keys() == want_moments.keys() and moments
    assert all(torch.equal(moments[k], want_moments[k]) for k in moments)
    np.testing.assert_allclose(forward_logprobs(fresh, SEQ_A), saved.logprobs, atol=1e-5)


def _fetch_all(rc: tinker.RestClient, path: str) -> dict[str, bytes]:
    urls = rc.get_external_weights_urls(path).result().urls
    return {name: urllib.request.urlopen(url, timeout=30).read() for name, url in urls.items()}


def test_training_save_weights_external_async(rc, tc, saved):
    async def alias() -> types.SaveWeightsExternalResponse:
        return await (await tc.save_weights_external_async("alias-ext-2"))

    path = run(alias()).path
    assert path == f"tinker://{tc.model_id}/external_weights/alias-ext-2"
    assert _listed(rc, tc.model_id)[path].checkpoint_type == "external"
    got, want = _fetch_all(rc, path), _fetch_all(rc, saved.external)  # same weights, same files
    assert got.keys() == want.keys() and "adapter_model.safetensors" in got
    assert got["adapter_model.safetensors"] == want["adapter_model.safetensors"]


def test_training_save_weights_for_sampler_async(service_client, rc, tc, saved):
    async def alias() -> types.SaveWeightsForSamplerResponse:
        return await (await tc.save_weights_for_sampler_async("alias-s4s"))

    path = run(alias()).path
    assert path == f"tinker://{tc.model_id}/sampler_weights/alias-s4s"
    assert _listed(rc, tc.model_id)[path].checkpoint_type == "sampler"
    sampler = service_client.create_sampling_client(model_path=path).result()
    np.testing.assert_allclose(_sampler_logprobs(sampler), saved.logprobs, atol=1e-4)


# ------------------------------------------------------------------ SamplingClient
def test_sampling_get_base_model_async(service_client, saved):
    sampler = service_client.create_sampling_client(model_path=saved.sampler).result()
    assert run(sampler.get_base_model_async()) == sampler.get_base_model() == MODEL


def test_sampling_get_tokenizer(server, service_client, saved):
    sampler = service_client.create_sampling_client(model_path=saved.sampler).result()
    _assert_encodes_like_the_engine(server, sampler.get_tokenizer())


# ------------------------------------------------------------------ RestClient
def test_rest_copy_weights_async(service_client, rc, saved):
    dst = run(rc.copy_weights_async(saved.sampler, "local", ttl_seconds=3600))
    assert dst != saved.sampler and dst.startswith("tinker://copy-") and dst.endswith("/sampler_weights/alias-sampler")
    row = _listed(rc, dst[len("tinker://"):].split("/")[0])[dst]
    assert row.checkpoint_type == "sampler" and 3590 < row.expires_at.timestamp() - time.time() <= 3600
    copy = service_client.create_sampling_client(model_path=dst).result()
    want = service_client.create_sampling_client(model_path=saved.sampler).result()
    np.testing.assert_array_equal(_sampler_logprobs(copy), _sampler_logprobs(want))


def test_rest_delete_checkpoint_async(rc, tc):
    path = tc.save_state("alias-del").result().path
    assert path in _listed(rc, tc.model_id)
    assert run(rc.delete_checkpoint_async(tc.model_id, "weights/alias-del")) is None
    assert path not in _listed(rc, tc.model_id)
    with pytest.raises(tinker.NotFoundError, match="not found"):
        run(rc.delete_checkpoint_async(tc.model_id, "weights/alias-del"))


def test_rest_delete_checkpoint_from_tinker_path_async(service_client, rc, tc):
    path = tc.save_weights_for_sampler("alias-del-path").result().path
    assert path in _listed(rc, tc.model_id)
    assert run(rc.delete_checkpoint_from_tinker_path_async(path)) is None
    assert path not in _listed(rc, tc.model_id)
    with pytest.raises(Exception, match="not found"):
        service_client.create_sampling_client(model_path=path).result()


def test_rest_get_current_checkpoint_storage_usage_async(storage_clients):
    rc, _, total = storage_clients
    got = run(rc.get_current_checkpoint_storage_usage_async())
    assert got == rc.get_current_checkpoint_storage_usage().result()
    assert len(got.data) == 1 and got.data[0].checkpoint_count == 2 and got.data[0].size_bytes == total


def test_rest_get_external_weights_urls_async(rc, saved):
    got = run(rc.get_external_weights_urls_async(saved.external))
    want = rc.get_external_weights_urls(saved.external).result()
    assert got.urls.keys() == want.urls.keys() and "adapter_config.json" in got.urls
    for name, url in got.urls.items():  # each URL serves the file the sync call's URL serves
        assert urllib.request.urlopen(url, timeout=30).read() == urllib.request.urlopen(want.urls[name], timeout=30).read()


def test_rest_get_sampler_async(service_client, rc, saved):
    sampler = service_client.create_sampling_client(model_path=saved.sampler).result()
    got = run(rc.get_sampler_async(sampler._sampling_session_id))
    assert got == rc.get_sampler(sampler._sampling_session_id).result()
    assert got.model_path == saved.sampler and got.base_model == MODEL


def test_rest_get_session_async(service_client, rc, tc):
    session_id = service_client.holder.get_session_id()
    got = run(rc.get_session_async(session_id))
    assert got == rc.get_session(session_id).result() and tc.model_id in got.training_run_ids


def test_rest_get_training_run_async(rc, tc, saved):
    got = run(rc.get_training_run_async(tc.model_id))
    assert got == rc.get_training_run(tc.model_id).result()
    assert got.training_run_id == tc.model_id and got.base_model == MODEL and got.lora_rank == 4


def test_rest_get_training_run_by_tinker_path_async(rc, tc, saved):
    got = run(rc.get_training_run_by_tinker_path_async(saved.state))
    assert got == rc.get_training_run_by_tinker_path(saved.state).result() and got.training_run_id == tc.model_id


def test_rest_list_checkpoints_async(rc, tc, saved):
    got = run(rc.list_checkpoints_async(tc.model_id))
    assert got == rc.list_checkpoints(tc.model_id).result()
    kinds = {c.tinker_path: c.checkpoint_type for c in got.checkpoints}
    assert kinds[saved.state] == "training" and kinds[saved.sampler] == "sampler"


def test_rest_list_sessions_async(service_client, rc):
    got = run(rc.list_sessions_async(limit=1000))
    assert got == rc.list_sessions(limit=1000).result()
    assert service_client.holder.get_session_id() in got.sessions


def test_rest_list_training_runs_async(rc, tc):
    got = run(rc.list_training_runs_async(limit=100))
    assert got == rc.list_training_runs(limit=100).result()
    assert tc.model_id in [r.training_run_id for r in got.training_runs]


def test_rest_list_user_checkpoints_async(rc, saved):
    got = run(rc.list_user_checkpoints_async(limit=1000))
    assert got == rc.list_user_checkpoints(limit=1000).result()
    assert {saved.state, saved.sampler} <= {c.tinker_path for c in got.checkpoints}


def test_rest_publish_checkpoint_from_tinker_path_async(rc, tc):
    path = tc.save_state("alias-pub").result().path
    assert _listed(rc, tc.model_id)[path].public is False
    assert run(rc.publish_checkpoint_from_tinker_path_async(path)) is None
    assert _listed(rc, tc.model_id)[path].public is True
    rc.unpublish_checkpoint_from_tinker_path(path).result()


def test_rest_unpublish_checkpoint_from_tinker_path_async(rc, tc):
    path = tc.save_state("alias-unpub").result().path
    rc.publish_checkpoint_from_tinker_path(path).result()
    assert _listed(rc, tc.model_id)[path].public is True
    assert run(rc.unpublish_checkpoint_from_tinker_path_async(path)) is None
    assert _listed(rc, tc.model_id)[path].public is False


def test_rest_set_checkpoint_ttl_from_tinker_path_async(rc, tc):
    path = tc.save_state("alias-ttl").result().path
    assert _listed(rc, tc.model_id)[path].expires_at is None
    assert run(rc.set_checkpoint_ttl_from_tinker_path_async(path, 3600)) is None
    assert 3590 < _listed(rc, tc.model_id)[path].expires_at.timestamp() - time.time() <= 3600
    run(rc.set_checkpoint_ttl_from_tinker_path_async(path, None))
    assert _listed(rc, tc.model_id)[path].expires_at is None


# ------------------------------------------------------------------ AdminClient
def test_admin_get_current_checkpoint_storage_usage_async(storage_clients):
    _, admin, total = storage_clients
    got = run(admin.get_current_checkpoint_storage_usage_async())
    assert got == admin.get_current_checkpoint_storage_usage().result()
    assert len(got.data) == 1 and got.data[0].checkpoint_count == 2 and got.data[0].size_bytes == total


# ------------------------------------------------------------------ refused, as their sync methods
@pytest.mark.parametrize("method, call", [
    ("export_session_trace", lambda rc, admin: rc.export_session_trace_async("s")),
    ("assign_session_project", lambda rc, admin: rc.assign_session_project_async("s", "proj")),
    ("get_audit_log", lambda rc, admin: rc.get_audit_log_async()),
    ("get_billing_usage", lambda rc, admin: rc.get_billing_usage_async("2026-01-01", "2026-02-01")),
    ("get_audit_log", lambda rc, admin: admin.get_audit_log_async()),
    ("get_billing_usage", lambda rc, admin: admin.get_billing_usage_async("2026-01-01", "2026-02-01")),
], ids=["rest-export_session_trace", "rest-assign_session_project", "rest-get_audit_log",
        "rest-get_billing_usage", "admin-get_audit_log", "admin-get_billing_usage"])
def test_refused_async_aliases_name_the_method_and_why(server, rc, method, call):
    admin = tinker.AdminClient(base_url=server.base_url, api_key=API_KEY)
    t0 = time.time()
    with pytest.raises(tinker.NotFoundError, match=rf"{method} .*is not offered by this server: "):
        run(call(rc, admin))
    assert time.time() - t0 < 10  # not retried
