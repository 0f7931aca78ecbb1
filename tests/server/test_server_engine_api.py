"""The engine contract (server/engine_api.py): the real `Engine` satisfies the `EngineAPI`
Protocol structurally, and the server's modules reach the engine only through it."""

from __future__ import annotations

import ast
import inspect
import typing
from pathlib import Path

from support.fake_engine import FakeEngine

from gemtinker.engine.engine import Engine
from gemtinker.server import engine_api
from gemtinker.server.engine_api import EngineAPI

SERVER = Path(engine_api.__file__).parent


def protocol_methods() -> dict[str, typing.Any]:
    return {name: member for name, member in vars(EngineAPI).items()
            if callable(member) and not name.startswith("_")}


def protocol_attributes() -> dict[str, typing.Any]:
    return typing.get_type_hints(EngineAPI)


def test_the_protocol_lists_methods_and_attributes():
    assert {"sample", "forward_backward", "create_adapter", "close"} <= set(protocol_methods())
    assert set(protocol_attributes()) == {"vocab_size", "max_len"}


def signature_problems(cls: type) -> list[str]:
    """What keeps `cls` from satisfying EngineAPI: a missing method, or a parameter the server
    passes that it names, orders, kinds or defaults differently, or another return type."""
    problems = []
    for name, member in protocol_methods().items():
        impl = getattr(cls, name, None)
        if not callable(impl):
            problems.append(f"{cls.__name__} has no method {name}")
            continue
        want = list(inspect.signature(member).parameters.values())
        have = inspect.signature(impl).parameters
        for p in want:
            q = have.get(p.name)
            if q is None:
                problems.append(f"{cls.__name__}.{name} lacks parameter {p.name!r}")
                continue
            if q.kind != p.kind:  # the server passes some by keyword, some by position
                problems.append(f"{cls.__name__}.{name}({p.name}) is {q.kind.description}, the Protocol says {p.kind.description}")
            if (p.default is inspect.Parameter.empty) != (q.default is inspect.Parameter.empty):
                problems.append(f"{cls.__name__}.{name}({p.name}): optional in one, required in the other")
            elif p.default is not inspect.Parameter.empty and p.default != q.default:
                problems.append(f"{cls.__name__}.{name}({p.name}) defaults to {q.default!r}, the Protocol says {p.default!r}")
        if list(have)[: len(want)] != [p.name for p in want]:
            problems.append(f"{cls.__name__}.{name} orders its parameters {list(have)}, the Protocol {[p.name for p in want]}")
        extra = [q for n, q in have.items() if n not in {p.name for p in want}
                 and q.default is inspect.Parameter.empty and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)]
        if extra:
            problems.append(f"{cls.__name__}.{name} requires parameters the server never passes: {[q.name for q in extra]}")
        want_ret = typing.get_type_hints(member).get("return")
        have_ret = typing.get_type_hints(impl).get("return")
        if want_ret != have_ret:
            problems.append(f"{cls.__name__}.{name} returns {have_ret}, the Protocol says {want_ret}")
    return problems


def test_every_protocol_method_exists_on_engine_with_a_compatible_signature():
    problems = signature_problems(Engine)
    assert not problems, "\n".join(problems)


def test_the_fake_engine_of_the_tests_satisfies_the_protocol_too():
    problems = signature_problems(FakeEngine)
    assert not problems, "\n".join(problems)
    assert isinstance(FakeEngine("m"), EngineAPI)


def test_the_signature_check_can_fail():
    class Drifted(FakeEngine):
        def sample(self, sampler_id, prompt_tokens, num_samples, config, prompt_logprobs=True):  # type: ignore[override]
            raise NotImplementedError

        def optim_step(self, adapter_id: str, adam) -> dict:  # type: ignore[override]
            raise NotImplementedError

    problems = "\n".join(signature_problems(Drifted))
    assert "Drifted.sample lacks parameter 'topk_prompt_logprobs'" in problems
    assert "Drifted.sample(prompt_logprobs) defaults to True" in problems
    assert "Drifted.optim_step returns" in problems


def test_a_real_engine_is_an_engine_api(tiny_engine):
    assert isinstance(tiny_engine, EngineAPI)  # runtime_checkable: every member is present
    assert isinstance(tiny_engine.vocab_size, int)
    assert tiny_engine.max_len is None or isinstance(tiny_engine.max_len, int)


def test_a_partial_engine_is_not_an_engine_api():
    class Partial:
        vocab_size = 10
        max_len = None

        def sample(self, *a, **k):  # the rest is missing
            raise NotImplementedError

    assert not isinstance(Partial(), EngineAPI)


def is_engine(expr: ast.expr) -> bool:
    return (isinstance(expr, ast.Name) and expr.id in ("engine", "eng")) or (
        isinstance(expr, ast.Attribute) and expr.attr == "engine")


def engine_calls_in_server() -> set[str]:
    """Names the server's modules use on engine objects: `<x>.engine.NAME`, `engine.NAME`,
    `eng.NAME`, and every getattr probe (which the Protocol replaces, so there must be none)."""
    used: set[str] = set()
    for path in SERVER.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and is_engine(node.value):
                used.add(node.attr)
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                    and node.args and is_engine(node.args[0])):
                used.add(f"probe:{ast.unparse(node)}")
    return used


def test_the_server_uses_only_protocol_members_on_engines():
    allowed = set(protocol_methods()) | set(protocol_attributes())
    used = engine_calls_in_server()
    assert {"sample", "forward_backward", "optim_step"} <= used  # the scan sees the calls
    assert used <= allowed, f"server code uses engine members outside EngineAPI: {sorted(used - allowed)}"
