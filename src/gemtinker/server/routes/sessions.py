"""Session routes: create, heartbeat, finish, and the REST listings (sessions.py)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from .. import sessions
from ..bodies import json_body, owner_of
from ..limits import check_page
from ..service import Service
from . import API


def router(service: Service) -> APIRouter:
    r = APIRouter()

    @r.post(f"{API}/create_session")
    async def create_session(request: Request):
        return service.create_session(await json_body(request), owner_of(request))

    @r.post(f"{API}/session_heartbeat")
    async def heartbeat(request: Request):
        body = await json_body(request)
        service.store.heartbeat(str(body.get("session_id")))
        return {"type": "session_heartbeat"}

    @r.post(f"{API}/sessions/{{session_id}}/finish")
    async def finish(session_id: str, request: Request):
        body = await json_body(request)
        reason = (body.get("reason") or {}).get("type", "unknown") if isinstance(body.get("reason"), dict) else "unknown"
        await service.finish_session(session_id, str(reason))
        return {}

    @r.get(f"{API}/sessions")
    async def list_sessions(request: Request, limit: int = 20, offset: int = 0, access_scope: str = "owned"):
        check_page(limit, offset)
        return sessions.list_sessions(service.store, owner_of(request), limit, offset, access_scope)

    @r.post(f"{API}/sessions/search")
    async def search_sessions(request: Request):
        body = await json_body(request)
        # Off the loop: a search that matches little may scan many rows (sessions.SEARCH_SCAN_MAX).
        return await asyncio.to_thread(sessions.search_sessions, service.store, body, owner_of(request))

    @r.get(f"{API}/sessions/{{session_id}}")
    async def get_session(session_id: str):
        return sessions.get_session(service.store, session_id)

    return r
