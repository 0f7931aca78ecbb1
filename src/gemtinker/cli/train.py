"""`python -m gemtinker.train key=value ...` / `gemtinker train`: multi-turn REINFORCE + ReBN on a GEM env.

With no arguments it runs the default demo (see `gemtinker.recipes.rebn.config.Config`). Without
TINKER_BASE_URL the embedded gemtinker server is started in this process and used; with it set,
that endpoint (another gemtinker server, or hosted Tinker) does the training.
`python -m gemtinker.train --help` lists every key.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    import chz

    from gemtinker.recipes.rebn import config_from_argv, run

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = config_from_argv(argv)
    except chz.blueprint.EntrypointHelpException as e:
        print(e)
        return 0
    except Exception as e:  # noqa: BLE001 - a bad key=value gets one clear line, not a traceback
        print(f"gemtinker train: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    # The embedded server logs every request at INFO; the trainer's own progress output is what a
    # user wants to see. GEMTINKER_SERVER_LOG=INFO brings the request log back.
    logging.getLogger("gemtinker.server").setLevel(os.environ.get("GEMTINKER_SERVER_LOG", "WARNING").upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # The SDK warns on every long-poll "try again" answer, which is normal operation here.
    logging.getLogger("tinker.lib.api_future_impl").setLevel(logging.ERROR)
    from gemtinker.hub import use_offline_hub_if_unreachable

    use_offline_hub_if_unreachable()
    if not cfg.base_url and not os.environ.get("TINKER_BASE_URL"):
        from gemtinker.server import ensure_backend

        ensure_backend(models=[cfg.model_name])
    try:
        result = run(cfg)
    except KeyboardInterrupt:
        print("\ninterrupted; resume with the same command plus resume=true", file=sys.stderr)
        return 130
    print(f"done: {result['log_dir']}")
    if result.get("heldout"):
        print(result["heldout"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
