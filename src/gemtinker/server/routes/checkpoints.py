"""REST routes of training runs and checkpoints: listings, TTL, publishing, delete, copy, weights
info, storage usage, and the signed download URLs of external weights (external.py)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..bodies import error_response, json_body, owner_of
from ..checkpoints import checkpoint_json
from ..errors import UserError
from ..external import DOWNLOAD_ROUTE
from ..limits import check_page, iso
from ..service import Service
from . import API


def router(service: Service) -> APIRouter:
    r = APIRouter()

    @r.get(f"{API}/training_runs")
    async def list_training_runs(limit: int = 20, offset: int = 0):
        check_page(limit, offset)
        runs, total = service.store.list_runs(limit, offset)
        return {"training_runs": [service.training_run_json(run) for run in runs],
                "cursor": {"offset": offset, "limit": limit, "total_count": total}}

    @r.get(f"{API}/training_runs/{{run_id}}")
    async def get_training_run(run_id: str):
        run = service.store.get_run(run_id)
        if run is None:
            return error_response(404, f"unknown training run {run_id!r}")
        return service.training_run_json(run)

    @r.get(f"{API}/training_runs/{{run_id}}/checkpoints")
    async def list_run_checkpoints(run_id: str):
        if service.store.get_run(run_id) is None:
            return error_response(404, f"unknown training run {run_id!r}")
        rows, _ = service.checkpoints.live_rows(run_id)
        return {"checkpoints": [checkpoint_json(row) for row in rows]}

    ckpt_route = f"{API}/training_runs/{{run_id}}/checkpoints/{{segment}}/{{name}}"

    @r.delete(ckpt_route)
    async def delete_checkpoint(run_id: str, segment: str, name: str, request: Request):
        await asyncio.to_thread(service.checkpoints.delete, run_id, f"{segment}/{name}", owner_of(request))
        return {}

    @r.put(f"{ckpt_route}/ttl")
    async def set_checkpoint_ttl(run_id: str, segment: str, name: str, request: Request):
        body = await json_body(request)
        if "ttl_seconds" not in body:
            raise UserError("set_checkpoint_ttl needs ttl_seconds (seconds from now, or null to keep forever)")
        expires = service.checkpoints.set_ttl(run_id, f"{segment}/{name}", owner_of(request), body["ttl_seconds"])
        return {"expires_at": iso(expires)}

    @r.post(f"{ckpt_route}/publish")
    async def publish_checkpoint(run_id: str, segment: str, name: str, request: Request):
        service.checkpoints.set_public(run_id, f"{segment}/{name}", owner_of(request), True)
        return {"public": True}

    @r.delete(f"{ckpt_route}/publish")
    async def unpublish_checkpoint(run_id: str, segment: str, name: str, request: Request):
        service.checkpoints.set_public(run_id, f"{segment}/{name}", owner_of(request), False)
        return {"public": False}

    @r.post(f"{API}/copy_weights")
    async def copy_weights(request: Request):
        body = await json_body(request)

        def live(session_id: str) -> bool:
            row = service.store.get_session(session_id)
            return row is not None and row["finished"] is None

        path = await asyncio.to_thread(service.checkpoints.copy, body, owner_of(request),
                                       request.headers.get("x-idempotency-key"), live)
        return {"tinker_path": path}

    @r.get(f"{API}/checkpoints")
    async def list_user_checkpoints(limit: int = 100, offset: int = 0):
        check_page(limit, offset)
        rows, total = service.checkpoints.live_rows(None, limit, offset)
        return {"checkpoints": [checkpoint_json(row) for row in rows],
                "cursor": {"offset": offset, "limit": limit, "total_count": total}}

    @r.post(f"{API}/weights_info")
    async def weights_info(request: Request):
        body = await json_body(request)
        return service.weights_info(body.get("tinker_path"), owner_of(request))

    @r.get(f"{API}/billing/usage/checkpoints/current")
    async def checkpoint_storage_usage(request: Request, project_id: str | None = None):
        return service.checkpoints.storage_usage(owner_of(request), project_id)

    # ------------------------------------------------------------ external weights (external.py)
    @r.get(f"{ckpt_route}/external_weights_urls")
    async def external_weights_urls(run_id: str, segment: str, name: str, request: Request):
        return await asyncio.to_thread(service.external.sign_urls, run_id, f"{segment}/{name}", owner_of(request),
                                       str(request.base_url))

    @r.get(f"{DOWNLOAD_ROUTE}/{{token}}/{{file}}")
    async def external_weights_download(token: str, file: str):
        path, size = await asyncio.to_thread(service.external.open_download, token, file)
        fh = path.open("rb")  # opened now: a delete after this point does not cut the transfer

        def chunks():
            with fh:
                while chunk := fh.read(1 << 20):
                    yield chunk

        return StreamingResponse(chunks(), media_type="application/octet-stream",
                                 headers={"content-length": str(size)})

    return r
