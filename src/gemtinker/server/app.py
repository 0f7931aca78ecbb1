"""The FastAPI app of the Tinker HTTP protocol (`/api/v1/...`), as spoken by `tinker==0.38.0`:
the middleware (origin and API-key checks, body limit), error handlers, housekeeping, and the
server-level routes; the protocol's routes are one router per concept (routes/).

Submissions answer at once with `{"request_id": ...}`; results come from `retrieve_future`, which
long-polls. Every error response carries a JSON body: the SDK treats an empty 400 as a network
glitch and retries it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import Counter
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.requests import ClientDisconnect

from gemtinker.engine.types import EngineError

from .bodies import DEFAULT_MAX_BODY_BYTES, body_bytes, error_response, too_large
from .errors import CrossSiteRequest, NotOffered, Overloaded, UserError
from .external import DOWNLOAD_ROUTE
from .origin import cross_site_problem
from .routes import API
from .routes import checkpoints as checkpoint_routes
from .routes import sampling as sampling_routes
from .routes import sessions as session_routes
from .routes import training as training_routes
from .routes.sampling import RETRY_HEADERS
from .sample_sessions import SAMPLE_JOURNAL, SampleSessions
from .service import Service

__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app"]

log = logging.getLogger("gemtinker.server")

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


def create_app(service: Service, api_key: str | None = None, client_config: dict | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, loopback: bool = True) -> FastAPI:
    """`client_config` overrides SDK flags (e.g. fwdbwd_max_chunk_len, to exercise chunking).
    `loopback`: the server is bound to a loopback address, so requests that name another Host
    or Origin come from web pages and are refused (origin.py)."""
    flags = {**CLIENT_CONFIG, **(client_config or {})}
    # retrieve_futures, join_sampling_session; the journal lets a restarted server report lost samples
    sampling = SampleSessions(service.futures, service.long_poll_s, service.root / SAMPLE_JOURNAL)
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
        sampling.close()

    app = FastAPI(title="gemtinker", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.service = service
    app.state.max_body_bytes = max_body_bytes
    status_counts: Counter[int] = Counter()  # responses by HTTP status, for /api/v1/server_stats

    @app.exception_handler(UserError)
    @app.exception_handler(EngineError)
    async def user_error(request: Request, e: Exception):
        response = error_response(getattr(e, "status_code", 400), str(e))
        if isinstance(e, Overloaded):
            response.headers.update(RETRY_HEADERS)
        return response

    @app.exception_handler(RequestValidationError)
    async def bad_query(request: Request, e: RequestValidationError):
        # FastAPI's own 422 has a list as `detail`; answer in this server's error shape.
        where = "; ".join(f"{'.'.join(map(str, err.get('loc', ())))}: {err.get('msg', '')}" for err in e.errors())
        return error_response(400, f"invalid request: {where}"[:500])

    @app.middleware("http")
    async def guard(request: Request, call_next):
        t0 = time.perf_counter()
        problem = cross_site_problem(request.headers.get("host"), request.headers.get("origin")) if loopback else None
        if problem is not None:
            return error_response(403, str(CrossSiteRequest(problem)))
        if api_key is not None and not request.url.path.startswith(DOWNLOAD_ROUTE + "/"):  # the URL's token is its key
            given = request.headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return error_response(401, "missing or wrong X-API-Key")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:  # refuse before reading a byte
            return error_response(413, str(too_large(max_body_bytes)))
        try:
            response = await call_next(request)
        except (UserError, EngineError) as e:
            response = error_response(getattr(e, "status_code", 400), str(e))
        except ClientDisconnect:  # gone mid-body (or cut off by a body deadline): nobody to answer
            response = error_response(499, "client closed the connection before its request body was complete")
        except Exception as e:  # keep serving; the SDK retries 5xx
            log.exception("%s %s failed", request.method, request.url.path)
            response = error_response(500, f"internal server error: {type(e).__name__}: {e}")
        status_counts[response.status_code] += 1
        if log.isEnabledFor(logging.DEBUG) and not request.url.path.endswith(("/retrieve_future", "/retrieve_futures")):
            log.debug("%s %s -> %d %.0f ms", request.method, request.url.path, response.status_code,
                      (time.perf_counter() - t0) * 1e3)
        return response

    # ------------------------------------------------------------ server level
    @app.post(f"{API}/client/config")
    async def client_config_route(request: Request):
        return flags

    @app.post(f"{API}/client/dynamic_config")
    async def dynamic_config(request: Request):
        return DYNAMIC_CONFIG

    @app.get(f"{API}/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get(f"{API}/server_stats")
    async def server_stats():
        """Not part of the Tinker protocol: load and capacity figures for operators and bench/load.py."""
        return {"responses_by_status": {str(k): v for k, v in sorted(status_counts.items())},
                "queued_sequences": service.queued_sequences, "queued_train_bytes": service.queued_train_bytes,
                "futures_in_memory": len(service.futures), "live_models": len(service.model_registry.live),
                "live_samplers": len(service.samplers.live), "retrieve_futures_polls": sampling.polls,
                "sampling_session_joins": sampling.joins,
                "connections": dict(getattr(app.state, "connection_counts", {}))}

    @app.get(f"{API}/get_server_capabilities")
    async def capabilities():
        return service.capabilities()

    @app.post(f"{API}/telemetry")
    async def telemetry(request: Request):
        await body_bytes(request)
        return {"status": "accepted"}

    # ------------------------------------------------------------ the protocol, by concept
    app.include_router(session_routes.router(service))
    app.include_router(training_routes.router(service, max_body_bytes))
    app.include_router(sampling_routes.router(service, sampling))
    app.include_router(checkpoint_routes.router(service))

    # ------------------------------------------------------------ not offered here
    for route, (method, sdk_name) in NOT_OFFERED_ROUTES.items():
        app.add_api_route(f"{API}/{route}", _not_offered(sdk_name), methods=[method])

    @app.api_route(f"{API}/{{rest:path}}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def unsupported(rest: str):  # after every router: it matches any path under /api/v1
        return error_response(404, f"/api/v1/{rest} is not supported by this gemtinker server")

    return app
