"""`gemtinker eval key=value ...`: a checkpoint (or the base model) on N held-out episodes.

    gemtinker eval log_dir=runs/game_GuessTheNumber-v0-easy-20260101-120000      # last checkpoint of a run
    gemtinker eval checkpoint=tinker://.../sampler_weights/step000040 env_id=...
    gemtinker eval env_id=game:GuessTheNumber-v0-easy                           # the base model

Each episode gets its own seed (seed_offset + i; the default offset is disjoint from every
training seed), so N episodes are N different games/questions where the env allows. Prints mean
return with a 95% CI and the success rate with a 95% Wilson interval.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Sequence

import chz

from gemtinker.recipes.evaluation.run import EvalConfig, evaluate, resolve_settings


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = chz.Blueprint(EvalConfig).make_from_argv(argv)
    except chz.blueprint.EntrypointHelpException as e:
        print(__doc__)
        print(e)
        return 0
    except Exception as e:  # noqa: BLE001
        print(f"gemtinker eval: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    logging.getLogger("gemtinker.server").setLevel(os.environ.get("GEMTINKER_SERVER_LOG", "WARNING").upper())
    logging.getLogger("tinker.lib.api_future_impl").setLevel(logging.ERROR)
    from gemtinker.hub import use_offline_hub_if_unreachable

    use_offline_hub_if_unreachable()
    try:
        settings = resolve_settings(cfg)
        if not cfg.base_url and not os.environ.get("TINKER_BASE_URL"):
            from gemtinker.server import ensure_backend

            ensure_backend(models=[settings["model_name"]])
        summary, report = asyncio.run(evaluate(cfg))
    except FileNotFoundError as e:
        print(f"gemtinker eval: {e}", file=sys.stderr)
        return 1
    print(f"{report['checkpoint']} on {report['env_id']}: {summary.line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
