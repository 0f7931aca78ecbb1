"""Groups of GEM envs that play one task: what a GRPO-style group (the cookbook's) trains on.

`make_group_gem_envs` resets one prototype env with the group's seed and copies that state
`group_size` times (GEM's `spawn(same_state=True)`, else `get_state`/`set_state` on a fresh env,
else fresh envs reset with the same seed, checked to agree). Envs come from `EnvFactory`, the
project's one way to build GEM envs, so math envs get its offline dataset.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import gem


def parse_env_kwargs(env_kwargs_json: str | None) -> dict[str, Any]:
    if not env_kwargs_json:
        return {}
    try:
        kwargs = json.loads(env_kwargs_json)
    except json.JSONDecodeError as exc:
        raise ValueError(f"env_kwargs_json is not valid JSON ({exc}): {env_kwargs_json!r}") from exc
    if not isinstance(kwargs, dict):
        raise ValueError(f"env_kwargs_json must be a JSON object, got {env_kwargs_json!r}")
    return kwargs


@lru_cache(maxsize=16)
def _factory(env_id: str, math_dataset: str) -> Any:
    # gemtinker.envs.EnvFactory is the project's one way to build GEM envs (shared with the
    # low-level trainer): it checks the id, and gives `math:*` envs an offline dataset, loaded once.
    from gemtinker.envs.factory import EnvFactory

    return EnvFactory(env_id, env_wrappers="", math_dataset=math_dataset)


def make_gem_env(env_id: str, env_kwargs: dict[str, Any], seed: int = 0, math_dataset: str = "auto") -> gem.Env:
    """One unwrapped GEM env. `env_kwargs` are GEM constructor arguments (`gem.make(id, **kw)`).

    Math envs always come from the factory, which builds them with `use_mp=False` (grading in a
    process pool is not needed here) over its offline-capable dataset; other kwargs for them are
    rejected rather than silently dropped.
    """
    from gemtinker.envs.factory import is_math_env

    factory = _factory(env_id, math_dataset)
    if is_math_env(env_id):
        unsupported = {k: v for k, v in env_kwargs.items() if not (k == "use_mp" and v is False)}
        if unsupported:
            raise ValueError(
                f"{env_id}: env_kwargs {unsupported} are not supported for math envs here "
                "(only use_mp=false, which is what gemtinker always uses)"
            )
        return factory.make_base(seed)
    if env_kwargs:
        return gem.make(env_id, **env_kwargs)
    return factory.make_base(seed)


# One prototype env per (env_id, kwargs) and process: groups copy their state from it instead of
# rebuilding envs (cheap for games, avoids re-reading datasets for math). The lock keeps a group's
# reset + copies atomic if builders ever run in threads (the cookbook's rollouts are coroutines).
_PROTO_LOCK = threading.Lock()


@lru_cache(maxsize=16)
def group_prototype(env_id: str, env_kwargs_json: str | None, math_dataset: str) -> gem.Env:
    return make_gem_env(env_id, parse_env_kwargs(env_kwargs_json), math_dataset=math_dataset)


def _implements_spawn(env: gem.Env) -> bool:
    return type(env.unwrapped).spawn is not gem.Env.spawn


def _copy_state(proto: gem.Env, make_fresh: Callable[[], gem.Env]) -> gem.Env | None:
    """A new env in `proto`'s current state, or None if this env type cannot be copied."""
    if _implements_spawn(proto):
        child = proto.spawn(same_state=True)
        # GEM's spawn builds the base class; keep subclasses (e.g. the factory's thread-safe
        # MathEnv) by falling through to get_state/set_state on a fresh env of the right type.
        if type(child) is type(proto):
            return child
    if hasattr(proto, "get_state") and hasattr(proto, "set_state"):
        child = make_fresh()
        child.set_state(proto.get_state())
        return child
    return None


def make_group_gem_envs(
    env_id: str,
    env_kwargs_json: str | None,
    seed: int,
    group_size: int,
    math_dataset: str = "auto",
) -> tuple[list[gem.Env], str, dict[str, Any]]:
    """`group_size` GEM envs in one state, the first reset with `seed`; returns (envs, obs, info)."""
    kwargs = parse_env_kwargs(env_kwargs_json)

    def make_fresh() -> gem.Env:
        return make_gem_env(env_id, kwargs, math_dataset=math_dataset)

    with _PROTO_LOCK:
        proto = group_prototype(env_id, env_kwargs_json, math_dataset)
        obs, info = proto.reset(seed=seed)
        copies = [_copy_state(proto, make_fresh) for _ in range(group_size)]
        if all(c is not None for c in copies):
            envs = [c for c in copies if c is not None]
        else:
            # No way to copy state (e.g. the language games): a GEM reset draws its task from the
            # RNG that `reset(seed)` seeds, so fresh envs reset with one seed share the task.
            envs = [make_fresh() for _ in range(group_size)]
            results = [e.reset(seed=seed) for e in envs]
            if any(r[0] != obs for r in results):
                raise RuntimeError(
                    f"{env_id}: envs reset with the same seed gave different observations, so a "
                    "group would not share a task; this env needs spawn(same_state=True)"
                )
    return envs, str(obs), dict(info or {})
