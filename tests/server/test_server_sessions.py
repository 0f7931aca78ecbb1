"""Sessions through the real `tinker` SDK (issue 16): list_sessions, get_session and
search_sessions; and the SDK methods of this area that the server does not offer, which must
fail at once with a message naming the method and the reason (no hang, no silent no-op)."""

from __future__ import annotations

import time
import uuid
import warnings

import pytest
import tinker
from tinker import types

from support.server import (
    API_KEY, MODEL, rest_client,
)

OTHER_KEY = "tml-someone-else"


def _session_id(sc: tinker.ServiceClient) -> str:
    return sc.holder.get_session_id()


def _search(rc: tinker.RestClient, **kw) -> types.SessionSearchResponse:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tinker.ExperimentalWarning)
        return rc.search_sessions(types.SessionSearchRequest(**kw)).result()


@pytest.fixture(scope="module")
def tagged(server):
    """Three sessions of API_KEY and one of OTHER_KEY that share a unique user_metadata tag,
    made in this order (oldest first): a, b (finished 'errored'), c, other."""
    tag = uuid.uuid4().hex[:8]
    made = {}
    clients = []
    for name, key, display in (("a", API_KEY, "Nightly Sweep 1"), ("b", API_KEY, "ablation"),
                               ("c", API_KEY, "nightly sweep 2"), ("other", OTHER_KEY, "Nightly Sweep 3")):
        sc = tinker.ServiceClient(user_metadata={"tag": tag, "name": name}, display_name=display,
                                  base_url=server.base_url, api_key=key)
        made[name] = _session_id(sc)
        clients.append(sc)
        time.sleep(0.01)  # distinct creation times
    clients[1].close("errored").result()
    yield tag, made
    for sc in clients[:1] + clients[2:]:
        sc.close("success")


def test_list_sessions_owned_and_accessible(server, tagged):
    _, made = tagged
    rc = rest_client(server)
    owned = rc.list_sessions(limit=1000).result().sessions
    assert {made["a"], made["b"], made["c"]} <= set(owned) and made["other"] not in owned
    # Newest first.
    assert owned.index(made["c"]) < owned.index(made["b"]) < owned.index(made["a"])
    everyone = rc.list_sessions(limit=1000, access_scope="accessible").result().sessions
    assert made["other"] in everyone
    page = rc.list_sessions(limit=1, offset=1).result().sessions
    assert page == owned[1:2]
    with pytest.raises(tinker.BadRequestError, match="limit must be in 0..10000"):
        rc.list_sessions(limit=10**9).result()


def test_get_session_lists_its_runs_samplers_and_metadata(server, service_client):
    tc = service_client.create_lora_training_client(base_model=MODEL, rank=4).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    rc = rest_client(server)
    session_id = _session_id(service_client)
    got = rc.get_session(session_id).result()
    assert tc.model_id in got.training_run_ids
    assert sampler.get_sampler_handle() and len(got.sampler_ids) >= 1
    with pytest.raises(tinker.NotFoundError, match="unknown session 'nope'"):
        rc.get_session("nope").result()


def test_get_session_shows_display_name_and_metadata(server, tagged):
    tag, made = tagged
    got = rest_client(server).get_session(made["a"]).result()
    assert got.display_name == "Nightly Sweep 1" and got.user_metadata == {"tag": tag, "name": "a"}
    assert got.training_run_ids == [] and got.sampler_ids == []


def test_search_sessions_by_metadata_pages_newest_first(server, tagged):
    tag, made = tagged
    rc = rest_client(server)
    page = _search(rc, user_metadata={"tag": tag}, limit=2)
    assert [s.session_id for s in page.sessions] == [made["c"], made["b"]] and page.next_cursor is not None
    first = page.sessions[0]
    assert first.display_name == "nightly sweep 2" and first.user_metadata == {"tag": tag, "name": "c"}
    assert first.project_id == "local" and first.checkpoints_count == 0 and first.checkpoint_storage_bytes == 0
    assert first.status.type == "active"
    assert page.sessions[1].status.type == "client_finished" and page.sessions[1].status.reason.type == "errored"
    rest = _search(rc, user_metadata={"tag": tag}, limit=2, cursor=page.next_cursor)
    assert [s.session_id for s in rest.sessions] == [made["a"]] and rest.next_cursor is None
    # Every pair must hold.
    assert [s.session_id for s in _search(rc, user_metadata={"tag": tag, "name": "b"}).sessions] == [made["b"]]


