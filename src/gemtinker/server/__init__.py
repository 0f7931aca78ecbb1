"""Tinker-compatible HTTP server in front of the gemtinker engine.

    with start_local(models=[...], root=...) as srv:   # uvicorn in a background thread
        tinker.ServiceClient(base_url=srv.base_url, api_key="tml-local")

`ensure_backend()` returns TINKER_BASE_URL, starting one local server per process if unset.
"""

from .local import LocalServer, ensure_backend, start_local

__all__ = ["LocalServer", "ensure_backend", "start_local"]
