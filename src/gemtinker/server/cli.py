"""`gemtinker serve`: run the Tinker-compatible server in the foreground."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

from gemtinker import DEFAULT_MODEL

from .connections import (DEFAULT_BODY_TIMEOUT_S, DEFAULT_HEADER_TIMEOUT_S, DEFAULT_MAX_CONNECTIONS,
                          DEFAULT_MIN_BODY_RATE, ConnectionGuard)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: list[str]) -> argparse.Namespace:
    from .local import default_root

    p = argparse.ArgumentParser(prog="gemtinker serve", description="Tinker-compatible HTTP server for the gemtinker engine. "
                                "Point the tinker SDK at it with TINKER_BASE_URL=http://HOST:PORT TINKER_API_KEY=tml-local.")
    p.add_argument("--model", action="append", dest="models", metavar="NAME",
                   help=f"base model to serve (repeatable; default {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; others need --api-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--root", type=Path, default=default_root(), help="state dir: SQLite db and checkpoints (default %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("GEMTINKER_API_KEY"),
                   help="require this X-API-Key on every request (env GEMTINKER_API_KEY); clients set TINKER_API_KEY to it, so start it with 'tml-'")
    p.add_argument("--max-body-mb", type=float, default=64, help="largest accepted request body, MiB (default %(default)s)")
    p.add_argument("--max-num-samples", type=int, default=128, help="largest num_samples of one sample request (default %(default)s)")
    p.add_argument("--max-queued-sequences", type=int, default=2048,
                   help="sampling capacity: sequences queued or decoding before /asample answers 429 (default %(default)s)")
    p.add_argument("--train-dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                   help="learner compute dtype (env GEMTINKER_TRAIN_DTYPE; default auto: bf16 on CUDA and on CPUs with "
                        "AVX512-BF16/AMX, else the model's dtype; bf16 runs the decoder linears in bf16, attention and "
                        "the unembedding's forward in fp32). LoRA weights and Adam state stay fp32 either way")
    p.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT_S, metavar="S",
                   help="close a connection whose request line and headers are not complete S seconds after "
                        "its first byte (or after it opened) (default %(default)s)")
    p.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S, metavar="S",
                   help="a request body gets S seconds plus 1 s per --min-body-rate bytes received; slower "
                        "bodies are cut off (default %(default)s)")
    p.add_argument("--min-body-rate", type=float, default=DEFAULT_MIN_BODY_RATE / 1024, metavar="KIB_S",
                   help="least average upload rate of a request body after --body-timeout, KiB/s (default %(default)s)")
    p.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                   help="open connections; past N the oldest idle or half-open ones are closed first, and "
                        "only when all are busy does a new one get a 503 the SDK retries (default %(default)s)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if not _is_loopback(args.host) and not args.api_key:
        print(f"gemtinker serve: binding {args.host} exposes the server beyond this machine; "
              "pass --api-key (or set GEMTINKER_API_KEY)", file=sys.stderr)
        return 2
    try:
        guard = ConnectionGuard(args.header_timeout, args.body_timeout, args.min_body_rate * 1024, args.max_connections)
    except ValueError as e:
        flags = {"header_timeout_s": "--header-timeout", "body_timeout_s": "--body-timeout",
                 "min_body_rate": "--min-body-rate (bytes/s)", "max_connections": "--max-connections"}
        name = str(e).split()[0]
        print(f"gemtinker serve: {str(e).replace(name, flags.get(name, name), 1)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from .app import create_app
    from .service import Service

    from .schema import SchemaError

    try:
        service = Service(args.models or [DEFAULT_MODEL], args.root, max_num_samples=args.max_num_samples,
                          max_queued_sequences=args.max_queued_sequences, train_dtype=args.train_dtype)
    except SchemaError as e:  # a state dir this version cannot use: say why, no traceback
        print(f"gemtinker serve: {e}", file=sys.stderr)
        return 2
    app = create_app(service, api_key=args.api_key, max_body_bytes=int(args.max_body_mb * (1 << 20)),
                     loopback=_is_loopback(args.host))
    app.state.connection_counts = guard.counts
    logging.getLogger("gemtinker.server").info(
        "serving %s on http://%s:%d (state in %s)", ", ".join(service.models), args.host, args.port, service.root)
    try:
        uvicorn.run(app, host=args.host, port=args.port, http=guard.protocol(), log_level="warning",
                    access_log=False, timeout_keep_alive=75, timeout_graceful_shutdown=5)
    finally:
        service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
