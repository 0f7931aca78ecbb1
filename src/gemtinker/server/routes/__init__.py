"""The `/api/v1` routes, one FastAPI router per concept: `training` (models and their ordered
ops), `sampling` (samplers, sampling, futures), `sessions`, `checkpoints` (REST listings,
checkpoint management, external weights). app.py adds the server-level routes (client config,
health, stats, capabilities), the middleware and the error handlers.
"""

from __future__ import annotations

from typing import Any

API = "/api/v1"


def future(request_id: str, model_id: Any = None, **extra: Any) -> dict:
    """The answer to a submitted op: its request_id, for retrieve_future."""
    # model_id echoes the request; a malformed one must not make the reply itself invalid.
    return {"request_id": request_id, "model_id": model_id if isinstance(model_id, str) else None, **extra}
