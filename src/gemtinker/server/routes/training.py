"""Training routes: models (create, info, load, unload) and their ordered ops (training.py),
custom losses and the external-weights export. Each op answers at once with a future."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from .. import codec
from ..bodies import body_bytes, error_response, json_body, off_loop, owner_of
from ..errors import UserError
from ..futures import Result
from ..service import Service
from . import API, future

# Decoded tensors may be larger than their wire form (int32 tokens become int64, sparse weights
# are densified), but a request whose tensors decode to more than this many bytes per body byte
# allowed is refused before anything is allocated (a 149-byte sparse tensor once asked for 1 GB).
DENSE_PER_BODY_BYTE = 4


def router(service: Service, max_body_bytes: int) -> APIRouter:
    r = APIRouter()

    @r.post(f"{API}/create_model")
    async def create_model(request: Request):
        body = await json_body(request)
        rid = service.create_model(body, owner_of(request))
        return future(rid, f"{body.get('session_id')}:train:{body.get('model_seq_id')}")

    @r.post(f"{API}/get_info")
    async def get_info(request: Request):
        body = await json_body(request)
        return service.get_info(str(body.get("model_id")))

    @r.post(f"{API}/forward_backward")
    async def forward_backward(request: Request):
        raw = await body_bytes(request)
        if "protobuf" not in request.headers.get("content-type", ""):
            return error_response(415, "forward_backward takes a protobuf ForwardBackwardRequest body "
                                       "(application/x-protobuf)")
        try:
            parsed = await off_loop(request, codec.parse_forward_backward, raw, DENSE_PER_BODY_BYTE * max_body_bytes)
        except UserError as e:  # not a protobuf at all: a failed future, as for every other bad input
            return future(service.failed(str(e), "forward_backward"))
        return future(service.forward_backward(parsed, len(raw)))

    @r.post(f"{API}/create_custom_loss")
    async def create_custom_loss(request: Request):
        body = await json_body(request)
        row = service.store.get_session(str(body.get("session_id")))
        try:  # compiling checks every node against the allowlists (custom_loss.py)
            made = await asyncio.to_thread(service.custom_losses.create, body, row is not None and row["finished"] is None)
        except UserError as e:
            return future(service.failed(str(e), "create_custom_loss"))
        return future(service.futures.resolved(service.futures.new(), Result.json(made)))

    @r.post(f"{API}/optim_step")
    async def optim_step(request: Request):
        body = await json_body(request)
        return future(service.optim_step(body), body.get("model_id"))

    @r.post(f"{API}/save_weights")
    async def save_weights(request: Request):
        body = await json_body(request)
        return future(service.save_weights(body), body.get("model_id"))

    @r.post(f"{API}/save_weights_for_sampler")
    async def save_weights_for_sampler(request: Request):
        body = await json_body(request)
        return future(service.save_weights_for_sampler(body), body.get("model_id"))

    @r.post(f"{API}/load_weights")
    async def load_weights(request: Request):
        body = await json_body(request)
        return future(service.load_weights(body, owner_of(request)), body.get("model_id"))

    @r.post(f"{API}/unload_model")
    async def unload_model(request: Request):
        body = await json_body(request)
        return future(service.unload_model(body.get("model_id")), body.get("model_id"))

    @r.post(f"{API}/save_weights_external")
    async def save_weights_external(request: Request):
        body = await json_body(request)
        return future(service.save_weights_external(body), body.get("model_id"))

    return r
