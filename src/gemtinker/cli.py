"""`gemtinker serve | train | cookbook-train | eval | plot | export | import-peft`.

Each subcommand lives in its own module (`module` runs its `main`, `module:function` that
function); this file only dispatches, so `gemtinker --help` stays fast (no torch import).
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "serve": ("gemtinker.server.cli", "Run the Tinker-compatible server (engine behind HTTP)"),
    "train": ("gemtinker.train", "Low-level multi-turn REINFORCE + ReBN on a GEM env (key=value args)"),
    "cookbook-train": ("gemtinker.cookbook_train", "tinker-cookbook RL loop on a GEM env (key=value args)"),
    "eval": ("gemtinker.recipes.evaluation.run", "Evaluate a checkpoint or base model on N episodes of an env"),
    "plot": ("gemtinker.recipes.runs.plotting", "Redraw the learning-curve PNG of a log directory"),
    "export": ("gemtinker.weights_cli:export_main", "Write a checkpoint as a PEFT adapter and/or a merged HF model"),
    "import-peft": ("gemtinker.weights_cli:import_main", "Turn a PEFT adapter folder into tinker:// checkpoints"),
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
