"""`gemtinker serve | train | cookbook-train | eval | plot | export | import-peft`.

Every command line of the project lives in this package, one module per command (`train`,
`cookbook_train`, `evaluate`, `plot`, `weights`): argument parsing, logging set-up, choosing the
backend, exit codes. The work itself is in `gemtinker.recipes` and below, so a recipe can be
called from Python without a command line, and the commands are found in one place.

Two kinds of thin shim remain elsewhere, each a few lines that import from here:
`gemtinker/train.py` and `gemtinker/cookbook_train.py`, because `python -m gemtinker.train` and
`python -m gemtinker.cookbook_train` are the module names GEM's command lines, the Makefile and
bench/ use; and `examples/train_tinker/*`, GEM's own script names. `serve` is
`gemtinker.server.cli`, which belongs to the server package it configures.

Each subcommand's module is imported only when it runs (`module` runs its `main`,
`module:function` that function), so `gemtinker --help` stays fast (no torch import).
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "serve": ("gemtinker.server.cli", "Run the Tinker-compatible server (engine behind HTTP)"),
    "train": ("gemtinker.cli.train", "Low-level multi-turn REINFORCE + ReBN on a GEM env (key=value args)"),
    "cookbook-train": ("gemtinker.cli.cookbook_train", "tinker-cookbook RL loop on a GEM env (key=value args)"),
    "eval": ("gemtinker.cli.evaluate", "Evaluate a checkpoint or base model on N episodes of an env"),
    "plot": ("gemtinker.cli.plot", "Redraw the learning-curve PNG of a log directory"),
    "export": ("gemtinker.cli.weights:export_main", "Write a checkpoint as a PEFT adapter and/or a merged HF model"),
    "import-peft": ("gemtinker.cli.weights:import_main", "Turn a PEFT adapter folder into tinker:// checkpoints"),
}


def _usage() -> str:
    lines = ["usage: gemtinker <command> [args...]", "", "commands:"]
    lines += [f"  {name:<15} {doc}" for name, (_, doc) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"gemtinker: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _, function = SUBCOMMANDS[name][0].partition(":")
    module = importlib.import_module(module_name)
    result = getattr(module, function or "main")(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
