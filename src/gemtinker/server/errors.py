"""Error types of the protocol layer.

`UserError` is the caller's fault: it becomes a failed future with category "user" (or a 4xx
with a JSON body on direct endpoints). Engine input errors (`EngineError`) are treated the same.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the client; reported back, never crashes the server."""

    status_code = 400


class NotFoundError(UserError):
    status_code = 404


class NotOffered(NotFoundError):
    """A Tinker route this server does not offer: 404, whose message names the SDK method and
    says why (the SDK does not retry 4xx, so the caller sees it at once)."""


class AuthError(UserError):
    status_code = 401


class PayloadTooLarge(UserError):
    status_code = 413


class UnsupportedMediaType(UserError):
    status_code = 415


class CrossSiteRequest(UserError):
    status_code = 403


class Forbidden(UserError):
    status_code = 403


class Overloaded(UserError):
    """Beyond capacity: the SDK retries 429 (with backoff) on every submit path."""

    status_code = 429


class Gone(UserError):
    """Existed, but no longer: an expired download URL or checkpoint (410; not retried)."""

    status_code = 410
