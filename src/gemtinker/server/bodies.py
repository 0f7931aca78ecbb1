"""Reading request bodies: size limits, zstd, JSON, and decoding large bodies off the event loop.

Every error here is a `UserError` with a JSON body (an empty 400 makes the SDK retry).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import Request
from fastapi.responses import JSONResponse

from .errors import PayloadTooLarge, UnsupportedMediaType, UserError
from .limits import check_strings
from .origin import is_json_content_type

T = TypeVar("T")

# The SDK splits forward_backward into chunks of ~5 MB (client config fwdbwd_max_chunk_bytes_count),
# so 64 MiB leaves a wide margin while one request can never take the server's memory.
DEFAULT_MAX_BODY_BYTES = 64 << 20
# Bodies larger than this are decoded (JSON, protobuf, zstd) on worker threads, DECODE_WORKERS at
# a time; two leave a core of a small machine to the loop and the engine.
OFF_LOOP_BYTES = 256 << 10
DECODE_WORKERS = 2


def owner_of(request: Request) -> str | None:
    """Who owns what a request creates: a hash of its X-API-Key (never the key itself, which
    would then sit in the database), or None without one."""
    key = request.headers.get("x-api-key")
    return hashlib.sha256(key.encode()).hexdigest()[:32] if key else None


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message, "error": message}, status_code=status, headers=headers)


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body is larger than this server's limit of {limit} bytes "
                           f"({limit >> 20} MiB; `gemtinker serve --max-body-mb`)")


async def off_loop(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """Run a CPU-bound decode on a worker thread, at most DECODE_WORKERS at once: the event loop
    keeps serving other clients (/healthz, long polls) while a large body is decoded, and a
    burst of large bodies waits for a worker instead of decoding all at once."""
    state = request.app.state
    if getattr(state, "decode_limiter", None) is None:  # made on the loop: anyio needs one
        state.decode_limiter = anyio.CapacityLimiter(DECODE_WORKERS)
    return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=state.decode_limiter)


async def body_bytes(request: Request) -> bytes:
    """The request body, read incrementally so a huge (or chunked, length-less) body is refused
    at the limit instead of being buffered whole."""
    limit: int = request.app.state.max_body_bytes
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        parts.append(chunk)
    raw = b"".join(parts)
    if request.headers.get("content-encoding", "").lower() == "zstd":
        raw = await off_loop(request, unzstd, raw, limit)
    return raw


def unzstd(raw: bytes, limit: int) -> bytes:
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
        raise too_large(limit)
    return out


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw) if raw else {}
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, absurd nesting
        raise UserError(f"request body is not valid JSON: {str(e)[:200]}")
    if not isinstance(body, dict):
        raise UserError("request body must be a JSON object")
    check_strings(raw, body)
    return body


async def json_body(request: Request) -> dict[str, Any]:
    ctype = request.headers.get("content-type")
    if not is_json_content_type(ctype):
        # text/plain, forms and no type at all are what a web page may POST cross-site unchecked.
        raise UnsupportedMediaType(f"{request.url.path} takes a JSON body (Content-Type: application/json), "
                                   f"got Content-Type {ctype!r}")
    raw = await body_bytes(request)
    # Small bodies (nearly all) parse in microseconds: the thread hop would cost more.
    return await off_loop(request, parse_json, raw) if len(raw) > OFF_LOOP_BYTES else parse_json(raw)
