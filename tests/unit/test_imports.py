"""The package's imports flow one way: no module imports one that imports it back, however
indirectly, counting imports inside functions (the ones that hid circles before)."""

from __future__ import annotations

import ast
import subprocess
import sys
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


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every package module `start` imports, however indirectly."""
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def outside_imports(module: str) -> set[str]:
    """The top-level names of the non-package modules one module imports anywhere."""
    path = PACKAGE.parent.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names - {"aigc_ray"}


def wing(graph: dict[str, set[str]], name: str) -> set[str]:
    return {m for m in graph if m == f"aigc_ray.{name}" or m.startswith(f"aigc_ray.{name}.")}


def test_the_wings_are_where_the_design_puts_them():
    graph = import_graph()
    for name, modules in {
        "data": {"files", "read", "chat", "pack", "cache", "pipeline", "sample"},
        "train": {"driver", "loop", "feed", "prepare", "sharding", "loss", "export", "metrics",
                  "trackers", "profile"},
        "decode": {"request", "sampling", "engine", "graphs"},
        "serve": {"api", "ingress", "replica", "app"},
    }.items():
        assert wing(graph, name) == {f"aigc_ray.{name}"} | {f"aigc_ray.{name}.{m}" for m in modules}


def test_training_imports_nothing_above_it():
    graph = import_graph()
    above = ({"aigc_ray.evaluate", "aigc_ray.tune", "aigc_ray.generate", "aigc_ray.cli",
              "aigc_ray.jobs"} | wing(graph, "decode") | wing(graph, "serve"))
    for module in wing(graph, "train"):
        assert reachable(graph, module) & above == set(), module


def test_data_never_imports_training_or_the_model():
    graph = import_graph()
    for module in wing(graph, "data"):
        assert reachable(graph, module) & ({"aigc_ray.model"} | wing(graph, "train")) == set(), module


def test_the_decode_wing_imports_no_ray():
    graph = import_graph()
    for module in wing(graph, "decode"):
        used = {module} | reachable(graph, module)
        assert not any("ray" in outside_imports(m) for m in used), module


def test_the_wire_format_loads_no_torch_and_the_cli_no_ray():
    """What the ingress imports (the OpenAI schema and the request contract) runs in a process
    with no torch; `aigc-ray --help` starts without importing Ray or torch."""
    script = ("import sys, aigc_ray.serve.api, aigc_ray.serve.ingress, aigc_ray.decode.request;"
              "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    script = ("import contextlib, io, sys\n"
              "from aigc_ray.cli import main\n"
              "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
              "    main(['--help'])\n"
              "print('ray' in sys.modules or 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
