"""Numeric ranges and string checks applied to each request on its own, before it is queued.

A value outside these ranges used to travel into torch or SQLite and fail there: inside a
sampler batch (failing every request batched with it), in a listing (failing every later
listing), or as a 500. Each check raises `UserError` naming the field and the allowed range.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Any

from .errors import UserError

# torch.Generator.manual_seed takes any uint64; the SDK types seeds as plain ints.
SEED_MAX = 2**64 - 1
# A checkpoint kept longer than this is "forever" in practice; beyond it timestamps stop being
# representable (datetime ends at year 9999) and listings would fail.
TTL_MAX_S = 10 * 365 * 24 * 3600
# Listing pages: SQLite takes int64, and no listing here needs more rows than this per page.
PAGE_LIMIT_MAX = 10_000
PAGE_OFFSET_MAX = 2**62
# Latest timestamp `datetime` can render (9999-12-31T23:59:59Z): stored rows are clamped to it.
MAX_RENDERABLE_TS = 253402300799.0

# JSON escapes of UTF-16 surrogates; only bodies that contain one need the (slower) string walk.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_seed(where: str, v: Any) -> int | None:
    """None, or an integer in the uint64 range."""
    if v is None:
        return None
    if not is_int(v) or not 0 <= v <= SEED_MAX:
        raise UserError(f"{where} must be an integer in 0..2**64-1, got {v!r}")
    return v


def check_ttl(v: Any) -> float | None:
    """None (keep forever) or a number of seconds in [1, TTL_MAX_S]. Hosted Tinker's minimum is
    an hour; one second here lets a test watch a checkpoint expire."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (1 <= v <= TTL_MAX_S):
        raise UserError(f"ttl_seconds must be a number of seconds in 1..{TTL_MAX_S} (10 years) or null, got {v!r}")
    return float(v)


def check_page(limit: int, offset: int) -> None:
    if not 0 <= limit <= PAGE_LIMIT_MAX:
        raise UserError(f"limit must be in 0..{PAGE_LIMIT_MAX}, got {limit}")
    if not 0 <= offset <= PAGE_OFFSET_MAX:
        raise UserError(f"offset must be in 0..2**62, got {offset}")


def check_token_ids(where: str, tokens: list[int], vocab_size: int | None) -> None:
    """Python ints checked before any numpy conversion (10**30 would overflow it)."""
    hi = vocab_size if vocab_size is not None else 2**31
    for i, t in enumerate(tokens):
        if not 0 <= t < hi:
            raise UserError(f"{where}: token id {t} is out of the vocabulary (0..{hi - 1}; at position {i})")


def clamp_ts(ts: float | None) -> float | None:
    """A stored timestamp made renderable: bad rows written before the TTL check must not
    break every listing that contains them."""
    if ts is None or math.isnan(ts):
        return None
    return min(max(ts, 0.0), MAX_RENDERABLE_TS)


def iso(ts: float | None) -> str | None:
    """A stored timestamp as ISO 8601 UTC for a response, clamped to what `datetime` renders."""
    ts = clamp_ts(ts)
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


def str_dict(d: dict | None) -> dict[str, str] | None:
    """user_metadata as the SDK types it (dict[str, str])."""
    return None if d is None else {str(k): v if isinstance(v, str) else str(v) for k, v in d.items()}


def check_strings(raw: bytes, body: Any) -> None:
    """Refuse strings holding a lone UTF-16 surrogate (`"\\ud800"`): Python accepts them from
    JSON, but they cannot be encoded as UTF-8, so SQLite and the JSON response would fail later."""
    if _SURROGATE_ESCAPE.search(raw):
        try:
            _walk_strings(body, "body")
        except RecursionError:
            raise UserError("request body is nested too deeply") from None


def _walk_strings(v: Any, where: str) -> None:
    if isinstance(v, str):
        _check_utf8(v, where)
    elif isinstance(v, dict):
        for k, x in v.items():
            _check_utf8(k, f"{where} key {k!r}")  # repr escapes surrogates: the message stays encodable
            _walk_strings(x, f"{where}.{k!r}")
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _walk_strings(x, f"{where}[{i}]")


def _check_utf8(s: str, where: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{where[:200]}: string holds a lone UTF-16 surrogate (not valid Unicode text)") from None
