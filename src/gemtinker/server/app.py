"""FastAPI routes of the Tinker HTTP protocol (`/api/v1/...`), as spoken by `tinker==0.38.0`.

Submissions answer at once with `{"request_id": ...}`; results come from `retrieve_future`, which
long-polls. Every error response carries a JSON body: the SDK treats an empty 400 as a network
glitch and retries it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import io
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from gemtinker.engine.types import EngineError

from . import codec, sessions
from .checkpoints import checkpoint_json
from .external import DOWNLOAD_ROUTE
from .errors import CrossSiteRequest, NotOffered, Overloaded, PayloadTooLarge, UnsupportedMediaType, UserError
from .futures import Result
from .limits import check_page, check_strings, iso
from .origin import cross_site_problem, is_json_content_type
from .sample_sessions import SampleSessions
from .service import Service

log = logging.getLogger("gemtinker.server")
T = TypeVar("T")

CLIENT_CONFIG = {
    "pjwt_auth_enabled": False,
    "use_pyqwest_transport": False,
    "sample_use_retrieve_futures": True,
    "custom_loss_server_side": True,
    "sample_join_sampling_session": True,
    "proto_compress_fwdbwd": False,
    "parallel_fwdbwd_chunks": True,
}
DYNAMIC_CONFIG = {"refresh_interval_sec": 300, "sample_cancel_enabled": False, "sample_cancel_max_batch_size": 64}
PURGE_EVERY_S = 60.0
# The SDK splits forward_backward into chunks of ~5 MB (client config fwdbwd_max_chunk_bytes_count),
# so 64 MiB leaves a wide margin while one request can never take the server's memory.
DEFAULT_MAX_BODY_BYTES = 64 << 20
# Decoded tensors may be larger than their wire form (int32 tokens become int64, sparse weights
# are densified), but a request whose tensors decode to more than this many bytes per body byte
# allowed is refused before anything is allocated (a 149-byte sparse tensor once asked for 1 GB).
DENSE_PER_BODY_BYTE = 4
# Bodies larger than this are decoded (JSON, protobuf, zstd) on worker threads, DECODE_WORKERS at
# a time; two leave a core of a small machine to the loop and the engine.
OFF_LOOP_BYTES = 256 << 10
DECODE_WORKERS = 2
# On 429: the stainless layer honours these; the SDK's outer retry loops back off on their own.
RETRY_HEADERS = {"retry-after-ms": "500", "retry-after": "1"}


# SDK methods whose routes this server does not offer, and why. Each answers 404 with this reason
# (never retried by the SDK: a 5xx would be, for minutes).
NOT_OFFERED = {
    "export_session_trace": "RestClient.export_session_trace is not offered by this server: it builds no Perfetto "
                            "traces; the server log has one line per request",
    "assign_session_project": "RestClient.assign_session_project is not offered by this server: it has no projects",
    "get_audit_log": "AdminClient.get_audit_log (and the deprecated RestClient.get_audit_log) is not offered by this "
                     "server: it has no organisation and keeps no audit log",
    "get_billing_usage": "AdminClient.get_billing_usage (and the deprecated RestClient.get_billing_usage) is not "
                         "offered by this server: nothing is billed here",
}
# route under /api/v1 -> (HTTP method, key of NOT_OFFERED)
NOT_OFFERED_ROUTES = {
    "sessions/{session_id}/trace_export": ("GET", "export_session_trace"),
    "sessions/{session_id}/project": ("PUT", "assign_session_project"),
    "audit": ("GET", "get_audit_log"),
    "billing/usage/events": ("GET", "get_billing_usage"),
}


def _not_offered(name: str) -> Callable[[], Any]:
    async def route() -> None:
        raise NotOffered(NOT_OFFERED[name])

    route.__name__ = f"not_offered_{name}"
    return route


def owner_of(request: Request) -> str | None:
    """Who owns what a request creates: a hash of its X-API-Key (never the key itself, which
    would then sit in the database), or None without one."""
    key = request.headers.get("x-api-key")
    return hashlib.sha256(key.encode()).hexdigest()[:32] if key else None


def _err(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message, "error": message}, status_code=status)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body is larger than this server's limit of {limit} bytes "
                           f"({limit >> 20} MiB; `gemtinker serve --max-body-mb`)")


async def _off_loop(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """Run a CPU-bound decode on a worker thread, at most DECODE_WORKERS at once: the event loop
    keeps serving other clients (/healthz, long polls) while a large body is decoded, and a
    burst of large bodies waits for a worker instead of decoding all at once."""
    state = request.app.state
    if getattr(state, "decode_limiter", None) is None:  # made on the loop: anyio needs one
        state.decode_limiter = anyio.CapacityLimiter(DECODE_WORKERS)
    return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=state.decode_limiter)


async def _body_bytes(request: Request) -> bytes:
    """The request body, read incrementally so a huge (or chunked, length-less) body is refused
    at the limit instead of being buffered whole."""
    limit: int = request.app.state.max_body_bytes
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
    raw = b"".join(parts)
    if request.headers.get("content-encoding", "").lower() == "zstd":
        raw = await _off_loop(request, _unzstd, raw, limit)
    return raw


def _unzstd(raw: bytes, limit: int) -> bytes:
    try:
        import zstandard
    except ImportError:
        raise UserError("zstd request bodies are not supported here (install 'zstandard')")
    # A stream reader bounds the output even when the frame header claims a huge size.
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)) as reader:
            out = reader.read(limit + 1)
    except zstandard.ZstdError as e:
        raise UserError(f"request body is not valid zstd: {e}")
    if len(out) > limit:
        raise _too_large(limit)
    return out


def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw) if raw else {}
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, absurd nesting
        raise UserError(f"request body is not valid JSON: {str(e)[:200]}")
    if not isinstance(body, dict):
        raise UserError("request body must be a JSON object")
    check_strings(raw, body)
    return body


async def _json(request: Request) -> dict[str, Any]:
    ctype = request.headers.get("content-type")
    if not is_json_content_type(ctype):
        # text/plain, forms and no type at all are what a web page may POST cross-site unchecked.
        raise UnsupportedMediaType(f"{request.url.path} takes a JSON body (Content-Type: application/json), "
                                   f"got Content-Type {ctype!r}")
    raw = await _body_bytes(request)
    # Small bodies (nearly all) parse in microseconds: the thread hop would cost more.
    return await _off_loop(request, _parse_json, raw) if len(raw) > OFF_LOOP_BYTES else _parse_json(raw)


def create_app(service: Service, api_key: str | None = None, client_config: dict | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, loopback: bool = True) -> FastAPI:
    """`client_config` overrides SDK flags (e.g. fwdbwd_max_chunk_len, to exercise chunking).
    `loopback`: the server is bound to a loopback address, so requests that name another Host
    or Origin come from web pages and are refused (origin.py)."""
    flags = {**CLIENT_CONFIG, **(client_config or {})}
    sampling = SampleSessions(service.futures, service.long_poll_s)  # retrieve_futures, join_sampling_session
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def purge_loop() -> None:
            while True:
                await asyncio.sleep(PURGE_EVERY_S)
                try:
                    service.futures.purge()
                    sampling.purge()
                    await service.reap_idle_sessions()
                    await asyncio.to_thread(service.checkpoints.purge_expired)
                except Exception:  # housekeeping must never stop for good
                    log.exception("periodic purge failed")

        task = asyncio.get_running_loop().create_task(purge_loop())
        yield
        task.cancel()
        service.stop_queues("server is shutting down")

    app = FastAPI(title="gemtinker", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.service = service
    app.state.max_body_bytes = max_body_bytes
    status_counts: Counter[int] = Counter()  # responses by HTTP status, for /api/v1/server_stats

    @app.exception_handler(UserError)
    @app.exception_handler(EngineError)
    async def user_error(request: Request, e: Exception):
        response = _err(getattr(e, "status_code", 400), str(e))
        if isinstance(e, Overloaded):
            response.headers.update(RETRY_HEADERS)
        return response

    @app.exception_handler(RequestValidationError)
    async def bad_query(request: Request, e: RequestValidationError):
        # FastAPI's own 422 has a list as `detail`; answer in this server's error shape.
        where = "; ".join(f"{'.'.join(map(str, err.get('loc', ())))}: {err.get('msg', '')}" for err in e.errors())
        return _err(400, f"invalid request: {where}"[:500])

    @app.middleware("http")
    async def guard(request: Request, call_next):
        t0 = time.perf_counter()
        problem = cross_site_problem(request.headers.get("host"), request.headers.get("origin")) if loopback else None
        if problem is not None:
            return _err(403, str(CrossSiteRequest(problem)))
        if api_key is not None and not request.url.path.startswith(DOWNLOAD_ROUTE + "/"):  # the URL's token is its key
            given = request.headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return _err(401, "missing or wrong X-API-Key")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:  # refuse before reading a byte
            return _err(413, str(_too_large(max_body_bytes)))
        try:
            response = await call_next(request)
        except (UserError, EngineError) as e:
            response = _err(getattr(e, "status_code", 400), str(e))
        except ClientDisconnect:  # gone mid-body (or cut off by a body deadline): nobody to answer
            response = _err(499, "client closed the connection before its request body was complete")
        except Exception as e:  # keep serving; the SDK retries 5xx
            log.exception("%s %s failed", request.method, request.url.path)
            response = _err(500, f"internal server error: {type(e).__name__}: {e}")
        status_counts[response.status_code] += 1
        if log.isEnabledFor(logging.DEBUG) and not request.url.path.endswith(("/retrieve_future", "/retrieve_futures")):
            log.debug("%s %s -> %d %.0f ms", request.method, request.url.path, response.status_code,
                      (time.perf_counter() - t0) * 1e3)
        return response

    def future(request_id: str, model_id: Any = None, **extra: Any) -> dict:
        # model_id echoes the request; a malformed one must not make the reply itself invalid.
        return {"request_id": request_id, "model_id": model_id if isinstance(model_id, str) else None, **extra}

    api = "/api/v1"

    # ------------------------------------------------------------ config / sessions
    @app.post(f"{api}/client/config")
    async def client_config_route(request: Request):
        return flags

    @app.post(f"{api}/client/dynamic_config")
    async def dynamic_config(request: Request):
        return DYNAMIC_CONFIG

    @app.get(f"{api}/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get(f"{api}/server_stats")
    async def server_stats():
        """Not part of the Tinker protocol: load and capacity figures for operators and bench/load.py."""
        return {"responses_by_status": {str(k): v for k, v in sorted(status_counts.items())},
                "queued_sequences": service.queued_sequences, "queued_train_bytes": service.queued_train_bytes,
                "futures_in_memory": len(service.futures), "live_models": len(service._live),
                "live_samplers": len(service._samplers), "retrieve_futures_polls": sampling.polls,
                "sampling_session_joins": sampling.joins,
                "connections": dict(getattr(app.state, "connection_counts", {}))}

    @app.get(f"{api}/get_server_capabilities")
    async def capabilities():
        return service.capabilities()

    @app.post(f"{api}/create_session")
    async def create_session(request: Request):
        return service.create_session(await _json(request), owner_of(request))

    @app.post(f"{api}/session_heartbeat")
    async def heartbeat(request: Request):
        body = await _json(request)
        service.store.heartbeat(str(body.get("session_id")))
        return {"type": "session_heartbeat"}

    @app.post(f"{api}/telemetry")
    async def telemetry(request: Request):
        await _body_bytes(request)
        return {"status": "accepted"}

    @app.post(f"{api}/sessions/{{session_id}}/finish")
    async def finish(session_id: str, request: Request):
        body = await _json(request)
        reason = (body.get("reason") or {}).get("type", "unknown") if isinstance(body.get("reason"), dict) else "unknown"
        await service.finish_session(session_id, str(reason))
        return {}

    @app.get(f"{api}/sessions")
    async def list_sessions(request: Request, limit: int = 20, offset: int = 0, access_scope: str = "owned"):
        check_page(limit, offset)
        return sessions.list_sessions(service.store, owner_of(request), limit, offset, access_scope)

    @app.post(f"{api}/sessions/search")
    async def search_sessions(request: Request):
        body = await _json(request)
        # Off the loop: a search that matches little may scan many rows (sessions.SEARCH_SCAN_MAX).
        return await asyncio.to_thread(sessions.search_sessions, service.store, body, owner_of(request))

    @app.get(f"{api}/sessions/{{session_id}}")
    async def get_session(session_id: str):
        return sessions.get_session(service.store, session_id)

    # ------------------------------------------------------------ training
    @app.post(f"{api}/create_model")
    async def create_model(request: Request):
        body = await _json(request)
        rid = service.create_model(body, owner_of(request))
        return future(rid, f"{body.get('session_id')}:train:{body.get('model_seq_id')}")

    @app.post(f"{api}/get_info")
    async def get_info(request: Request):
        body = await _json(request)
        return service.get_info(str(body.get("model_id")))

    @app.post(f"{api}/forward_backward")
    async def forward_backward(request: Request):
        raw = await _body_bytes(request)
        if "protobuf" not in request.headers.get("content-type", ""):
            return _err(415, "forward_backward takes a protobuf ForwardBackwardRequest body (application/x-protobuf)")
        try:
            parsed = await _off_loop(request, codec.parse_forward_backward, raw, DENSE_PER_BODY_BYTE * max_body_bytes)
        except UserError as e:  # not a protobuf at all: a failed future, as for every other bad input
            return future(service.failed(str(e), "forward_backward"))
        return future(service.forward_backward(parsed, len(raw)))

    @app.post(f"{api}/create_custom_loss")
    async def create_custom_loss(request: Request):
        body = await _json(request)
        row = service.store.get_session(str(body.get("session_id")))
        try:  # compiling checks every node against the allowlists (custom_loss.py)
            made = await asyncio.to_thread(service.custom_losses.create, body, row is not None and row["finished"] is None)
        except UserError as e:
            return future(service.failed(str(e), "create_custom_loss"))
        return future(service.futures.resolved(service.futures.new(), Result.json(made)))

    @app.post(f"{api}/optim_step")
    async def optim_step(request: Request):
        body = await _json(request)
        return future(service.optim_step(body), body.get("model_id"))

    @app.post(f"{api}/save_weights")
    async def save_weights(request: Request):
        body = await _json(request)
        return future(service.save_weights(body), body.get("model_id"))

    @app.post(f"{api}/save_weights_for_sampler")
    async def save_weights_for_sampler(request: Request):
        body = await _json(request)
        return future(service.save_weights_for_sampler(body), body.get("model_id"))

    @app.post(f"{api}/load_weights")
    async def load_weights(request: Request):
        body = await _json(request)
        return future(service.load_weights(body, owner_of(request)), body.get("model_id"))

    @app.post(f"{api}/unload_model")
    async def unload_model(request: Request):
        body = await _json(request)
        return future(service.unload_model(body.get("model_id")), body.get("model_id"))

    # ------------------------------------------------------------ sampling
    @app.post(f"{api}/create_sampling_session")
    async def create_sampling_session(request: Request):
        body = await _json(request)
        return await asyncio.to_thread(service.create_sampling_session, body, owner_of(request))

    @app.get(f"{api}/samplers/{{sampler_id}}")
    async def get_sampler(sampler_id: str):
        return service.get_sampler(sampler_id)

    @app.post(f"{api}/asample")
    async def asample(request: Request):
        body = await _json(request)
        submitted = service.asample(body)
        if submitted is None:
            msg = (f"sampling queue is full ({service.queued_sequences} sequences queued or decoding); "
                   "retry shortly")
            return JSONResponse({"detail": msg, "error": msg}, status_code=429, headers=RETRY_HEADERS)
        rid, ids = submitted
        sampling.watch(body.get("sampling_session_id"), body.get("seq_id"), rid)
        return future(rid, sample_sequence_ids=ids)

    @app.post(f"{api}/join_sampling_session")
    async def join_sampling_session(request: Request):
        body = await _json(request)
        sid = body.get("sampling_session_id")
        if not isinstance(sid, str):
            raise UserError("join_sampling_session needs a sampling_session_id string")
        service.get_sampler(sid)  # 404 for a sampler this server never made
        return sampling.join(sid)

    # ------------------------------------------------------------ futures
    @app.post(f"{api}/retrieve_future")
    async def retrieve_future(request: Request):
        body = await _json(request)
        rid = body.get("request_id")
        if not isinstance(rid, str):
            return _err(400, "request_id is required")
        try:
            result = await service.futures.wait(rid, service.long_poll_s)
        except KeyError:
            return _err(404, f"unknown request_id {rid!r} (expired or never submitted)")
        if result is None:
            return {"type": "try_again", "request_id": rid, "queue_state": "active"}
        media = "application/x-protobuf" if result.kind == "proto" else "application/json"
        return Response(result.payload, media_type=media)

    @app.post(f"{api}/retrieve_futures")
    async def retrieve_futures(request: Request):
        return await sampling.retrieve(await _json(request))

    # ------------------------------------------------------------ REST: runs and checkpoints
    @app.get(f"{api}/training_runs")
    async def list_training_runs(limit: int = 20, offset: int = 0):
        check_page(limit, offset)
        runs, total = service.store.list_runs(limit, offset)
        return {"training_runs": [service.training_run_json(r) for r in runs],
                "cursor": {"offset": offset, "limit": limit, "total_count": total}}

    @app.get(f"{api}/training_runs/{{run_id}}")
    async def get_training_run(run_id: str):
        run = service.store.get_run(run_id)
        if run is None:
            return _err(404, f"unknown training run {run_id!r}")
        return service.training_run_json(run)

    @app.get(f"{api}/training_runs/{{run_id}}/checkpoints")
    async def list_run_checkpoints(run_id: str):
        if service.store.get_run(run_id) is None:
            return _err(404, f"unknown training run {run_id!r}")
        rows, _ = service.checkpoints.live_rows(run_id)
        return {"checkpoints": [checkpoint_json(r) for r in rows]}

    ckpt_route = f"{api}/training_runs/{{run_id}}/checkpoints/{{segment}}/{{name}}"

    @app.delete(ckpt_route)
    async def delete_checkpoint(run_id: str, segment: str, name: str, request: Request):
        await asyncio.to_thread(service.checkpoints.delete, run_id, f"{segment}/{name}", owner_of(request))
        return {}

    @app.put(f"{ckpt_route}/ttl")
    async def set_checkpoint_ttl(run_id: str, segment: str, name: str, request: Request):
        body = await _json(request)
        if "ttl_seconds" not in body:
            raise UserError("set_checkpoint_ttl needs ttl_seconds (seconds from now, or null to keep forever)")
        expires = service.checkpoints.set_ttl(run_id, f"{segment}/{name}", owner_of(request), body["ttl_seconds"])
        return {"expires_at": iso(expires)}

    @app.post(f"{ckpt_route}/publish")
    async def publish_checkpoint(run_id: str, segment: str, name: str, request: Request):
        service.checkpoints.set_public(run_id, f"{segment}/{name}", owner_of(request), True)
        return {"public": True}

    @app.delete(f"{ckpt_route}/publish")
    async def unpublish_checkpoint(run_id: str, segment: str, name: str, request: Request):
        service.checkpoints.set_public(run_id, f"{segment}/{name}", owner_of(request), False)
        return {"public": False}

    @app.post(f"{api}/copy_weights")
    async def copy_weights(request: Request):
        body = await _json(request)

        def live(session_id: str) -> bool:
            row = service.store.get_session(session_id)
            return row is not None and row["finished"] is None

        path = await asyncio.to_thread(service.checkpoints.copy, body, owner_of(request),
                                       request.headers.get("x-idempotency-key"), live)
        return {"tinker_path": path}

    @app.get(f"{api}/checkpoints")
    async def list_user_checkpoints(limit: int = 100, offset: int = 0):
        check_page(limit, offset)
        rows, total = service.checkpoints.live_rows(None, limit, offset)
        return {"checkpoints": [checkpoint_json(r) for r in rows],
                "cursor": {"offset": offset, "limit": limit, "total_count": total}}

    @app.post(f"{api}/weights_info")
    async def weights_info(request: Request):
        body = await _json(request)
        return service.weights_info(body.get("tinker_path"), owner_of(request))

    @app.get(f"{api}/billing/usage/checkpoints/current")
    async def checkpoint_storage_usage(request: Request, project_id: str | None = None):
        return service.checkpoints.storage_usage(owner_of(request), project_id)

    # ------------------------------------------------------------ external weights (external.py)
    @app.post(f"{api}/save_weights_external")
    async def save_weights_external(request: Request):
        body = await _json(request)
        return future(service.save_weights_external(body), body.get("model_id"))

    @app.get(f"{ckpt_route}/external_weights_urls")
    async def external_weights_urls(run_id: str, segment: str, name: str, request: Request):
        return await asyncio.to_thread(service.external.sign_urls, run_id, f"{segment}/{name}", owner_of(request),
                                       str(request.base_url))

    @app.get(f"{DOWNLOAD_ROUTE}/{{token}}/{{file}}")
    async def external_weights_download(token: str, file: str):
        path, size = await asyncio.to_thread(service.external.open_download, token, file)
        fh = path.open("rb")  # opened now: a delete after this point does not cut the transfer

        def chunks():
            with fh:
                while chunk := fh.read(1 << 20):
                    yield chunk

        return StreamingResponse(chunks(), media_type="application/octet-stream",
                                 headers={"content-length": str(size)})

    # ------------------------------------------------------------ not offered here
    for route, (method, sdk_name) in NOT_OFFERED_ROUTES.items():
        app.add_api_route(f"{api}/{route}", _not_offered(sdk_name), methods=[method])

    @app.api_route(f"{api}/{{rest:path}}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def unsupported(rest: str):
        return _err(404, f"/api/v1/{rest} is not supported by this gemtinker server")

    return app
