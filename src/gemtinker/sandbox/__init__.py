"""Sandbox for model-written Python (GEM's Python tool). See `runner` for what is enforced."""

from gemtinker.sandbox.runner import (
    DEFAULT_HIDDEN_PATHS,
    SandboxResult,
    resolve_isolation,
    run_python,
    set_default_forbid_paths,
)

__all__ = [
    "DEFAULT_HIDDEN_PATHS",
    "SandboxResult",
    "resolve_isolation",
    "run_python",
    "set_default_forbid_paths",
]
