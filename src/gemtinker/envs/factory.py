"""Building GEM environments (with their wrappers) by id, the way GEM's scripts name them.

`EnvFactory(env_id, env_wrappers, tokenizer).make(seed)` returns a ready, wrapped `gem.Env`.
The factory checks the id and the wrapper list once, up front, so a typo fails before any model
is loaded; it also loads a math env's dataset once and shares it between all env copies.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import difflib
import io
import threading
from typing import Any, Callable

from gemtinker.envs.math_data import MathRows, resolve_math_rows

MATH_ENTRY_POINT = "gem.envs.math_env:MathEnv"
# Wrappers that add a tool to the env must wrap it before an observation wrapper renders the
# history, otherwise tool results never reach the observation (GEM: "Order is important!").
_TOOL_PREFIXES = ("python_tool", "search_tool")
_OBSERVATION_PREFIX = "concat"


def _gem_registry() -> dict[str, Any]:
    import gem  # noqa: F401 - importing gem registers its envs
    from gem.envs.registration import ENV_REGISTRY

    return ENV_REGISTRY


def parse_wrappers(spec: str | None) -> list[str]:
    """Split and check a comma-separated wrapper list such as `python_tool,concat_chat`."""
    from gem.wrappers.wrapper_factory import WRAPPER_FACTORY

    names = [w.strip() for w in (spec or "").split(",") if w.strip() and w.strip() != "none"]
    for name in names:
        if name not in WRAPPER_FACTORY:
            raise ValueError(f"unknown env wrapper {name!r}; known: {', '.join(WRAPPER_FACTORY)}")
    seen_observation = False
    for name in names:
        if name.startswith(_OBSERVATION_PREFIX):
            seen_observation = True
        elif name.startswith(_TOOL_PREFIXES) and seen_observation:
            raise ValueError(
                f"env_wrappers={spec!r}: tool wrapper {name!r} must come before the concat* wrapper"
            )
    return names


def check_env_id(env_id: str) -> None:
    registry = _gem_registry()
    if env_id not in registry:
        close = difflib.get_close_matches(env_id, list(registry), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown GEM env id {env_id!r}.{hint}")


def is_math_env(env_id: str) -> bool:
    spec = _gem_registry()[env_id]
    return spec.entry_point == MATH_ENTRY_POINT


_grade_pool: concurrent.futures.ThreadPoolExecutor | None = None
_grade_pool_lock = threading.Lock()


def _run_with_timeout(fn: Callable[..., Any], args: tuple[Any, ...], timeout_s: float) -> Any:
    """GEM grades answers under `signal.alarm`, which only works on the main thread; env steps
    here run on worker threads, so grade on a small pool and give up (answer wrong) on timeout."""
    global _grade_pool
    with _grade_pool_lock:
        if _grade_pool is None:
            _grade_pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="gem-grade")
    future = _grade_pool.submit(fn, *args)
    try:
        return future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        return None


_patched_grader = False


def _let_grader_run_off_main_thread() -> None:
    """GEM's grader wraps sympy calls in a SIGALRM-based `timeout` context manager, which raises
    ValueError on any thread but the main one. Off the main thread, make it a no-op: the whole
    grading call is already bounded by `_run_with_timeout`."""
    global _patched_grader
    if _patched_grader:
        return
    from gem.utils import math_grader

    signal_timeout = math_grader.timeout

    class _ThreadTolerantTimeout(signal_timeout):  # type: ignore[misc, valid-type]
        def __enter__(self) -> None:
            if threading.current_thread() is threading.main_thread():
                super().__enter__()

        def __exit__(self, *exc: Any) -> None:
            if threading.current_thread() is threading.main_thread():
                super().__exit__(*exc)

    math_grader.timeout = _ThreadTolerantTimeout
    _patched_grader = True


def _make_math_env_class() -> type:
    from gem.envs.math_env import MathEnv
    from gem.utils.constants import TERMINAL_STATE

    _let_grader_run_off_main_thread()

    class ThreadSafeMathEnv(MathEnv):  # type: ignore[misc, valid-type]
        """GEM's MathEnv with answer grading that works off the main thread."""

        def _local_step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
            correct = bool(_run_with_timeout(self.check_correct, (action, self.answer), 2.0))
            return TERMINAL_STATE, 1.0 if correct else 0.0, True, True, {"correct": correct}

    return ThreadSafeMathEnv


class EnvFactory:
    """Makes wrapped GEM envs for one env id; cheap to call `make` many times."""

    def __init__(
        self,
        env_id: str,
        env_wrappers: str | None = "",
        tokenizer: Any = None,
        math_dataset: str = "auto",
        sandbox_forbid_paths: tuple[str, ...] = (),
    ) -> None:
        check_env_id(env_id)
        self.env_id = env_id
        self.wrapper_names = parse_wrappers(env_wrappers)
        self.tokenizer = tokenizer
        self.math_dataset = math_dataset
        self._math_rows: MathRows | None = None
        self._math_hf_dataset: Any = None
        self._lock = threading.Lock()
        if any(name.startswith("concat_chat") for name in self.wrapper_names) and tokenizer is None:
            raise ValueError(f"env_wrappers={env_wrappers!r} needs a tokenizer (chat template)")
        if any(name.startswith("python_tool") for name in self.wrapper_names):
            # GEM runs model-written code as a plain subprocess of the trainer; route it through
            # gemtinker's sandbox, hiding e.g. the run's own log directory from the code.
            from gemtinker.sandbox import install_into_gem

            install_into_gem(forbid_paths=sandbox_forbid_paths)

    @property
    def dataset_source(self) -> str | None:
        return self._math_rows.source if self._math_rows else None

    def _math_dataset(self) -> Any:
        with self._lock:
            if self._math_hf_dataset is None:
                from datasets import Dataset

                kwargs = _gem_registry()[self.env_id].kwargs
                self._math_rows = resolve_math_rows(
                    self.env_id, kwargs.get("dataset_name"), self.math_dataset, kwargs.get("split")
                )
                self._math_hf_dataset = Dataset.from_list(self._math_rows.rows)
            return self._math_hf_dataset

    def make_base(self, seed: int) -> Any:
        """The unwrapped env. `seed` seeds env-level generators (reasoning-gym datasets, math
        shuffles); episodes are seeded separately at reset."""
        import gem

        if is_math_env(self.env_id):
            env = _make_math_env_class()(
                dataset=self._math_dataset(), question_key="problem", answer_key="answer",
                seed=seed, use_mp=False,
            )
            env.env_id = self.env_id
            return env
        try:
            return gem.make(self.env_id, seed=seed)
        except TypeError:
            return gem.make(self.env_id)

    def wrap(self, env: Any) -> Any:
        from gem.wrappers.wrapper_factory import get_wrapper_fns

        # get_wrapper_fns prints its arguments on every call; keep rollouts quiet.
        with contextlib.redirect_stdout(io.StringIO()):
            fns = get_wrapper_fns(",".join(self.wrapper_names), tokenizer=self.tokenizer)
        for fn in fns:
            env = fn(env)
        return env

    def make(self, seed: int) -> Any:
        return self.wrap(self.make_base(seed))
