"""No import cycles among the modules of src/gemtinker (the graph: support/import_graph.py)."""

from __future__ import annotations

from support.import_graph import a_cycle, cycles, import_graph


def test_the_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "gemtinker.server.store" in graph["gemtinker.server.service"]  # `from .store import ...`
    assert "gemtinker.engine.engine" in graph["gemtinker.server.engines"]  # inside a function
    found = cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert found == [["a", "b", "c"]]


def test_no_import_cycles_in_src():
    graph = import_graph()
    found = cycles(graph)
    described = [" -> ".join(a_cycle(graph, c)) + f"   (component: {', '.join(c)})" for c in found]
    assert not found, "import cycles in src/gemtinker:\n" + "\n".join(described)
