"""In-process server for recipes and tests: uvicorn in a background thread.

`ensure_backend()` is how recipes pick their backend: an explicit TINKER_BASE_URL wins (another
gemtinker server or hosted Tinker); otherwise one local server is started for this process.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from gemtinker import DEFAULT_MODEL

from .app import DEFAULT_MAX_BODY_BYTES, create_app
from .connections import ConnectionGuard
from .origin import is_loopback_name as _is_loopback
from .service import EngineFactory, Service

log = logging.getLogger("gemtinker.server")
DUMMY_API_KEY = "tml-local"


def default_root() -> Path:
    env = os.environ.get("GEMTINKER_SERVER_ROOT")
    return Path(env) if env else Path.home() / ".cache" / "gemtinker" / "server"


class LocalServer:
    """A running server; `.base_url` is what TINKER_BASE_URL / `base_url=` should be."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 client_config: dict | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 guard: ConnectionGuard | None = None):
        self.service = service
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port = self._sock.getsockname()[1]
        self.base_url = f"http://{host}:{self.port}"
        app = create_app(service, api_key, client_config, max_body_bytes, loopback=_is_loopback(host))
        self.guard = guard or ConnectionGuard()
        app.state.connection_counts = self.guard.counts
        config = uvicorn.Config(app, http=self.guard.protocol(), log_level="warning", access_log=False,
                                timeout_keep_alive=75, timeout_graceful_shutdown=3)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="gemtinker-server", daemon=True)
        self._thread.start()
        deadline = time.time() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.time() > deadline:
                raise RuntimeError("gemtinker server failed to start")
            time.sleep(0.02)
        log.info("gemtinker server on %s (models: %s, root: %s)", self.base_url, ", ".join(service.models), service.root)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()
        self.service.close()

    def __enter__(self) -> "LocalServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_local(models: list[str] | None = None, root: str | Path | None = None, port: int = 0, *,
                api_key: str | None = None, engine_factory: EngineFactory | None = None,
                long_poll_s: float = 25.0, client_config: dict | None = None,
                max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, guard: ConnectionGuard | None = None,
                **service_kw: Any) -> LocalServer:
    """Start a server on 127.0.0.1 in this process (port 0 = any free port). `guard` sets the
    connection deadlines and cap; `service_kw` go to `Service` (capacity limits such as
    max_num_samples, max_queued_sequences)."""
    service = Service(models or [DEFAULT_MODEL], Path(root) if root else default_root(),
                      engine_factory=engine_factory, long_poll_s=long_poll_s, **service_kw)
    try:
        return LocalServer(service, port=port, api_key=api_key, client_config=client_config,
                           max_body_bytes=max_body_bytes, guard=guard)
    except BaseException:
        service.close()
        raise


_backend_lock = threading.Lock()
_backend: LocalServer | None = None


def ensure_backend(models: list[str] | None = None, root: str | Path | None = None) -> str:
    """TINKER_BASE_URL if set; else start (once per process) a local server and point the
    environment at it (TINKER_BASE_URL, and a dummy TINKER_API_KEY if none is set)."""
    global _backend
    url = os.environ.get("TINKER_BASE_URL")
    if url:
        return url
    with _backend_lock:
        if _backend is None:
            _backend = start_local(models=models, root=root)
            atexit.register(_backend.stop)
        os.environ["TINKER_BASE_URL"] = _backend.base_url
        os.environ.setdefault("TINKER_API_KEY", DUMMY_API_KEY)
        return _backend.base_url
