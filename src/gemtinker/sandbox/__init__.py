"""Sandbox for model-written Python (GEM's Python tool). See `runner` for what is enforced."""

from gemtinker.sandbox.gem_tool import gem_run_python, install_into_gem, uninstall_from_gem
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
    "SandboxedPythonCodeTool",
    "gem_run_python",
    "install_into_gem",
    "uninstall_from_gem",
    "resolve_isolation",
    "run_python",
    "set_default_forbid_paths",
]


def __getattr__(name: str) -> object:
    if name == "SandboxedPythonCodeTool":  # lazy: importing it imports gem
        from gemtinker.sandbox import gem_tool

        return gem_tool.SandboxedPythonCodeTool
    raise AttributeError(name)
