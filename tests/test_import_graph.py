"""The import graph of trainer/ and launchers/ has no circles, counting imports inside functions too.

Read from the source with ast (nothing is imported): every `import x` / `from x import y` anywhere in a module,
and every `importlib.import_module("x")` with a literal name, is an edge; `from pkg import mod` is an edge to the
submodule when one exists. A circle would mean two modules that only work through imports hidden in functions.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

from tests.conftest import REPO

PACKAGES = ("trainer", "launchers")


def module_files() -> Dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports_of(path: Path, modules: Set[str], name: str) -> Set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges: Set[str] = set()

    def add(target: str) -> None:
        while target and target not in modules:  # a name inside a module: the module itself
            target = target.rpartition(".")[0]
        if target and target != name:
            edges.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base
                                                                                                   else []))
            for alias in node.names:
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            add(node.args[0].value)
    return edges


def graph() -> Dict[str, Set[str]]:
    files = module_files()
    names = set(files)
    return {name: imports_of(path, names, name) for name, path in files.items()}


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_circles() -> None:
    edges = graph()
    assert len(edges) > 40 and edges["trainer.entry"] >= {"launchers", "trainer.plan", "trainer.validate"}
    assert cycles(edges) == [], cycles(edges)


def test_the_checker_sees_a_circle_through_a_function_level_import() -> None:
    """The checker itself: two modules that import each other, one of them inside a function."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    source = ("def f():\n    from trainer import plan\n    import importlib\n"
              "    importlib.import_module('trainer.run')\n")
    path = REPO / ".pytest_cache" / "probe_module.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(source)
    assert imports_of(path, {"trainer.plan", "trainer.run", "trainer"}, "x.y") == {"trainer.plan", "trainer.run"}


def test_rules_know_nothing_of_the_project_and_launchers_never_import_the_entry() -> None:
    edges = graph()
    assert edges["trainer.rules"] == set()
    for name, targets in edges.items():
        if name.startswith("launchers"):
            assert not targets & {"trainer.entry", "trainer.cli"}, (name, targets)
    # A rank reads the plan and trains: it never reaches composition or validation.
    reachable, todo = set(), ["trainer.rank"]
    while todo:
        for nxt in edges[todo.pop()] - reachable:
            reachable.add(nxt)
            todo.append(nxt)
    assert not reachable & {"trainer.compose", "trainer.validate", "trainer.entry", "trainer.overrides",
                            "trainer.plan"}, reachable