def test_search_sessions_by_name_id_status_and_owner(server, tagged):
    tag, made = tagged
    rc = rest_client(server)
    ids = lambda res: [s.session_id for s in res.sessions]  # noqa: E731
    # Case-insensitive words in any order; session_id OR display_name.
    assert ids(_search(rc, user_metadata={"tag": tag}, display_name="SWEEP nightly")) == [made["c"], made["a"]]
    assert ids(_search(rc, user_metadata={"tag": tag}, display_name="ablation", session_id=made["a"])) == [
        made["b"], made["a"]]
    assert ids(_search(rc, session_id=made["b"])) == [made["b"]]
    # Statuses.
    finished = types.ClientFinishedSessionStatusQuery(reasons=["errored"])
    assert ids(_search(rc, user_metadata={"tag": tag}, statuses=[finished])) == [made["b"]]
    assert ids(_search(rc, user_metadata={"tag": tag},
                       statuses=[types.ClientFinishedSessionStatusQuery(reasons=["success"])])) == []
    assert ids(_search(rc, user_metadata={"tag": tag}, statuses=[types.ActiveSessionStatusQuery()])) == [
        made["c"], made["a"]]
    assert ids(_search(rc, user_metadata={"tag": tag}, statuses=[types.FailedSessionStatusQuery()])) == []
    # Owners: one's own by default; everyone's with AccessibleSearchOwner.
    assert made["other"] not in ids(_search(rc, user_metadata={"tag": tag}))
    everyone = _search(rc, user_metadata={"tag": tag}, owner=types.AccessibleSearchOwner())
    assert ids(everyone)[0] == made["other"] and len(everyone.sessions) == 4
    assert everyone.sessions[0].owner != everyone.sessions[1].owner


def test_search_sessions_refuses_what_it_cannot_answer(server):
    rc = rest_client(server)
    with pytest.raises(tinker.BadRequestError, match="no projects"):
        _search(rc, project_ids=["proj-1"])
    with pytest.raises(tinker.BadRequestError, match="UserSearchOwner is not offered"):
        _search(rc, owner=types.UserSearchOwner(owner_urns=["tml:user:1"]))


def test_search_sessions_counts_checkpoints(server):
    sc = tinker.ServiceClient(user_metadata={"tag": uuid.uuid4().hex}, base_url=server.base_url, api_key=API_KEY)
    try:
        tc = sc.create_lora_training_client(base_model=MODEL, rank=4).result()
        tc.save_state("one").result()
        tc.save_weights_for_sampler("two").result()
        res = _search(rest_client(server), session_id=_session_id(sc))
        sizes = [c.size_bytes for c in rest_client(server).list_checkpoints(tc.model_id).result().checkpoints]
        assert res.sessions[0].checkpoints_count == 2 and res.sessions[0].checkpoint_storage_bytes == sum(sizes)
    finally:
        sc.close("success")


# ------------------------------------------------------------------ not offered here
@pytest.mark.parametrize("method, call", [
    ("export_session_trace", lambda rc, admin: rc.export_session_trace("s")),
    ("assign_session_project", lambda rc, admin: rc.assign_session_project("s", "proj")),
    ("get_audit_log", lambda rc, admin: admin.get_audit_log()),
    ("get_billing_usage", lambda rc, admin: admin.get_billing_usage("2026-01-01", "2026-02-01")),
    ("get_audit_log", lambda rc, admin: rc.get_audit_log()),  # the deprecated RestClient spellings
    ("get_billing_usage", lambda rc, admin: rc.get_billing_usage("2026-01-01", "2026-02-01")),
])
def test_routes_not_offered_name_the_method_and_why(server, method, call):
    rc = rest_client(server)
    admin = tinker.AdminClient(base_url=server.base_url, api_key=API_KEY)
    t0 = time.time()
    with pytest.raises(tinker.NotFoundError, match=rf"{method} .*is not offered by this server: "), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        call(rc, admin).result()
    assert time.time() - t0 < 10  # not retried


def test_whoami_is_refused_by_the_sdk_itself(server):
    # No JWT auth here (client config pjwt_auth_enabled=false): the SDK refuses before any request.
    with pytest.raises(RuntimeError, match="whoami requires JWT auth"):
        rest_client(server).whoami().result()


@pytest.mark.parametrize("route, method, body, needle", [
    ("sessions/search", "POST", {"limit": 500}, "search_sessions: invalid request"),
    ("sessions/search", "POST", {"cursor": {"last_created_at": "yesterday", "last_session_id": "x"}},
     "search_sessions: invalid request"),
    ("sessions/search", "POST", {"display_name": ""}, "search_sessions: invalid request"),
    ("sessions/search", "POST", {"owner": {"type": "root"}}, "search_sessions: invalid request"),
    ("sessions?access_scope=everything", "GET", None, "access_scope must be 'owned' or 'accessible'"),
    ("training_runs/r:train:0/checkpoints/weights/x/ttl", "PUT", {}, "set_checkpoint_ttl needs ttl_seconds"),
    ("training_runs/r:train:0/checkpoints/bogus/x/ttl", "PUT", {"ttl_seconds": 60}, "invalid checkpoint path"),
    ("copy_weights", "POST", {"source_path": "tinker://a/weights/b", "rm": "-rf"}, "copy_weights: invalid request"),
    ("copy_weights", "POST", {"source_path": "tinker://../../etc/weights/b"}, "invalid checkpoint path"),
    ("copy_weights", "POST", {"source_path": "tinker://..x/weights/b"}, "invalid training run id"),
])
def test_malformed_management_requests_get_clear_4xx(server, route, method, body, needle):
    import json
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{server.base_url}/api/v1/{route}", data=data, method=method,
                                 headers={"Content-Type": "application/json", "X-API-Key": API_KEY})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert 400 <= err.value.code < 500
    assert needle in json.loads(err.value.read())["error"]
