"""Make GEM's Python tool execute model-written code in the gemtinker sandbox.

GEM's `PythonCodeTool.execute_action` calls the module-level function
`gem.tools.python_code_tool.run_python(code, sandbox_type, timeout=...)`, which by default runs
the code as a plain subprocess of the trainer with only a string blacklist of imports, and
(in gem-llm 0.1.0) does not even pass `timeout` on, so the default 10 s applies.

How the envs layer uses this (one call, before or after building envs):

    from gemtinker.sandbox import install_into_gem
    install_into_gem(forbid_paths=[log_dir])   # e.g. the run's checkpoints/metrics directory

`install_into_gem` replaces that module-level function, so every `PythonCodeTool`, including the
instances GEM's `WRAPPER_FACTORY` created at import time (`python_tool`,
`python_tool_no_int_reward`, `python_tool_no_int_reward_last_line_error`), runs code through
`gemtinker.sandbox.run_python`. It is idempotent and thread-safe; `uninstall_from_gem()` restores
GEM's function. Alternatively, build tools explicitly with `SandboxedPythonCodeTool(...)`.

The observation format is GEM's own ("Code execution result: <stdout>\n<stderr>"); a sandbox
violation is appended as the last stderr line (`SandboxError: ...`), so it reaches the agent even
with `keep_error_last_line=True`.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Sequence

from gemtinker.sandbox.runner import run_python

_lock = threading.Lock()
_original: Callable[..., Any] | None = None
_limits: dict[str, Any] = {}


def _base_imports() -> str:
    from gem.utils.constants import BASE_IMPORTS

    return str(BASE_IMPORTS)


def gem_run_python(
    code: str,
    sandbox_type: str = "none",
    stdin: str | None = None,
    timeout: float = 5,
    **limits: Any,
) -> tuple[bool, str, str]:
    """Drop-in for `gem.utils.sandbox.run_python`: returns (success, stdout, stderr).

    `sandbox_type` is accepted for signature compatibility and ignored: isolation is always ours.
    Like GEM, a run that fails with a NameError ("... is not defined") is retried once with GEM's
    BASE_IMPORTS prepended, so models relying on that behaviour see the same results.
    """
    del sandbox_type
    kwargs = {**_limits, **limits}
    result = run_python(code, timeout_s=float(timeout), stdin=stdin, **kwargs)
    if not result.ok and result.violation is None and "is not defined" in result.stderr:
        result = run_python(_base_imports() + "\n" + code, timeout_s=float(timeout), stdin=stdin, **kwargs)  # fmt: skip
    stderr = result.stderr.strip()
    if result.violation is not None:
        note = result.error_text_for_agent.rsplit("\n", 1)[-1]  # the "SandboxError: ..." line
        stderr = f"{stderr}\n{note}" if stderr else note
    return result.ok, result.stdout, stderr


def install_into_gem(
    *,
    forbid_paths: Sequence[str | os.PathLike[str]] = (),
    memory_mb: int = 512,
    max_output_bytes: int = 64_000,
    **limits: Any,
) -> None:
    """Route GEM's Python tool through the sandbox (see module docstring). Later calls update the
    limits; `forbid_paths` are hidden from the code in addition to the sandbox defaults."""
    global _original
    import gem.tools.python_code_tool as pct

    with _lock:
        _limits.clear()
        _limits.update(
            forbid_paths=tuple(os.fspath(p) for p in forbid_paths),
            memory_mb=memory_mb,
            max_output_bytes=max_output_bytes,
            **limits,
        )
        if pct.run_python is not gem_run_python:
            _original = pct.run_python
            pct.run_python = gem_run_python


def uninstall_from_gem() -> None:
    global _original
    import gem.tools.python_code_tool as pct

    with _lock:
        if _original is not None:
            pct.run_python = _original
            _original = None


def is_installed() -> bool:
    import gem.tools.python_code_tool as pct

    return pct.run_python is gem_run_python


def _make_tool_class() -> type:
    from gem.tools.python_code_tool import PythonCodeTool

    class SandboxedPythonCodeTool(PythonCodeTool):  # type: ignore[misc, valid-type]
        """GEM's PythonCodeTool with per-instance sandbox limits, independent of
        `install_into_gem`. Use it where envs are built with explicit tool lists:
        `ToolEnvWrapper(env, tools=[SandboxedPythonCodeTool(timeout=5, forbid_paths=[log_dir])])`.
        """

        def __init__(
            self,
            timeout: int = 5,
            keep_error_last_line: bool = False,
            **limits: Any,
        ) -> None:
            super().__init__(timeout=timeout, sandbox_type="gemtinker", keep_error_last_line=keep_error_last_line)  # fmt: skip
            self.limits = limits

        def execute_action(self, action: str):  # type: ignore[no-untyped-def]
            # Same parsing and observation format as GEM's execute_action, with this instance's
            # limits instead of the module-level function.
            parsed_code, parsed_action, is_valid = self._parse_action(action)
            if not is_valid:
                return is_valid, True, "", parsed_action
            success, stdout, stderr = gem_run_python(parsed_code, timeout=self.timeout, **self.limits)  # fmt: skip
            if stderr and self.keep_error_last_line:
                stderr = stderr.split("\n")[-1]
            result = f"{stdout}\n{stderr}" if stderr else stdout
            observation = "Code execution result: " + result.lstrip(" \n") + "\n"
            return is_valid, not success, observation, parsed_action

    return SandboxedPythonCodeTool


def __getattr__(name: str) -> Any:
    # Built lazily so importing gemtinker.sandbox does not import gem.
    if name == "SandboxedPythonCodeTool":
        cls = _make_tool_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
