"""Sessions: `create_session`, and the listings of the REST API: `list_sessions`, `get_session` and
`search_sessions`. (Finishing one frees its models and samplers: `Service.finish_session`.)

A session belongs to the API key that created it (`owner`, as for training runs; NULL: made
before owners, anyone's). This server has no organisation, projects or console, so:
- `project_id` is "local" for every session, and a search naming projects is refused;
- a session's status is "active" until its client finishes it ("client_finished" with the
  client's reason); one the server ended because its client stopped heartbeating has no status
  (neither finished by its client nor running). Nothing is ever "cancelled" or "failed" here.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from .errors import NotFoundError, UserError
from .limits import iso, str_dict
from .requests import dict_field
from .store import ANYONE, Store

log = logging.getLogger("gemtinker.server")

PROJECT_ID = "local"
# Owner shown for sessions made without an API key (or before owners were recorded).
NO_OWNER = "anyone"
CLIENT_REASONS = ("success", "errored", "interrupted")
# Upper bound on rows examined for one search page (filters run in Python over the newest rows),
# so a search that matches nothing cannot scan a huge table in one request.
SEARCH_SCAN_MAX = 100_000
_SCAN_BATCH = 500


def create_session(store: Store, body: dict, owner: str | None = None) -> dict:
    session_id = uuid.uuid4().hex[:16]
    tags = body.get("tags") or []
    if not isinstance(tags, list):
        raise UserError(f"tags must be a list, got {tags!r}")
    display_name = body.get("display_name")
    if display_name is not None and not isinstance(display_name, str):
        raise UserError(f"display_name must be a string, got {display_name!r}")
    store.add_session(session_id, tags, dict_field(body, "user_metadata"), str(body.get("sdk_version", "")),
                      owner, display_name)
    log.info("%-26s %s tags=%s", "create_session", session_id, tags)
    return {"type": "create_session", "session_id": session_id}


def list_sessions(store: Store, owner: str | None, limit: int, offset: int, access_scope: str) -> dict:
    if access_scope not in ("owned", "accessible"):
        raise UserError(f"access_scope must be 'owned' or 'accessible', got {access_scope!r}")
    return {"sessions": store.list_sessions(limit, offset, owner if access_scope == "owned" else ANYONE)}


def get_session(store: Store, session_id: str) -> dict:
    row = store.get_session(session_id)
    if row is None:
        raise NotFoundError(f"unknown session {session_id!r}")
    return {"training_run_ids": store.runs_of_session(session_id),
            "sampler_ids": store.samplers_of_session(session_id),
            "user_metadata": str_dict(row["user_metadata"] or {}) or None,
            "display_name": row.get("display_name")}


def _status(row: dict) -> dict | None:
    if row["finished"] is None:
        return {"type": "active"}
    if row["finish_reason"] in CLIENT_REASONS:
        return {"type": "client_finished", "reason": {"type": row["finish_reason"]}}
    return None


def _matches_status(status: dict | None, queries: list) -> bool:
    for q in queries:
        if status is not None and q.type == status["type"]:
            reasons = getattr(q, "reasons", None)
            if reasons is None or status["reason"]["type"] in reasons:
                return True
    return False


def search_sessions(store: Store, body: dict, owner: str | None) -> dict:
    """`RestClient.search_sessions`: filters of `types.SessionSearchRequest`, newest first,
    keyset-paged by (created_at, session_id)."""
    from tinker import types

    try:
        req = types.SessionSearchRequest.model_validate(body)
    except ValueError as e:
        raise UserError(f"search_sessions: invalid request: {str(e)[:300]}") from None
    if req.project_ids is not None:
        raise UserError(f"search_sessions: project_ids={req.project_ids!r}, but this server has no projects "
                        f"(every session is in project {PROJECT_ID!r}); leave project_ids unset")
    if req.owner.type == "user":
        raise UserError("search_sessions: owner=UserSearchOwner is not offered by this server (it has no user "
                        "URNs, only API keys); use OwnSearchOwner or AccessibleSearchOwner")
    words = req.display_name.lower().split() if req.display_name is not None else None

    def wanted(row: dict) -> bool:
        if req.owner.type == "own" and row.get("owner") not in (None, owner):
            return False
        if req.session_id is not None or words is not None:
            by_id = req.session_id is not None and row["session_id"] == req.session_id
            name = (row.get("display_name") or "").lower()
            by_name = words is not None and all(w in name for w in words)
            if not (by_id or by_name):
                return False
        meta = str_dict(row["user_metadata"]) or {}
        if any(meta.get(k) != v for k, v in req.user_metadata.items()):
            return False
        return req.statuses is None or _matches_status(_status(row), req.statuses)

    if req.cursor is None:
        created, last_id = float("inf"), ""
    else:
        created, last_id = req.cursor.last_created_at.timestamp(), req.cursor.last_session_id
    found: list[dict] = []
    scanned, more = 0, True
    while len(found) < req.limit + 1 and more and scanned < SEARCH_SCAN_MAX:
        batch = store.sessions_before(created, last_id, _SCAN_BATCH)
        more = len(batch) == _SCAN_BATCH
        scanned += len(batch)
        for row in batch:
            created, last_id = row["created"], row["session_id"]
            if wanted(row):
                found.append(row)
                if len(found) == req.limit + 1:
                    break
    page, has_more = found[:req.limit], len(found) > req.limit or (more and scanned >= SEARCH_SCAN_MAX)
    cursor = None
    if has_more:
        last = page[-1] if len(found) > req.limit else {"created": created, "session_id": last_id}
        cursor = {"last_created_at": _iso(last["created"]), "last_session_id": last["session_id"]}
    return {"sessions": [_summary(store, r) for r in page], "next_cursor": cursor}


def _iso(ts: float) -> str:
    out = iso(ts)
    assert out is not None
    return out


def _summary(store: Store, row: dict) -> dict[str, Any]:
    now = time.time()
    ckpts = [c for run_id in store.runs_of_session(row["session_id"])
             for c in store.list_checkpoints(run_id, live_at=now)[0]]
    return {"session_id": row["session_id"], "created_at": _iso(row["created"]),
            "owner": row.get("owner") or NO_OWNER, "project_id": PROJECT_ID, "status": _status(row),
            "checkpoints_count": len(ckpts), "display_name": row.get("display_name"),
            "user_metadata": str_dict(row["user_metadata"]),
            "checkpoint_storage_bytes": sum(int(c["size_bytes"] or 0) for c in ckpts)}
