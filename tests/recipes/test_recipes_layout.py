"""The recipes' layering, read from the source like test_import_graph (support/import_graph.py):
held-out evaluation and the run files never reach a trainer, envs never reach the recipes, and the
two trainers (the low-level ReBN loop and the cookbook adapter) do not depend on each other."""

from __future__ import annotations

import pytest

from support.import_graph import import_graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


GRAPH = import_graph()


def modules_under(prefix: str) -> list[str]:
    found = sorted(m for m in GRAPH if m == prefix or m.startswith(prefix + "."))
    assert found, f"no module under {prefix}: was it moved?"
    return found


@pytest.mark.parametrize(
    ("prefix", "forbidden"),
    [
        ("gemtinker.recipes.evaluation", ("gemtinker.recipes.rebn", "gemtinker.recipes.cookbook")),
        ("gemtinker.recipes.runs", ("gemtinker.recipes.rebn", "gemtinker.recipes.cookbook")),
        ("gemtinker.envs", ("gemtinker.recipes", "gemtinker.cli")),
        ("gemtinker.recipes.cookbook", ("gemtinker.recipes.rebn", "gemtinker.cli")),
        ("gemtinker.recipes.rebn", ("gemtinker.recipes.cookbook", "gemtinker.cli")),
    ],
)
def test_layer_does_not_reach(prefix: str, forbidden: tuple[str, ...]) -> None:
    for module in modules_under(prefix):
        bad = sorted(m for m in reachable(GRAPH, module) if any(m == f or m.startswith(f + ".") for f in forbidden))
        assert not bad, f"{module} reaches {bad}"


def test_the_check_sees_a_forbidden_edge() -> None:
    assert "gemtinker.recipes.rebn.config" in reachable(GRAPH, "gemtinker.cli.train")
