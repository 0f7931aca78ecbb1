"""Sampling routes: sampling sessions, `asample` (429 beyond capacity), and the futures every
op's result comes from (`retrieve_future` long-polls; `retrieve_futures`, `join_sampling_session`:
sample_sessions.py)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..bodies import error_response, json_body, owner_of
from ..errors import UserError
from ..sample_sessions import SampleSessions
from ..service import Service
from . import API, future

# On 429: the stainless layer honours these; the SDK's outer retry loops back off on their own.
RETRY_HEADERS = {"retry-after-ms": "500", "retry-after": "1"}


def router(service: Service, sampling: SampleSessions) -> APIRouter:
    r = APIRouter()

    @r.post(f"{API}/create_sampling_session")
    async def create_sampling_session(request: Request):
        body = await json_body(request)
        return await asyncio.to_thread(service.create_sampling_session, body, owner_of(request))

    @r.get(f"{API}/samplers/{{sampler_id}}")
    async def get_sampler(sampler_id: str):
        return service.get_sampler(sampler_id)

    @r.post(f"{API}/asample")
    async def asample(request: Request):
        body = await json_body(request)
        submitted = service.asample(body)
        if submitted is None:
            msg = (f"sampling queue is full ({service.queued_sequences} sequences queued or decoding); "
                   "retry shortly")
            return error_response(429, msg, RETRY_HEADERS)
        rid, ids = submitted
        sampling.watch(body.get("sampling_session_id"), body.get("seq_id"), rid)
        return future(rid, sample_sequence_ids=ids)

    @r.post(f"{API}/join_sampling_session")
    async def join_sampling_session(request: Request):
        body = await json_body(request)
        sid = body.get("sampling_session_id")
        if not isinstance(sid, str):
            raise UserError("join_sampling_session needs a sampling_session_id string")
        service.get_sampler(sid)  # 404 for a sampler this server never made
        return sampling.join(sid)

    @r.post(f"{API}/retrieve_future")
    async def retrieve_future(request: Request):
        body = await json_body(request)
        rid = body.get("request_id")
        if not isinstance(rid, str):
            return error_response(400, "request_id is required")
        try:
            result = await service.futures.wait(rid, service.long_poll_s)
        except KeyError:
            return error_response(404, f"unknown request_id {rid!r} (expired or never submitted)")
        if result is None:
            return {"type": "try_again", "request_id": rid, "queue_state": "active"}
        media = "application/x-protobuf" if result.kind == "proto" else "application/json"
        return Response(result.payload, media_type=media)

    @r.post(f"{API}/retrieve_futures")
    async def retrieve_futures(request: Request):
        return await sampling.retrieve(await json_body(request))

    return r
