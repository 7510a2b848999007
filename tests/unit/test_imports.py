"""The package's imports flow one way: no module imports one that imports it back, however
indirectly, counting imports inside functions (the ones that hid circles before)."""

from __future__ import annotations

import ast
from pathlib import Path

import aigc_ray

PACKAGE = Path(aigc_ray.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports anywhere in its source."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from aigc_ray.serve import app` may name a submodule, not an attribute.
                targets |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_circles():
    graph = import_graph()
    assert "aigc_ray.train" in graph and "aigc_ray.serve.app" in graph  # the walk found them
    assert circles(graph) == []


def test_the_circle_finder_finds_a_hidden_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_training_imports_nothing_above_it():
    graph = import_graph()
    above = {"aigc_ray.evaluate", "aigc_ray.tune", "aigc_ray.generate", "aigc_ray.cli",
             "aigc_ray.jobs", "aigc_ray.decode"} | {m for m in graph if m.startswith("aigc_ray.serve")}
    assert graph["aigc_ray.train"] & above == set()
    assert graph["aigc_ray.data"] & {"aigc_ray.model", "aigc_ray.train"} == set()
