"""Checkpoint management through the real `tinker` SDK (issue 16): TTLs that expire, publish and
unpublish, copies, storage usage, optimizer state restored bit for bit, and who may do what.

Clients with another API key stand for another user: the shared test server enforces no key, so
each key is its own owner (app.owner_of).
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pytest
import tinker
import torch
from tinker import types

from support.clock import server_clock  # noqa: F401  (fixture)
from support.old_store import CKPT, write_old_db
from support.server import (
    API_KEY, MODEL, SEQ_A, SEQ_B, datum_ce, forward_logprobs, rest_client,
)

from gemtinker.server.checkpoints import STORE_FILE
from gemtinker.server.store import Store

pytestmark = pytest.mark.integration  # a real (tiny) torch engine behind HTTP, or a server subprocess: `make test` only

OTHER_KEY = "tml-someone-else"


@pytest.fixture(scope="module")
def tc(service_client):
    """A trained training client of the default key (API_KEY)."""
    c = service_client.create_lora_training_client(base_model=MODEL, rank=4, seed=5).result()
    c.forward_backward([datum_ce(SEQ_A)], "cross_entropy")
    c.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return c


@pytest.fixture(scope="module")
def other_rest(server):
    return tinker.RestClient(base_url=server.base_url, api_key=OTHER_KEY)


@pytest.fixture(scope="module")
def other_service(server):
    sc = tinker.ServiceClient(base_url=server.base_url, api_key=OTHER_KEY, project_id="local")
    yield sc
    sc.close("success")


def _listed(rc, run_id: str) -> dict[str, types.Checkpoint]:
    return {c.tinker_path: c for c in rc.list_checkpoints(run_id).result().checkpoints}


def _user_listed(rc) -> dict[str, types.Checkpoint]:
    return {c.tinker_path: c for c in rc.list_user_checkpoints(limit=10_000).result().checkpoints}


# ------------------------------------------------------------------ TTL
def test_a_short_ttl_really_expires_the_checkpoint(server, service_client, tc, server_clock):
    rc = rest_client(server)
    path = tc.save_state("ttl-short").result().path
    sampler_path = tc.save_weights_for_sampler("ttl-short-s").result().path
    assert _listed(rc, tc.model_id)[path].expires_at is None
    rc.set_checkpoint_ttl_from_tinker_path(path, 1).result()
    rc.set_checkpoint_ttl_from_tinker_path(sampler_path, 1).result()
    expires = _listed(rc, tc.model_id)[path].expires_at
    assert expires is not None and 0 < expires.timestamp() - time.time() <= 1.0
    server_clock.advance(1.3)

    assert path not in _listed(rc, tc.model_id) and path not in _user_listed(rc)
    assert sampler_path not in _listed(rc, tc.model_id)
    with pytest.raises(tinker.RequestFailedError, match=r"expired at .* \(its TTL ran out\)"):
        service_client.create_training_client_from_state(path).result()
    with pytest.raises(tinker.NotFoundError, match="expired"):
        service_client.create_sampling_client(model_path=sampler_path).result()
    with pytest.raises(tinker.NotFoundError, match="expired"):
        rc.get_weights_info_by_tinker_path(path).result()
    with pytest.raises(tinker.NotFoundError, match="expired"):  # too late to extend it
        rc.set_checkpoint_ttl_from_tinker_path(path, 3600).result()

    # The periodic purge (white-box) deletes rows and directories; the name is free again.
    directory = server.service.checkpoints.root / tc.model_id / "weights" / "ttl-short"
    assert directory.is_dir()
    gone = server.service.checkpoints.purge_expired()
    assert path in gone and sampler_path in gone and not directory.exists()
    assert server.service.store.get_checkpoint(path) is None
    assert tc.save_state("ttl-short").result().path == path
    assert _listed(rc, tc.model_id)[path].expires_at is None


def test_a_save_over_an_expired_name_needs_no_overwrite(server, tc, server_clock):
    rc = rest_client(server)
    path = tc.save_state("ttl-reuse", ttl_seconds=1).result().path
    assert _listed(rc, tc.model_id)[path].expires_at is not None
    server_clock.advance(1.2)
    assert tc.save_state("ttl-reuse").result().path == path  # not "already exists"
    row = _listed(rc, tc.model_id)[path]
    assert row.expires_at is None and row.size_bytes > 0


def test_ttl_can_be_set_extended_and_removed(server, tc):
    rc = rest_client(server)
    path = tc.save_state("ttl-set").result().path
    rc.set_checkpoint_ttl_from_tinker_path(path, 3600).result()
    first = _listed(rc, tc.model_id)[path].expires_at
    assert 3590 < first.timestamp() - time.time() <= 3600
    rc.set_checkpoint_ttl_from_tinker_path(path, 7200).result()
    assert _listed(rc, tc.model_id)[path].expires_at > first
    rc.set_checkpoint_ttl_from_tinker_path(path, None).result()
    assert _listed(rc, tc.model_id)[path].expires_at is None



def test_the_purge_leaves_a_checkpoint_alone_while_it_is_being_overwritten(server, tc, server_clock):
    path = tc.save_state("ttl-pinned", ttl_seconds=2).result().path
    ckpts = server.service.checkpoints
    tp = ckpts.resolve(path)[0]
    with ckpts.writing(tp, overwrite=True) as directory:  # what a save does around its write
        server_clock.advance(2.1)  # the checkpoint it overwrites expires meanwhile
        assert ckpts.purge_expired() == [] and directory.is_dir()
        with pytest.raises(tinker.BadRequestError, match="being saved right now"):
            rest_client(server).delete_checkpoint_from_tinker_path(path).result()
    assert path in ckpts.purge_expired()

@pytest.mark.parametrize("ttl", [0, 0.5, -5, 10 * 365 * 24 * 3600 + 1, 10**30, "soon", True, [60]])
def test_absurd_ttls_are_refused(server, tc, ttl):
    rc = rest_client(server)
    path = tc.save_state("ttl-absurd", overwrite=True).result().path
    with pytest.raises(tinker.BadRequestError, match="ttl_seconds must be a number of seconds"):
        rc.set_checkpoint_ttl_from_tinker_path(path, ttl).result()
    assert _listed(rc, tc.model_id)[path].expires_at is None


def test_ttl_of_unknown_or_malformed_checkpoints(server, tc):
    rc = rest_client(server)
    with pytest.raises(tinker.NotFoundError, match="not found"):
        rc.set_checkpoint_ttl_from_tinker_path(f"tinker://{tc.model_id}/weights/no-such", 60).result()
    with pytest.raises(tinker.BadRequestError, match="invalid training run id"):
        rc.set_checkpoint_ttl_from_tinker_path("tinker://bad$run/weights/x", 60).result()
    with pytest.raises(tinker.BadRequestError, match="invalid checkpoint name"):
        rc.publish_checkpoint_from_tinker_path(f"tinker://{tc.model_id}/weights/a b").result()


# ------------------------------------------------------------------ publish
def test_publish_and_unpublish_are_recorded_and_listed(server, tc):
    rc = rest_client(server)
    path = tc.save_state("pub").result().path
    assert _listed(rc, tc.model_id)[path].public is False
    rc.publish_checkpoint_from_tinker_path(path).result()
    assert _listed(rc, tc.model_id)[path].public is True
    assert _user_listed(rc)[path].public is True
    assert rc.get_training_run(tc.model_id).result().last_checkpoint.public is True
    # Durable: another connection to the same SQLite file reads it.
    store = Store(server.service.root / STORE_FILE)
    try:
        assert store.get_checkpoint(path)["public"] is True
    finally:
        store.close()
    rc.publish_checkpoint_from_tinker_path(path).result()  # idempotent
    rc.unpublish_checkpoint_from_tinker_path(path).result()
    assert _listed(rc, tc.model_id)[path].public is False
    # Saving over a published checkpoint makes new weights: they start private.
    rc.publish_checkpoint_from_tinker_path(path).result()
    tc.save_state("pub", overwrite=True).result()
    assert _listed(rc, tc.model_id)[path].public is False


def test_only_the_owner_changes_a_checkpoint_and_others_read_it_once_published(
        server, service_client, tc, other_rest, other_service):
    rc = rest_client(server)
    path = tc.save_state("owned").result().path
    sampler_path = tc.save_weights_for_sampler("owned-s").result().path
    for call in (lambda: other_rest.set_checkpoint_ttl_from_tinker_path(path, 60),
                 lambda: other_rest.publish_checkpoint_from_tinker_path(path),
                 lambda: other_rest.unpublish_checkpoint_from_tinker_path(path),
                 lambda: other_rest.delete_checkpoint_from_tinker_path(path)):
        with pytest.raises(tinker.PermissionDeniedError, match="belongs to another API key"):
            call().result()
    row = _listed(rc, tc.model_id)[path]
    assert row.expires_at is None and row.public is False

    # Private: another key can neither load, sample from, inspect nor copy it.
    with pytest.raises(tinker.RequestFailedError, match="not published"):
        other_service.create_training_client_from_state(path).result()
    for call in (lambda: other_service.create_sampling_client(model_path=sampler_path),
                 lambda: other_rest.get_weights_info_by_tinker_path(path),
                 lambda: other_rest.copy_weights(path, "local")):
        with pytest.raises(tinker.PermissionDeniedError, match="not published"):
            call().result()

    rc.publish_checkpoint_from_tinker_path(path).result()
    rc.publish_checkpoint_from_tinker_path(sampler_path).result()
    theirs = other_service.create_training_client_from_state(path).result()
    np.testing.assert_allclose(forward_logprobs(theirs, SEQ_B), forward_logprobs(tc, SEQ_B), atol=1e-5)
    other_service.create_sampling_client(model_path=sampler_path).result()
    assert other_rest.get_weights_info_by_tinker_path(path).result().lora_rank == 4
    # Published is still not theirs to change.
    with pytest.raises(tinker.PermissionDeniedError):
        other_rest.delete_checkpoint_from_tinker_path(path).result()
    rc.unpublish_checkpoint_from_tinker_path(path).result()
    with pytest.raises(tinker.RequestFailedError, match="not published"):
        other_service.create_training_client_from_state(path).result()


# ------------------------------------------------------------------ copy_weights
def test_rest_copy_weights_makes_an_independent_copy(server, service_client, tc):
    rc = rest_client(server)
    src = tc.save_weights_for_sampler("to-copy", user_metadata={"step": "7"}).result().path
    src_lp = service_client.create_sampling_client(model_path=src).result().compute_logprobs(
        types.ModelInput.from_ints(SEQ_A)).result()
    dst = rc.copy_weights(src, "local", ttl_seconds=3600).result()
    assert dst != src and dst.startswith("tinker://copy-") and dst.endswith("/sampler_weights/to-copy")
    run_id = dst[len("tinker://"):].split("/")[0]
    row = _listed(rc, run_id)[dst]
    assert row.checkpoint_type == "sampler" and row.user_metadata == {"step": "7"} and row.public is False
    assert 3590 < row.expires_at.timestamp() - time.time() <= 3600
    assert _listed(rc, tc.model_id)[src].expires_at is None  # the source's TTL is untouched
    run = rc.get_training_run(run_id).result()
    assert run.base_model == MODEL and run.lora_rank == 4
    # No bytes duplicated: the files are hard links (white-box).
    root = server.service.checkpoints.root
    a = sorted((root / tc.model_id / "sampler_weights" / "to-copy").iterdir())
    b = sorted((root / run_id / "sampler_weights" / "to-copy").iterdir())
    assert [p.name for p in a] == [p.name for p in b]
    assert all(os.stat(x).st_ino == os.stat(y).st_ino for x, y in zip(a, b))

    # Deleting the source leaves the copy whole.
    rc.delete_checkpoint_from_tinker_path(src).result()
    copy_lp = service_client.create_sampling_client(model_path=dst).result().compute_logprobs(
        types.ModelInput.from_ints(SEQ_A)).result()
    assert copy_lp == pytest.approx(src_lp, abs=1e-6)


def test_service_copy_weights_belongs_to_the_caller(server, tc, other_rest, other_service):
    rc = rest_client(server)
    src = tc.save_state("copy-pub").result().path
    rc.publish_checkpoint_from_tinker_path(src).result()
    dst = other_service.copy_weights(src).result()  # ServiceClient(project_id=...) sends it
    assert dst.endswith("/weights/copy-pub") and dst in _user_listed(other_rest)
    # The copy is the other key's: the source's owner cannot change it, its new owner can.
    with pytest.raises(tinker.PermissionDeniedError):
        rc.delete_checkpoint_from_tinker_path(dst).result()
    other_rest.set_checkpoint_ttl_from_tinker_path(dst, 3600).result()
    # A copy of training weights keeps the optimizer state: a training client resumes from it.
    resumed = other_service.create_training_client_from_state_with_optimizer(dst).result()
    np.testing.assert_allclose(forward_logprobs(resumed, SEQ_B), forward_logprobs(tc, SEQ_B), atol=1e-5)
    other_rest.delete_checkpoint_from_tinker_path(dst).result()
    assert dst not in _user_listed(other_rest)


def test_copy_weights_refuses_bad_requests(server, tc):
    rc = rest_client(server)
    src = tc.save_state("copy-bad", overwrite=True).result().path
    with pytest.raises(tinker.NotFoundError, match="not found"):
        rc.copy_weights(f"tinker://{tc.model_id}/weights/nope", "local").result()
    with pytest.raises(tinker.BadRequestError, match="invalid checkpoint path"):
        rc.copy_weights("/etc/passwd", "local").result()
    with pytest.raises(tinker.BadRequestError, match="ttl_seconds must be"):
        rc.copy_weights(src, "local", ttl_seconds=-1).result()
    with pytest.raises(ValueError, match="destination_project_id"):  # the SDK's own check
        os.environ.pop("TINKER_PROJECT_ID", None)
        rc.copy_weights(src)


# ------------------------------------------------------------------ storage usage
def test_checkpoint_storage_usage_counts_the_callers_checkpoints(server, server_clock):
    key = "tml-storage-user"
    sc = tinker.ServiceClient(base_url=server.base_url, api_key=key)
    try:
        mine = sc.create_lora_training_client(base_model=MODEL, rank=4).result()
        mine.save_state("s1").result()
        mine.save_weights_for_sampler("s2").result()
        mine.save_state("s3", ttl_seconds=1).result()
        server_clock.advance(1.1)  # an expired checkpoint no longer counts
        rc = tinker.RestClient(base_url=server.base_url, api_key=key)
        sizes = [c.size_bytes for c in rc.list_checkpoints(mine.model_id).result().checkpoints]
        usage = tinker.AdminClient(base_url=server.base_url, api_key=key).get_current_checkpoint_storage_usage().result()
        assert len(usage.data) == 1 and len(sizes) == 2
        item = usage.data[0]
        assert item.checkpoint_count == 2 and item.size_bytes == sum(sizes) > 0
        assert item.size_gigabytes == pytest.approx(sum(sizes) / 1e9)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            old = rc.get_current_checkpoint_storage_usage().result()  # deprecated spelling, same route
            assert old.data[0].checkpoint_count == 2
            with pytest.raises(tinker.BadRequestError, match="no projects"):
                rc.get_current_checkpoint_storage_usage("proj-x").result()
    finally:
        sc.close("success")


# ------------------------------------------------------------------ optimizer state
def _opt_state(server, model_id: str) -> tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    adapter = server.service.engine_for(MODEL)._get(model_id)  # white-box: the engine's Adam state
    opt = adapter.opt
    return opt.step, {k: v.clone() for k, v in opt.tensors().items()}, {
        k: v.detach().clone() for k, v in adapter.params().items()}


def test_load_state_with_optimizer_restores_adam_moments_bit_for_bit(server, service_client):
    tc = service_client.create_lora_training_client(base_model=MODEL, rank=4, seed=3).result()
    for lr in (1e-2, 5e-3, 2e-3):
        tc.forward_backward([datum_ce(SEQ_A), datum_ce(SEQ_B)], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=lr)).result()
    path = tc.save_state("adam").result().path
    step, moments, weights = _opt_state(server, tc.model_id)
    assert step == 3 and moments and all(t.abs().sum() > 0 for t in moments.values())

    fresh = service_client.create_lora_training_client(base_model=MODEL, rank=4, seed=99).result()
    assert _opt_state(server, fresh.model_id)[0] == 0
    with pytest.warns(FutureWarning):
        fresh.load_state_with_optimizer(path).result()
    step2, moments2, weights2 = _opt_state(server, fresh.model_id)
    assert step2 == step and moments2.keys() == moments.keys() and weights2.keys() == weights.keys()
    for k in moments:
        assert moments2[k].dtype == moments[k].dtype and torch.equal(moments2[k], moments[k]), k
    for k in weights:
        assert torch.equal(weights2[k], weights[k]), k

    # Without the optimizer: the same weights, a fresh Adam.
    plain = service_client.create_lora_training_client(base_model=MODEL, rank=4).result()
    with pytest.warns(FutureWarning):
        plain.load_state(path).result()
    step3, moments3, weights3 = _opt_state(server, plain.model_id)
    assert step3 == 0 and not moments3 and all(torch.equal(weights3[k], weights[k]) for k in weights)

    # A sampler checkpoint has no optimizer state: a clear error, and the client keeps working.
    spath = tc.save_weights_for_sampler("adam-s").result().path
    with pytest.warns(FutureWarning), pytest.raises(tinker.RequestFailedError, match="sampler checkpoint"):
        fresh.load_state_with_optimizer(spath).result()
    assert _opt_state(server, fresh.model_id)[0] == step
    assert fresh.forward_backward([datum_ce(SEQ_A)], "cross_entropy").result().metrics


def test_a_database_from_before_publish_and_session_owners_opens_and_gains_the_columns(tmp_path):
    write_old_db(tmp_path / "old.sqlite", added=0)
    store = Store(tmp_path / "old.sqlite")
    try:
        assert store.get_checkpoint(CKPT)["public"] is False
        row = store.get_session("old0session")
        assert row["owner"] is None and row["display_name"] is None
        store.set_checkpoint_public(CKPT, True)
        assert store.get_checkpoint(CKPT)["public"] is True
        store.add_session("t", [], {}, "0.38.0", owner="abc", display_name="run")
        assert store.list_sessions(10, 0, owner="abc") == ["t", "old0session"]  # old rows are anyone's
        assert store.list_sessions(10, 0, owner="xyz") == ["old0session"]
    finally:
        store.close()


def test_get_info_sampler_and_delete_checkpoint_by_run_and_id(server, tc):
    info = tc.get_info()
    assert info.model_id == tc.model_id and info.model_data.model_name == MODEL and info.lora_rank == 4
    sampler_path = tc.save_weights_for_sampler("by-id-s").result().path
    sampler = tc.create_sampling_client(sampler_path).result()
    lp = sampler.compute_logprobs(types.ModelInput.from_ints(SEQ_A)).result()
    np.testing.assert_allclose(lp[1:], forward_logprobs(tc, SEQ_A), atol=1e-4)
    rc = rest_client(server)
    path = tc.save_state("by-id").result().path
    rc.delete_checkpoint(tc.model_id, "weights/by-id").result()
    assert path not in _listed(rc, tc.model_id)
    with pytest.raises(tinker.NotFoundError, match="not found"):
        rc.delete_checkpoint(tc.model_id, "weights/by-id").result()


def test_a_retried_copy_request_makes_one_copy(server, tc):
    """The SDK sends one X-Idempotency-Key per copy_weights call and reuses it on retries."""
    import json
    import urllib.request

    src = tc.save_state("copy-once", overwrite=True).result().path
    body = json.dumps({"source_path": src, "destination_project_id": "local"}).encode()

    def post(key: str, api_key: str = API_KEY) -> str:
        req = urllib.request.Request(server.base_url + "/api/v1/copy_weights", data=body, method="POST", headers={
            "Content-Type": "application/json", "X-API-Key": api_key, "X-Idempotency-Key": key})
        return json.loads(urllib.request.urlopen(req, timeout=30).read())["tinker_path"]

    first = post("key-1")
    assert post("key-1") == first and post("key-2") != first
    rest_client(server).publish_checkpoint_from_tinker_path(src).result()
    assert post("key-1", api_key=OTHER_KEY) != first  # a key counts per API key
