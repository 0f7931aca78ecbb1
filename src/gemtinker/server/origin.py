"""Cross-site request checks for a server bound to a loopback address.

A key-less server on 127.0.0.1 is reachable by any web page the user opens: a page can POST to
it (CSRF; the browser sends `Origin: http://that.site`), or rebind its own domain name to
127.0.0.1 and then read the answers too (the browser sends `Host: that.site:PORT`). Programs
such as the tinker SDK send `Host: 127.0.0.1:PORT` and no Origin, so refusing any other Host
or Origin, and any JSON route body that is not `application/json` (the content types a page can
send without a CORS preflight are text/plain, forms and none), costs them nothing.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost",)


def is_loopback_name(host: str) -> bool:
    """localhost, or a loopback IP literal (127.0.0.0/8, ::1)."""
    host = host.strip().lower().rstrip(".")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_without_port(value: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1'; '[::1]:8000' -> '::1'; 'localhost' -> 'localhost'."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    name, sep, port = value.rpartition(":")
    return name if sep and port.isdigit() else value


def cross_site_problem(host: str | None, origin: str | None) -> str | None:
    """Why a request to a loopback-bound server must be refused, or None if it may pass."""
    if host and not is_loopback_name(host_without_port(host)):
        return (f"Host {host[:100]!r} is not a loopback name: this server listens on a loopback address and only "
                "answers requests addressed to localhost, 127.0.0.1 or [::1] (refused as a possible DNS-rebinding "
                "request from a web page)")
    if origin is not None:
        try:
            parts = urlsplit(origin.strip())
        except ValueError:  # e.g. an unclosed "[::1"
            parts = urlsplit("")
        if parts.scheme not in ("http", "https") or not parts.hostname or not is_loopback_name(parts.hostname):
            return (f"Origin {origin[:100]!r} is not a loopback origin: this server does not answer requests from "
                    "web pages of other sites (refused as a possible cross-site request)")
    return None


def is_json_content_type(value: str | None) -> bool:
    """application/json, with or without parameters (charset), or an application/*+json type."""
    if not value:
        return False
    media = value.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))
