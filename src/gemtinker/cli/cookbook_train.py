"""`python -m gemtinker.cookbook_train key=value ...` / `gemtinker cookbook-train`: tinker-cookbook's
RL loop on a GEM env. The keys and what they build are in `gemtinker.recipes.cookbook.train`."""

from __future__ import annotations

import asyncio
import logging
import sys

import chz

from gemtinker.recipes.cookbook.train import CLIConfig, cli_main, write_plot


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from chz.blueprint._entrypoint import EntrypointException, EntrypointHelpException

    try:
        cfg = chz.entrypoint(CLIConfig, argv=list(argv))  # chz consumes its argv list
    except EntrypointHelpException:  # already printed (chz re-raises under pytest)
        return 0
    except EntrypointException:  # bad key or value, already printed
        return 2
    except SystemExit as exc:  # chz prints the help or the error, then exits with status 1
        return 0 if any(a in ("-h", "--help", "help") for a in argv) else (2 if exc.code else 0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log_path = asyncio.run(cli_main(cfg))
    if cfg.plot:
        png = write_plot(log_path)
        if png is not None:
            print(f"learning curve: {png}")
    print(f"logs: {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
